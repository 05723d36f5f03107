#!/usr/bin/env python3
"""Compare speedrun records: code diff, machines, per-run numbers, significance, run planner, curves.

    python records/compare.py A B [--target 3.28] [--pool] [--json | --markdown] [--plot out.png]
    python records/compare.py BASE V1 V2 ...      one row per variant against the base
    python records/compare.py RUN [--follow 30]   one side: its own report, also while it is written

Each side is a run log or a folder of run logs (several seeds of one configuration). Both
layouts are read: the public speedrun's (a line of 100 '=', the source, '=', the environment,
'=', the steps) and ours (the source, '=', the environment with a 'Hyperparameters:' block, '=',
the steps, a last 'summary:' line). A source may hold several files, each after a header of a
40-'-' line, '# <name>' and a 40-'-' line. Further '=' sections before the steps and anything
after the last step line are metadata. A resumed run's parts are joined into one run. Problems
with a run are warnings on stderr naming the file; a file that is no run log at all is refused.
"""

import difflib
import glob
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.flags import FlagParser, run_tool  # noqa: E402  one-line errors, no abbreviations, as every tool

DIVIDER = "=" * 100
FILE_RULE = "-" * 40  # a '# <name>' line between two of these starts a further source file
MAIN_FILE = "train_gpt2.py"  # the name of a record's first source file
KNOWN = ("summary:", "peak memory", "resumed_from:", "stopped:", "checkpoint:")  # recognised non-step lines
RESUMED = re.compile(r"resumed_from: (.+) at step (\d+) \(parent record (.+)\)\s*$")
LOG_SUFFIXES = (".txt", ".log")
# Flags that do not change the math of a run: runs that differ only in these are one configuration.
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
    "device",
    "device_batch_size",
    "compile",
}
# A GPU row of the nvidia-smi table: "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:19:00.0 Off |".
GPU_ROW = re.compile(r"^\|\s+\d+\s+(.+?)\s+(?:On|Off)\s+\|\s+[0-9A-Fa-f]+:[0-9A-Fa-f]+:")
ALPHA = 0.01  # the speedrun's significance level for a record claim
ZOOM_ABOVE_TARGET = 0.12  # the zoomed plot panels show val loss up to target + this (3.4 for 3.28)
MARKDOWN_DIFF_LINES = 40  # --markdown shows changed hunks up to this many lines, a diff stat for the rest
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
    source: list = field(default_factory=list)  # every source line, file headers included
    files: dict = field(default_factory=dict)  # {file name: its lines}, in record order
    source_closed: bool = False  # a '=' line follows the source: it was written whole
    hparams: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # the lines after 'Notes:'
    metadata: list = field(default_factory=list)  # further sections before the steps, lines after them
    env: dict = field(default_factory=dict)  # python, pytorch, cuda, gpu, gpus, cpu, world_size, device
    summary: dict = field(default_factory=dict)  # the key:value tokens of the summary: line
    val: list = field(default_factory=list)  # (step, loss, train_time_ms), sorted by step
    train: list = field(default_factory=list)
    times: list = field(default_factory=list)  # (step, train_time_ms, step_avg) of every step line
    untimed: int = 10  # first steps of this part left out of train_time
    resumed: tuple = None  # (parent record path, step) of a resumed part
    parts: list = field(default_factory=list)  # the paths of a resumed run's parts, the first run first
    cut_off: bool = False
    last_step: int = -1
    total_steps: int = 0  # N of step:s/N
    train_time_ms: float = NAN
    estimated_ms: float = 0.0  # untimed steps of resumed parts, counted at that part's ms/step
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
        cuda = self.env.get("cuda", "none")  # a CPU build says None
        return ", ".join(
            [self.machine or "machine unknown", f"PyTorch {self.env.get('pytorch', 'unknown')}"]
            + ([f"CUDA {cuda}"] if cuda.lower() != "none" else [])
        )

    def note(self, key):
        """The text of the note 'key: text', or None."""
        return next((n.split(":", 1)[1].strip() for n in self.notes if n.startswith(key + ":")), None)


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


