#!/usr/bin/env python3
"""Compare speedrun records: code diff, machines, per-run numbers, significance, run planner, curves.

    python records/compare.py A B [--target 3.28] [--pool] [--json | --markdown] [--plot out.png]
    python records/compare.py BASE V1 V2 ...      one row per variant against the base

Each side is a run log or a folder of run logs (several seeds of one configuration). Two
layouts are read: the public speedrun's (a line of 100 '=', the script's source, '=', the
environment with nvidia-smi, '=', the step lines, 'peak memory consumption: N MiB') and ours
(no first '=' line, a 'Hyperparameters:' block of --name=value lines in the environment, a
last 'summary:' line). Problems with a log are warnings on stderr naming the file; a file
that is no run log at all is refused.
"""

import difflib
import itertools
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.flags import FlagParser  # noqa: E402  one-line errors, no abbreviations, as every tool of the project

DIVIDER = "=" * 100
KNOWN = ("summary:", "peak memory", "resumed_from:", "stopped:", "checkpoint:")  # recognised non-step lines
LOG_SUFFIXES = (".txt", ".log")
# Per-run bookkeeping flags: runs that differ only in these are one configuration.
RUN_FLAGS = {
    "seed",
    "run_name",
    "records_dir",
    "checkpoint_dir",
    "save_every",
    "save_every_minutes",
    "keep_checkpoints",
    "resume",
    "memory_limit_gb",
    "progress_seconds",
}
# A GPU row of the nvidia-smi table: "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:19:00.0 Off |".
GPU_ROW = re.compile(r"^\|\s+\d+\s+(.+?)\s+(?:On|Off)\s+\|\s+[0-9A-Fa-f]+:[0-9A-Fa-f]+:")
ALPHA = 0.01  # the speedrun's significance level for a record claim
ZOOM_ABOVE_TARGET = 0.12  # the zoomed plot panels show val loss up to target + this (3.4 for 3.28)
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


@dataclass(eq=False)  # a run is itself: `run in runs` compares identity, not every field
class Run:
    path: str
    source: list = field(default_factory=list)
    hparams: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # python, pytorch, cuda, gpu, gpus, cpu, world_size, device
    val: list = field(default_factory=list)  # (step, loss, train_time_ms), sorted by step
    train: list = field(default_factory=list)
    last_step: int = -1
    total_steps: int = 0  # N of step:s/N
    train_time_ms: float = NAN
    ms_per_step: float = NAN
    last_val: float = NAN
    complete: bool = False  # has a val line at step N, and the log is not cut off
    target_step: float = None  # where the val curve crosses the target, interpolated
    target_time_ms: float = None

    @property
    def final_val(self):
        return self.last_val if self.complete else NAN

    @property
    def config(self):
        """What makes two runs one configuration: script, hyperparameters (not RUN_FLAGS) and total steps."""
        return (
            tuple(self.source),
            tuple(sorted(kv for kv in self.hparams.items() if kv[0] not in RUN_FLAGS)),
            self.total_steps,
        )

    @property
    def machine(self):
        """'8x NVIDIA H100 80GB HBM3', or None when the log does not say."""
        name = self.env.get("gpu") or self.env.get("cpu") or self.env.get("device")
        return name and f"{self.env.get('world_size') or self.env.get('gpus') or 1}x {name}"

    @property
    def setup(self):
        """Machine and software, the things that make timings comparable."""
        cuda = self.env.get("cuda", "none")
        return ", ".join(
            [self.machine or "machine unknown", f"PyTorch {self.env.get('pytorch', 'unknown')}"]
            + ([f"CUDA {cuda}"] if cuda.lower() != "none" else [])
        )  # a CPU build says None


def parse_environment(lines):
    env, gpus = {}, []
    for line in lines:
        if m := re.match(r"Running pytorch (\S+) compiled for CUDA (\S+)", line, re.I):
            env["pytorch"], env["cuda"] = m[1], m[2]
        elif m := re.match(r"Running Python (\S+)", line, re.I):
            env["python"] = m[1]
        elif line.startswith("CPU: "):
            env["cpu"] = "CPU " + line[5:].strip()
        elif m := GPU_ROW.match(line):
            gpus.append(m[1])
    if gpus:
        env["gpu"], env["gpus"] = " + ".join(sorted(set(gpus))), len(gpus)
    return env


