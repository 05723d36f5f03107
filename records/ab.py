#!/usr/bin/env python3
"""Time two variants of the training script interleaved on this machine: A B B A A B B A ...

    python records/ab.py A.py B.py --pairs N [--name NAME] [--target LOSS] [--keep_checkpoints] [-- flags]

Machines drift (clocks, heat, neighbours), so a block of A runs then a block of B runs is
biased; in A B B A order a steady drift costs A and B alike. Every run is launched as run.sh
would: torchrun over this machine's GPUs (NPROC_PER_NODE, else CUDA_VISIBLE_DEVICES, else
nvidia-smi), or with --device=cpu one plain process (torchrun when NPROC_PER_NODE is set).
Runs start in the repository root and import from it (PYTHONPATH: a copy of train_gpt2.py
anywhere imports harness.py); as with run.sh, relative paths in the path flags (--input_bin,
--input_val_bin, --records_dir, --checkpoint_dir, --resume) mean what they mean where ab.py
was started. Records go to <records_dir>/<date>_<NAME>_a/ and _b/; pair p
runs with --seed=p-1 unless the flags set --seed. The runs' checkpoints are deleted unless
--keep_checkpoints is given. At the end: compare.py's report of A against B, each pair's
train-time ratio B/A with their mean and its 95% confidence interval, and a one-sided paired
t-test of "B is faster". The loss verdicts are against --target (default 3.28, the record's
FineWeb val loss: give your own for other data or models). Ctrl-C stops after the current
run (a second one stops that run too) and compares what has finished.
"""

import glob
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta

import compare  # also puts the repository root on sys.path

from data.flags import FlagParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flag_value(flags, name):
    """The value of --name=value or --name value among the trainer flags, or None."""
    for i, flag in enumerate(flags):
        if flag.startswith(f"--{name}="):
            return flag.split("=", 1)[1]
        if flag == f"--{name}" and i + 1 < len(flags):
            return flags[i + 1]
    return None


PATH_FLAGS = ("input_bin", "input_val_bin", "records_dir", "checkpoint_dir", "resume")


def absolute_paths(flags, cwd):
    """The flags with each relative path of PATH_FLAGS made absolute against `cwd` (the runs start in ROOT).

    --input_bin and --input_val_bin are globs: `cwd` is escaped in them. --resume=latest is not a path."""

    def absolute(name, value):
        if not value or os.path.isabs(value) or (name == "resume" and value == "latest"):
            return value
        return os.path.join(glob.escape(cwd) if name in ("input_bin", "input_val_bin") else cwd, value)

    out, rest = [], list(flags)
    while rest:
        flag = rest.pop(0)
        name = next((n for n in PATH_FLAGS if flag == f"--{n}" or flag.startswith(f"--{n}=")), None)
        if name and "=" in flag:
            out.append(f"--{name}={absolute(name, flag.split('=', 1)[1])}")
        elif name and rest:
            out += [flag, absolute(name, rest.pop(0))]
        else:
            out.append(flag)
    return out


def launcher(flags):
    """The command before the script, as run.sh chooses it."""
    nproc = os.environ.get("NPROC_PER_NODE", "")
    if nproc and not (nproc.isdigit() and int(nproc) > 0):
        raise SystemExit(f"ab.py: NPROC_PER_NODE={nproc}: give the number of processes per node, such as 8")
    if flag_value(flags, "device") == "cpu" and not nproc:
        return [sys.executable]
    if not nproc and os.environ.get("CUDA_VISIBLE_DEVICES"):
        nproc = str(sum(1 for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()))
    if not nproc:
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        nproc = str(sum(line.startswith("GPU") for line in listing.splitlines()))
    if nproc == "0":
        raise SystemExit(
            "ab.py: no GPU found (nvidia-smi, CUDA_VISIBLE_DEVICES, NPROC_PER_NODE); set NPROC_PER_NODE, "
            "or pass -- --device=cpu to run on the CPU"
        )
    # Loopback for the workers' store, as run.sh: one machine needs no hostname lookup (it fails in some
    # containers).
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--local-addr=127.0.0.1",
        f"--nproc_per_node={nproc}",
    ]


def paired_timing(pairs):
    """pairs: [(A ms, B ms)]. Each pair's B/A train-time ratio, their mean and 95% CI (t over pairs), and the
    one-sided paired t-test of B < A."""
    import numpy as np
    from scipy import stats

    a, b = np.array(pairs, dtype=float).reshape(-1, 2).T
    ratios = b / a
    out = {
        "ratios": ratios.tolist(),
        "mean_ratio": float(ratios.mean()) if len(ratios) else None,
        "ci95": None,
        "t": None,
        "p_b_faster": None,
    }
    if len(ratios) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical ratios give a zero-width interval, which is right
            half = stats.t.ppf(0.975, len(ratios) - 1) * stats.sem(ratios)
            res = stats.ttest_rel(b, a, alternative="less")
        out.update(
            ci95=[float(ratios.mean() - half), float(ratios.mean() + half)],
            t=float(res.statistic),
            p_b_faster=float(res.pvalue),
        )
    return out


