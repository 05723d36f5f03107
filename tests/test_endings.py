"""Any way a run can end keeps its work: signals, a lost console, bad or vanishing data, odd folder names,
and resumes that change things. None of these tests depends on timing: every disturbance is made from
inside the run (a hook on the loader's prefetch, which runs once per step) or before it starts."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_FLAGS, TORCHRUN, learnable_tokens, read_record

import harness
import train_gpt2
from data.shards import write_shard

STEPS = ["--num_iterations=12", "--warmdown_iters=2", "--val_loss_every=0", "--save_every_minutes=0"]


def named(shards):
    """The shards fixture's flags by name: {'input_bin': ..., 'records_dir': ..., ...}."""
    return dict(flag[2:].split("=", 1) for flag in shards)


def one_line(stop):
    message = str(stop.value)
    assert "\n" not in message and message.startswith("train_gpt2.py"), message
    return message


def saved_steps(folder):
    return sorted(
        int(m[1]) for p in glob.glob(f"{glob.escape(folder)}/*/*.pt") if (m := re.search(r"step(\d+)", p))
    )


def at_prefetch(monkeypatch, call, action):
    """Run action() just before the loader's `call`-th prefetch (1-based), which step `call` makes."""
    prefetch, calls = train_gpt2.ShardLoader.prefetch, []

    def hooked(self):
        calls.append(1)
        if len(calls) == call:
            action()
        return prefetch(self)

    monkeypatch.setattr(train_gpt2.ShardLoader, "prefetch", hooked)


# ----------------------------------------------------------------------------------------------
# Signals: every "end now" signal checkpoints at the next step boundary


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT, signal.SIGTERM])
def test_a_hang_up_or_a_warning_signal_checkpoints_and_stops(shards, monkeypatch, signum, capsys):
    at_prefetch(monkeypatch, 3, lambda: os.kill(os.getpid(), signum))
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 128 + signum
    paths = named(shards)
    lines = read_record(paths["records_dir"]).splitlines()
    stopped = re.match(rf"stopped: {signal.Signals(signum).name} at step (\d+): checkpoint saved", lines[-2])
    assert stopped and lines[-1].startswith("summary: ")
    assert saved_steps(paths["checkpoint_dir"]) == [int(stopped[1])] == [3]


# ----------------------------------------------------------------------------------------------
# A lost console is no reason to stop