def split_layout(path, lines):
    """(source, environment, step section) of either layout: the last two '=' lines enclose the environment."""
    cuts = [i for i, line in enumerate(lines) if line.rstrip() == DIVIDER]
    if cuts and cuts[0] == 0:  # the public layout opens with a '=' line before the source
        lines, cuts = lines[1:], [c - 1 for c in cuts[1:]]
    if not cuts:
        warn(path, "no line of 100 '=': no script source or environment in this log")
        return [], [], lines
    if len(cuts) == 1:
        warn(path, "only one line of 100 '=': environment not separated from the steps")
        return lines[: cuts[0]], [], lines[cuts[0] + 1 :]
    return lines[: cuts[-2]], lines[cuts[-2] + 1 : cuts[-1]], lines[cuts[-1] + 1 :]


def parse_log(path, target):
    """Parse one run log into a Run; warn (naming the file) about anything odd in it."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:65536]:
        raise NotARunLog(f"{path} is not a run log (binary data)")
    lines = raw.decode("utf-8", errors="replace").splitlines()  # also handles \r\n
    if not any(line.rstrip() == DIVIDER or line.startswith("step:") for line in lines):
        raise NotARunLog(f"{path} is not a run log (no line of 100 '=' and no 'step:' lines)")
    # A run killed mid-write leaves a last line without its newline: its number may be cut short.
    cut_off = not raw.endswith(b"\n") and not any(line.startswith("summary:") for line in lines)
    if cut_off:
        warn(
            path,
            f"the log ends mid-line ({lines[-1][-40:]!r}, no newline, no summary: line): the run was cut "
            "off while writing; that line is ignored and the run counts as incomplete",
        )
        lines = lines[:-1]
    run = Run(path)
    run.source, env, steps = split_layout(path, lines)
    run.env = parse_environment(env)
    flags = env[env.index("Hyperparameters:") + 1 :] if "Hyperparameters:" in env else []
    # The block ends at the first other line: notes below it may start with -- too.
    run.hparams = dict(
        line[2:].split("=", 1)
        for line in itertools.takewhile(lambda x: x.startswith("--"), flags)
        if "=" in line
    )

    last, bad, unknown, stopped = None, [], [], ""
    for line in steps:
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
        elif line.startswith("summary:"):
            if m := re.search(r"world_size:(\d+)", line):
                run.env["world_size"] = int(m[1])
            if m := re.search(r"device:(.+)$", line):
                run.env["device"] = m[1].strip()
        elif line.startswith("stopped:"):
            stopped = f" ({line.strip()})"
        elif line.strip() and not line.startswith(KNOWN):
            unknown.append(line)

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
        run.complete = run.val[-1][0] >= run.total_steps and not cut_off
    if not run.complete and not cut_off:
        early = f"ended early at step {s} of {run.total_steps}: " if s < run.total_steps else ""
        warn(path, f"{early}no val loss at the final step {run.total_steps}{stopped}")
    run.target_step, run.target_time_ms = crossing(run.val, target)
    return run


def crossing(val, target):
    """(step, train time) where the val curve first reaches target, linear between the two val points around it."""
    before = None
    for point in val:
        if point[1] <= target:
            if before is None or not math.isfinite(before[1]):
                return float(point[0]), point[2]
            frac = (before[1] - target) / (before[1] - point[1])
            return tuple(b + frac * (p - b) for b, p in ((before[0], point[0]), (before[2], point[2])))
        before = point
    return None, None


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
    return runs


def differences(run, other):
    """What sets run's configuration apart from other's: 'source', flag names, 'total steps'."""
    ha, hb = run.hparams, other.hparams
    flags = sorted(k for k in {**ha, **hb} if k not in RUN_FLAGS and ha.get(k) != hb.get(k))
    return (
        (["source"] if run.source != other.source else [])
        + flags
        + (
            [f"total steps {run.total_steps} vs {other.total_steps}"]
            if run.total_steps != other.total_steps
            else []
        )
    )


def pick_runs(path, runs, pool):
    """(runs the statistics use, configurations): the first finished run's configuration unless pooled."""
    groups = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    first = next((r for r in runs if r.complete), runs[0])
    groups = sorted(groups.values(), key=lambda g: first not in g)  # the first finished run's comes first
    if len(groups) == 1:
        return runs, groups
    listing = "".join(
        f"\n  configuration {i}: {len(g)} run(s)"
        + (f", differs from 1 in {', '.join(differences(g[0], groups[0][0]))}" if i > 1 else "")
        + f": {', '.join(os.path.basename(r.path) for r in g)}"
        for i, g in enumerate(groups, 1)
    )
    used = runs if pool else groups[0]
    use = (
        "--pool: statistics pool them all"
        if pool
        else "statistics use configuration 1, the first finished run's (--pool pools them)"
    )
    warn(
        path,
        f"{len(runs)} runs hold {len(groups)} configurations (script source, hyperparameters or total steps "
        f"differ); {use}:{listing}",
    )
    return used, groups


