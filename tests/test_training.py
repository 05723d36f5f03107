"""Whole runs on the CPU: the loss falls, the record is complete, two ranks equal one, failures are logged."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, STEP_LINE, TINY_FLAGS, TORCHRUN, losses, read_record

import train_gpt2

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_losses.json")
GOLDEN_FLAGS = ["--num_iterations=10", "--warmdown_iters=4", "--seed=1234"]
GOLDEN_TOLERANCE = (
    2e-4  # absolute: the log prints 4 decimals (rounding can differ by 1e-4), plus fp32 noise across CPUs
)


def test_fifty_steps_learn_and_write_a_complete_record(shards, capsys):
    assert train_gpt2.main(TINY_FLAGS + shards + ["--num_iterations=50", "--warmdown_iters=15"]) == 0
    record = read_record(shards.records_dir)
    train = losses(record)
    val = losses(record, "val_loss")
    assert len(train) == 50 and len(val) == 11  # step 0, every 5, the end
    assert abs(val[0] - 5.5452) < 1e-4  # ln 256: uniform prediction at step 0
    assert val[-1] < 0.7 * val[0]  # the chain is 90% predictable: the loss must fall far

    source, environment, steps = record.split("=" * 100 + "\n")
    sections = re.split(r"-{40}\n# (\S+)\n-{40}\n", source)  # the recipe, then each file under its header
    files = {"train_gpt2.py": sections[0], **dict(zip(sections[1::2], sections[2::2]))}
    for name in ("train_gpt2.py", "harness.py"):
        with open(os.path.join(ROOT, name)) as f:
            assert files[name] == f.read()  # every line that ran
    assert environment.startswith("Running Python 3.") and "Running PyTorch 2." in environment
    assert "CPU: " in environment and "Hyperparameters:\n--input_bin=" in environment
    assert "--num_iterations=50\n" in environment and "--compile=false\n" in environment
    lines = steps.splitlines()
    assert re.fullmatch(r"checkpoint: .*-step000050\.pt", lines.pop(-2))  # the final model, for sample.py
    assert lines[0] == "step:0/50 val_loss:5.5452 train_time:0ms step_avg:nanms"
    assert lines[1].startswith("step:1/50 train_loss:") and lines[1].endswith(
        " train_time:0ms step_avg:nanms"
    )
    assert all(STEP_LINE.match(line) for line in lines[:-1])
    assert re.fullmatch(r"step:50/50 val_loss:\d\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms", lines[-2])
    assert re.fullmatch(
        r"summary: final_val_loss:\d\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms tokens_per_s:\d+ "
        r"startup_s:\d+\.\d compiled_graphs:0 peak_memory:\d+MiB world_size:1 device:CPU .*",
        lines[-1],
    )
    fields = dict(field.split(":", 1) for field in lines[-1].split(" device:")[0].split()[1:])
    tokens_per_s = 8 * 32 * 48 / (int(fields["train_time"][:-2]) / 1000)  # 48 timed steps of 8 x 32 tokens
    assert int(fields["tokens_per_s"]) == pytest.approx(tokens_per_s, rel=2e-3)  # train_time: whole ms
    assert f"final_val_loss:{val[-1]:.4f}" in lines[-1]


def test_golden_losses_of_a_fixed_tiny_config(shards, capsys):
    """The first 10 train losses; regenerate (REGENERATE_GOLDEN=1) only for an intended change of the math."""
    assert train_gpt2.main(TINY_FLAGS + shards + GOLDEN_FLAGS) == 0
    got = losses(read_record(shards.records_dir))
    if os.environ.get("REGENERATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(dict(flags=TINY_FLAGS + GOLDEN_FLAGS, train_losses=got), f, indent=1)
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert golden["flags"] == TINY_FLAGS + GOLDEN_FLAGS
    assert len(got) == 10
    assert all(abs(a - b) <= GOLDEN_TOLERANCE for a, b in zip(got, golden["train_losses"])), (got, golden)


def run_script(flags, nproc=None, **popen):
    launcher = [*TORCHRUN, f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, os.path.join(ROOT, "train_gpt2.py"), *flags],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def test_two_ranks_match_one_rank_with_accumulation(shards, tmp_path):
    """Two gloo ranks x 1 micro-step and one process x 2 micro-steps: same losses, so gradient averaging,
    the rank-strided loader and Muon's sharded orthogonalization are right."""
    common = (
        TINY_FLAGS
        + shards.data
        + [
            f"--checkpoint_dir={shards.checkpoint_dir}",
            "--num_iterations=6",
            "--warmdown_iters=3",
            "--val_loss_every=3",
        ]
    )
    one = run_script(common + [f"--records_dir={tmp_path}/one"])
    out = one.communicate(timeout=300)[0]
    assert one.returncode == 0, out
    two = run_script(common + [f"--records_dir={tmp_path}/two"], nproc=2)
    out = two.communicate(timeout=300)[0]
    assert two.returncode == 0, out
    one_record, two_record = read_record(f"{tmp_path}/one"), read_record(f"{tmp_path}/two")
    assert "world_size:2" in two_record and "world_size:1" in one_record
    for kind in ("train_loss", "val_loss"):
        a, b = losses(one_record, kind), losses(two_record, kind)
        assert len(a) == len(b) > 0
        assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (kind, a, b)