class StopAfterRun:
    """First Ctrl-C: finish the current run, then stop. Another Ctrl-C, or SIGTERM: pass it to the run too."""

    def __init__(self):
        self.signal, self.child = None, None
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signal or signum == signal.SIGTERM:
            if self.child and self.child.poll() is None:
                os.killpg(self.child.pid, signum)  # the run's own process group: torchrun and its workers
        else:
            print("\nab.py: stopping after this run (Ctrl-C again stops it now)", flush=True)
        self.signal = self.signal or signum


def records_of(records_dir, run_name):
    # a folder is a path, never a pattern: records[x]/ is records[x]/
    return set(glob.glob(os.path.join(glob.escape(records_dir), f"*_{glob.escape(run_name)}", "*.txt")))


def checkpoints_of(checkpoint_dir, run_name):
    """The checkpoint files in <checkpoint_dir>/<run_name>/, finished or half-written."""
    folder = glob.escape(os.path.join(checkpoint_dir, run_name))
    return set(glob.glob(os.path.join(folder, "*.pt")) + glob.glob(os.path.join(folder, "*.pt.tmp")))


def remove_checkpoints(paths):
    """Delete these checkpoint files, and their folders where that empties them; returns (files, bytes)."""
    files, size = 0, 0
    for path in sorted(paths):
        try:
            n = os.path.getsize(path)
            os.remove(path)
        except FileNotFoundError:
            continue
        files, size = files + 1, size + n
    for folder in sorted({os.path.dirname(p) for p in paths}):
        try:
            os.rmdir(folder)
        except OSError:  # not empty: other runs' checkpoints
            pass
    return files, size


def run_env():
    """The environment of a run: the repository root first on PYTHONPATH, whatever was there kept after it."""
    paths = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def progress(k, n, side, pair, started, durations):
    elapsed = time.monotonic() - started
    if durations:
        left = sum(durations) / len(durations) * (n - k + 1)
        done_at = datetime.now() + timedelta(seconds=left)
        eta = f"ETA {timedelta(seconds=round(left))} left, done at {done_at:%H:%M}"
    else:
        eta = "ETA after the first run"
    print(
        f"ab.py: run {k}/{n}: {side.upper()} (pair {pair}), "
        f"{timedelta(seconds=round(elapsed))} elapsed, {eta}",
        flush=True,
    )


