"""The trainer under hostile use: every failure is one line, a true message, and nothing lost on disk."""

import errno
import glob
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, TORCHRUN, read_record

import harness
import train_gpt2

STEPS = ["--num_iterations=6", "--warmdown_iters=2", "--val_loss_every=0", "--save_every_minutes=0"]


def one_line(stop):
    message = str(stop.value)
    assert "\n" not in message and message.startswith("train_gpt2.py")
    return message


def checkpoints(folder):
    return sorted(glob.glob(f"{folder}/*/*.pt*"))


@pytest.fixture
def tmpfs(tmp_path):
    """A 128 KiB filesystem (room for a record's source, not its steps) to fill up for real; skipped where
    this process may not mount one."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip(
            "cannot mount a tmpfs here (needs root): test_a_record_line_that_fails_is_left_out_whole "
            "fakes the same write error"
        )
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)])  # a file torch.save left open must not keep it busy


def test_a_full_disk_for_the_record_stops_the_run_with_a_checkpoint(shards, tmpfs, tmp_path):
    """The record's disk fills mid-run: the run stops at the next step with a checkpoint on the other disk,
    says which folder is full in one line, and the record holds whole lines only."""
    flags = (
        TINY_FLAGS
        + shards.data
        + [
            f"--records_dir={tmpfs}",
            f"--checkpoint_dir={tmp_path}/checkpoints",
            "--num_iterations=5000",
            "--warmdown_iters=0",
            "--val_loss_every=0",
            "--progress_seconds=0",
        ]
    )
    run = subprocess.run(
        [sys.executable, "train_gpt2.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(run.stderr.splitlines()) == 1 and "full" in run.stderr and str(tmpfs) in run.stderr
    saved = checkpoints(f"{tmp_path}/checkpoints")
    assert len(saved) == 1 and saved[0].endswith(".pt")  # no progress lost
    record = read_record(tmpfs)
    assert record.endswith("\n")  # only whole lines
    recorded = [
        int(line.split(":")[1].split("/")[0]) for line in record.splitlines() if line.startswith("step:")
    ]
    assert 0 < recorded[-1] <= int(saved[0][-9:-3]) < 5000  # the checkpoint holds every step the record shows


def test_a_full_disk_for_checkpoints_is_one_line_and_leaves_no_temp_file(shards, tmpfs, tmp_path):
    flags = (
        TINY_FLAGS
        + shards.data
        + [f"--records_dir={tmp_path}/records", f"--checkpoint_dir={tmpfs}", *STEPS, "--save_every=3"]
    )
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(flags)
    message = one_line(stop)
    assert "full" in message and str(tmpfs) in message and "enforce fail" not in message
    assert checkpoints(tmpfs) == []  # the temp file of the failed save is gone
    record = read_record(f"{tmp_path}/records")
    assert "stopped: " in record and "full" in record.splitlines()[-2]
    assert record.splitlines()[-1].startswith("summary: ")


def test_a_record_line_that_fails_is_left_out_whole(tmp_path, monkeypatch):
    log = harness.RunLog(str(tmp_path / "record.txt"))
    log("first line", console=False)
    real_write = os.write

    def half_then_full(fd, data):  # the disk takes half the line, then is full
        if fd == log.fd and len(data) > 4:
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    log("a long second line that will not fit", console=False)
    assert "full" in str(log.error) and str(tmp_path) in str(log.error)
    monkeypatch.undo()
    log(
        "third", console=False
    )  # the disk has room again, but a record with a hole would mislead: console only
    log.close()
    assert (tmp_path / "record.txt").read_text() == "first line\n"


def test_an_existing_records_dir_that_cannot_be_written_is_one_line(shards, tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here; the file-as-folder case is in test_loader.py")
    try:
        with pytest.raises(SystemExit) as stop:
            train_gpt2.main(TINY_FLAGS + shards.data + [f"--records_dir={folder}", *STEPS])
        message = one_line(stop)
        assert str(folder) in message and "--records_dir" in message
    finally:
        subprocess.run(["umount", "--lazy", str(folder)])  # a file torch.save left open must not keep it busy


def test_resume_at_or_past_the_last_step_is_refused(shards, tmp_path, capsys):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3"]) == 0
    checkpoint = checkpoints(f"{tmp_path}/checkpoints")[-1]
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main([f"--resume={checkpoint}"])
    assert "--num_iterations" in one_line(stop) and "6" in str(stop.value)
    before = glob.glob(f"{tmp_path}/records/*/*.txt")
    with pytest.raises(SystemExit):
        train_gpt2.main([f"--resume={checkpoint}", "--num_iterations=4", "--warmdown_iters=1"])
    assert glob.glob(f"{tmp_path}/records/*/*.txt") == before  # no empty record


def test_resume_past_the_shards_of_this_machine_is_refused(shards, tmp_path, capsys):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3"]) == 0
    checkpoint = torch.load(checkpoints(f"{tmp_path}/checkpoints")[0], weights_only=True)
    checkpoint["data"] = dict(shard_index=1, position=0)  # a run that had reached the second shard
    torch.save(checkpoint, tmp_path / "far.pt")
    one_shard = shards.data[0].replace("tiny_train_*.bin", "tiny_train_000001.bin")
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main([f"--resume={tmp_path}/far.pt", one_shard])
    assert "shard 2" in one_line(stop)


@pytest.mark.parametrize("damage", ["wrong shape", "missing key", "nothing but the format"])
def test_a_checkpoint_that_contradicts_its_own_flags_is_refused(shards, tmp_path, damage, capsys):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3"]) == 0
    checkpoint = torch.load(checkpoints(f"{tmp_path}/checkpoints")[0], weights_only=True)
    if damage == "wrong shape":
        checkpoint["model"]["blocks.0.mlp.up.weight"] = torch.zeros(3, 3)
    elif damage == "missing key":
        del checkpoint["optimizers"]["muon"]
    else:
        checkpoint = {"format": checkpoint["format"]}
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main([f"--resume={tmp_path}/bad.pt"])
    assert f"{tmp_path}/bad.pt" in one_line(stop)


def test_resume_latest_stays_within_the_run_name(shards, tmp_path, capsys):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3", "--run_name=mine"]) == 0
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(shards + ["--resume=latest", "--run_name=other"])
    assert "--run_name=other" in one_line(stop)


def test_a_stale_checkpoint_temp_file_is_named(shards, tmp_path, capsys):
    os.makedirs(f"{tmp_path}/checkpoints/run")
    stale = f"{tmp_path}/checkpoints/run/old-step000100.pt.tmp"
    with open(stale, "wb") as f:
        f.write(b"\0" * 2**20)
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 0
    assert stale in capsys.readouterr().out and stale in read_record(f"{tmp_path}/records")


def test_a_training_glob_that_matches_the_val_shard_is_refused(shards, tmp_path):
    everything = shards.data[0].replace("tiny_train_*.bin", "tiny_*.bin")
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(TINY_FLAGS + shards + STEPS + [everything])
    assert "--input_bin" in one_line(stop) and "tiny_val_000000.bin" in str(stop.value)


def test_a_model_too_large_for_memory_is_one_line(shards):
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--vocab_size=100000000000000"])
    assert "--vocab_size" in one_line(stop)


def test_a_signal_during_start_up_stops_at_once(shards, monkeypatch, capsys):
    slow_build = train_gpt2.build_run

    def build_then_get_signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came during the shard checks or the compilation
        time.sleep(30)
        return slow_build(*args)

    monkeypatch.setattr(train_gpt2, "build_run", build_then_get_signalled)
    started = time.monotonic()
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10
    assert "SIGTERM" in capsys.readouterr().err


def test_a_signal_during_shutdown_exits_without_a_traceback(monkeypatch):
    stop = harness.StopRequest()
    stop.phase = "shutdown"
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit) as done:
        stop._handle(signal.SIGINT, None)
    assert done.value.code == 130


def test_a_failing_rank_is_named_in_rank_0s_record(shards, tmp_path):
    """Rank 1 meets bad data that rank 0 does not see: rank 0's record still ends, naming rank 1 and why."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import harness