def split_files(source):
    """{file name: lines}: the first file is MAIN_FILE; later ones follow their header."""
    starts = [
        i
        for i in range(len(source) - 2)
        if source[i].rstrip() == FILE_RULE == source[i + 2].rstrip() and source[i + 1].startswith("# ")
    ]
    bounds = [(MAIN_FILE, 0)] + [(source[i + 1][2:].strip(), i + 3) for i in starts]
    ends = starts + [len(source)]
    return {name: source[begin:end] for (name, begin), end in zip(bounds, ends)}


def split_layout(path, lines):
    """(source, environment, metadata, steps, source_closed) of either layout. The source ends at the first
    '=' line after it; the next section is the environment; later '=' sections and the lines before the
    first step line are metadata."""
    first_step = next((i for i, line in enumerate(lines) if line.startswith("step:")), len(lines))
    cuts = [i for i, line in enumerate(lines[:first_step]) if line.rstrip() == DIVIDER]
    begin = 1 if cuts and cuts[0] == 0 else 0  # the public layout opens with a '=' line before the source
    cuts = cuts[begin:]
    if not cuts:
        if begin or first_step:
            return lines[begin:first_step], [], [], lines[first_step:], False
        warn(path, "no line of 100 '=': no script source or environment in this log")
        return [], [], [], lines, False
    if len(cuts) == 1 and first_step < len(lines):
        warn(path, "only one line of 100 '=': environment not separated from the steps")
    env_end = cuts[1] if len(cuts) > 1 else first_step
    meta = [line for line in lines[env_end + 1 : first_step] if line.rstrip() != DIVIDER]
    return lines[begin : cuts[0]], lines[cuts[0] + 1 : env_end], meta, lines[first_step:], True


def parse_step(line):
    """(kind, step, total, loss, train_time, step_avg) of a step line; kind: val, train or time (no loss)."""
    f = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    s, n = (int(x) for x in f["step"].split("/"))
    kind = "val" if "val_loss" in f else "train" if "train_loss" in f else "time"
    if kind == "time" and "train_time" not in f:
        raise ValueError(line)
    loss = num(f.get(f"{kind}_loss", "nan"))
    return kind, s, n, loss, num(f.get("train_time", "nan")), num(f.get("step_avg", "nan"))


def parse_summary(line):
    """The key:value tokens of a summary: line; device: takes the rest of the line (names have spaces)."""
    head, _, device = line.removeprefix("summary:").partition(" device:")
    out = dict(tok.split(":", 1) for tok in head.split() if ":" in tok)
    if device:
        out["device"] = device.strip()
    return out


def parse_log(path, target):
    """Parse one run log into a Run; warn (naming the file) about anything odd in it."""
    run = read_log(path)
    derive(run, target)
    return run


