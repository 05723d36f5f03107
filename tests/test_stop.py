"""A planned stop (--max_hours, --stop_at): a checkpoint at a step boundary, exit 0, a command to continue."""

import re
import shlex
import time
from datetime import datetime, timedelta

import pytest
from conftest import TINY_FLAGS, losses, parse_args, read_record

import harness
import train_gpt2

STEPS = ["--num_iterations=12", "--warmdown_iters=4", "--val_loss_every=4", "--save_every_minutes=0"]


def step_lines(record):
    return [line.split(" train_time:")[0] for line in record.splitlines() if line.startswith("step:")]


def test_max_hours_stops_at_a_step_boundary_and_the_continuation_matches_an_uninterrupted_run(
    shards, tmp_path, capsys
):
    data = shards.data + [f"--checkpoint_dir={tmp_path}/checkpoints"]
    assert train_gpt2.main(TINY_FLAGS + data + STEPS + [f"--records_dir={tmp_path}/full"]) == 0
    full = read_record(tmp_path / "full")

    # Already past the deadline at the first step boundary: the stop step does not depend on timing.
    flags = (
        TINY_FLAGS + data + STEPS + [f"--records_dir={tmp_path}/part", "--run_name=night", "--max_hours=1e-9"]
    )
    assert train_gpt2.main(flags) == 0  # a planned stop is no failure
    part = read_record(tmp_path / "part").splitlines()
    stopped, summary = part[-2], part[-1]
    assert stopped.startswith("stopped: --max_hours=1e-09 reached at step 1: checkpoint saved")
    assert "final_val_loss" not in summary and "nan" not in summary
    assert " last_val_loss:" in summary and " last_val_step:0 " in summary
    command = shlex.split(stopped.split("; continue with: ", 1)[1])
    resume = f"--resume={tmp_path}/checkpoints/night/"
    assert any(word.startswith(resume) and word.endswith("-step000001.pt") for word in command)
    assert "--run_name=night" in command
    assert f"--checkpoint_dir={tmp_path}/checkpoints" in command and "--device=cpu" in command

    continued = [word for word in command if word.startswith("--")]
    assert train_gpt2.main(continued + [f"--records_dir={tmp_path}/rest"]) == 0
    rest = read_record(tmp_path / "rest")
    assert step_lines("\n".join(part)) + step_lines(rest) == step_lines(full)  # line for line
    assert losses(rest, "val_loss")[-1] == losses(full, "val_loss")[-1]
    assert "final_val_loss:" in rest.splitlines()[-1]


def test_stop_at_is_the_next_such_time_of_the_local_clock():
    stop = harness.StopRequest(started=time.time())  # a process started now
    soon = datetime.now() + timedelta(minutes=2)
    stop.plan(parse_args([f"--stop_at={soon:%H:%M}"]))
    assert 0 < stop.deadline - stop.started <= 120
    stop.plan(parse_args([f"--stop_at={datetime.now() - timedelta(minutes=2):%H:%M}"]))
    assert 23 * 3600 < stop.deadline - stop.started <= 24 * 3600  # passed today: tomorrow
    stop.plan(parse_args(["--stop_at=23:59", "--max_hours=0.5"]))
    assert stop.deadline - stop.started == pytest.approx(1800) and not stop.requested()  # the earlier one


@pytest.mark.parametrize("value", ["24:00", "7:30", "07:60", "noon"])
def test_a_stop_time_that_is_not_hh_mm_is_refused(value):
    with pytest.raises(harness.ConfigError, match="--stop_at"):
        parse_args([f"--stop_at={value}"])


def test_the_console_says_when_steps_are_untimed_and_never_prints_nan(shards, tmp_path, capsys):
    flags = TINY_FLAGS + shards + ["--num_iterations=4", "--warmdown_iters=1", "--untimed_steps=10"]
    assert train_gpt2.main(flags + ["--progress_seconds=1e-9"]) == 0
    console = capsys.readouterr().out
    progress = [line for line in console.splitlines() if re.match(r"step \d+/4 ", line)]
    assert progress and all("untimed" in line and "eta" not in line for line in progress)
    assert "nan" not in console.split("summary:")[1]  # no step was timed: no step_avg in the summary
