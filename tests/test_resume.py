"""Long runs: checkpoints, resume to the same losses (on any world size), auto micro-batch, several nodes."""

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, TORCHRUN, losses, parse_args, read_record

import harness
import train_gpt2
from harness import CheckpointError, choose_device_batch_size, load_checkpoint
from train_gpt2 import GPT

STEPS = ["--num_iterations=20", "--warmdown_iters=8", "--val_loss_every=5", "--save_every_minutes=0"]


def run_in_process(flags, records_dir):
    assert train_gpt2.main(TINY_FLAGS + flags + [f"--records_dir={records_dir}"]) == 0
    return read_record(records_dir)


def step_losses(record, start):
    """{(kind, step): loss} of a run resumed at step `start`: val from `start` on, train after it."""
    return {
        (kind, int(step)): float(loss)
        for step, _, kind, loss, _, _ in re.findall(
            r"^step:(\d+)/(\d+) (train_loss|val_loss):(\S+) train_time:(\d+)ms step_avg:(\S+)ms$",
            record,
            re.M,
        )
        if int(step) > start or (kind == "val_loss" and int(step) == start)
    }


@pytest.fixture
def uninterrupted(shards, tmp_path):
    """A 20-step run that also saves a checkpoint every 10 steps."""
    record = run_in_process(
        shards.data + [f"--checkpoint_dir={shards.checkpoint_dir}"] + STEPS + ["--save_every=10"],
        tmp_path / "full",
    )
    checkpoints = sorted(glob.glob(f"{tmp_path}/checkpoints/run/*-step000010.pt"))
    assert len(checkpoints) == 1
    return record, checkpoints[0]


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(shards, tmp_path, uninterrupted, capsys):
    full, checkpoint = uninterrupted
    resumed = run_in_process(
        shards.data + [f"--checkpoint_dir={shards.checkpoint_dir}"] + STEPS + [f"--resume={checkpoint}"],
        tmp_path / "resumed",
    )
    assert step_losses(resumed, 10) == step_losses(full, 10)  # exact: same fp32 ops in the same order
    assert len(step_losses(resumed, 10)) == 10 + 3  # train 11..20, val at 10, 15, 20
    assert f"resumed_from: {checkpoint} at step 10 (parent record {tmp_path}/full/" in resumed
    assert "step:10/20 train_loss" not in resumed  # it starts after step 10


def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(shards, tmp_path, uninterrupted, capsys):
    """Checkpoints written before optimizers were saved by name (adam, muon_momentum) still continue."""
    full, checkpoint = uninterrupted
    old = torch.load(checkpoint, weights_only=True)
    optimizers = old.pop("optimizers")
    old.update(adam=optimizers["adam"], muon_momentum=optimizers["muon"]["momentum_buffers"])
    torch.save(old, tmp_path / "old-step000010.pt")
    resumed = run_in_process(
        shards.data
        + [f"--checkpoint_dir={shards.checkpoint_dir}"]
        + STEPS
        + [f"--resume={tmp_path}/old-step000010.pt"],
        tmp_path / "resumed",
    )
    assert step_losses(resumed, 10) == step_losses(full, 10)


def test_resumed_run_inherits_the_training_knobs(shards, tmp_path, uninterrupted, capsys):
    _, checkpoint = uninterrupted
    resumed = run_in_process([f"--resume={checkpoint}"], tmp_path / "resumed")  # no other flag
    assert "--num_iterations=20\n" in resumed and "--warmdown_iters=8\n" in resumed
    assert "step:20/20 val_loss:" in resumed


def test_timed_total_is_the_sum_of_the_timed_parts(shards, tmp_path, uninterrupted, capsys):
    _, checkpoint = uninterrupted
    before = load_checkpoint(checkpoint)
    assert before["timed_steps"] == 10 - 2  # untimed_steps=2
    resumed = run_in_process([f"--resume={checkpoint}"], tmp_path / "resumed")
    summary = dict(re.findall(r"(\w+):(\S+)", resumed.splitlines()[-1]))
    total_ms = float(summary["train_time"].rstrip("ms"))
    last_val = re.findall(r"^step:20/20 val_loss:\S+ train_time:(\d+)ms step_avg:(\S+)ms$", resumed, re.M)[0]
    assert total_ms >= before["train_ms"] and int(last_val[0]) == round(total_ms)
    assert float(last_val[1]) == pytest.approx(
        total_ms / (8 + 10 - 2), abs=0.05
    )  # 2 untimed steps again; ms rounded