def read_log(path):
    """A Run with what the log says, before the numbers that follow from it (derive)."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:65536]:
        raise NotARunLog(f"{path} is not a run log (binary data)")
    lines = raw.decode("utf-8", errors="replace").splitlines()  # also handles \r\n
    if not any(line.rstrip() == DIVIDER or line.startswith("step:") for line in lines):
        raise NotARunLog(f"{path} is not a run log (no line of 100 '=' and no 'step:' lines)")
    run = Run(path)
    # A run killed mid-write (or still writing) leaves a last line without its newline: it is not read.
    finished = any(line.startswith(("summary:", "peak memory")) for line in lines)
    run.cut_off = not raw.endswith(b"\n") and not finished and bool(lines)
    if run.cut_off:
        lines = lines[:-1]
    run.source, env, run.metadata, steps, run.source_closed = split_layout(path, lines)
    run.files = split_files(run.source) if run.source else {}
    run.env = parse_environment(env)
    flags = env[env.index("Hyperparameters:") + 1 :] if "Hyperparameters:" in env else []
    # The block ends at the first other line: notes below it may start with -- too.
    run.hparams = dict(
        line[2:].split("=", 1)
        for line in itertools.takewhile(lambda x: x.startswith("--"), flags)
        if "=" in line
    )
    run.notes = env[env.index("Notes:") + 1 :] if "Notes:" in env else []
    untimed = run.hparams.get("untimed_steps", "10")
    run.untimed = int(untimed) if untimed.isdigit() else 10  # the speedrun leaves the first 10 steps untimed
    if m := next(filter(None, map(RESUMED.match, run.notes)), None):
        run.resumed = (m[3].strip(), int(m[2]))

    last_step_line = max((i for i, line in enumerate(steps) if line.startswith("step:")), default=-1)
    points, bad, unknown, repeated = {"val": {}, "train": {}, "time": {}}, [], [], []
    for i, line in enumerate(steps):
        if line.startswith("step:"):
            try:
                kind, s, n, loss, t, avg = parse_step(line)
            except (KeyError, ValueError):
                bad.append(line)
                continue
            if s in points[kind]:
                repeated.append(s)
            points[kind][s] = (s, loss, t)
            run.times.append((s, t, avg))
            run.total_steps = n
        elif line.startswith("summary:"):
            run.summary = parse_summary(line)
        elif line.startswith("stopped:"):
            run.summary["stopped"] = line[8:].strip()
        elif i > last_step_line or line.startswith(KNOWN):
            if not line.startswith(KNOWN):
                run.metadata.append(line)  # after the steps: parameter listings and the like
        elif line.strip():
            unknown.append(line)
    run.val, run.train = (sorted(points[k].values()) for k in ("val", "train"))
    if "world_size" in run.summary and run.summary["world_size"].isdigit():
        run.env["world_size"] = int(run.summary["world_size"])
    if run.summary.get("device"):
        run.env["device"] = run.summary["device"]

    if run.cut_off:
        warn(
            path,
            "the log ends mid-line (no newline, no summary: line): cut off while writing; read to its last "
            "whole line",
        )
    if bad:
        warn(path, f"{len(bad)} malformed step line(s) ignored, first: {bad[0][:70]!r}")
    if unknown:
        warn(path, f"{len(unknown)} unrecognised line(s) ignored, first: {unknown[0][:70]!r}")
    if repeated:
        warn(
            path,
            f"{len(repeated)} step line(s) repeat earlier steps (first: step {min(repeated)}; resumed lines "
            "appended to their parent's log?); the later ones are used",
        )
    nonfinite = sorted(p[0] for p in run.val + run.train if not math.isfinite(p[1]))
    if nonfinite:
        warn(path, f"NaN/inf loss at step {nonfinite[0]} ({len(nonfinite)} line(s))")
    if not run.times:
        warn(path, "no step lines: the run logged nothing")
    elif not run.val:
        warn(path, "train-loss lines only: no val_loss lines")
    return run


def part_ms_per_step(part, start):
    """ms/step of a resumed part's own timed steps (NaN if it timed none); start: the step it resumed at."""
    timed = part.times[-1][0] - start - part.untimed
    # untimed lines keep the restored clock
    restored = [t for s, t, _ in part.times if s <= start + part.untimed]
    if timed <= 0 or not restored:
        return NAN
    return (part.times[-1][1] - restored[0]) / timed


