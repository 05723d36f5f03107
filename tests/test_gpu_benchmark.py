"""CPU sibling of the GPU check: gpu/benchmark.py on the tiny preset, its numbers checked by hand.

gpu/check.sh runs the same script with --preset full24gb and --preset recipe on a GPU (--preset full is for
runs by hand); here the same code path (synthetic shards, trainer subprocess through gpu/trainer_memory.py,
record parsing, FLOP count, memory verdict) runs on the CPU in seconds.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import harness
import train_gpt2
from gpu import benchmark as gpu_benchmark

SCRIPT = os.path.join(ROOT, "gpu", "benchmark.py")


def run_benchmark(*args):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
    }  # a tiny model: one thread is fastest, also on a busy machine
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "tiny", "--json", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def analytic_flops_per_token(vocab, layers, dim, seq_len, mlp_ratio=4):
    """6 x non-embedding params + 12 x layers x dim x seq_len, the params counted from the recipe's shapes:
    per block q, k, v, out (4 dim^2), MLP up and down (2 mlp_ratio dim^2), lambda (1) and x0 mixing (2)."""
    non_embedding = layers * ((4 + 2 * mlp_ratio) * dim * dim + 3) + vocab * dim  # + the untied head
    return 6 * non_embedding + 12 * layers * dim * seq_len


def test_tiny_benchmark_numbers_are_consistent(tmp_path):
    proc, result = run_benchmark("--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_benchmark: PASS" in proc.stdout and "ms per micro-step" in proc.stdout
    assert result["device"].startswith("CPU ") and result["world_size"] == 1
    assert (result["steps"], result["untimed_steps"], result["timed_steps"]) == (20, 2, 18)
    assert (result["batch_size"], result["seq_len"], result["device_batch_size"], result["accum_steps"]) == (
        8,
        32,
        4,
        2,
    )

    # The record's own summary is the source of the step time.
    with open(result["record"]) as f:
        summary = f.read().splitlines()[-1]
    assert f"step_avg:{result['ms_per_step']:.2f}ms" in summary
    assert f"peak_memory:{result['peak_memory_mib']:.0f}MiB" in summary

    ms = result["ms_per_step"]
    assert ms > 0
    assert result["ms_per_micro_step"] == pytest.approx(ms / 2)
    assert result["tokens_per_s"] == pytest.approx(8 * 32 / (ms / 1000))
    flops = analytic_flops_per_token(vocab=256, layers=2, dim=64, seq_len=32)
    assert result["flops_per_token"] == flops
    assert result["params"] - result["non_embedding_params"] == 256 * 64  # the embedding, a lookup
    assert result["mfu"] == pytest.approx(flops * result["tokens_per_s"] / 989e12)
    assert result["first_train_loss"] == pytest.approx(5.5452, abs=1e-4)  # ln 256
    assert result["last_train_loss"] < result["first_train_loss"]
    assert result["memory_ok"] is None and not result["timed_out"]


def test_auto_micro_batch_and_memory_verdict(tmp_path):
    """The full24gb path on the CPU: auto micro-batch is read from the record's note, and the memory check
    fails the run when the memory is over the ceiling."""
    proc, result = run_benchmark("--device_batch_size=auto", "--max_memory_gb=0.01", "--steps", "6")
    assert proc.returncode == 1
    assert re.search(r"memory check +FAIL: reserved \+ context \d+\.\d\d GiB >= 0\.01 GiB", proc.stdout)
    assert "gpu_benchmark: FAIL: reserved memory + CUDA context" in proc.stdout
    memory = result["memory"]  # gpu/trainer_memory.py's line; on the CPU: the peak resident set, no context
    assert memory["context_mib"] == memory["device_total_mib"] == 0 and memory["max_reserved_mib"] > 0
    assert result["card_memory_gib"] == memory["max_reserved_mib"] / 1024 and result["oom"] is False
    assert result["memory_ok"] is False and result["max_memory_gb"] == 0.01
    assert (result["device_batch_size"], result["accum_steps"]) == (8, 1)
    assert result["device_batch_size_note"].startswith("device_batch_size: 8 (auto on CPU")
    assert result["ms_per_micro_step"] == result["ms_per_step"]


def test_full_config_is_about_085_gflop_per_token():
    flops, params, non_embedding = gpu_benchmark.model_flops_per_token(train_gpt2.Hyperparameters())
    assert params == 162_201_636 and non_embedding == params - 50304 * 768
    assert flops == analytic_flops_per_token(vocab=50304, layers=12, dim=768, seq_len=1024)
    assert flops == pytest.approx(0.85e9, rel=0.02)  # the recipe's figure
    assert flops * 512 * 1024 == pytest.approx(4.5e14, rel=0.02)  # per optimizer step


def test_metrics_of_a_24gb_record():
    """What gpu/check.sh's 24 GB stage reports, from a record as an H100 would write it."""
    flags = harness.as_flags(
        train_gpt2.Hyperparameters(
            batch_size=512, device_batch_size=16, val_tokens=524288, memory_limit_gb=23
        )
    )
    record = "\n".join(
        [
            "source",
            "=" * 100,
            "Running Python 3",
            "Hyperparameters:",
            *flags,
            "Notes:",
            "attention: cuDNN SDPA (Hopper)",
            "device_batch_size: 16 (auto: the largest that fits; 32 did not)",
            "=" * 100,
            "step:1/15 train_loss:10.8258 train_time:0ms step_avg:nanms",
            "step:15/15 train_loss:7.0000 train_time:16000ms step_avg:1600.00ms",
            "step:15/15 val_loss:7.1000 train_time:16000ms step_avg:1600.00ms",
            "summary: final_val_loss:7.1000 train_time:16000ms step_avg:1600.00ms peak_memory:20480MiB "
            "world_size:1 device:NVIDIA H100 80GB HBM3",
            "",
        ]
    )
    parsed = gpu_benchmark.parse_record(record)
    result = gpu_benchmark.compute_metrics(parsed, 989.0, max_memory_gb=24)
    assert result["device"] == "NVIDIA H100 80GB HBM3"
    assert (result["device_batch_size"], result["accum_steps"]) == (16, 32)
    assert (
        result["device_batch_size_note"] == "device_batch_size: 16 (auto: the largest that fits; 32 did not)"
    )
    assert result["ms_per_micro_step"] == pytest.approx(50.0)
    assert result["tokens_per_s"] == pytest.approx(524288 / 1.6)
    assert result["mfu"] == pytest.approx(result["flops_per_token"] * 524288 / 1.6 / 989e12)
    assert result["peak_memory_gib"] == 20.0 and result["memory_ok"] is True
    assert (result["first_train_loss"], result["last_train_loss"], result["final_val_loss"]) == (
        10.8258,
        7.0,
        7.1,
    )
    over = gpu_benchmark.parse_record(record.replace("peak_memory:20480MiB", "peak_memory:24576MiB"))
    assert gpu_benchmark.compute_metrics(over, 989.0, max_memory_gb=24)["memory_ok"] is False
    text = gpu_benchmark.table(result, "full24gb")
    assert "16 sequences x 32 micro-steps per step" in text and "PASS: peak 20.00 GiB < 24 GiB" in text