def test_non_finite_loss_stops_the_run_with_a_logged_reason(shards, capsys):
    with pytest.raises(SystemExit, match="train loss is nan at step \\d+"):
        train_gpt2.main(
            TINY_FLAGS
            + shards
            + ["--num_iterations=20", "--warmdown_iters=0", "--muon_lr=1e30", "--embed_lr=1e30"]
        )
    record = read_record(shards.records_dir)
    assert re.search(r"^stopped: train loss is nan at step \d+", record, re.M)
    assert record.splitlines()[-1].startswith("summary: last_val_loss:5.5452 last_val_step:0 ")  # never final


@pytest.mark.parametrize("nproc", [None, 1], ids=["plain", "torchrun"])
def test_ctrl_c_checkpoints_and_leaves_a_complete_log(shards, nproc):
    records_dir = shards.records_dir
    run = run_script(
        TINY_FLAGS + shards + ["--num_iterations=100000", "--warmdown_iters=0", "--val_loss_every=0"], nproc
    )
    deadline = time.time() + 120
    while time.time() < deadline and not re.search(r"step:3/", _record_or_empty(records_dir)):
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    run.send_signal(
        signal.SIGINT
    )  # torchrun forwards the terminal's Ctrl-C: the copy must not abort the save
    run.communicate(timeout=60)
    assert run.returncode == (1 if nproc else 130)  # torchrun exits 1 after any signal; run.sh, 130
    lines = read_record(records_dir).splitlines()
    assert re.fullmatch(r"checkpoint: .*/checkpoints/run/.*-step\d{6}\.pt", lines[-3])
    assert os.path.isfile(lines[-3].split(": ", 1)[1])
    continued = r"continue with: .* --resume=\S+-step\d{6}\.pt .*"  # that checkpoint, not latest
    assert re.fullmatch(r"stopped: SIGINT at step \d+: checkpoint saved; " + continued, lines[-2])
    launcher = [*TORCHRUN, "--nproc_per_node=1"] if nproc else [sys.executable]  # as it was started
    assert shlex.split(lines[-2].split("continue with: ")[1])[: len(launcher) + 1] == [
        *launcher,
        os.path.join(ROOT, "train_gpt2.py"),
    ]
    assert lines[-1].startswith("summary: ") and "world_size:1" in lines[-1]


def _record_or_empty(records_dir):
    try:
        return read_record(records_dir)
    except AssertionError:
        return ""


def test_the_record_embeds_every_project_module_the_trainer_imported(shards, tmp_path):
    """Run as torchrun runs it, then list the project's modules in sys.modules: the record holds each one."""
    script = tmp_path / "list_modules.py"
    script.write_text(
        f"""import os, runpy, sys
sys.argv = ["train_gpt2.py", *sys.argv[1:]]
sys.path.insert(0, {ROOT!r})
try:
    runpy.run_path(os.path.join({ROOT!r}, "train_gpt2.py"), run_name="__main__")
finally:
    root = {ROOT!r} + os.sep
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        path = os.path.realpath(path) if os.path.isabs(path) else ""
        if path.startswith(root) and not path.startswith(root + ".venv"):
            print("module:", os.path.relpath(path, root))
"""
    )
    run = subprocess.run(
        [sys.executable, str(script), *TINY_FLAGS, *shards, "--num_iterations=2", "--warmdown_iters=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.split(" ", 1)[1] for line in run.stdout.splitlines() if line.startswith("module: ")}
    assert {"train_gpt2.py", "harness.py"} <= imported
    source = read_record(shards.records_dir).split("=" * 100 + "\n")[0]
    for name in imported:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        assert text in source and (name == "train_gpt2.py" or f"\n# {name}\n" in source)