def report(scripts, logs, target):
    """compare.py's report of A against B, then the paired timing of the pairs where both runs finished."""
    runs = {path: compare.parse_log(path, target) for side in "ab" for path in logs[side] if path}
    sides = [(scripts[side], [runs[p] for p in logs[side] if p]) for side in "ab"]
    if not sides[0][1] or not sides[1][1]:
        print("ab.py: nothing to compare: each side needs at least one finished run")
        return
    rep, _ = compare.build_report(sides, target)
    print(compare.render(compare.jsonable(rep)))
    done = {path: run.train_time_ms for path, run in runs.items() if run.complete}
    pairs = [(done[a], done[b]) for a, b in zip(logs["a"], logs["b"]) if a in done and b in done]
    timing = paired_timing(pairs)
    lines = [
        f"pair {i}: B/A = {r:.4f} (A {a / 1000:.2f}s, B {b / 1000:.2f}s)"
        for i, (r, (a, b)) in enumerate(zip(timing["ratios"], pairs), 1)
    ]
    if timing["ci95"]:
        lo, hi = timing["ci95"]
        lines += [
            f"mean B/A = {timing['mean_ratio']:.4f}, 95% CI {lo:.4f} to {hi:.4f} (t over {len(pairs)} pairs)",
            f"paired t-test, B faster than A (one-sided): "
            f"t = {timing['t']:.3f}, p = {timing['p_b_faster']:.3g}",
        ]
    else:
        lines.append(f"a confidence interval needs >= 2 finished pairs (has {len(pairs)})")
    folders = [sorted({os.path.dirname(p) for p in logs[side] if p}) for side in "ab"]
    lines.append(
        f"again, with plots: python records/compare.py {' '.join(folders[0])} {' '.join(folders[1])} "
        f"--plot ab.png"
    )
    title = "paired timing (A B B A on this machine)"
    print("\n" + compare.section(title, compare.bullets(lines, False), False))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = FlagParser(
        description="Time two variants of train_gpt2.py interleaved (A B B A ...) on this "
        "machine and compare them. Trainer flags go after --."
    )
    ap.add_argument("a", help="the baseline script, e.g. train_gpt2.py")
    ap.add_argument("b", help="the candidate script")
    ap.add_argument("--pairs", type=int, required=True, help="number of A/B pairs (2 runs each)")
    ap.add_argument(
        "--name", default="ab", help="records go to <records_dir>/<date>_<name>_a/ and _b/ (default ab)"
    )
    ap.add_argument(
        "--target",
        type=float,
        default=3.28,
        help="val loss the loss verdicts test against (default 3.28: the record's, on FineWeb)",
    )
    ap.add_argument(
        "--keep_checkpoints",
        action="store_true",
        help="keep the checkpoints the runs write (default: delete them once each run ends)",
    )
    args, flags = ap.parse_args(argv[:split]), absolute_paths(argv[split + 1 :], os.getcwd())
    scripts = {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b)}
    for path in scripts.values():
        if not os.path.isfile(path):
            raise SystemExit(f"ab.py: {path}: no such script")
    if args.pairs < 1:
        raise SystemExit(f"ab.py: --pairs={args.pairs}: give at least 1 pair")
    if not math.isfinite(args.target) or args.target <= 0:
        raise SystemExit(f"ab.py: --target {args.target}: give a finite val loss above 0, such as 3.28")
    if not re.fullmatch(r"[\w.-]+", args.name):
        raise SystemExit(f"ab.py: --name={args.name!r}: use letters, digits, '.', '_' and '-' only")
    if flag_value(flags, "run_name") is not None:
        raise SystemExit("ab.py: --run_name is set by ab.py (<name>_a, <name>_b); use --name instead")
    records_dir = os.path.join(ROOT, flag_value(flags, "records_dir") or "records")
    checkpoint_dir = os.path.join(ROOT, flag_value(flags, "checkpoint_dir") or "checkpoints")
    command = launcher(flags)
    if (
        flag_value(flags, "input_bin") is None
        and subprocess.run([sys.executable, "data/cached_fineweb10B.py"], cwd=ROOT).returncode
    ):
        raise SystemExit("ab.py: fetching the data failed (above); pass --input_bin to use your own shards")

    order = [side for pair in range(args.pairs) for side in ("ab" if pair % 2 == 0 else "ba")]
    logs, durations, outcome, removed = {"a": [], "b": []}, [], 0, [0, 0]
    stop, started = StopAfterRun(), time.monotonic()
    for k, side in enumerate(order, 1):
        pair, run_name = (k + 1) // 2, f"{args.name}_{side}"  # runs 2p-1 and 2p are pair p
        progress(k, len(order), side, pair, started, durations)
        before = records_of(records_dir, run_name)
        checkpoints_before = checkpoints_of(checkpoint_dir, run_name)
        t0 = time.monotonic()
        ours = [f"--run_name={run_name}"]
        if flag_value(flags, "records_dir") is None:
            ours.append(f"--records_dir={records_dir}")
        if flag_value(flags, "seed") is None:  # a new seed per pair, the same for A and B: pairs match
            ours.append(f"--seed={pair - 1}")
        # Its own session: a Ctrl-C in the terminal reaches only ab.py, which lets the run finish.
        stop.child = subprocess.Popen(
            command + [scripts[side], *flags, *ours], cwd=ROOT, env=run_env(), start_new_session=True
        )
        code = stop.child.wait()
        durations.append(time.monotonic() - t0)
        if not args.keep_checkpoints:  # a timing run is not resumed: ~150 MB each at full size, for nothing
            files, size = remove_checkpoints(checkpoints_of(checkpoint_dir, run_name) - checkpoints_before)
            removed = [removed[0] + files, removed[1] + size]
        written = sorted(records_of(records_dir, run_name) - before)
        logs[side].append(written[0] if written else None)
        if code or not written:
            outcome = code or 1
            print(
                f"ab.py: run {k} ({side.upper()}) ended with exit status {code}"
                f"{'' if written else ' and wrote no record'}; stopping",
                flush=True,
            )
            break
        if stop.signal:
            outcome = 128 + stop.signal
            print(f"ab.py: stopped after run {k} of {len(order)}", flush=True)
            break
    if args.keep_checkpoints:
        print(f"ab.py: the runs' checkpoints are kept in {checkpoint_dir}/{args.name}_a/ and _b/")
    else:
        print(
            f"ab.py: deleted the {removed[0]} checkpoint files of these runs ({removed[1] / 1e6:.1f} MB); "
            "--keep_checkpoints keeps them"
        )
    report({"a": args.a, "b": args.b}, logs, args.target)
    return outcome


if __name__ == "__main__":
    sys.exit(main())