def test_resume_on_two_ranks_with_another_micro_batch_trains_the_same(shards, tmp_path, uninterrupted):
    full, checkpoint = uninterrupted
    run = subprocess.run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            "train_gpt2.py",
            f"--resume={checkpoint}",
            "--device_batch_size=2",
            "--device=cpu",
            f"--records_dir={tmp_path}/two",
            f"--checkpoint_dir={shards.checkpoint_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = read_record(f"{tmp_path}/two")
    assert "world_size:2" in two and "--device_batch_size=2\n" in two  # 2 ranks x 2 micro-steps x 2 sequences
    expected, got = step_losses(full, 10), step_losses(two, 10)
    assert expected.keys() == got.keys()
    assert all(abs(got[k] - expected[k]) <= 1e-5 * abs(expected[k]) + 1e-4 for k in expected), (expected, got)


def test_resume_latest_takes_the_newest_checkpoint(shards, tmp_path, uninterrupted, capsys):
    newest = sorted(glob.glob(f"{tmp_path}/checkpoints/run/*.pt"), key=os.path.getmtime)[-1]
    assert newest.endswith("-step000020.pt")  # the final one
    record = run_in_process(
        [f"--checkpoint_dir={shards.checkpoint_dir}", "--resume=latest", "--num_iterations=22"],
        tmp_path / "latest",
    )
    assert f"resumed_from: {newest} at step 20" in record and "step:22/22 val_loss:" in record


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(shards, tmp_path, capsys):
    run_in_process(
        shards.data
        + [f"--checkpoint_dir={shards.checkpoint_dir}"]
        + STEPS
        + ["--save_every=3", "--keep_checkpoints=2"],
        tmp_path / "r",
    )
    names = sorted(os.path.basename(p).split("-step")[1] for p in glob.glob(f"{tmp_path}/checkpoints/run/*"))
    assert names == ["000018.pt", "000020.pt"]  # no .tmp left behind
    checkpoint = load_checkpoint(glob.glob(f"{tmp_path}/checkpoints/run/*-step000020.pt")[0])
    assert {"model", "optimizers", "data", "rng", "hyperparameters", "step"} <= checkpoint.keys()
    assert checkpoint["optimizers"].keys() == {"adam", "muon"}
    assert checkpoint["hyperparameters"]["num_iterations"] == 20 and checkpoint["step"] == 20


def test_a_checkpoint_of_another_shape_is_refused(shards, tmp_path, uninterrupted):
    _, checkpoint = uninterrupted
    with pytest.raises(SystemExit, match=f"{checkpoint} holds a model with --model_dim=64, not 128"):
        train_gpt2.main([f"--resume={checkpoint}", "--model_dim=128"])


@pytest.mark.parametrize(
    "content, message", [(None, "no checkpoint at"), (b"not a zip", "is not a readable checkpoint")]
)
def test_a_missing_or_foreign_checkpoint_is_refused(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        train_gpt2.main([f"--resume={path}"])
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="is not a train_gpt2.py checkpoint"):
        load_checkpoint(path)


def test_auto_micro_batch_takes_the_largest_that_fits():
    args = parse_args(["--batch_size=256"])
    with torch.device("meta"):
        model = GPT(256, 1, 64, 2, 4, 10000.0, 30.0)
    tried = []
    fits = lambda size: tried.append(size) or size <= 24  # noqa: E731  a card where 32 runs out of memory
    size, note = choose_device_batch_size(model, args, 1, torch.device("cpu"), fits=fits)
    assert (size, tried) == (16, [64, 32, 16])  # divisors of the 256 sequences per device, at most 64
    assert note == "auto: the largest that fits; 32 did not"
    assert choose_device_batch_size(model, args, 1, torch.device("cpu"))[0] == 64
    assert (
        choose_device_batch_size(
            model, parse_args(["--batch_size=24", "--val_tokens=24576"]), 1, torch.device("cpu")
        )[0]
        == 24
    )
    with pytest.raises(harness.ConfigError, match="not even one sequence"):
        choose_device_batch_size(model, args, 1, torch.device("cpu"), fits=lambda size: False)


