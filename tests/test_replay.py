"""Tests for records/replay.py: a record's files and command written out, refusals, and a CPU run repeated."""

import os
import re
import subprocess
import sys

from conftest import ROOT, TINY_FLAGS, assert_one_line_error, losses, read_record
from test_compare import DIV, OUR_ENV, SRC_A, make_log

REPLAY = os.path.join(ROOT, "records", "replay.py")
HARNESS = ["def helper():", "    return 1", ""]


def replay(*args, timeout=60):
    return subprocess.run(
        [sys.executable, REPLAY, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def our_record(path, threads="cpu_threads: 2", world_size=1):
    flags = [
        "--num_layers=2",
        "--records_dir=/x/records",
        "--checkpoint_dir=/x/ck",
        "--run_name=a b",
        "--seed=3",
    ]
    lines = [*SRC_A, "-" * 40, "# harness.py", "-" * 40, *HARNESS, DIV, *OUR_ENV, "Hyperparameters:", *flags]
    lines += ["--resume=", "Notes:", threads, DIV, "step:0/10 val_loss:5.5000 train_time:0ms step_avg:nanms"]
    lines += [f"summary: final_val_loss:5.5 train_time:0ms world_size:{world_size} device:CPU x"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_out_writes_every_file_and_the_command(tmp_path):
    out = tmp_path / "rep[1]"  # a path, not a pattern
    r = replay(our_record(tmp_path / "r.txt"), "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "train_gpt2.py").read_text().splitlines() == SRC_A[:-1]
    assert (out / "harness.py").read_text() == "\n".join(HARNESS).rstrip("\n") + "\n"
    line = r.stdout.strip()
    assert line in (out / "command.sh").read_text()
    assert line.startswith("OMP_NUM_THREADS=2 python ") and f"{out}/train_gpt2.py" in line
    assert "--num_layers=2" in line and "--seed=3" in line
    for per_run in ("records_dir", "checkpoint_dir", "run_name", "resume"):
        assert f"--{per_run}" not in line
    r = replay(our_record(tmp_path / "r4.txt", threads="attention: flash", world_size=4), "--out", out)
    assert "OMP_NUM_THREADS" not in r.stdout and "torchrun --standalone --nproc_per_node=4 " in r.stdout


def test_public_record_is_written_not_run(tmp_path):
    public = make_log(tmp_path / "pub.txt", public=True)
    r = replay(public, "--out", tmp_path / "o")
    assert r.returncode == 0 and r.stdout.strip().endswith(
        "--nproc_per_node=8 " + str(tmp_path / "o" / "train_gpt2.py")
    )
    assert (tmp_path / "o" / "train_gpt2.py").read_text().splitlines() == SRC_A[:-1]
    assert_one_line_error(replay(public, "--out", tmp_path / "o", "--run"), "public", "8x NVIDIA H100")


def test_cut_or_bad_records_are_refused(tmp_path):
    whole = our_record(tmp_path / "r.txt").read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(whole[: whole.index("    return 1")])  # cut inside harness.py, before the '=' line
    assert_one_line_error(replay(cut, "--out", tmp_path / "o"), "cut or incomplete")
    broken = tmp_path / "broken.txt"
    broken.write_text(whole.replace("    return 1", "    return (1"))  # a source cut mid-expression
    assert_one_line_error(replay(broken, "--out", tmp_path / "o"), "harness.py", "cut or incomplete")
    assert_one_line_error(replay(tmp_path / "none.txt", "--out", tmp_path / "o"), "no such file")
    assert_one_line_error(replay(tmp_path / "r.txt"), "--out")
    assert_one_line_error(replay(tmp_path / "r.txt", "--out", tmp_path / "o", "--", "--seed=1"), "--run")


def test_replay_repeats_a_cpu_run(shards, tmp_path):
    """A CPU record replayed with --run gives the same loss lines, and compare.py shows no code diff."""
    flags = [*TINY_FLAGS, "--num_iterations=6", "--warmdown_iters=2", *shards]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_gpt2.py"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    records = shards.records_dir
    original = read_record(records)
    path = next(os.path.join(d, f) for d, _, fs in os.walk(records) for f in fs if f.endswith(".txt"))
    out = tmp_path / "replayed"
    r = replay(path, "--out", out, "--run", timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = read_record(out / "records")
    assert losses(again) == losses(original) and len(losses(original)) == 6
    assert losses(again, "val_loss") == losses(original, "val_loss")
    assert "(script sources identical)" in r.stdout and "hyperparameters (A -> B)" not in r.stdout
    names = re.findall(r"^-{40}\n# (\S+)\n-{40}$", original, re.M)
    assert "harness.py" in names and all(
        (out / name).is_file() for name in names
    )  # harness.py and the rest, beside the copy
