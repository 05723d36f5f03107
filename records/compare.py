#!/usr/bin/env python3
"""Compare two speedrun records: code diff, per-run numbers, significance, curves.

    python records/compare.py A B [--target 3.28] [--json] [--plot out.png]

A and B are each a run log or a folder of run logs (several seeds of one configuration).
A run log is the speedrun format: the script's source, a line of 100 '=', the environment
(ours adds a 'Hyperparameters:' block of --name=value lines), another line of 100 '=',
then 'step:s/N val_loss:... train_time:...ms step_avg:...ms' and
'step:s/N train_loss:... train_time:...ms step_avg:...ms' lines. Problems with a log are
warnings on stderr naming the file; a file that is no run log at all is refused.
"""
import argparse
import difflib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

DIVIDER = "=" * 100
KNOWN = ("summary:", "peak memory", "resumed_from:", "stopped:", "checkpoint:", DIVIDER)  # recognised non-step lines
LOG_SUFFIXES = (".txt", ".log")
NAN = math.nan


class NotARunLog(Exception):
    pass


def warn(path, msg):
    print(f"{path}: warning: {msg}", file=sys.stderr)


def num(text):
    try:
        return float(text.removesuffix("ms"))
    except ValueError:
        return NAN


def finite(x):
    return x is not None and math.isfinite(x)


@dataclass
class Run:
    path: str
    source: list = field(default_factory=list)
    hparams: dict = field(default_factory=dict)
    val: list = field(default_factory=list)  # (step, loss, train_time_ms), sorted by step
    train: list = field(default_factory=list)
    last_step: int = -1
    total_steps: int = 0  # N of step:s/N
    train_time_ms: float = NAN
    ms_per_step: float = NAN
    last_val: float = NAN
    complete: bool = False  # has a val line at step N
    target_step: int = None
    target_time_ms: float = None

    @property
    def final_val(self):
        return self.last_val if self.complete else NAN


