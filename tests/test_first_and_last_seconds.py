"""The first and last seconds of a run, and the lines a user reads then: a signal while compiling or while the
record opens, a planned stop that is said, the final model kept, and messages that name what was typed."""

import glob
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    TINY_FLAGS,
    RunFlags,
    assert_one_line_error,
    learnable_tokens,
    parse_args,
    read_record,
)

import harness
import train_gpt2
from data.shards import write_shard

IMPORTED = time.monotonic()

STEPS = ["--num_iterations=6", "--warmdown_iters=2", "--val_loss_every=0", "--save_every_minutes=0"]


def last_lines(record):
    """The record's `stopped:` and `summary:` lines, however the run ended."""
    lines = record.splitlines()
    assert lines[-1].startswith("summary: ") and lines[-2].startswith("stopped: "), lines[-3:]
    return lines[-2], lines[-1]


def signal_self(signum=signal.SIGTERM):
    os.kill(os.getpid(), signum)  # the handler runs before the next line: it raises, or only notes it
    time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# A signal before the first step: one line, exit 128 + n, a record (if one opened) that ends


def test_a_signal_that_another_exception_wraps_is_still_a_signal(shards, monkeypatch, capsys):
    """Inductor wraps whatever a signal raises while it compiles: the run still ends as the signal."""
    build_run = train_gpt2.build_run

    def compile_that_wraps_the_signal(*args):
        try:
            signal_self()
        except BaseException as e:
            raise RuntimeError("InductorError: backend compiler failed") from e
        return build_run(*args)

    monkeypatch.setattr(train_gpt2, "build_run", compile_that_wraps_the_signal)
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM" in err and "Traceback" not in err
    assert not os.path.exists(shards.records_dir) and not os.path.exists(shards.checkpoint_dir)


