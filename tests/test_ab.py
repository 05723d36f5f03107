"""records/ab.py (two trainer variants timed in A B B A order) and run.sh, on the CPU with the tiny config."""

import ast
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, STEP_LINE, TINY_FLAGS, learnable_tokens
from scipy import stats

sys.path.insert(0, os.path.join(ROOT, "records"))
import ab  # noqa: E402

from data.shards import write_shard  # noqa: E402

AB = os.path.join(ROOT, "records", "ab.py")
TRAINER = os.path.join(ROOT, "train_gpt2.py")
FLAGS = [*TINY_FLAGS, "--num_iterations=12", "--warmdown_iters=2"]
# B's extra time comes from a module on the caller's PYTHONPATH, which the runs must keep
SLOWER = """import time, torch
from ab_test_delay import DELAY
def _slow_backward(self, *args, _backward=torch.Tensor.backward, **kwargs):
    time.sleep(DELAY)
    return _backward(self, *args, **kwargs)
torch.Tensor.backward = _slow_backward
"""


def write_slower_copy(path):
    """B: a copy of the trainer with 50 ms more in every backward pass, so B's record holds B's own source.

    It lies outside the checkout, yet imports the trainer's modules from the repository root, as a user's
    copy does.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = open(TRAINER).read().splitlines(keepends=True)
    after = ast.parse("".join(lines)).body[0].end_lineno  # after the docstring, which stays the docstring
    path.write_text("".join(lines[:after]) + SLOWER + "".join(lines[after:]))
    (path.parent / "pythonpath").mkdir()
    (path.parent / "pythonpath" / "ab_test_delay.py").write_text("DELAY = 0.05\n")
    return path


def run_ab(b_script, pairs, flags, *ab_flags, **env):
    # a tiny model: one thread is fastest, also on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, AB, TRAINER, str(b_script), "--pairs", str(pairs), "--name", "t", *ab_flags]
        + ["--", *FLAGS, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def records_in_run_order(records_dir):
    """The records the runs wrote, oldest first (each is closed when its run ends), with their side."""
    logs = sorted(
        glob.glob(os.path.join(glob.escape(str(records_dir)), "*_t_?", "*.txt")), key=os.path.getmtime
    )
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
        ([TRAINER, TRAINER, "--pairs", "1", "--target", "nan"], ["--target"]),
        ([TRAINER, TRAINER, "--pairs", "1", "--target=-1"], ["--target"]),
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


def test_paths_are_made_absolute_where_ab_py_was_started():
    flags = ["--input_bin", "d/*.bin", "--records_dir=r", "--resume", "latest", "--resume=c.pt", "--seed=1"]
    flags += ["--checkpoint_dir=/abs", "--num_layers", "2", "--input_val_bin=", "--records_dir"]
    assert ab.absolute_paths(flags, "/w[1]") == [
        "--input_bin",
        "/w[[]1]/d/*.bin",  # a glob: the folder escaped
        "--records_dir=/w[1]/r",
        "--resume",
        "latest",
        "--resume=/w[1]/c.pt",
        "--seed=1",
        "--checkpoint_dir=/abs",
        "--num_layers",
        "2",
        "--input_val_bin=",
        "--records_dir",  # no value: the trainer names the problem
    ]


def test_runs_import_from_the_repository_root_and_keep_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/x", "", "/y"]))
    assert ab.run_env()["PYTHONPATH"].split(os.pathsep) == [ROOT, "/x", "/y"]
    monkeypatch.delenv("PYTHONPATH")
    assert ab.run_env()["PYTHONPATH"] == ROOT


def test_interleaved_runs_and_paired_ratio(shards, tmp_path):
    """Also: a candidate outside the checkout, --records_dir like a glob, --target, --keep_checkpoints."""
    records_dir = tmp_path / "abrec[x]"
    flags = [*shards.data, f"--records_dir={records_dir}", f"--checkpoint_dir={shards.checkpoint_dir}"]
    b = write_slower_copy(tmp_path / "candidate" / "slow_gpt2.py")
    p = run_ab(b, 2, flags, "--target", "9.5", "--keep_checkpoints", PYTHONPATH=str(b.parent / "pythonpath"))
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert "ended with exit status" not in out and "wrote no record" not in out
    # the verdicts and the table test --target, never the default 3.28
    assert set(re.findall(r"(?:final val < |step@|time@|below )([\d.]+)", out)) == {"9.5"}, out[-3000:]
    assert len(glob.glob(str(tmp_path / "checkpoints" / "t_?" / "*.pt"))) == 4  # one per run, kept
    assert "checkpoints are kept" in out
    records = records_in_run_order(records_dir)
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
    """Also: the runs' checkpoints are deleted (without --keep_checkpoints), and that is said in one line."""
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
    records = records_in_run_order(tmp_path / "records")
    assert [side for side, _ in records] == ["a", "b"]
    assert re.search(r"^ab\.py: deleted the 2 checkpoint files of these runs \(\d", out, re.M)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert all(final_train_time(text) >= 0 for _, text in records)  # run 2 finished, not cut short
    assert "== comparison ==" in out and "has 1" in out  # one pair compared, no interval from one pair


# --- run.sh ----------------------------------------------------------------------------------------

