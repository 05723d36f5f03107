"""Tests for records/ab.py: two trainer variants timed in A B B A order, on the CPU with the tiny config."""

import ast
import glob
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, STEP_LINE, TINY_FLAGS
from scipy import stats

sys.path.insert(0, os.path.join(ROOT, "records"))
import ab  # noqa: E402

AB = os.path.join(ROOT, "records", "ab.py")
TRAINER = os.path.join(ROOT, "train_gpt2.py")
FLAGS = [*TINY_FLAGS, "--num_iterations=12", "--warmdown_iters=2"]
SLOWER = """import time, torch
def _slow_backward(self, *args, _backward=torch.Tensor.backward, **kwargs):
    time.sleep(0.05)
    return _backward(self, *args, **kwargs)
torch.Tensor.backward = _slow_backward
"""


def write_slower_copy(path):
    """B: a copy of the trainer with 50 ms more in every backward pass, so B's record holds B's own source."""
    lines = open(TRAINER).read().splitlines(keepends=True)
    after = (
        ast.parse("".join(lines)).body[0].end_lineno
    )  # after the docstring, which stays the docstring (--help)
    path.write_text("".join(lines[:after]) + SLOWER + "".join(lines[after:]))
    return path


def run_ab(b_script, pairs, shards):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
    }  # a tiny model: one thread is fastest, also on a busy machine
    return subprocess.Popen(
        [
            sys.executable,
            AB,
            TRAINER,
            str(b_script),
            "--pairs",
            str(pairs),
            "--name",
            "t",
            "--",
            *FLAGS,
            *shards,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def records_in_run_order(tmp_path):
    """The records the runs wrote, oldest first (each is closed when its run ends), with their side."""
    logs = sorted(glob.glob(str(tmp_path / "records" / "*_t_?" / "*.txt")), key=os.path.getmtime)
    return [(os.path.basename(os.path.dirname(p))[-1], open(p).read()) for p in logs]


def final_train_time(record):
    """train_time of the last step line: the run's timed total, in ms."""
    last = STEP_LINE.findall(record)[-1]
    assert last[0] == last[1] == "12" and last[2] == "val_loss", last  # the run finished
    return float(last[4])


def test_paired_timing_numbers():
    a, b = [1000.0, 1010.0, 995.0, 1005.0, 1002.0], [950.0, 962.0, 948.0, 955.0, 941.0]
    got = ab.paired_timing(list(zip(a, b)))
    ratios = np.array(b) / np.array(a)
    assert got["ratios"] == pytest.approx(ratios) and got["mean_ratio"] == pytest.approx(ratios.mean())
    assert got["ci95"] == pytest.approx(
        stats.t.interval(0.95, len(a) - 1, loc=ratios.mean(), scale=stats.sem(ratios))
    )
    want = stats.ttest_rel(b, a, alternative="less")
    assert got["p_b_faster"] == pytest.approx(want.pvalue) and got["t"] == pytest.approx(want.statistic)
    assert got["p_b_faster"] < 0.01
    assert ab.paired_timing([(1000.0, 900.0)])["ci95"] is None  # one pair: a ratio, no interval
    assert ab.paired_timing([])["mean_ratio"] is None


def test_launcher_like_run_sh(monkeypatch, tmp_path):
    for name in ("NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here
    assert ab.launcher(["--device=cpu"]) == ab.launcher(["--device", "cpu"]) == [sys.executable]
    with pytest.raises(SystemExit) as e:
        ab.launcher([])
    assert "NPROC_PER_NODE" in str(e.value) and "--device=cpu" in str(e.value) and "\n" not in str(e.value)
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n")
    fake.chmod(0o755)
    assert ab.launcher([])[-1] == "--nproc_per_node=2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3,5")  # only the GPUs this shell may use
    assert ab.launcher([])[-1] == "--nproc_per_node=3"
    monkeypatch.setenv("NPROC_PER_NODE", "1")  # overrides both, and puts a CPU run under torchrun
    assert ab.launcher([])[-1] == ab.launcher(["--device=cpu"])[-1] == "--nproc_per_node=1"
    assert ab.launcher([])[:3] == [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["missing.py", TRAINER, "--pairs", "1"], ["missing.py", "no such script"]),
        ([TRAINER, TRAINER, "--pairs", "0"], ["--pairs"]),
        ([TRAINER, TRAINER, "--pairs", "1", "--name", "a/b"], ["--name"]),
        ([TRAINER, TRAINER, "--pairs", "1", "--", "--run_name=x"], ["--run_name", "--name"]),
    ],
)
def test_bad_input_is_one_line(args, words):
    with pytest.raises(SystemExit) as e:
        ab.main(args)
    assert (
        str(e.value).startswith("ab.py: ")
        and "\n" not in str(e.value)
        and all(w in str(e.value) for w in words)
    )


def test_interleaved_runs_and_paired_ratio(shards, tmp_path):
    p = run_ab(write_slower_copy(tmp_path / "slow_gpt2.py"), 2, shards)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    records = records_in_run_order(tmp_path)
    assert [side for side, _ in records] == list("abba")
    assert all(
        ("_slow_backward" in text) == (side == "b") for side, text in records
    )  # each record holds its script
    assert [re.search(r"^--seed=(\d+)$", text, re.M)[1] for _, text in records] == list(
        "0011"
    )  # a seed per pair
    progress = [line for line in out.splitlines() if line.startswith("ab.py: run ")]
    assert [line.split(":")[1].split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert [line.split()[3] for line in progress] == ["A", "B", "B", "A"]
    assert "ETA" in progress[0] and all(" left, done at " in line for line in progress[1:])
    assert (
        "+def _slow_backward(self, *args, _backward=torch.Tensor.backward, **kwargs):" in out
    )  # compare's code diff
    # the paired ratio and its interval, recomputed from the records
    times = {side: [final_train_time(text) for s, text in records if s == side] for side in "ab"}
    ratios = np.array(times["b"]) / np.array(times["a"])
    lo, hi = stats.t.interval(0.95, 1, loc=ratios.mean(), scale=stats.sem(ratios))
    line = next(line for line in out.splitlines() if "mean B/A = " in line)
    numbers = [
        float(x.rstrip(",")) for x in line.split() if x.rstrip(",").replace(".", "", 1).lstrip("-").isdigit()
    ]
    assert numbers[:3] == pytest.approx([ratios.mean(), lo, hi], abs=1e-4) and ratios.mean() > 1
    assert f"{stats.ttest_rel(times['b'], times['a'], alternative='less').pvalue:.3g}" in out


def test_ctrl_c_stops_after_the_current_run(shards, tmp_path):
    p = run_ab(TRAINER, 2, shards)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("ab.py: run 2/4"):
            p.send_signal(signal.SIGINT)  # as a terminal does: ab.py only, the run has its own session
            break
    out = "".join(seen) + p.communicate(timeout=120)[0]
    assert p.returncode == 130, out[-3000:]
    assert "ab.py: run 3/4" not in out and "Traceback" not in out
    records = records_in_run_order(tmp_path)
    assert [side for side, _ in records] == ["a", "b"]
    assert all(final_train_time(text) >= 0 for _, text in records)  # run 2 finished, not cut short
    assert "== comparison ==" in out and "has 1" in out  # one pair compared, no interval from one pair