def describe(xs):
    import numpy as np

    xs = np.array([x for x in xs if finite(x)], dtype=float)
    return {
        "mean": xs.mean() if xs.size else None,
        "std": xs.std(ddof=1) if xs.size > 1 else None,
        "n": int(xs.size),
    }


def p_below(vals, target):
    """(t, p) of the one-sided one-sample t-test 'mean < target'."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical values (std 0) give t = +-inf, which is right here
        res = stats.ttest_1samp(vals, target, alternative="less")
    return float(res.statistic), float(res.pvalue)


def runs_needed(mean, std, target):
    """Smallest n for which the one-sided test at this mean and std gives p < ALPHA; None if no n does."""
    from scipy import stats

    if not mean < target:
        return None
    if std == 0:
        return 2

    def p(n):
        return stats.t.cdf((mean - target) / (std / math.sqrt(n)), n - 1)

    n = 2
    while p(n) >= ALPHA:  # p falls as n grows: double, then bisect
        n *= 2
    low = n // 2  # p(low) >= ALPHA, or low = 1
    while n - low > 1:
        mid = (low + n) // 2
        low, n = (low, mid) if p(mid) < ALPHA else (mid, n)
    return n


def val_by_step(runs):
    """{step: [(loss, train_time_ms) of each run]} over the val steps where every run has a finite loss."""
    per_run = [{s: (v, t) for s, v, t in r.val if math.isfinite(v)} for r in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    return {s: [d[s] for d in per_run] for s in steps}


def earliest_significant_step(runs, target):
    """The first val step at which the runs' losses are below target with p < ALPHA, or None."""
    return next(
        (
            s
            for s, points in val_by_step(runs).items()
            if len(points) >= 2 and p_below([v for v, _ in points], target)[1] < ALPHA
        ),
        None,
    )


