"""Muon: Newton-Schulz orthogonalization, the update's scale, Nesterov momentum."""

import pytest
import torch

from train_gpt2 import Muon, newton_schulz_orthogonalize


@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (256, 96), (768, 3072), (3072, 768)])
def test_newton_schulz_singular_values_near_one(shape):
    # Non-square random matrices: a square Gaussian has singular values near 0, which five steps
    # (slope 3.4445 each) cannot lift; gradient directions that weak are meant to stay small.
    torch.manual_seed(0)
    grad = torch.randn(shape) * 1e-3
    out = newton_schulz_orthogonalize(grad, steps=5, dtype=torch.float32)
    assert out.shape == grad.shape
    singular_values = torch.linalg.svdvals(out)
    assert singular_values.min() >= 0.5 and singular_values.max() <= 1.5


def test_newton_schulz_keeps_singular_vectors():
    torch.manual_seed(0)
    grad = torch.randn(48, 48)
    u, _, vh = torch.linalg.svd(grad)
    out = newton_schulz_orthogonalize(grad, steps=5, dtype=torch.float32)
    assert torch.allclose(u.T @ out @ vh.T, torch.diag(torch.diagonal(u.T @ out @ vh.T)), atol=1e-3)


def run_muon(shape, steps=3):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Muon([p], lr=1.0, momentum=0.95, ns_steps=5, rank=0, world_size=1, ns_dtype=torch.float32)
    grads = [torch.randn(shape) for _ in range(steps)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), grads


def test_muon_update_of_tall_matrix_is_scaled_up():
    p, grads = run_muon((256, 64), steps=1)
    expected = -newton_schulz_orthogonalize(grads[0] * 1.95, 5, torch.float32) * 2.0  # sqrt(256 / 64)
    assert torch.allclose(p, expected, atol=1e-5)


def test_muon_uses_nesterov_momentum():
    p, grads = run_muon((32, 64), steps=2)
    buf1 = grads[0]
    buf2 = 0.95 * buf1 + grads[1]
    expected = -(
        newton_schulz_orthogonalize(grads[0] + 0.95 * buf1, 5, torch.float32)
        + newton_schulz_orthogonalize(grads[1] + 0.95 * buf2, 5, torch.float32)
    )
    assert torch.allclose(p, expected, atol=1e-5)