RUN_SH = os.path.join(ROOT, "run.sh")
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def run_sh_calls(tmp_path, cwd, args, **env):
    """run.sh with a PYTHON that only records each call: [(argv, cwd, TORCHELASTIC_SIGNALS_TO_HANDLE)]."""
    stub, log = tmp_path / "python_stub", tmp_path / "calls.jsonl"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    signals = os.environ.get('TORCHELASTIC_SIGNALS_TO_HANDLE')\n"
        "    print(json.dumps([sys.argv[1:], os.getcwd(), signals]), file=f)\n"
    )
    stub.chmod(0o755)
    env = {**os.environ, "NPROC_PER_NODE": "1", "PYTHON": str(stub), **env}
    env.pop("NNODES", None)
    r = subprocess.run(["bash", RUN_SH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def test_run_sh_reads_both_flag_forms_and_paths_from_the_callers_folder(tmp_path, monkeypatch):
    caller = tmp_path / "caller[1]"  # a folder named like a glob, too
    (caller / "rel").mkdir(parents=True)
    for name in ("tr_000001.bin", "tr_000002.bin", "v_000000.bin"):
        (caller / "rel" / name).write_bytes(b"")
    monkeypatch.delenv("TORCHELASTIC_SIGNALS_TO_HANDLE", raising=False)
    flags = ["--input_bin", "rel/tr_*.bin", "--input_val_bin=rel/v_*.bin", "--records_dir", "recs"]
    flags += ["--checkpoint_dir=/abs/ck", "--resume", "latest", "--seed", "3"]
    calls = run_sh_calls(tmp_path, caller, flags)
    assert len(calls) == 1  # --input_bin PATH: no FineWeb download
    argv, cwd, signals = calls[0]
    assert argv[:3] == ["-m", "torch.distributed.run", "--standalone"] and cwd == ROOT
    assert signals == DEFAULT_SIGNALS  # torchrun passes USR1 (SLURM's warning) on to the trainer
    script = argv.index("train_gpt2.py")
    assert argv[script + 1 :] == [
        "--input_bin",
        glob.escape(str(caller)) + "/rel/tr_*.bin",
        "--input_val_bin=" + glob.escape(str(caller)) + "/rel/v_*.bin",
        "--records_dir",
        f"{caller}/recs",
        "--checkpoint_dir=/abs/ck",
        "--resume",
        "latest",
        "--seed",
        "3",
    ]
    assert len(glob.glob(argv[script + 2])) == 2 and len(glob.glob(argv[script + 3].split("=", 1)[1])) == 1


def test_run_sh_fetches_the_data_without_input_bin_and_keeps_the_callers_signals(tmp_path):
    calls = run_sh_calls(
        tmp_path,
        tmp_path,
        ["--resume=ck/x.pt", "--input_val_bin", "/v/*.bin"],
        TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM",
    )
    assert [argv[0] for argv, _, _ in calls] == ["data/cached_fineweb10B.py", "-m"]
    assert calls[1][0][-3:] == [f"--resume={tmp_path}/ck/x.pt", "--input_val_bin", "/v/*.bin"]
    assert {signals for _, _, signals in calls} == {"SIGTERM"}


def test_run_sh_trains_on_relative_paths_from_another_folder(tmp_path):
    """End to end on the CPU: shards, record and checkpoint where the caller's relative paths point."""
    caller = tmp_path / "run[1]"
    (caller / "shards").mkdir(parents=True)
    for i in (1, 2):
        write_shard(caller / "shards" / f"tiny_train_{i:06d}.bin", learnable_tokens(6000, seed=i))
    write_shard(caller / "shards" / "tiny_val_000000.bin", learnable_tokens(2000, seed=99))
    flags = [
        *TINY_FLAGS,
        "--num_iterations=3",
        "--warmdown_iters=1",
        "--input_bin",
        "shards/tiny_train_*.bin",
    ]
    flags += ["--input_val_bin=shards/tiny_val_*.bin", "--records_dir", "recs", "--checkpoint_dir=ck"]
    env = {**os.environ, "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("NNODES", None)
    r = subprocess.run(
        ["bash", RUN_SH, *flags], cwd=caller, env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    records = glob.glob(glob.escape(str(caller)) + "/recs/*_run/*.txt")
    assert len(records) == 1 and STEP_LINE.findall(open(records[0]).read())[-1][:3] == ("3", "3", "val_loss")
    assert len(glob.glob(glob.escape(str(caller)) + "/ck/run/*.pt")) == 1


def test_ctrl_c_under_run_sh_ends_with_the_trainers_lines_and_exit_130(shards, tmp_path):
    """SIGINT to run.sh's process group, as a terminal's Ctrl-C: torchrun's noise stays off the console."""
    flags = [*TINY_FLAGS, *shards, "--num_iterations=100000", "--warmdown_iters=0", "--progress_seconds=1e-9"]
    env = {**os.environ, "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("NNODES", None)
    run = subprocess.Popen(
        ["bash", RUN_SH, *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in run.stdout:
        seen.append(line)
        if re.match(r"step \d+/100000 ", line):
            os.killpg(run.pid, signal.SIGINT)
            break
    console = ("".join(seen) + run.communicate(timeout=120)[0]).splitlines()
    assert run.returncode == 130, console[-30:]
    assert console[-1].startswith("summary: ") and "Traceback" not in "\n".join(console)
    stopped = console[-2]
    assert re.match(r"stopped: SIGINT at step \d+: checkpoint saved; continue with: ", stopped)
    command = shlex.split(stopped.split("continue with: ", 1)[1])
    assert command[:3] == ["NPROC_PER_NODE=1", f"PYTHON={sys.executable}", RUN_SH]
    assert command[3].startswith(f"--resume={shards.checkpoint_dir}/run/")
    assert not glob.glob(f"{tmp_path}/run_sh_torchrun.*")  # a stop by signal keeps no log of torchrun's noise