def derive(run, target, parts=None):
    """The run's numbers from its step lines; parts: the Runs of a resumed run, the first run first.
    Train time by the rule: the trainer's clock goes on from the checkpoint, and every resumed part leaves its
    first untimed_steps out of it; those of them that a run without the resume would have timed count at that
    part's ms/step (estimated_ms)."""
    parts = parts or [run]
    run.parts = [p.path for p in parts]
    val, train, offset, avg = {}, {}, 0.0, NAN
    for k, part in enumerate(parts):
        start = part.resumed[1] if part.resumed else 0
        own = part_ms_per_step(part, start) if part.resumed else NAN
        if part.resumed and part.times:
            fallback = avg if finite(avg) else part.times[-1][2]  # the earlier parts', or the clock's average
            rate = own if finite(own) else fallback if finite(fallback) and fallback > 0 else 0.0
            # the steps this part left untimed that a run without the resume would have timed
            offset += (
                max(0, min(start + part.untimed, part.times[-1][0]) - max(start, parts[0].untimed)) * rate
            )
        if part.times:
            avg = own if part.resumed else part.times[-1][2]
        end = parts[k + 1].resumed[1] if k + 1 < len(parts) else math.inf
        for points, into in ((part.val, val), (part.train, train)):
            for s, loss, t in points:
                if (s > start or s not in into) and s <= end:
                    into[s] = (s, loss, t + offset)
    run.val, run.train, run.estimated_ms = sorted(val.values()), sorted(train.values()), offset
    leaf = parts[-1]
    if not leaf.times:
        return run
    s, t, avg = leaf.times[-1]  # the last whole step line
    run.last_step, run.train_time_ms, run.total_steps = s, t + offset, leaf.total_steps
    timed = s - parts[0].untimed
    if len(parts) > 1 or run.resumed:
        run.ms_per_step = run.train_time_ms / timed if timed > 0 and run.train_time_ms > 0 else NAN
    else:
        run.ms_per_step = avg if finite(avg) and avg > 0 else (t / timed if timed > 0 and t > 0 else NAN)
    if run.val:
        run.last_val = run.val[-1][1]
        run.complete = run.val[-1][0] >= run.total_steps and not leaf.cut_off
    if not run.complete and not leaf.cut_off:
        early = f"ended early at step {s} of {run.total_steps}: " if s < run.total_steps else ""
        stopped = f" (stopped: {leaf.summary['stopped']})" if "stopped" in leaf.summary else ""
        running = "" if leaf.summary else " (no summary: line: still running, or killed)"
        warn(run.path, f"{early}no val loss at the final step {run.total_steps}{stopped}{running}")
    run.target_step, run.target_time_ms = crossing(run.val, target)
    return run


def crossing(val, target):
    """(step, train time) where the val curve first reaches target, linear between val points around it."""
    before = None
    for point in val:
        if point[1] <= target:
            if before is None or not math.isfinite(before[1]):
                return float(point[0]), point[2]
            frac = (before[1] - target) / (before[1] - point[1])
            return tuple(b + frac * (p - b) for b, p in ((before[0], point[0]), (before[2], point[2])))
        before = point
    return None, None


def read_side(path):
    """The Runs (not yet derived) of a log file or a folder of logs (*.txt, *.log; other files skipped)."""
    if os.path.isfile(path):
        try:
            return [read_log(path)]
        except NotARunLog as e:
            raise SystemExit(f"compare.py: {e}") from None
    if not os.path.isdir(path):
        raise SystemExit(f"compare.py: {path}: no such file or folder")
    runs = []
    for full in sorted(glob.glob(os.path.join(glob.escape(path), "*"))):
        if full.endswith(LOG_SUFFIXES) and os.path.isfile(full):
            try:
                runs.append(read_log(full))
            except NotARunLog as e:
                warn(full, f"skipped: {e}")
    if not runs:
        raise SystemExit(f"compare.py: {path}: no run logs (*.txt, *.log) in this folder")
    return runs


def find_parent(run, runs):
    """The parent record of a resumed part: a run of this side with its path or file name, else the file."""
    parent = run.resumed[0]
    for other in runs:
        if other is not run and os.path.realpath(other.path) == os.path.realpath(parent):
            return other
    for other in runs:
        if other is not run and os.path.basename(other.path) == os.path.basename(parent):
            return other
    # another day's folder, same records root
    root = os.path.dirname(os.path.dirname(os.path.abspath(run.path)))
    for candidate in (parent, os.path.join(root, *parent.replace("\\", "/").split("/")[-2:])):
        if os.path.isfile(candidate) and os.path.realpath(candidate) != os.path.realpath(run.path):
            try:
                return read_log(candidate)
            except NotARunLog:
                pass
    return None


def load_side(path, target):
    """The runs of one side, a resumed run's parts joined into one run."""
    runs = read_side(path)
    chains, absorbed = {}, set()
    for run in runs:
        chain, seen = [run], {id(run)}
        while chain[0].resumed and (parent := find_parent(chain[0], runs)) and id(parent) not in seen:
            chain.insert(0, parent)
            seen.add(id(parent))
        if chain[0].resumed:
            warn(
                run.path,
                f"resumed at step {chain[0].resumed[1]} from {chain[0].resumed[0]}, a record not found "
                "(give it on this side): its train time counts from the checkpoint's clock",
            )
        chains[id(run)] = chain
        absorbed.update(id(p) for p in chain[:-1])
    return [derive(r, target, chains[id(r)]) for r in runs if id(r) not in absorbed]


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