def run_with_stdout(flags, stdout):
    return subprocess.run(
        [sys.executable, "train_gpt2.py", *flags], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("console", ["closed pipe", "full disk"])
def test_a_lost_console_drops_its_output_and_training_goes_on(shards, console):
    """`| head -1` that has exited (EPIPE), `> /dev/full` (ENOSPC): the same as a hung-up terminal (EIO)."""
    flags = TINY_FLAGS + shards + STEPS + ["--save_every=6"]
    if console == "closed pipe":
        read_end, write_end = os.pipe()
        os.close(read_end)  # before the run starts: its first line already meets EPIPE
        try:
            run = run_with_stdout(flags, write_end)
        finally:
            os.close(write_end)
    else:
        with open("/dev/full", "w") as full:
            run = run_with_stdout(flags, full)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    record = read_record(named(shards)["records_dir"])
    lost = [line for line in record.splitlines() if line.startswith("console: lost")]
    assert len(lost) == 1 and ("BrokenPipeError" if console == "closed pipe" else "No space") in lost[0]
    assert "step:12/12 val_loss:" in record and record.splitlines()[-1].startswith("summary: final_val_loss:")
    assert saved_steps(named(shards)["checkpoint_dir"]) == [6, 12]


def test_a_console_that_fails_with_eio_is_dropped(tmp_path, monkeypatch, capsys):
    log = harness.RunLog(str(tmp_path / "record.txt"))

    def hung_up(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(harness, "print", hung_up, raising=False)
    monkeypatch.setattr(harness, "drop_console", lambda: True)  # pytest owns this process's stdout
    log("one")
    log("two")
    log.close()
    lines = (tmp_path / "record.txt").read_text().splitlines()
    assert (
        lines[0]
        == "console: lost (OSError: [Errno 5] Input/output error): output only to this record from here on"
    )
    assert lines[1:] == ["one", "two"]


# ----------------------------------------------------------------------------------------------
# Data that goes bad mid-run: the healthy model is saved first, and nothing is memory-mapped


def spoil_second_shard(paths):
    tokens = learnable_tokens(6000, seed=2)
    tokens[4000] = 300  # past --vocab_size=256
    write_shard(paths["input_bin"].replace("*", "000002"), tokens)


def truncate_first_shard(paths):
    os.truncate(paths["input_bin"].replace("*", "000001"), 1024 + 2 * 100)  # a memory map: SIGBUS here


def delete_first_shard(paths):
    os.remove(paths["input_bin"].replace("*", "000001"))


def delete_val_shard(paths):
    os.remove(paths["input_val_bin"].replace("*", "000000"))


@pytest.mark.parametrize(
    "damage, when, saved_at, message",
    [
        ("vocab", None, 23, r"tiny_train_000002.bin: token 4000 is id 300, not below --vocab_size=256"),
        ("truncated", 4, 4, r"tiny_train_000001.bin: ends before token \d+: it shrank during the run"),
        ("deleted", 4, 4, r"tiny_train_000001.bin: cannot read it \(No such file or directory\): deleted"),
        ("val deleted", 3, 5, r"tiny_val_000000.bin: cannot read it"),
    ],
)
def test_data_that_goes_bad_mid_run_is_one_line_after_a_checkpoint(
    shards, monkeypatch, damage, when, saved_at, message, capsys
):
    """Two shards of 23 steps each; the val shard is read at step 5 (--val_loss_every=5)."""
    paths = named(shards)
    damages = dict(vocab=spoil_second_shard, truncated=truncate_first_shard, deleted=delete_first_shard) | {
        "val deleted": delete_val_shard
    }
    if when is None:
        damages[damage](paths)  # the second shard opens at step 23
    else:
        at_prefetch(monkeypatch, when, lambda: damages[damage](paths))
    flags = TINY_FLAGS + shards + ["--num_iterations=30", "--warmdown_iters=2", "--save_every_minutes=0"]
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(flags)
    assert re.search(message, one_line(stop)), stop.value
    assert f"at step {saved_at}: checkpoint saved" in str(stop.value)
    assert saved_steps(paths["checkpoint_dir"]) == [saved_at]
    lines = read_record(paths["records_dir"]).splitlines()
    assert lines[-2].startswith("stopped: ") and re.search(message, lines[-2])
    assert lines[-1].startswith("summary: ")
    assert f"step:{saved_at}/30 train_loss:" in "\n".join(lines)


def test_the_checkpoint_before_bad_data_resumes_at_the_bad_batch(shards, monkeypatch, tmp_path, capsys):
    """After the data is fixed, --resume=latest continues exactly where the bad shard began."""
    paths = named(shards)
    good = np.fromfile(paths["input_bin"].replace("*", "000002"), dtype=np.uint16)
    spoil_second_shard(paths)
    flags = TINY_FLAGS + shards + ["--num_iterations=26", "--warmdown_iters=2", "--val_loss_every=0"]
    with pytest.raises(SystemExit):
        train_gpt2.main(flags + ["--save_every_minutes=0"])
    good.tofile(paths["input_bin"].replace("*", "000002"))
    assert (
        train_gpt2.main(
            [
                f"--records_dir={tmp_path}/resumed",
                f"--checkpoint_dir={shards.checkpoint_dir}",
                "--resume=latest",
            ]
        )
        == 0
    )
    whole = [f"--records_dir={tmp_path}/whole", f"--checkpoint_dir={tmp_path}/c2"]
    assert train_gpt2.main(flags + whole) == 0

    def after_the_stop(folder):
        return re.findall(r"^step:(2[4-6])/26 train_loss:(\S+)", read_record(f"{tmp_path}/{folder}"), re.M)

    assert after_the_stop("resumed") == after_the_stop("whole") != []


def test_a_shard_that_shrinks_under_the_loader_is_a_shard_error(tmp_path):
    write_shard(tmp_path / "s_000000.bin", np.arange(4000) % 256)
    loader = train_gpt2.ShardLoader(str(tmp_path / "s_*.bin"), 4, 32, 0, 1, torch.device("cpu"), 256)
    loader.next_batch()
    os.truncate(tmp_path / "s_000000.bin", 1024 + 2 * 200)
    with pytest.raises(train_gpt2.ShardError, match="s_000000.bin: ends before token 257: it shrank"):
        loader.next_batch()
    loader.prefetch()  # the loop's way: the error waits, the state stays before the batch
    assert isinstance(loader.error, train_gpt2.ShardError) and loader.state_dict()["position"] == 128


# ----------------------------------------------------------------------------------------------
# Paths are paths: a folder name with glob characters


def test_folders_with_glob_characters_resume_and_name_stale_files(shards, tmp_path, capsys):
    odd = dict(records_dir=f"{tmp_path}/rec[1]", checkpoint_dir=f"{tmp_path}/ck[1]*?")
    flags = TINY_FLAGS + shards.data + [f"--{k}={v}" for k, v in odd.items()]
    assert train_gpt2.main(flags + STEPS + ["--save_every=6"]) == 0
    stale = f"{odd['checkpoint_dir']}/run/old-step000001.pt.tmp"
    open(stale, "wb").close()
    assert train_gpt2.main(flags[len(TINY_FLAGS) :] + ["--resume=latest", "--num_iterations=14"]) == 0
    assert stale in capsys.readouterr().out
    records = glob.glob(f"{glob.escape(odd['records_dir'])}/*/*.txt")
    resumed = [open(p).read() for p in records if re.search("^resumed_from:", open(p).read(), re.M)]
    assert len(resumed) == 1 and re.search(r"resumed_from: .*-step000012\.pt at step 12", resumed[0])
    assert stale in resumed[0]


# ----------------------------------------------------------------------------------------------
# Resume questions changes


def first_run(shards, extra=()):
    assert (
        train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3", "--keep_checkpoints=9", *extra]) == 0
    )
    return sorted(glob.glob(f"{named(shards)['checkpoint_dir']}/run/*.pt"))


def resumed_record(shards, tmp_path, flags):
    assert (
        train_gpt2.main(
            [f"--records_dir={tmp_path}/resumed", f"--checkpoint_dir={shards.checkpoint_dir}", *flags]
        )
        == 0
    )
    return read_record(f"{tmp_path}/resumed")


def test_changed_batch_seq_len_and_data_are_noted(shards, tmp_path, capsys):
    checkpoint = first_run(shards)[1]  # step 6, position 1536 of the first shard
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in glob.glob(named(shards)["input_bin"]):
        shutil.copy(path, copy)
    flags = [
        f"--resume={checkpoint}",
        "--batch_size=16",
        "--seq_len=16",
        f"--input_bin={copy}/tiny_train_*.bin",
    ]
    record = resumed_record(shards, tmp_path, [*flags, "--num_iterations=14"])
    notes = [line for line in record.splitlines() if line.startswith("resume_changes: ")]
    assert notes == [
        f"resume_changes: --input_bin={copy}/tiny_train_*.bin (the checkpoint's: {shards.data[0][12:]})",
        "resume_changes: --batch_size=16 (the checkpoint's: 8)",
        "resume_changes: --seq_len=16 (the checkpoint's: 32)",
        "resume_changes: --num_iterations=14 (the checkpoint's: 12)",
    ]


def test_resume_on_data_too_small_for_the_checkpoint_is_refused(shards, tmp_path, capsys):
    checkpoint = first_run(shards)[3]  # step 12: token 3072 of the first shard
    write_shard(tmp_path / "small_000001.bin", learnable_tokens(2000, seed=1))
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(
            [f"--resume={checkpoint}", f"--input_bin={tmp_path}/small_*.bin", "--num_iterations=14"]
        )
    assert "small_000001.bin ends before token 3072, where the run continues" in one_line(stop)


def test_resume_latest_takes_the_highest_step_and_names_what_it_skips(shards, tmp_path, capsys):
    saved = first_run(shards)  # steps 3, 6, 9, 12
    folder = os.path.dirname(saved[0])
    os.utime(saved[0])  # the newest file is the oldest step: mtime must not decide
    os.mkdir(f"{folder}/000000-00000000-step000099.pt")
    os.symlink(f"{tmp_path}/gone.pt", f"{folder}/000000-00000000-step000098.pt")
    with open(saved[-1], "rb") as f, open(f"{folder}/000000-00000000-step000097.pt", "wb") as g:
        g.write(f.read()[:5000])
    capsys.readouterr()
    record = resumed_record(shards, tmp_path, ["--resume=latest", "--num_iterations=14"])
    assert f"resumed_from: {saved[-1]} at step 12" in record
    skipped = [line for line in record.splitlines() if line.startswith("resume_skipped: ")]
    assert [re.search(r"step0000(\d\d)", line)[1] for line in skipped] == ["99", "98", "97"]
    assert "a folder there" in skipped[0] and "a dangling link there" in skipped[1]
    assert "not a readable checkpoint" in skipped[2]
    assert capsys.readouterr().err.count("--resume=latest skips a broken checkpoint") == 3


def test_nothing_but_broken_checkpoints_is_one_line(shards, tmp_path):
    folder = f"{named(shards)['checkpoint_dir']}/run"
    os.makedirs(f"{folder}/a-step000001.pt")
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(shards + ["--resume=latest"])
    assert "found no readable checkpoint" in one_line(stop) and "a-step000001.pt" in str(stop.value)


def test_pruning_covers_the_checkpoints_of_the_runs_earlier_parts(shards, tmp_path, capsys):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3", "--keep_checkpoints=2"]) == 0
    folder = f"{named(shards)['checkpoint_dir']}/run"
    open(f"{folder}/mine.pt", "wb").close()  # not a name save_checkpoint writes: never deleted
    resumed_record(shards, tmp_path, ["--resume=latest", "--num_iterations=18", "--save_every=3"])
    names = sorted(os.listdir(folder))
    assert [n[-9:-3] for n in names if n != "mine.pt"] == ["000015", "000018"] and "mine.pt" in names


def test_pruning_never_touches_another_run_of_the_same_name(shards, tmp_path, capsys):
    for _ in range(2):  # two fresh runs of one --run_name, each keeping its own 2 newest checkpoints
        assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3", "--keep_checkpoints=2"]) == 0
    names = sorted(os.listdir(f"{shards.checkpoint_dir}/run"))
    assert len({name.split("-step")[0] for name in names}) == 2  # two run ids
    assert sorted(name[-9:-3] for name in names) == ["000009", "000009", "000012", "000012"]


@pytest.mark.parametrize(
    "flag",
    [
        "--seed=18446744073709551616",
        "--muon_lr=1e308",
        "--embed_lr=inf",
        "--head_lr=nan",
        "--logit_softcap=inf",
        "--logit_softcap=1e-300",
        "--rope_base=1e-300",
        "--save_every_minutes=inf",
        "--memory_limit_gb=nan",
    ],
)
def test_flags_out_of_range_are_one_line(shards, flag):
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(TINY_FLAGS + shards + STEPS + [flag])
    assert flag.split("=")[0] in one_line(stop)


def test_a_checkpoint_of_non_finite_weights_is_named(shards, tmp_path, capsys):
    checkpoint = torch.load(first_run(shards)[0], weights_only=True)
    checkpoint["model"]["blocks.0.mlp.up.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main([f"--resume={tmp_path}/nan.pt"])
    assert f"checkpoint {tmp_path}/nan.pt holds non-finite weights (blocks.0.mlp.up.weight)" in one_line(stop)
    assert "learning rate" not in str(stop.value)


def test_a_checkpoint_folder_deleted_mid_run_is_made_again(shards, monkeypatch, capsys):
    folder = f"{named(shards)['checkpoint_dir']}/run"
    at_prefetch(monkeypatch, 5, lambda: shutil.rmtree(folder))
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3"]) == 0
    assert saved_steps(named(shards)["checkpoint_dir"]) == [9, 12]


def test_a_save_that_fails_with_its_folder_gone_is_one_line(shards, monkeypatch, capsys):
    """The error handler itself must not fail (shutil.disk_usage of a folder that is gone)."""
    folder = f"{named(shards)['checkpoint_dir']}/run"

    def save_into_nothing(state, path):
        shutil.rmtree(folder)
        raise RuntimeError(f"Parent directory {folder} does not exist.")

    monkeypatch.setattr(torch, "save", save_into_nothing)
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=3"])
    assert "cannot write" in one_line(stop) and "does not exist" in str(stop.value)


def test_a_data_error_on_one_rank_still_saves_on_every_rank(shards, tmp_path):
    """Only rank 1 reads a window past a shard's end: the ranks agree at the step boundary, save the step
    before it together, and rank 0's record names rank 1's error."""
    script = tmp_path / "rank1_shrinks.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import train_gpt2
read, windows = train_gpt2.read_tokens, []
def shrinking(path, start, count):
    windows.append(count == 129)  # a batch window: 4 sequences of 32 tokens, and the next token
    if os.environ["RANK"] == "1" and sum(windows) == 4:
        raise train_gpt2.ShardError(f"{{path}}: ends before token {{start + count}}: it shrank")
    return read(path, start, count)
train_gpt2.read_tokens = shrinking
sys.exit(train_gpt2.main(sys.argv[1:]))
""")
    run = subprocess.run(
        [*TORCHRUN, "--nproc_per_node=2", str(script), *TINY_FLAGS, *shards, *STEPS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    lines = read_record(named(shards)["records_dir"]).splitlines()
    assert re.match(
        r"stopped: rank 1 failed: .*tiny_train_000001.bin: ends before token \d+: it shrank", lines[-2]
    )
    assert "at step 3: checkpoint saved" in lines[-2] and lines[-1].startswith("summary: ")
    assert saved_steps(named(shards)["checkpoint_dir"]) == [3]