def side_report(path, runs, target, pool):
    """The numbers of one side, and the runs its statistics use."""
    used, groups = pick_runs(path, runs, pool)
    done = [r for r in used if r.complete and finite(r.final_val)]
    if len(done) < len(used):
        warn(
            path,
            f"{len(used) - len(done)} of {len(used)} run(s) left out of val-loss and train-time "
            "statistics (ended early, cut off or non-finite loss)",
        )
    vals = [r.final_val for r in done]
    test = {"t": None, "p": None, "verdict": f"needs >= 2 finished runs (has {len(vals)})"}
    plan = {"runs_needed": None, "note": f"needs >= 2 finished runs to measure the spread (has {len(vals)})"}
    if len(vals) >= 2:
        test["t"], test["p"] = p_below(vals, target)
        significant = test["p"] < ALPHA
        test["verdict"] = (
            f"mean < {target} with p < {ALPHA}" if significant else f"not significant (p >= {ALPHA})"
        )
        st = describe(vals)
        plan["runs_needed"] = runs_needed(st["mean"], st["std"], target)
        if plan["runs_needed"] is None:
            plan["note"] = (
                f"mean {st['mean']:.4f} is not below {target}: no number of runs will give p < {ALPHA}"
            )
        else:
            more = max(0, plan["runs_needed"] - len(vals))
            plan["note"] = (
                f"p = {test['p']:.3g} now with {len(vals)} runs; p < {ALPHA} needs "
                f"{plan['runs_needed']} runs at this mean and std{f' ({more} more)' if more else ''}"
            )
    setups = {}
    for r in used:
        setups[r.setup] = setups.get(r.setup, 0) + 1
    return {
        "path": path,
        "environment": [{"setup": s, "runs": n} for s, n in setups.items()],
        "configurations": [[r.path for r in g] for g in groups],
        "runs": [
            {
                "file": r.path,
                "configuration": next(i for i, g in enumerate(groups, 1) if r in g),
                "used": r in used,
                "steps": r.last_step,
                "total_steps": r.total_steps,
                "complete": r.complete,
                "val_loss": r.last_val,
                "train_time_ms": r.train_time_ms,
                "ms_per_step": r.ms_per_step,
                "target_step": r.target_step,
                "target_time_ms": r.target_time_ms,
            }
            for r in runs
        ],
        "stats": {
            "val_loss": describe(vals),
            "train_time_ms": describe([r.train_time_ms for r in done]),
            "ms_per_step": describe([r.ms_per_step for r in used]),
            "target_step": describe([r.target_step for r in used]),
            "target_time_ms": describe([r.target_time_ms for r in used]),
        },
        "below_target_test": test,
        "planner": plan,
        "earliest_significant_step": earliest_significant_step(done, target),
    }, used


def compare_sides(ra, used_a, rb, used_b):
    """B against A: code and flag diff, machines, time ratios, Welch's t-test on final val loss."""
    from scipy import stats

    a0, b0 = (
        next((r for r in used if r.complete), used[0]) for used in (used_a, used_b)
    )  # first finished run
    diff = "\n".join(difflib.unified_diff(a0.source, b0.source, a0.path, b0.path, lineterm=""))
    ha, hb = a0.hparams, b0.hparams
    hdiff = {k: [ha.get(k), hb.get(k)] for k in {**ha, **hb} if k not in RUN_FLAGS and ha.get(k) != hb.get(k)}
    sa, sb = ra["stats"], rb["stats"]

    def ratio(key):
        ma, mb = sa[key]["mean"], sb[key]["mean"]
        return mb / ma if finite(ma) and finite(mb) and ma else None

    va, vb = ([r.final_val for r in used if finite(r.final_val)] for used in (used_a, used_b))
    welch = {"t": None, "p": None, "mean_diff": None}
    if va and vb:
        welch["mean_diff"] = sum(vb) / len(vb) - sum(va) / len(va)
    if len(va) >= 2 and len(vb) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.ttest_ind(vb, va, equal_var=False)
        welch.update(t=float(res.statistic), p=float(res.pvalue))
    ta, tb = sa["train_time_ms"]["mean"], sb["train_time_ms"]["mean"]
    setups_a, setups_b = (
        {r.machine and (r.machine, r.env.get("pytorch")) for r in used} for used in (used_a, used_b)
    )
    known = None not in setups_a | setups_b
    return {
        "code_diff": diff,
        "hyperparameter_diff": hdiff,
        "train_time_ratio": ratio("train_time_ms"),
        "ms_per_step_ratio": ratio("ms_per_step"),
        "train_time_diff_ms": tb - ta if finite(ta) and finite(tb) else None,
        "welch_val_loss": welch,
        "timings_comparable": (setups_a == setups_b and len(setups_a) == 1) if known else None,
    }