def test_a_signal_while_inductor_compiles_ends_in_one_line(shards, tmp_path):
    """SIGTERM while the first step compiles (caches off, so the compile lasts): exit 143, one line on stderr,
    and the record that was open ends in its stopped: and summary: lines."""
    env = dict(
        os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind")
    )
    flags = TINY_FLAGS + shards + STEPS + ["--compile=true"]
    run = subprocess.Popen(
        [sys.executable, f"{ROOT}/train_gpt2.py", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in run.stdout:  # the first step compiles once the record is open
        if line.startswith("compiling:"):
            time.sleep(1)
            run.send_signal(signal.SIGTERM)
            break
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "While executing" not in err, err  # torch's warnings may come before
    assert (
        err.strip().splitlines()[-1]
        == "train_gpt2.py: stopped: SIGTERM before the first step was done: nothing to save"
    )
    stopped, summary = last_lines(read_record(shards.records_dir))
    assert "SIGTERM" in stopped


def test_a_signal_while_the_record_opens_leaves_a_record_that_ends(shards, monkeypatch):
    sources = harness.project_sources

    def sources_then_signal(recipe):
        signal_self()  # waits: the record is being written
        return sources(recipe)

    monkeypatch.setattr(harness, "project_sources", sources_then_signal)
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 128 + signal.SIGTERM
    stopped, summary = last_lines(read_record(shards.records_dir))
    assert "SIGTERM before the first step" in stopped and "train_time:0ms" in summary


def test_a_signal_during_the_first_step_leaves_a_record_that_ends(shards, monkeypatch):
    micro_batches = train_gpt2.micro_batches

    def signal_in_the_first_step(*args):
        signal_self()
        return micro_batches(*args)

    monkeypatch.setattr(train_gpt2, "micro_batches", signal_in_the_first_step)
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 128 + signal.SIGTERM
    stopped, summary = last_lines(read_record(shards.records_dir))
    assert stopped.startswith("stopped: SIGTERM before the first step") and "summary: " in summary


# ----------------------------------------------------------------------------------------------
# A planned stop counts from the process's start, and is said


def test_stop_at_a_minute_that_came_during_start_up_is_today():
    """Started at hh:mm:59 with --stop_at=hh:(mm+1), which passed while torch was imported: stop now."""
    minute = datetime.now().replace(second=0, microsecond=0)
    stop = harness.StopRequest(started=(minute - timedelta(seconds=1)).timestamp())
    note = stop.plan(parse_args([f"--stop_at={minute:%H:%M}"]))
    assert stop.deadline - stop.started == pytest.approx(1) and stop.requested()
    assert note.startswith(f"planned_stop: {minute:%Y-%m-%d %H:%M}:00 (--stop_at={minute:%H:%M}), in 0:00:00")


def test_the_planned_stop_is_on_the_console_and_in_the_record(shards, capsys):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--max_hours=2"]) == 0
    console, record = capsys.readouterr().out, read_record(shards.records_dir)
    planned = re.search(r"^planned_stop: (\S+ \S+) \(--max_hours=2\.0\), in (\d:\d\d:\d\d)$", console, re.M)
    assert planned and planned[0] in record.splitlines()
    when = datetime.strptime(planned[1], "%Y-%m-%d %H:%M:%S").timestamp()
    assert when - harness.process_start_time() == pytest.approx(7200, abs=2)  # two hours after the start
    left = datetime.strptime(planned[2], "%H:%M:%S")
    assert abs(left.hour * 3600 + left.minute * 60 + left.second - (when - time.time())) < 60


def test_startup_counts_from_the_process_start(shards):
    running = time.monotonic() - harness.StopRequest().started
    assert harness.StopRequest().started < IMPORTED  # the process began before this module was imported
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 0
    startup = float(re.search(r"startup_s:([\d.]+)", read_record(shards.records_dir))[1])
    # the whole life of this process so far, not the run's own start-up (the record gives tenths)
    assert startup >= round(running, 1)


# ----------------------------------------------------------------------------------------------
# A stop seen during validation saves at that step


def test_a_signal_during_validation_saves_at_that_step(shards, monkeypatch, tmp_path):
    evaluate, steps = train_gpt2.evaluate, []

    def signal_during_step_4s_validation(model, loader, args, accum_steps, world_size, step):
        steps.append(step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # training has begun: the handler only notes it
        return evaluate(model, loader, args, accum_steps, world_size, step)

    def slow_all_reduce(*args, _all_reduce=harness.all_reduce, **kwargs):
        time.sleep(0.05)  # after step 4's val line: the stop vote, then the save, neither of them train time
        return _all_reduce(*args, **kwargs)

    monkeypatch.setattr(train_gpt2, "evaluate", signal_during_step_4s_validation)
    monkeypatch.setattr(harness, "all_reduce", slow_all_reduce)
    flags = TINY_FLAGS + shards + STEPS[:2] + ["--val_loss_every=2", "--save_every_minutes=0"]
    assert train_gpt2.main(flags) == 128 + signal.SIGTERM
    record = read_record(shards.records_dir)
    stopped, summary = last_lines(record)
    assert stopped.startswith("stopped: SIGTERM at step 4: checkpoint saved") and steps == [0, 2, 4]
    val_time = re.search(r"^step:4/\d+ val_loss:\S+ (train_time:\d+ms) ", record, re.M)[1]
    assert f" {val_time} " in summary  # the timed total ends at the val line
    assert [p[-9:] for p in glob.glob(f"{shards.checkpoint_dir}/run/*.pt")] == ["000004.pt"]


# ----------------------------------------------------------------------------------------------
# The final model, and folders only where something is written


def test_a_finished_run_keeps_its_final_model_with_periodic_saves_off(shards):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_every=0"]) == 0
    saved = glob.glob(f"{shards.checkpoint_dir}/run/*-step000006.pt")
    assert len(saved) == 1 and f"checkpoint: {saved[0]}" in read_record(shards.records_dir).splitlines()[-3:]


def test_a_run_that_saves_nothing_says_so_and_leaves_no_checkpoint_folder(shards):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--save_final=false"]) == 0
    assert "checkpoint: none (--save_final=false)" in read_record(shards.records_dir).splitlines()[-3:]
    assert not os.path.exists(shards.checkpoint_dir)


def test_an_output_folder_under_a_file_is_refused_before_anything_slow(shards, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = subprocess.run(
        [sys.executable, f"{ROOT}/train_gpt2.py", *TINY_FLAGS, *shards.data, *STEPS]
        + [f"--checkpoint_dir={tmp_path}/a_file/ck", f"--records_dir={tmp_path}/records"],
        capture_output=True,
        text=True,
    )
    assert_one_line_error(result, "--checkpoint_dir", f"{tmp_path}/a_file/ck")
    assert not os.path.exists(tmp_path / "records")


# ----------------------------------------------------------------------------------------------
# Messages name what the user typed; notes say what was silently true


def test_resuming_with_the_unet_skips_changed_names_the_flag(shards, tmp_path):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS) == 0
    checkpoint = glob.glob(f"{shards.checkpoint_dir}/run/*.pt")[0]
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main([f"--resume={checkpoint}", "--unet_skips", "--num_iterations=8"])
    assert "--unet_skips" in str(stop.value) and "\n" not in str(stop.value)


def test_a_recipe_value_in_a_message_is_named_as_the_recipes_with_its_fix():
    with pytest.raises(harness.ConfigError) as refused:
        parse_args(["--recipe=2024-11-24", "--window_tokens=0"])
    assert "--recipe=2024-11-24" in str(refused.value) and "--window_warmup_start=0" in str(refused.value)
    with pytest.raises(harness.ConfigError) as typed:  # typed by the user: no word of the recipe
        parse_args(["--recipe=2024-11-24", "--window_tokens=0", "--window_warmup_start=64"])
    assert "recipe" not in str(typed.value)


def test_document_mask_on_data_without_documents_is_noted(tmp_path):
    for name in ("tiny_train_000001.bin", "tiny_val_000000.bin"):
        write_shard(tmp_path / name, learnable_tokens(6000) % 255)  # no token 255 anywhere
    flags = RunFlags(tmp_path)
    assert train_gpt2.main(TINY_FLAGS + flags + STEPS + ["--document_mask", "--eot_token=255"]) == 0
    record = read_record(flags.records_dir)
    assert re.search(r"^document_mask: no --eot_token=255 in the first 6000 train tokens", record, re.M)


def test_memory_limit_on_the_cpu_is_noted(shards):
    assert train_gpt2.main(TINY_FLAGS + shards + STEPS + ["--memory_limit_gb=23"]) == 0
    assert re.search(r"^memory_limit_gb: 23.0 ignored", read_record(shards.records_dir), re.M)


def test_the_continue_command_leaves_auto_flags_to_decide_again(shards):
    """A micro-batch that auto chose on this machine is chosen again where the run continues."""
    flags = [f for f in TINY_FLAGS if not f.startswith("--device_batch_size")] + ["--max_hours=1e-9"]
    assert train_gpt2.main(flags + shards + STEPS + ["--device_batch_size=auto"]) == 0
    stopped, _ = last_lines(read_record(shards.records_dir))
    assert "continue with: " in stopped and "--device_batch_size" not in stopped and "--device=cpu" in stopped


def test_save_final_false_decides_the_last_step_even_at_an_agreed_stop(shards):
    args = parse_args(TINY_FLAGS + ["--num_iterations=6", "--warmdown_iters=2", "--save_final=false"])
    monitor = harness.Monitor(SimpleNamespace(args=args, start_step=0), harness.StopRequest(), train_gpt2, [])
    monitor.stop_agreed = True  # a signal during the last step
    assert not monitor.checkpoint_due(6) and monitor.checkpoint_due(5)


def test_the_probe_never_lets_one_rank_branch_alone(monkeypatch):
    """Another rank found no whole sequence that fits: this one, whose 8 fit, refuses with it, so that every
    rank takes the --micro_tokens route together."""
    monkeypatch.setattr(harness, "smallest_of_all_ranks", lambda chosen, world_size, device: 0)
    args = parse_args(["--batch_size=16", "--seq_len=64", "--val_tokens=1024"])
    with pytest.raises(harness.ConfigError, match="not even one sequence"):
        harness.choose_device_batch_size(None, args, 2, torch.device("cpu"), fits=lambda size: size <= 8)