def test_synthetic_tokens_fit_the_vocab_and_bad_flags_are_refused():
    tokens = gpu_benchmark.synthetic_tokens(5000, 50304, noise_seed=1)
    assert tokens.min() >= 0 and tokens.max() < 50257 and len(tokens) == 5000
    assert gpu_benchmark.synthetic_tokens(300, 256, noise_seed=1).max() < 256
    for bad in ("--bogus=1", "stray"):  # the trainer's parser refuses them, before any shard is written
        with pytest.raises(SystemExit, match=f"^gpu_benchmark: .*{bad}"):
            gpu_benchmark.main(["--preset", "tiny", bad])


def test_24gb_verdict_judges_reserved_memory_plus_the_context_and_any_oom_after_the_probe():
    """What a 24 GB card must hold: the allocator's reserve plus the CUDA context, not the tensors' peak."""
    flags = harness.as_flags(
        train_gpt2.Hyperparameters(batch_size=512, device_batch_size=32, val_tokens=524288)
    )
    record = dict(
        flags=flags,
        notes=[],
        train_losses=[10.8, 9.0],
        stopped=None,
        summary=dict(step_avg="1000.00ms", peak_memory="20000MiB", device="NVIDIA H200"),
    )
    output = "trainer| x\ntrainer_memory: context_mib:512 max_reserved_mib:23040 max_allocated_mib:20000 "
    output += "device_total_mib:143771\n"
    memory = gpu_benchmark.trainer_memory(output)
    assert memory == dict(
        context_mib=512, max_reserved_mib=23040, max_allocated_mib=20000, device_total_mib=143771
    )
    fits = gpu_benchmark.compute_metrics(record, 989.0, 24, memory)
    assert fits["card_memory_gib"] == pytest.approx((512 + 23040) / 1024) and fits["memory_ok"] is True
    over = gpu_benchmark.compute_metrics(record, 989.0, 24, dict(memory, max_reserved_mib=24064))
    assert over["card_memory_gib"] == 24.0 and over["memory_ok"] is False  # the tensors alone: 19.5 GiB
    oom = gpu_benchmark.compute_metrics(record, 989.0, 24, memory, oom=True)
    assert oom["memory_ok"] is False
    text = gpu_benchmark.table(oom, "full24gb")
    assert "max_memory_reserved 23,040 MiB + CUDA context 512 MiB = 23.00 GiB" in text
    assert "FAIL: reserved + context 23.00 GiB < 24 GiB, but out of memory" in text
    assert gpu_benchmark.trainer_memory("no such line") is None


