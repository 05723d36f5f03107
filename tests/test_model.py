"""The model, item by item as the recipe lists it."""

import math

import torch

from train_gpt2 import GPT, CastedLinear, Hyperparameters, apply_rotary, cast_model, rms_norm, rotary_cos_sin


def tiny_model(**overrides):
    shape = dict(
        vocab_size=256,
        num_layers=2,
        model_dim=64,
        num_heads=2,
        mlp_ratio=4,
        rope_base=10000.0,
        logit_softcap=30.0,
    )
    torch.manual_seed(0)
    return GPT(**{**shape, **overrides})


def test_step0_loss_is_ln_vocab():
    model = tiny_model()
    idx = torch.randint(0, 256, (4, 32))
    loss = model(idx, torch.randint(0, 256, (4, 32)))
    assert abs(loss.item() - math.log(256)) < 1e-4


def test_full_config_step0_loss_is_ln_50304():
    """The recipe's own shape, zero-initialized head: every logit 0, the loss ln 50304 = 10.8258."""
    torch.manual_seed(0)
    model = GPT.from_args(Hyperparameters())
    tokens = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(50304)) < 1e-4 and abs(loss - 10.8258) < 1e-4


def test_logits_never_exceed_softcap():
    model = tiny_model(logit_softcap=5.0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)  # raw logits in the hundreds
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.abs().max() <= 5.0
    assert logits.abs().max() > 4.9  # the cap is reached, not just respected


def test_lambda_zero_gives_plain_attention():
    attn = tiny_model().blocks[1].attn
    x = rms_norm(torch.randn(2, 16, 64))
    other_values = torch.randn(2, 16, 2, 32)
    rotary = rotary_cos_sin(16, 32, 10000.0, torch.float32, x.device)
    with torch.no_grad():
        attn.out_proj.weight.normal_()
        attn.value_residual_lambda.fill_(0.0)
        plain, _ = attn(x, None, rotary)  # v1 = own values: plain attention
        mixed, _ = attn(x, other_values, rotary)
        assert torch.allclose(plain, mixed, atol=1e-6)
        attn.value_residual_lambda.fill_(0.5)
        assert not torch.allclose(attn(x, other_values, rotary)[0], plain, atol=1e-3)


def test_block0_values_are_v1():
    model = tiny_model()
    seen = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda module, inputs, output: seen.append((inputs, output)))
    idx = torch.randint(0, 256, (2, 16))
    model(idx)
    (x_block0, v1_in, _), (_, v1_out) = seen[0]
    assert v1_in is None
    assert torch.equal(v1_out, model.blocks[0].attn.v(x_block0).view(2, 16, 2, 32))
    (_, v1_given, _), (_, v1_passed_on) = seen[1]
    assert v1_given is v1_out and v1_passed_on is v1_out


def test_x0_mixing_and_lambda_initial_values():
    for block in tiny_model().blocks:
        assert block.x0_mixing.tolist() == [1.0, 0.0]
        assert block.attn.value_residual_lambda.item() == 0.5


def test_head_and_out_projections_start_at_zero():
    model = tiny_model()
    assert not model.lm_head.weight.any()
    for block in model.blocks:
        assert not block.attn.out_proj.weight.any() and not block.mlp.down.weight.any()
        assert block.attn.q.weight.any() and block.mlp.up.weight.any()


def test_linears_are_bias_free_and_mlp_is_4x():
    model = tiny_model()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    assert model.blocks[0].mlp.up.weight.shape == (256, 64)


def test_parameter_count_of_full_config():
    with torch.device("meta"):
        model = GPT.from_args(Hyperparameters())
    total = sum(p.numel() for p in model.parameters())
    without_embedding = total - model.embed.weight.numel()
    assert round(total / 1e6, 1) == 162.2 and total == 162_201_636
    assert round(without_embedding / 1e6, 1) == 123.6
    assert model.embed.weight.shape == (50304, 768) and len(model.blocks) == 12
    assert model.blocks[0].attn.q.weight.shape == (768, 768) and model.blocks[0].attn.num_heads == 6


def test_bf16_casts_keep_fp32_master_weights_for_linears():
    model = cast_model(tiny_model(), torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.blocks[0].x0_mixing.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, CastedLinear))
    loss = model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8)))
    assert loss.dtype == torch.float32 and abs(loss.item() - math.log(256)) < 1e-3
    assert not list(model.buffers())  # nothing a bf16 cast could round: rotary angles stay fp32-exact


def test_rotary_angles_are_fp32_exact_then_cast():
    cos, sin = rotary_cos_sin(1024, 128, 10000.0, torch.bfloat16, torch.device("cpu"))
    position = torch.arange(1024, dtype=torch.float64)[:, None]
    angles = position * 10000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    assert cos.dtype == torch.bfloat16 and cos.shape == (1, 1024, 1, 64)
    assert torch.allclose(cos[0, :, 0].double(), angles.cos(), atol=4e-3)  # bf16 rounding only, even at 1023
    assert torch.allclose(sin[0, :, 0].double(), angles.sin(), atol=4e-3)


def test_rotary_is_a_rotation_that_keeps_relative_positions():
    cos, sin = rotary_cos_sin(8, 16, 10000.0, torch.float64, torch.device("cpu"))
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    rotated_q, rotated_k = (
        apply_rotary(q.expand(1, 8, 1, 16), cos, sin),
        apply_rotary(k.expand(1, 8, 1, 16), cos, sin),
    )
    assert torch.allclose(rotated_q.norm(dim=-1), q.norm(dim=-1).expand(1, 8, 1))
    scores = rotated_q[0, :, 0] @ rotated_k[0, :, 0].T
    assert torch.allclose(scores[2, 0], scores[7, 5]) and torch.allclose(scores[3, 1], scores[6, 4])


def test_causal_prefix_does_not_see_the_future():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    assert torch.allclose(model(idx)[0, :10], model(changed)[0, :10], atol=1e-5)