def censored_median(xs):
    """Time (or step) to target over runs where some never reached it: the median with those runs at +inf, so
    that runs which missed do not pull it low; None when half or more never reached it."""
    import numpy as np

    reached = sorted(x for x in xs if finite(x))
    if not xs:
        return {"median": None, "reached": 0, "n": 0}
    median = float(np.median(reached + [math.inf] * (len(xs) - len(reached))))
    return {"median": median if finite(median) else None, "reached": len(reached), "n": len(xs)}


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
                "parts": r.parts,
                "estimated_ms": r.estimated_ms,
                "startup_s": num(r.summary.get("startup_s", "nan")),
                "compiled_graphs": r.summary.get("compiled_graphs"),
                "tokens_per_s": num(r.summary.get("tokens_per_s", "nan")),
                "peak_reserved_mib": num(r.summary.get("peak_reserved", "nan").removesuffix("MiB")),
            }
            for r in runs
        ],
        "stats": {
            "val_loss": describe(vals),
            "train_time_ms": describe([r.train_time_ms for r in done]),
            "ms_per_step": describe([r.ms_per_step for r in used]),
            "target_step": censored_median([r.target_step for r in used]),
            "target_time_ms": censored_median([r.target_time_ms for r in used]),
        },
        "below_target_test": test,
        "planner": plan,
        "earliest_significant_step": earliest_significant_step(done, target),
    }, used


def file_diffs(files_a, files_b):
    """{file name: unified diff lines} of every embedded source file that differs, A's files first."""
    names = list(files_a) + [n for n in files_b if n not in files_a]
    diffs = {
        name: list(
            difflib.unified_diff(
                files_a.get(name, []), files_b.get(name, []), f"a/{name}", f"b/{name}", lineterm=""
            )
        )
        for name in names
    }
    return {name: lines for name, lines in diffs.items() if lines}