def parse_log(path, target):
    """Parse one run log into a Run; warn (naming the file) about anything odd in it."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:65536]:
        raise NotARunLog(f"{path} is not a run log (binary data)")
    lines = raw.decode("utf-8", errors="replace").splitlines()  # also handles \r\n
    cuts = [i for i, line in enumerate(lines) if line.rstrip() == DIVIDER][:2]
    if not cuts and not any(line.startswith("step:") for line in lines):
        raise NotARunLog(f"{path} is not a run log (no line of 100 '=' and no 'step:' lines)")
    run = Run(path)
    if not cuts:
        warn(path, "no line of 100 '=': no script source or environment in this log")
    elif len(cuts) == 1:
        warn(path, "only one line of 100 '=': environment not separated from the steps")
    run.source = lines[: cuts[0]] if cuts else []
    env = lines[cuts[0] + 1 : cuts[1]] if len(cuts) == 2 else []
    run.hparams = dict(line[2:].split("=", 1) for line in env if line.startswith("--") and "=" in line)

    last, bad, unknown, stopped = None, [], [], ""
    for line in lines[cuts[-1] + 1 :] if cuts else lines:
        if line.startswith("step:"):
            f = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            key = "val_loss" if "val_loss" in f else "train_loss"
            try:
                s, n = (int(x) for x in f["step"].split("/"))
                point = (s, num(f[key]), num(f.get("train_time", "nan")), num(f.get("step_avg", "nan")))
            except (KeyError, ValueError):
                bad.append(line)
                continue
            (run.val if key == "val_loss" else run.train).append(point[:3])
            last = point, n
        elif line.strip() and not line.startswith(KNOWN):
            unknown.append(line)
        elif line.startswith("stopped:"):
            stopped = f" ({line.strip()})"

    if bad:
        warn(path, f"{len(bad)} malformed step line(s) ignored, first: {bad[0][:70]!r}")
    if unknown:
        warn(path, f"{len(unknown)} unrecognised line(s) ignored, first: {unknown[0][:70]!r}")
    nonfinite = sorted(p[0] for p in run.val + run.train if not math.isfinite(p[1]))
    if nonfinite:
        warn(path, f"NaN/inf loss at step {nonfinite[0]} ({len(nonfinite)} line(s))")
    if last is None:
        warn(path, "no step lines: the run logged nothing")
        return run
    if not run.val:
        warn(path, "train-loss lines only: no val_loss lines")
    (s, _, t, avg), run.total_steps = last
    run.last_step, run.train_time_ms = s, t
    untimed = run.hparams.get("untimed_steps", "10")
    untimed = int(untimed) if untimed.isdigit() else 10  # the speedrun leaves the first 10 steps untimed
    run.ms_per_step = avg if math.isfinite(avg) else (t / (s - untimed) if s > untimed else NAN)
    run.val.sort(key=lambda p: p[0])
    run.train.sort(key=lambda p: p[0])
    if run.val:
        run.last_val = run.val[-1][1]
        run.complete = run.val[-1][0] >= run.total_steps
    if not run.complete:
        early = f"ended early at step {s} of {run.total_steps}: " if s < run.total_steps else ""
        warn(path, f"{early}no val loss at the final step {run.total_steps}{stopped}")
    hit = next((p for p in run.val if p[1] <= target), None)
    if hit:
        run.target_step, run.target_time_ms = hit[0], hit[2]
    return run


def load_side(path, target):
    """A log file, or a folder of logs (*.txt, *.log; other files such as README.md are skipped)."""
    if os.path.isfile(path):
        try:
            return [parse_log(path, target)]
        except NotARunLog as e:
            raise SystemExit(f"compare.py: {e}")
    if not os.path.isdir(path):
        raise SystemExit(f"compare.py: {path}: no such file or folder")
    runs = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(LOG_SUFFIXES) and os.path.isfile(full):
            try:
                runs.append(parse_log(full, target))
            except NotARunLog as e:
                warn(full, f"skipped: {e}")
    if not runs:
        raise SystemExit(f"compare.py: {path}: no run logs (*.txt, *.log) in this folder")
    if any(r.source != runs[0].source for r in runs):
        warn(path, "runs have different script sources; the code diff uses the first finished run")
    return runs


def describe(xs):
    import numpy as np

    xs = np.array([x for x in xs if finite(x)], dtype=float)
    return {"mean": xs.mean() if xs.size else None, "std": xs.std(ddof=1) if xs.size > 1 else None, "n": int(xs.size)}


def side_report(path, runs, target):
    from scipy import stats

    done = [r for r in runs if r.complete and finite(r.final_val)]
    if len(done) < len(runs):
        warn(path, f"{len(runs) - len(done)} of {len(runs)} run(s) left out of val-loss and train-time "
                   "statistics (ended early or non-finite loss)")
    vals = [r.final_val for r in done]
    test = {"t": None, "p": None, "verdict": f"needs >= 2 finished runs (has {len(vals)})"}
    if len(vals) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.ttest_1samp(vals, target, alternative="less")
        test = {"t": float(res.statistic), "p": float(res.pvalue)}
        test["verdict"] = f"mean < {target} with p < 0.01" if res.pvalue < 0.01 else "not significant (p >= 0.01)"
    return {
        "path": path,
        "runs": [{"file": r.path, "steps": r.last_step, "total_steps": r.total_steps, "complete": r.complete,
                  "val_loss": r.last_val, "train_time_ms": r.train_time_ms, "ms_per_step": r.ms_per_step,
                  "target_step": r.target_step, "target_time_ms": r.target_time_ms} for r in runs],
        "stats": {"val_loss": describe(vals), "train_time_ms": describe([r.train_time_ms for r in done]),
                  "ms_per_step": describe([r.ms_per_step for r in runs]),
                  "target_step": describe([r.target_step for r in runs]),
                  "target_time_ms": describe([r.target_time_ms for r in runs])},
        "below_target_test": test,
    }


def build_report(a_path, a_runs, b_path, b_runs, target):
    from scipy import stats

    ra, rb = side_report(a_path, a_runs, target), side_report(b_path, b_runs, target)
    ra0, rb0 = (next((r for r in runs if r.complete), runs[0]) for runs in (a_runs, b_runs))  # first finished run
    diff = "\n".join(difflib.unified_diff(ra0.source, rb0.source, ra0.path, rb0.path, lineterm=""))
    ha, hb = ra0.hparams, rb0.hparams
    hdiff = {k: [ha.get(k), hb.get(k)] for k in {**ha, **hb} if ha.get(k) != hb.get(k)}

    def ratio(key):
        ma, mb = ra["stats"][key]["mean"], rb["stats"][key]["mean"]
        return mb / ma if finite(ma) and finite(mb) and ma else None

    va = [r["val_loss"] for r in ra["runs"] if r["complete"] and finite(r["val_loss"])]
    vb = [r["val_loss"] for r in rb["runs"] if r["complete"] and finite(r["val_loss"])]
    welch = {"t": None, "p": None, "mean_diff": None}
    if len(va) >= 2 and len(vb) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.ttest_ind(vb, va, equal_var=False)
        welch = {"t": float(res.statistic), "p": float(res.pvalue), "mean_diff": sum(vb) / len(vb) - sum(va) / len(va)}
    return {"target": target, "a": ra, "b": rb, "code_diff": diff, "hyperparameter_diff": hdiff,
            "comparison": {"train_time_ratio": ratio("train_time_ms"), "ms_per_step_ratio": ratio("ms_per_step"),
                           "welch_val_loss": welch}}


def fmt(x, spec=".4f", scale=1.0, unit=""):
    return f"{x * scale:{spec}}{unit}" if finite(x) else "-"


def table(rows, indent="  "):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                                         enumerate(zip(r, widths))).rstrip() for r in rows)


def render(rep):
    tgt, out = rep["target"], []
    out.append(f"== code diff (first finished run of each side) ==\n{rep['code_diff'] or '  (script sources identical)'}")
    if rep["hyperparameter_diff"]:
        out.append("== hyperparameters (A -> B) ==\n" + table(
            [[k, "", "-" if a is None else a, "->", "-" if b is None else b] for k, (a, b) in sorted(rep["hyperparameter_diff"].items())]))
    rows = [["side", "run", "steps", "val_loss", "train_time", "ms/step", f"step@{tgt}", f"time@{tgt}"]]
    for side in "ab":
        for r in rep[side]["runs"]:
            steps = f"{r['steps']}/{r['total_steps']}" + ("" if r["complete"] else " early")
            rows.append([side.upper(), os.path.basename(r["file"])[:28], steps, fmt(r["val_loss"]),
                         fmt(r["train_time_ms"], ".1f", 1e-3, "s"), fmt(r["ms_per_step"], ".2f"),
                         str(r["target_step"]) if r["target_step"] is not None else "-",
                         fmt(r["target_time_ms"], ".1f", 1e-3, "s")])
    out.append("== runs ==\n" + table(rows))

    def cell(s, spec, scale=1.0, unit=""):
        return f"{fmt(s['mean'], spec, scale, unit)} ± {fmt(s['std'], spec, scale, unit)} (n={s['n']})"

    rows = [["", "", "A: " + rep["a"]["path"], "B: " + rep["b"]["path"]]]
    for key, label, spec, scale, unit in [("val_loss", "final val loss", ".4f", 1, ""),
                                          ("train_time_ms", "train time", ".1f", 1e-3, "s"),
                                          ("ms_per_step", "ms/step", ".2f", 1, ""),
                                          ("target_step", f"step@{tgt}", ".0f", 1, ""),
                                          ("target_time_ms", f"time@{tgt}", ".1f", 1e-3, "s")]:
        rows.append([label, "", *(cell(rep[s]["stats"][key], spec, scale, unit) for s in "ab")])
    out.append("== sides: mean ± std (n) ==\n" + table(rows))
    c, w = rep["comparison"], rep["comparison"]["welch_val_loss"]
    lines = [f"train time B/A: {fmt(c['train_time_ratio'], '.4f')}   ms/step B/A: {fmt(c['ms_per_step_ratio'], '.4f')}",
             f"Welch t-test, final val loss B - A = {fmt(w['mean_diff'], '+.4f')}: "
             f"t = {fmt(w['t'], '.3f')}, p = {fmt(w['p'], '.3g')} (two-sided)"]
    for s in "ab":
        t = rep[s]["below_target_test"]
        lines.append(f"{s.upper()}: mean final val < {tgt}: t = {fmt(t['t'], '.3f')}, p = {fmt(t['p'], '.3g')}"
                     f" (one-sided) -> {t['verdict']}")
    out.append("== comparison ==\n" + "\n".join("  " + line for line in lines))
    return "\n\n".join(out)


def plot(sides, target, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    tops, lows = [], []
    for (name, runs), color in zip(sides, ("tab:blue", "tab:orange")):
        label = f"{name} ({len(runs)} run{'s' * (len(runs) > 1)})"
        for r in runs:
            pts = [p for p in r.val if math.isfinite(p[1])]
            if not pts:
                continue
            steps, losses, times = zip(*pts)
            lows.append(min(losses))
            tops.append(max(losses[1:] if len(losses) > 2 else losses))  # skip the step-0 loss (ln V) if we can
            style = dict(color=color, lw=1.2, alpha=0.8, marker="." if len(pts) <= 80 else None, label=label)
            axes[0].plot(steps, losses, **style)
            axes[1].plot([t / 1000 for t in times], losses, **style)
            label = None
    for ax, xlabel in zip(axes, ("step", "train time (s)")):
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target}")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=10))  # the zoom below spans < 1.5x: plain ticks read best
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"val loss vs {xlabel}")
    axes[0].set_ylabel("val loss (log scale)")
    if lows:  # zoom on the end game: at most 50% above the lowest loss, the target in view if it is near
        lo = min(lows) if target < min(lows) / 1.2 else min(lows + [target])
        axes[0].set_ylim(lo * 0.99, min(max(tops), lo * 1.5) * 1.01)
    axes[1].legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [jsonable(v) for v in x]
    if hasattr(x, "item"):  # numpy scalar
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compare two speedrun records (log files or folders of logs).")
    ap.add_argument("a", help="baseline: a run log or a folder of run logs")
    ap.add_argument("b", help="candidate: a run log or a folder of run logs")
    ap.add_argument("--target", type=float, default=3.28, help="val loss target (default 3.28)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    ap.add_argument("--plot", metavar="OUT.png", help="draw val loss against step and train time")
    args = ap.parse_args(argv)
    a_runs, b_runs = load_side(args.a, args.target), load_side(args.b, args.target)
    report = jsonable(build_report(args.a, a_runs, args.b, b_runs, args.target))
    print(json.dumps(report, indent=2) if args.json else render(report))
    if args.plot:
        plot([("A: " + args.a, a_runs), ("B: " + args.b, b_runs)], args.target, args.plot)
        print(f"compare.py: wrote {args.plot}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