def build_report(sides, target, pool=False):
    """sides: [(path, runs)], the baseline first; every later side is compared with it.
    Returns the report (plain data) and, per side, the runs its statistics use."""
    reps, used = zip(*(side_report(path, runs, target, pool) for path, runs in sides))
    names = ["A", "B"] if len(sides) == 2 else ["base"] + [f"V{i}" for i in range(1, len(sides))]
    for name, rep in zip(names, reps):
        rep["name"] = name
    return {
        "target": target,
        "sides": list(reps),
        "comparisons": [compare_sides(reps[0], used[0], reps[i], used[i]) for i in range(1, len(sides))],
    }, used


def fmt(x, spec=".4f", scale=1.0, unit=""):
    return f"{x * scale:{spec}}{unit}" if finite(x) else "-"


def table(rows, md, left=2):
    """Aligned text columns (the first `left` left-aligned, the numbers right-aligned), or a Markdown table."""
    if md:
        cells = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(
            cells[:1]
            + ["|" + "|".join(":--" if i < left else "--:" for i in range(len(rows[0]))) + "|"]
            + cells[1:]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  "
        + "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    )


def section(title, body, md):
    return f"### {title}\n\n{body}" if md else f"== {title} ==\n{body}"


def bullets(lines, md):
    return "\n".join(("- " if md else "  ") + line for line in lines)


def mean_std(s, spec, scale=1.0, unit=""):
    return f"{fmt(s['mean'], spec, scale, unit)} ± {fmt(s['std'], spec, scale, unit)} (n={s['n']})"


def environment_lines(rep):
    lines = [
        f"{s['name']}: "
        + "; ".join(f"{e['setup']} ({e['runs']} run{'s' * (e['runs'] > 1)})" for e in s["environment"])
        for s in rep["sides"]
    ]
    for side, c in zip(rep["sides"][1:], rep["comparisons"]):
        if c["timings_comparable"] is False:
            lines.append(
                f"timings are not comparable: {rep['sides'][0]['name']} and {side['name']} ran on different "
                "GPUs or PyTorch versions (above); time both on one machine (records/ab.py)"
            )
    return lines


def render(rep, md=False):
    """The full report of two sides; one row per variant for more."""
    if len(rep["sides"]) > 2:
        return render_variants(rep, md)
    tgt, out = rep["target"], []
    a, b = rep["sides"]
    c = rep["comparisons"][0]
    diff = c["code_diff"]
    out.append(
        section(
            "code diff (first finished run of each side)",
            (f"```diff\n{diff}\n```" if md else diff) if diff else "(script sources identical)",
            md,
        )
    )
    if c["hyperparameter_diff"]:
        out.append(
            section(
                "hyperparameters (A -> B)",
                table(
                    [["flag", "A", "", "B"]]
                    + [
                        [k, "-" if x is None else x, "->", "-" if y is None else y]
                        for k, (x, y) in sorted(c["hyperparameter_diff"].items())
                    ],
                    md,
                ),
                md,
            )
        )
    out.append(section("environment", bullets(environment_lines(rep), md), md))
    several = any(len(s["configurations"]) > 1 for s in rep["sides"])
    rows = [
        ["side", "run", "steps", "val_loss", "train_time", "ms/step", f"step@{tgt}", f"time@{tgt}"]
        + ["configuration"] * several
    ]
    for side in (a, b):
        for r in side["runs"]:
            steps = f"{r['steps']}/{r['total_steps']}" + ("" if r["complete"] else " early")
            rows.append(
                [
                    side["name"],
                    os.path.basename(r["file"])[:28],
                    steps,
                    fmt(r["val_loss"]),
                    fmt(r["train_time_ms"], ".1f", 1e-3, "s"),
                    fmt(r["ms_per_step"], ".2f"),
                    fmt(r["target_step"], ".1f"),
                    fmt(r["target_time_ms"], ".1f", 1e-3, "s"),
                ]
                + [f"{r['configuration']}{'' if r['used'] else ' (left out)'}"] * several
            )
    out.append(section("runs (step@ and time@ interpolated between val points)", table(rows, md), md))
    rows = [["", "A: " + a["path"], "B: " + b["path"]]]
    for key, label, spec, scale, unit in [
        ("val_loss", "final val loss", ".4f", 1, ""),
        ("train_time_ms", "train time", ".1f", 1e-3, "s"),
        ("ms_per_step", "ms/step", ".2f", 1, ""),
        ("target_step", f"step@{tgt}", ".1f", 1, ""),
        ("target_time_ms", f"time@{tgt}", ".1f", 1e-3, "s"),
    ]:
        rows.append([label, *(mean_std(s["stats"][key], spec, scale, unit) for s in (a, b))])
    out.append(section("sides: mean ± std (n)", table(rows, md, left=1), md))
    w = c["welch_val_loss"]
    lines = [
        f"train time B/A: {fmt(c['train_time_ratio'])}   ms/step B/A: {fmt(c['ms_per_step_ratio'])}",
        f"Welch t-test, final val loss B - A = {fmt(w['mean_diff'], '+.4f')}: "
        f"t = {fmt(w['t'], '.3f')}, p = {fmt(w['p'], '.3g')} (two-sided)",
    ]
    for s in (a, b):
        t, step = s["below_target_test"], s["earliest_significant_step"]
        lines += [
            f"{s['name']}: mean final val < {tgt}: t = {fmt(t['t'], '.3f')}, p = {fmt(t['p'], '.3g')}"
            f" (one-sided) -> {t['verdict']}",
            f"{s['name']}: planner: {s['planner']['note']}",
            f"{s['name']}: below {tgt} with p < {ALPHA} "
            + (f"from val step {step} on" if step is not None else "at no val step"),
        ]
    out.append(section("comparison", bullets(lines, md), md))
    return "\n\n".join(out)


def render_variants(rep, md):
    tgt, base = rep["target"], rep["sides"][0]
    rows = [
        [
            "side",
            "path",
            "runs",
            "final val",
            "Δ val",
            "Welch p",
            "train time",
            "Δ time",
            "time ratio",
            f"p(mean<{tgt})",
        ]
    ]
    for s, c in zip(rep["sides"], [None] + rep["comparisons"]):
        st = s["stats"]
        rows.append(
            [
                s["name"],
                s["path"],
                str(len(s["runs"])),
                mean_std(st["val_loss"], ".4f"),
                fmt(c and c["welch_val_loss"]["mean_diff"], "+.4f"),
                fmt(c and c["welch_val_loss"]["p"], ".3g"),
                fmt(st["train_time_ms"]["mean"], ".1f", 1e-3, "s"),
                fmt(c and c["train_time_diff_ms"], "+.1f", 1e-3, "s"),
                fmt(c and c["train_time_ratio"]),
                fmt(s["below_target_test"]["p"], ".3g"),
            ]
        )
    planner = [f"{s['name']}: planner: {s['planner']['note']}" for s in rep["sides"]]
    return "\n\n".join(
        [
            section("environment", bullets(environment_lines(rep), md), md),
            section(f"variants against the base ({base['path']}); Δ = variant - base", table(rows, md), md),
            section("planner", bullets(planner, md), md),
        ]
    )


def mean_curve(runs):
    """(steps, mean train time in s, mean loss, min loss, max loss) over the val steps every run has."""
    import numpy as np

    at = val_by_step(runs)
    if not at:
        return (np.array([]),) * 5
    losses = np.array([[v for v, _ in at[s]] for s in at])  # (steps, runs)
    times = np.array([[t for _, t in at[s]] for s in at]) / 1000
    return np.array(list(at)), times.mean(1), losses.mean(1), losses.min(1), losses.max(1)


def check_plot_path(path):
    """Refuse a --plot path that cannot be written before any work: unknown image type, missing folder."""
    from matplotlib.figure import Figure

    types = Figure().canvas.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in types:
        kind = f"unknown image type .{ext}" if ext else "no image type"
        raise SystemExit(f"compare.py: --plot {path}: {kind}; end the name in .png, .pdf or .svg")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(
            f"compare.py: --plot {path}: folder {folder} does not exist; create it or pick another path"
        )
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise SystemExit(f"compare.py: --plot {path}: cannot write there; pick another path")


def plot(sides, target, out_path):
    """Val loss against step and train time: per side the mean curve, with a min-max band; below, zoomed in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    zoom_top = target + ZOOM_ABOVE_TARGET
    lows, tops, zoom_from = [], [], [math.inf, math.inf]
    for i, (label, runs) in enumerate(sides):
        steps, times, mean, low, high = mean_curve([r for r in runs if r.complete] or runs)
        if not len(steps):
            continue
        lows.append(low.min())
        tops.append(mean[1:].max() if len(mean) > 2 else mean.max())  # skip the step-0 loss (ln V) if we can
        near = [j for j in range(len(mean)) if mean[j] <= zoom_top]
        color = f"C{i}"
        for col, x in enumerate((steps, times)):
            if near:  # from the val point before the curve enters the zoom
                zoom_from[col] = min(zoom_from[col], x[max(0, near[0] - 1)])
            for ax in axes[:, col]:
                ax.plot(
                    x,
                    mean,
                    color=color,
                    lw=1.4,
                    marker="." if len(x) <= 80 else None,
                    label=f"{label} ({len(runs)} run{'s' * (len(runs) > 1)})",
                )
                if len(runs) > 1:
                    ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
    for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):
        ax = axes[row, col]
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target}")
        ax.set_xlabel(("step", "train time (s)")[col])
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(
            ticker.MaxNLocator(nbins=10)
        )  # the view spans < 1.5x: plain ticks read best
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"val loss vs {ax.get_xlabel()} (mean, band min-max)")
        if lows:  # the end game: at most 50% above the lowest loss, the target in view if it is near
            lo = min(lows) if target < min(lows) / 1.2 else min(lows + [target])
            ax.set_ylim(lo * 0.99, min(max(tops), lo * 1.5) * 1.01)
    for col, ax in enumerate(axes[1]):
        ax.set_title(f"zoom: val loss <= {zoom_top:g}")
        if lows:
            ax.set_ylim(min(lows + [target]) - 0.01, zoom_top)
        if math.isfinite(zoom_from[col]):
            ax.set_xlim(left=zoom_from[col])
    axes[0, 0].set_ylabel("val loss (log scale)")
    axes[1, 0].set_ylabel("val loss")
    axes[0, 1].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out_path, dpi=110)
    except OSError as e:
        raise SystemExit(f"compare.py: --plot {out_path}: {e.strerror or e}")
    finally:
        plt.close(fig)


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item"):  # numpy scalar
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def main(argv=None):
    ap = FlagParser(
        description="Compare speedrun records (log files or folders of logs): a baseline "
        "and one candidate in full, or a baseline and several variants."
    )
    ap.add_argument(
        "sides",
        nargs="+",
        metavar="SIDE",
        help="the baseline, then one or more candidates: each a run log or a folder of run logs",
    )
    ap.add_argument("--target", type=float, default=3.28, help="val loss target (default 3.28)")
    ap.add_argument(
        "--pool", action="store_true", help="pool a side's runs even when their configurations differ"
    )
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    out.add_argument(
        "--markdown", action="store_true", help="print the tables in Markdown (for a README or a PR)"
    )
    ap.add_argument(
        "--plot", metavar="OUT.png", help="draw val loss against step and train time (.png, .pdf, .svg)"
    )
    args = ap.parse_args(argv)
    if len(args.sides) < 2:
        raise SystemExit(
            "compare.py: give a baseline and at least one candidate (two or more logs or folders)"
        )
    if not math.isfinite(args.target) or args.target <= 0:
        raise SystemExit(f"compare.py: --target {args.target}: give a finite val loss above 0, such as 3.28")
    if args.plot:
        check_plot_path(args.plot)
    sides = [(path, load_side(path, args.target)) for path in args.sides]
    report, used = build_report(sides, args.target, args.pool)
    report = jsonable(report)
    print(json.dumps(report, indent=2) if args.json else render(report, args.markdown))
    if args.plot:
        plot(
            [(f"{s['name']}: {s['path']}", runs) for s, runs in zip(report["sides"], used)],
            args.target,
            args.plot,
        )
        print(f"compare.py: wrote {args.plot}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