def compare_sides(ra, used_a, rb, used_b):
    """B against A: code and flag diff, machines, time ratios, Welch's t-test on final val loss."""
    from scipy import stats

    # the first finished run of each side
    a0, b0 = (next((r for r in used if r.complete), used[0]) for used in (used_a, used_b))
    diffs = file_diffs(a0.files, b0.files)
    diff = "\n".join(line for lines in diffs.values() for line in lines)
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
        {r.machine and r.env.get("pytorch") and (r.machine, r.env["pytorch"]) for r in used}
        for used in (used_a, used_b)
    )
    known = None not in setups_a | setups_b
    return {
        "code_diff": diff,
        "changed_files": list(diffs),
        "file_diffs": diffs,
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
    names = (
        ["A", "B"][: len(sides)] if len(sides) <= 2 else ["base"] + [f"V{i}" for i in range(1, len(sides))]
    )
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
    """Aligned text columns (the first `left` left-aligned, numbers right-aligned), or a Markdown table."""
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
    unknown = [s["name"] for s in rep["sides"] if any("unknown" in e["setup"] for e in s["environment"])]
    if unknown and rep["comparisons"]:
        lines.append(
            f"timings' comparability is unknown: {' and '.join(unknown)} do{'es' * (len(unknown) == 1)} not "
            "say the GPU or the PyTorch build"
        )
    return lines


def short_diff(diffs, limit=MARKDOWN_DIFF_LINES):
    """For a README: whole hunks up to `limit` lines, a diff stat of the rest, the full diff collapsed."""
    shown, rest, used = [], {}, 0
    for name, lines in diffs.items():
        hunks, header = [], lines[:2]
        for line in lines[2:]:
            if line.startswith("@@"):
                hunks.append([])
            hunks[-1].append(line)
        for hunk in hunks:
            if used + len(hunk) <= limit:
                shown += header + hunk
                header, used = [], used + len(hunk)
            else:
                stat = rest.setdefault(name, [0, 0, 0])
                stat[0] += 1
                stat[1] += sum(x.startswith("+") for x in hunk)
                stat[2] += sum(x.startswith("-") for x in hunk)
    full = [line for lines in diffs.values() for line in lines]
    out = ["```diff", *shown, "```"] if shown else []
    if rest:
        out += ["", "Not shown above:", ""] + [
            f"- `{name}`: {h} hunk{'s' * (h > 1)}, +{add} -{rem}" for name, (h, add, rem) in rest.items()
        ]
    out += [
        "",
        f"<details><summary>full diff ({len(full)} lines)</summary>",
        "",
        "```diff",
        *full,
        "```",
        "",
        "</details>",
    ]
    return "\n".join(out)


def run_rows(sides, tgt):
    """One row per run; `*` marks a train time holding estimated untimed steps of resumed parts."""
    several = any(len(s["configurations"]) > 1 for s in sides)
    startup = any(finite(r["startup_s"]) for s in sides for r in s["runs"])
    speed = any(finite(r.get("tokens_per_s")) for s in sides for r in s["runs"])  # records before it: none
    reserved = any(finite(r.get("peak_reserved_mib")) for s in sides for r in s["runs"])  # CUDA runs only
    rows = [
        ["side", "run", "steps", "val_loss", "train_time", "ms/step", f"step@{tgt}", f"time@{tgt}"]
        + ["tokens/s"] * speed
        + ["startup"] * startup
        + ["peak reserved"] * reserved
        + ["configuration"] * several
    ]
    for side in sides:
        for r in side["runs"]:
            steps = f"{r['steps']}/{r['total_steps']}" + ("" if r["complete"] else " early")
            parts = (
                f" +{len(r['parts']) - 1} part{'s' * (len(r['parts']) > 2)}" if len(r["parts"]) > 1 else ""
            )
            graphs = f" ({r['compiled_graphs']} graphs)" if r["compiled_graphs"] else ""
            rows.append(
                [
                    side["name"],
                    os.path.basename(r["file"])[:28] + parts,
                    steps,
                    fmt(r["val_loss"]),
                    fmt(r["train_time_ms"], ".1f", 1e-3, "s") + "*" * (r["estimated_ms"] > 0),
                    fmt(r["ms_per_step"], ".2f"),
                    fmt(r["target_step"], ".1f"),
                    fmt(r["target_time_ms"], ".1f", 1e-3, "s"),
                ]
                + [fmt(r.get("tokens_per_s"), ",.0f")] * speed
                + [fmt(r["startup_s"], ".1f", 1, "s") + graphs] * startup
                + [fmt(r.get("peak_reserved_mib"), ",.0f", 1, " MiB")] * reserved
                + [f"{r['configuration']}{'' if r['used'] else ' (left out)'}"] * several
            )
    return rows


def runs_section(sides, tgt, md):
    title = "runs (step@ and time@ interpolated between val points)"
    if any(r["estimated_ms"] > 0 for s in sides for r in s["runs"]):
        title += "; * with the untimed steps of resumed parts at that part's ms/step (estimated)"
    return section(title, table(run_rows(sides, tgt), md), md)


def stats_rows(sides, tgt):
    rows = [["", *(f"{s['name']}: {s['path']}" for s in sides)]]
    for key, label, spec, scale, unit in [
        ("val_loss", "final val loss", ".4f", 1, ""),
        ("train_time_ms", "train time", ".1f", 1e-3, "s"),
        ("ms_per_step", "ms/step", ".2f", 1, ""),
    ]:
        rows.append([label, *(mean_std(s["stats"][key], spec, scale, unit) for s in sides)])
    for key, label, spec, scale, unit in [
        ("target_step", f"step@{tgt}", ".1f", 1, ""),
        ("target_time_ms", f"time@{tgt}", ".1f", 1e-3, "s"),
    ]:
        rows.append(
            [
                f"{label} median",
                *(
                    f"{fmt(st['median'], spec, scale, unit)} ({st['reached']} of {st['n']} reached)"
                    for st in (s["stats"][key] for s in sides)
                ),
            ]
        )
    return rows


def side_lines(s, tgt):
    t, step = s["below_target_test"], s["earliest_significant_step"]
    return [
        f"{s['name']}: mean final val < {tgt}: t = {fmt(t['t'], '.3f')}, p = {fmt(t['p'], '.3g')}"
        f" (one-sided) -> {t['verdict']}",
        f"{s['name']}: planner: {s['planner']['note']}",
        f"{s['name']}: below {tgt} with p < {ALPHA} "
        + (f"from val step {step} on" if step is not None else "at no val step"),
    ]


STATS_TITLE = "sides: mean ± std (n); median to target, runs that never reached it as +inf"


def render(rep, md=False):
    """The full report of two sides; one row per variant for more; one side's own report."""
    if len(rep["sides"]) > 2:
        return render_variants(rep, md)
    tgt, out = rep["target"], []
    if len(rep["sides"]) == 1:
        (a,) = rep["sides"]
        return "\n\n".join(
            [
                section("environment", bullets(environment_lines(rep), md), md),
                runs_section([a], tgt, md),
                section(STATS_TITLE, table(stats_rows([a], tgt), md, left=1), md),
                section("target", bullets(side_lines(a, tgt), md), md),
            ]
        )
    a, b = rep["sides"]
    c = rep["comparisons"][0]
    diff = c["code_diff"]
    if not diff:
        body = "(script sources identical)"
    elif md:
        body = short_diff(c["file_diffs"])
    else:
        body = diff
    files = f": {', '.join(c['changed_files'])}" if diff else ""
    out.append(section(f"code diff (first finished run of each side){files}", body, md))
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
    out.append(runs_section([a, b], tgt, md))
    out.append(section(STATS_TITLE, table(stats_rows([a, b], tgt), md, left=1), md))
    w = c["welch_val_loss"]
    lines = [
        f"train time B/A: {fmt(c['train_time_ratio'])}   ms/step B/A: {fmt(c['ms_per_step_ratio'])}",
        f"Welch t-test, final val loss B - A = {fmt(w['mean_diff'], '+.4f')}: "
        f"t = {fmt(w['t'], '.3f')}, p = {fmt(w['p'], '.3g')} (two-sided)",
    ]
    for s in (a, b):
        lines += side_lines(s, tgt)
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
    """Val loss against step and train time: per side the mean curve and a min-max band; below, zoomed in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    zoom_top = target + ZOOM_ABOVE_TARGET
    lows, tops, zoom_from = [], [], [math.inf, math.inf]
    for i, (label, runs) in enumerate(sides):
        if len(sides) == len(runs) == 1 and runs[0].train:  # one run watched: its train curve too
            train = [(s, loss, t) for s, loss, t in runs[0].train if math.isfinite(loss)]
            for col, ax in enumerate(axes[0]):
                ax.plot(
                    [p[col * 2] / (1000 if col else 1) for p in train],
                    [p[1] for p in train],
                    color="C1",
                    lw=0.8,
                    alpha=0.8,
                    label="train loss",
                )
            tops.append(max((p[1] for p in train[len(train) // 10 :]), default=NAN))
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
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=10))  # the view spans < 1.5x: plain ticks
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"loss vs {ax.get_xlabel()} (val: mean, band min-max)")
        if lows and all(map(finite, tops)):  # the end game: at most 50% above the lowest loss
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
        raise SystemExit(f"compare.py: --plot {out_path}: {e.strerror or e}") from None
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
        "and one candidate in full, a baseline and several variants, or one side's own report."
    )
    ap.add_argument(
        "sides",
        nargs="+",
        metavar="SIDE",
        help="the baseline, then candidates if any: each a run log or a folder of run logs",
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
    ap.add_argument(
        "--follow",
        type=float,
        metavar="SECONDS",
        help="print the report (and redraw --plot) every this many seconds, for runs still writing; "
        "Ctrl-C ends it",
    )
    args = ap.parse_args(argv)
    if not math.isfinite(args.target) or args.target <= 0:
        raise SystemExit(f"compare.py: --target {args.target}: give a finite val loss above 0, such as 3.28")
    if args.follow is not None and not (math.isfinite(args.follow) and args.follow > 0):
        raise SystemExit(f"compare.py: --follow {args.follow}: give the seconds between reports, such as 30")
    if args.plot:
        check_plot_path(args.plot)
    while True:
        report = report_once(args)
        if args.follow is None:
            return report
        sys.stdout.flush()
        time.sleep(args.follow)
        print(f"\n---- {time.strftime('%H:%M:%S')} ----\n")


def report_once(args):
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
    run_tool(main, "compare.py")
