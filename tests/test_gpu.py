"""GPU-only tests: the bf16 path, compile and the memory probe on CUDA. gpu/check.sh runs them on a GPU.

Each is skipped without a CUDA GPU and names its CPU sibling, which checks the same logic on the CPU
(fp32 there, the recipe's CPU path) in every CI run.
"""

import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, TINY_VOCAB, losses, parse_args, read_record

import train_gpt2
from harness import choose_device_batch_size
from train_gpt2 import (
    GPT,
    CastedLinear,
    build_optimizers,
    cast_model,
    newton_schulz_orthogonalize,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU; the CPU siblings are tests/test_model.py::test_bf16_casts_keep_fp32_master_"
    "weights_for_linears, tests/test_muon.py, tests/test_training.py::test_fifty_steps_learn_and_write_a_"
    "complete_record, tests/test_resume.py::test_auto_micro_batch_takes_the_largest_that_fits, "
    "tests/test_gpu_report.py (the check's dry run) and tests/test_compiled.py",
)

CUDA = torch.device("cuda")


def test_bf16_casts_on_cuda():
    """CPU sibling: tests/test_model.py::test_bf16_casts_keep_fp32_master_weights_for_linears."""
    torch.manual_seed(0)
    for args, batch in (
        (parse_args(["--num_layers=2", "--model_dim=64", "--num_heads=2", "--vocab_size=256"]), 4),
        (parse_args([]), 2),
    ):  # tiny, then the full 124M config at context 1024
        model = cast_model(GPT.from_args(args).to(CUDA), train_gpt2.compute_dtype(CUDA))
        assert train_gpt2.compute_dtype(CUDA) == torch.bfloat16
        assert model.embed.weight.dtype == torch.bfloat16
        assert (
            model.blocks[0].x0_mixing.dtype
            == model.blocks[0].attn.value_residual_lambda.dtype
            == torch.bfloat16
        )
        assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, CastedLinear))
        assert not list(model.buffers())  # rotary angles are computed in fp32 each forward, never cast
        idx = torch.randint(0, args.vocab_size, (batch, 1024), device=CUDA)
        loss = model(idx, idx)
        assert loss.dtype == torch.float32
        assert abs(loss.item() - math.log(args.vocab_size)) < 2e-2  # ln(vocab): zero head, bf16 tolerance
        loss.backward()
        assert model.blocks[0].attn.q.weight.grad.dtype == torch.float32  # fp32 master weights get fp32 grads
        assert model.embed.weight.grad.dtype == torch.bfloat16
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        del model, loss
    torch.cuda.empty_cache()


@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (256, 96), (768, 3072), (3072, 768)])
def test_newton_schulz_in_bf16_on_cuda(shape):
    """CPU sibling: tests/test_muon.py::test_newton_schulz_singular_values_near_one (fp32 there)."""
    torch.manual_seed(0)
    grad = torch.randn(shape, device=CUDA) * 1e-3
    out = newton_schulz_orthogonalize(grad, steps=5, dtype=torch.bfloat16)
    assert out.shape == grad.shape and out.dtype == torch.bfloat16 and out.is_cuda
    singular_values = torch.linalg.svdvals(out.float())
    assert singular_values.min() >= 0.5 and singular_values.max() <= 1.5


def test_compiled_cuda_run_learns_and_names_the_gpu(shards):
    """CPU sibling: tests/test_training.py::test_fifty_steps_learn_and_write_a_complete_record.

    A subprocess, so that compile and the attention-backend switches stay out of this test process."""
    flags = [f for f in TINY_FLAGS if not f.startswith("--device=")] + ["--device=cuda", "--compile=true"]
    proc = subprocess.run(
        [
            sys.executable,
            "train_gpt2.py",
            *flags,
            *shards,
            "--num_iterations=50",
            "--warmdown_iters=15",
            "--progress_seconds=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(shards.records_dir)
    train, val = losses(record), losses(record, "val_loss")
    assert len(train) == 50 and len(val) == 11
    assert abs(val[0] - math.log(TINY_VOCAB)) < 2e-2  # uniform prediction at step 0, in bf16
    assert val[-1] < 0.7 * val[0]  # the chain is 90% predictable: the loss must fall far
    assert "--compile=true\n" in record and "--device=cuda\n" in record
    summary = record.splitlines()[-1]
    assert re.fullmatch(
        r"summary: final_val_loss:\d\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms tokens_per_s:\d+ "
        r"startup_s:\d+\.\d compiled_graphs:\d+ peak_memory:\d+MiB peak_reserved:\d+MiB world_size:1 "
        r"device:.+",
        summary,
    )
    assert summary.endswith(f"device:{torch.cuda.get_device_name(0)}")


def test_auto_micro_batch_probe_on_cuda_stays_under_the_limit():
    """CPU sibling: tests/test_resume.py::test_auto_micro_batch_takes_the_largest_that_fits (a fake `fits`).

    The full 124M model under a cap that 64 sequences do not fit in: the real probe picks a smaller divisor,
    and a real training micro-step with optimizer states at that size then runs under the cap."""
    total = torch.cuda.get_device_properties(CUDA).total_memory
    limit = min(8 * 2**30, total // 2)
    args = parse_args(["--batch_size=64", "--val_tokens=65536", "--device=cuda"])
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / total, CUDA)
    try:
        torch.manual_seed(0)
        model = cast_model(GPT.from_args(args).to(CUDA), torch.bfloat16)
        size, note = choose_device_batch_size(model, args, 1, CUDA)
        candidates = [64, 32, 16, 8, 4, 2, 1]
        assert size in candidates[1:], note  # 64 sequences of 1024 tokens need far more than the cap
        assert note == f"auto: the largest that fits; {candidates[candidates.index(size) - 1]} did not"
        assert torch.cuda.max_memory_allocated(CUDA) < limit  # peak stats were reset after the probe

        optimizers = build_optimizers(model, args, 0, 1, CUDA)
        idx = torch.randint(0, 50257, (size, args.seq_len), device=CUDA)
        model(idx, idx).backward()
        for opt in optimizers.values():
            opt.step()
        torch.cuda.synchronize(CUDA)
        peak = torch.cuda.max_memory_allocated(CUDA)
        print(f"probe under {limit / 2**30:.1f} GiB: micro-batch {size}, peak {peak / 2**30:.2f} GiB")
        assert peak < limit
    finally:
        model = optimizers = None
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.reset_peak_memory_stats(CUDA)
