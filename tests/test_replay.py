"""Tests for records/replay.py: a record's files and command written out, refusals, and a CPU run repeated."""

import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT, TINY_FLAGS, assert_one_line_error, losses, read_record
from test_compare import DIV, OUR_ENV, SRC_A, make_log

import train_gpt2

REPLAY = os.path.join(ROOT, "records", "replay.py")
HARNESS = ["def helper():", "    return 1", ""]


def replay(*args, timeout=60):
    return subprocess.run(
        [sys.executable, REPLAY, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def our_record(path, threads="cpu_threads: 2", world_size=1, source=SRC_A, harness=True):
    flags = [
        "--num_layers=2",
        "--records_dir=/x/records",
        "--checkpoint_dir=/x/ck",
        "--run_name=a b",
        "--seed=3",
    ]
    embedded = ["-" * 40, "# harness.py", "-" * 40, *HARNESS] if harness else []
    lines = [*source, *embedded, DIV, *OUR_ENV, "Hyperparameters:", *flags]
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
    words = shlex.split(r.stdout)
    assert words[:3] == ["OMP_NUM_THREADS=2", sys.executable, f"{out}/train_gpt2.py"]
    assert "--num_layers=2" in words and "--seed=3" in words
    assert f"--records_dir={out}/records" in words and f"--checkpoint_dir={out}/checkpoints" in words
    assert not any(word.startswith(("--run_name", "--resume")) for word in words)
    exec_line = r.stdout.strip().replace("OMP_NUM_THREADS=2 ", "OMP_NUM_THREADS=2 exec ", 1) + ' "$@"'
    assert (out / "command.sh").read_text().splitlines()[-1] == exec_line  # the variable before exec
    r = replay(our_record(tmp_path / "r4.txt", threads="attention: flash", world_size=4), "--out", out)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1"]
    assert shlex.split(r.stdout)[:7] == [*torchrun, "--nproc_per_node=4", f"{out}/train_gpt2.py"]


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


def test_a_record_without_a_module_its_source_imports_is_refused_and_leaves_no_folder(tmp_path):
    record = our_record(tmp_path / "r.txt", source=["import harness", *SRC_A], harness=False)
    out = tmp_path / "new" / "out"
    assert_one_line_error(replay(record, "--out", out), "imports harness", "does not embed")
    assert_one_line_error(replay(record, "--out", out, "--run"), "imports harness")
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")  # --out under a file: the folder cannot be made
    assert_one_line_error(replay(our_record(tmp_path / "r2.txt"), "--out", tmp_path / "file" / "o"), "--out")


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


def test_command_sh_repeats_the_run_with_sh_from_another_folder(shards, tmp_path):
    flags = [*TINY_FLAGS, "--num_iterations=4", "--warmdown_iters=1", *shards]
    assert train_gpt2.main(flags) == 0
    original = read_record(shards.records_dir)
    path = next(
        os.path.join(d, f) for d, _, fs in os.walk(shards.records_dir) for f in fs if f.endswith(".txt")
    )
    out, elsewhere = tmp_path / "replayed", tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert replay(path, "--out", out).returncode == 0
    r = subprocess.run(["sh", out / "command.sh"], capture_output=True, text=True, timeout=120, cwd=elsewhere)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    again = read_record(out / "records")
    assert losses(again) == losses(original) and len(losses(original)) == 4
    assert list(elsewhere.iterdir()) == []
