"""The trainer with --compile=true on the CPU (inductor's C++ backend): the CPU sibling of the compiled
GPU run in tests/test_gpu.py. A few steps with validation on the tiny config must compile without a graph
break into exactly the expected graphs (the model: one for eval, one for training; Newton-Schulz: one per
matrix shape) and recompile nothing after the first training step; with --device_batch_size=auto the
harness's probe runs a real forward+backward first (the warm-up), and training reuses its graph: no
recompile for the aliasing of inputs and targets (two views of one window).

Runs as subprocesses with TORCH_LOGS=recompiles,graph_breaks, whose lines are parsed from the merged
output; inductor's cache lives outside the checkout (a first run on a fresh machine compiles cold: slower).
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, parse_args, read_record

import train_gpt2

STEPS = ["--num_iterations=4", "--warmdown_iters=0", "--val_loss_every=2", "--save_every_minutes=0"]
STEPS += ["--progress_seconds=0.000001"]  # a console line after every step: recompiles are placed by it
NS_SHAPES = 3  # the tiny model's matrices: 64x64 (q, k, v, out), 256x64 (MLP up), 64x256 (MLP down)
RECOMPILE = re.compile(r"Recompiling function (\w+) in .*\n((?:(?!.*Recompiling).*\[__recompiles\] .*\n)*)")


def compiled_run(flags, script="train_gpt2.py"):
    """(exit status, merged console output, record) of a compiled tiny run."""
    env = {**os.environ, "TORCH_LOGS": "recompiles,graph_breaks", "PYTHONUNBUFFERED": "1"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, script, *TINY_FLAGS, *flags, *STEPS, "--compile=true"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    records_dir = next(f.split("=", 1)[1] for f in flags if f.startswith("--records_dir="))
    return proc.returncode, proc.stdout, read_record(records_dir)


def check_compiled(status, out, record):
    """The asserts shared by both runs: no graph break, the expected graphs, no late or aliasing recompile."""
    assert status == 0, out
    assert "Graph break" not in out and "graph_break" not in out.replace("graph_breaks", ""), out
    summary = record.splitlines()[-1]
    assert re.search(rf" compiled_graphs:{2 + NS_SHAPES} ", summary), summary
    first_step = out.index("step 1/4 train_loss")
    recompiles = [(m.start(), m[1], m[2]) for m in RECOMPILE.finditer(out)]
    assert all(at < first_step for at, _, _ in recompiles), out  # nothing recompiles after the first step
    by_function = {name: [why for _, n, why in recompiles if n == name] for _, name, _ in recompiles}
    assert sorted(by_function) == ["newton_schulz_orthogonalize", "trunk"], out
    assert len(by_function["trunk"]) == 1 and "grad_mode" in by_function["trunk"][0]  # eval <-> train
    assert len(by_function["newton_schulz_orthogonalize"]) == NS_SHAPES - 1  # one graph per shape
    assert all("size mismatch" in why for why in by_function["newton_schulz_orthogonalize"])
    assert not re.search(r"alias|is L\[|DUPLICATE_INPUT", out), out  # idx and targets: views of one window
    # after the first timed step (--untimed_steps=2): each graph's first call, and inductor's cache counts
    compile_line = re.search(r"^compile: (.*); inductor cache hits (\d+) misses (\d+)$", record, re.M)
    assert compile_line and record.index("step:3/4 train_loss") < compile_line.start(), record
    assert int(compile_line[2]) + int(compile_line[3]) >= 2 + NS_SHAPES  # a hit or a miss per graph at least
    graphs = dict(re.fullmatch(r"(.+) (\d+\.\d)s", part).groups() for part in compile_line[1].split(", "))
    assert {"newton_schulz 64x64", "newton_schulz 256x64", "newton_schulz 64x256"} < graphs.keys()
    assert sum(name.startswith(("train ", "eval ")) for name in graphs) == 2 and len(graphs) == 2 + NS_SHAPES
    assert all(float(seconds) > 0 for seconds in graphs.values())
    assert re.search(r" tokens_per_s:\d+ ", summary) and " peak_reserved:" not in summary  # CUDA only
    return graphs


def test_compiled_run_on_the_cpu_has_no_graph_break_and_no_recompile_after_step_one(shards):
    status, out, record = compiled_run(shards)
    assert list(check_compiled(status, out, record))[0] == "eval 4x32"  # validation at step 0 runs first
    assert "--compile=true\n" in record and "--device_batch_size=4\n" in record
    assert len(re.findall(r"^step:\d+/4 val_loss:", record, re.M)) == 3  # validation at 0, 2 and 4


def test_auto_micro_batch_with_compile_probes_on_the_cpu_and_training_reuses_its_graph(shards):
    status, out, record = compiled_run(shards + ["--device_batch_size=auto"])
    assert list(check_compiled(status, out, record))[0] == "train 8x32"  # the probe's is the first call
    note = re.search(r"^device_batch_size: (\d+) \((.*)\)$", record, re.M)
    assert note and note[1] == "8", record  # the whole per-device batch: one micro-step
    assert note[2].startswith("auto: the largest that fits"), note[2]  # probed, not "no memory probe"


@pytest.mark.parametrize("flag", ["--compile=maybe"])
def test_a_bad_compile_flag_is_one_line(shards, flag):
    proc = subprocess.run(
        [sys.executable, "train_gpt2.py", *TINY_FLAGS, *shards, flag],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--compile" in proc.stderr


@pytest.mark.parametrize("coordinate_descent", [False, True])
def test_coordinate_descent_reaches_both_compile_calls(monkeypatch, coordinate_descent):
    """--coordinate_descent (default false) sets the tuning in both compiles, model and Newton-Schulz."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append((fn, kwargs)) or fn)
    flags = [f"--coordinate_descent={str(coordinate_descent).lower()}"] * coordinate_descent
    args = parse_args(TINY_FLAGS + ["--compile=true"] + flags)
    assert parse_args(TINY_FLAGS).coordinate_descent is False
    model = train_gpt2.GPT.from_args(args)
    train_gpt2.build_optimizers(model, args, 0, 1, torch.device("cpu"))
    train_gpt2.compile_model(model, args)
    assert [getattr(fn, "__name__", None) for fn, _ in calls] == ["newton_schulz_orthogonalize", "trunk"]
    for _, kwargs in calls:
        assert kwargs == dict(dynamic=False, options={"coordinate_descent_tuning": coordinate_descent})