def test_recipe_step_is_printed_beside_the_default_from_the_report_headline(tmp_path):
    args = train_gpt2.Hyperparameters(recipe="2024-11-24")
    result = dict(ms_per_step=500.0, step_tokens=524288, accum_steps=8, device_batch_size=1, seq_len=65536)
    result["tokens_per_s"] = 524288 / 0.5
    log = tmp_path / "check.txt"
    log.write_text(
        "gpu_report: headline: forward+backward 130.00 ms per micro-step of 64x1024 (median of 16), MFU 40% "
        "of 989 TFLOP/s; step 1048.58 ms, 500,000 tokens/s\n"
    )
    line = gpu_benchmark.beside_line(result, args, str(log))
    assert line == (
        "gpu_benchmark: --recipe=2024-11-24: 500.00 ms per step of 524,288 tokens (8 micro-steps of 1 x "
        "65536), 1,048,576 tokens/s; beside the default recipe (gpu/report.py, same card): 1048.58 ms per "
        "step, 500,000 tokens/s: 2.10x the tokens/s"
    )
    missing = gpu_benchmark.beside_line(result, args, str(tmp_path / "none.txt"))
    assert missing.endswith(f"the default's step was not measured in {tmp_path / 'none.txt'}")


def test_the_record_is_copied_and_the_work_folder_removed(tmp_path):
    proc, result = run_benchmark("--steps", "4", "--copy_record", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copied = os.listdir(tmp_path / "out")
    assert len(copied) == 1 and copied[0].startswith("bench_tiny_") and copied[0].endswith(".txt")
    text = (tmp_path / "out" / copied[0]).read_text()
    assert text.splitlines()[-1].startswith("summary: ") and "--num_iterations=4" in text
    work = re.search(r"work folder (\S+)", proc.stdout)[1]
    assert not os.path.exists(work)  # shards, records and checkpoints: gone