import train_gpt2
load, calls = train_gpt2.ShardLoader._load, []
def failing_load(self):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 4:
        raise train_gpt2.ShardError("shard_x.bin: only rank 1 reads this")
    return load(self)
train_gpt2.ShardLoader._load = failing_load
sys.exit(train_gpt2.main(sys.argv[1:]))
""")
    run = subprocess.run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            str(script),
            *TINY_FLAGS,
            *shards,
            "--num_iterations=20",
            "--warmdown_iters=2",
            "--val_loss_every=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    lines = read_record(f"{tmp_path}/records").splitlines()
    assert lines[-2].startswith("stopped: rank 1 failed: shard_x.bin: only rank 1 reads this")
    assert lines[-1].startswith("summary: ") and "world_size:2" in lines[-1]


def test_a_checkpoint_that_fails_to_save_ends_every_rank(shards, tmpfs, tmp_path):
    """Only rank 0 writes: its full disk must not leave rank 1 waiting in the next step's collectives."""
    run = subprocess.run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            "train_gpt2.py",
            *TINY_FLAGS,
            *shards.data,
            f"--records_dir={shards.records_dir}",
            f"--checkpoint_dir={tmpfs}",
            *STEPS,
            "--save_every=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert checkpoints(tmpfs) == []
    lines = read_record(f"{tmp_path}/records").splitlines()
    assert (
        lines[-2].startswith("stopped: rank ") and "full" in lines[-2] and lines[-1].startswith("summary: ")
    )


def test_keeping_no_checkpoint_is_refused_before_anything_is_written(shards, tmp_path):
    """--keep_checkpoints=0 would delete the checkpoint a 'saved' line just named: refused up front."""
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--keep_checkpoints=0"])
    assert "--keep_checkpoints" in one_line(stop)
    assert not os.path.exists(f"{tmp_path}/records") and not os.path.exists(f"{tmp_path}/checkpoints")


def test_a_checkpoint_write_that_fails_on_a_full_disk_is_one_line(shards, tmp_path, monkeypatch, capsys):
    """Sibling of the tmpfs test where no filesystem can be mounted: torch.save fails as on a full disk."""

    def full_disk_save(state, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7552 vs 7446")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(harness.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3"])
    assert "full" in one_line(stop) and "enforce fail" not in str(stop.value)
    assert checkpoints(f"{tmp_path}/checkpoints") == []  # the partial temp file is gone