def test_under_a_memory_limit_the_probe_estimates_from_the_cap(monkeypatch):
    """mem_get_info ignores the allocator's cap: under --memory_limit_gb=23 on a 141 GiB card, 139 GiB free,
    the estimate is the cap less what the allocator holds, so the probe starts at 32, not 64 (29.8 GiB)."""
    gib = 2**30
    assert harness.room_for_activations(139 * gib, 1 * gib, 0.0, 2 * gib) == 137 * gib  # no cap: free memory
    assert harness.room_for_activations(139 * gib, 1 * gib, 23.0, 2 * gib) == 20 * gib  # the cap, less both
    assert harness.room_for_activations(10 * gib, 1 * gib, 23.0, 2 * gib) == 8 * gib  # less free than the cap
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (139 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1 * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    tried = []
    monkeypatch.setattr(
        harness, "probe_fits", lambda model, args, size, *rest, **kw: tried.append(size) or True
    )
    with torch.device("meta"):
        model = GPT.from_args(parse_args([]))  # the 124M model, without its memory
    states = harness.optimizer_state_bytes(model) / gib
    for limit, first in (("23", 32), ("0", 64)):
        args = parse_args(["--batch_size=512", f"--memory_limit_gb={limit}", "--val_tokens=524288"])
        size, note = choose_device_batch_size(model, args, 1, cuda)
        assert (size, tried.pop()) == (first, first), note
        assert f"of {(22.0 if limit == '23' else 139.0) - states:.1f} GiB free" in note
    # 24 Nov under the cap: one 64K sequence (29.8 GiB) is not probed, micro-steps of 32K (14.9 GiB) are
    args = parse_args(["--recipe=2024-11-24", "--memory_limit_gb=23"])
    monkeypatch.setattr(harness, "probe_fits", lambda model, args, *rest: tried.append(rest) or True)
    assert harness.choose_micro_steps(model, args, 1, cuda).endswith(
        "micro-steps of 32768 do: --micro_tokens=32768)"
    )
    assert tried == [(1, cuda, 32768, None)] and args.device_batch_size == 1


def test_a_probe_whose_first_allocation_fails_does_not_fit(monkeypatch):
    """Running out of memory already in the probe's reserve for the optimizer states is "does not fit"."""
    args = parse_args(["--batch_size=8", "--seq_len=16", "--val_tokens=128"])
    model = GPT(256, 1, 64, 2, 4, 10000.0, 30.0)

    def out_of_memory(*shape, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(harness.torch, "empty", out_of_memory)
    assert harness.probe_fits(model, args, 8, torch.device("cpu")) is False


def test_auto_micro_batch_is_logged(shards, tmp_path, capsys):
    flags = [f for f in TINY_FLAGS if not f.startswith("--device_batch_size")]
    assert (
        train_gpt2.main(
            flags + shards + ["--num_iterations=2", "--warmdown_iters=1", "--device_batch_size=auto"]
        )
        == 0
    )
    record = read_record(shards.records_dir)
    assert "--device_batch_size=8\n" in record
    assert "device_batch_size: 8 (auto on CPU: no memory probe, the largest candidate)" in record


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_as_one_process_with_accumulation(shards, tmp_path, capsys):
    """run.sh on two 'nodes' (one gloo process each, c10d rendezvous on loopback) equals one process."""
    flags = (
        TINY_FLAGS
        + shards.data
        + [
            f"--checkpoint_dir={shards.checkpoint_dir}",
            "--num_iterations=4",
            "--warmdown_iters=2",
            "--val_loss_every=2",
        ]
    )
    single = run_in_process(flags, tmp_path / "one")
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "LOCAL_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    # Output goes to files: a node blocked on a full, unread pipe would hold the other at the exit barrier.
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [
        subprocess.Popen(
            ["bash", "run.sh", *flags, f"--records_dir={tmp_path}/node{rank}"],
            cwd=ROOT,
            env={**env, "NODE_RANK": str(rank)},
            stdout=open(logs[rank], "w"),
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    deadline = (
        time.time() + 240
    )  # stop at the first failure: it holds the other node at torchrun's 300 s exit barrier
    while time.time() < deadline and None in (codes := [node.poll() for node in nodes]) and not any(codes):
        time.sleep(0.2)
    for node in nodes:
        if node.poll() is None:
            node.terminate()  # torchrun stops its worker too
    assert [node.wait(timeout=60) for node in nodes] == [0, 0], [log.read_text()[-5000:] for log in logs]
    records = glob.glob(f"{tmp_path}/node*/*/*.txt")
    assert len(records) == 1  # only global rank 0 writes
    with open(records[0]) as f:
        two = f.read()
    assert "world_size:2" in two
    for kind in ("train_loss", "val_loss"):
        a, b = losses(single, kind), losses(two, kind)
        assert len(a) == len(b) > 0 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)


def test_sigterm_checkpoints_then_resume_matches(shards, tmp_path, capsys):
    flags = (
        TINY_FLAGS
        + shards.data
        + [
            f"--checkpoint_dir={shards.checkpoint_dir}",
            "--num_iterations=400",
            "--warmdown_iters=100",
            "--val_loss_every=0",
            "--save_every_minutes=0",
        ]
    )
    run = subprocess.Popen(
        [sys.executable, "train_gpt2.py", *flags, f"--records_dir={tmp_path}/stopped"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(f"{tmp_path}/stopped/*/*.txt"):
        time.sleep(0.1)
    while time.time() < deadline and "step:5/" not in read_record(f"{tmp_path}/stopped"):
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 128 + signal.SIGTERM, output
    stopped = read_record(f"{tmp_path}/stopped")
    step = int(re.search(r"^stopped: SIGTERM at step (\d+): checkpoint saved", stopped, re.M)[1])
    assert step < 400
    resumed = run_in_process(flags[len(TINY_FLAGS) :] + ["--resume=latest"], tmp_path / "resumed")
    assert f"at step {step} " in resumed
    uninterrupted = run_in_process(flags[len(TINY_FLAGS) :], tmp_path / "uninterrupted")
    assert step_losses(resumed, step) == step_losses(
        uninterrupted, step
    )  # every loss after the stop, exactly
    before_stop = {k: v for k, v in step_losses(uninterrupted, 0).items() if k[1] <= step}
    assert step_losses(stopped, 0) == before_stop


def test_learning_rates_given_on_resume_take_effect(uninterrupted):
    _, checkpoint = uninterrupted
    args, saved = harness.resolve_args(
        train_gpt2.Hyperparameters, [f"--resume={checkpoint}", "--embed_lr=0.1", "--adam_beta2=0.99"]
    )
    args.compile = False
    run, _ = train_gpt2.build_run(args, 0, 1, torch.device("cpu"), saved)
    adam, muon = run.optimizers["adam"], run.optimizers["muon"]
    assert run.start_step == 10 and adam.state  # the optimizer state came from the checkpoint...
    assert adam.param_groups[0]["lr"] == 0.1 and adam.param_groups[0]["betas"] == (
        0.9,
        0.99,
    )  # ...not its lrs
    assert muon.orthogonalize is train_gpt2.newton_schulz_orthogonalize  # --compile=false: nothing compiled


class StandIn:
    """An optimizer or loader as the harness sees one: state_dict() and load_state_dict(), nothing else."""

    def __init__(self, state=None):
        self.state = state or {}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_the_harness_saves_and_restores_parts_through_their_state_dicts_only(tmp_path):
    cpu, saved_model, restored_model = torch.device("cpu"), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    args = parse_args(TINY_FLAGS + [f"--checkpoint_dir={tmp_path}"])
    optimizers = dict(first=StandIn({"lr": 0.5}), second=StandIn({"momentum_buffers": [torch.ones(2)]}))
    parts = (saved_model, saved_model, optimizers, StandIn({"shard_index": 1, "position": 96}), None, 1)
    run = harness.Run(args, 0, 1, cpu, *parts, clock=harness.Clock(cpu, 12.5, 3), run_id="120000-0123abcd")
    path = harness.save_checkpoint(run, 7, "a record")

    fresh, loader = dict(first=StandIn(), second=StandIn()), StandIn()
    step, clock = harness.restore_checkpoint(load_checkpoint(path), path, restored_model, fresh, loader, cpu)
    assert step == 7 and (clock.train_ms, clock.timed_steps) == (12.5, 3)
    assert fresh["first"].state == {"lr": 0.5} and torch.equal(
        fresh["second"].state["momentum_buffers"][0], torch.ones(2)
    )
    assert loader.state == {"shard_index": 1, "position": 96}
    assert torch.equal(restored_model.weight, saved_model.weight)
