"""Train GPT-2 small (124M) on FineWeb to val loss 3.28, speedrun style: the recipe.

    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the 8xH100 record recipe
    python train_gpt2.py --help                                # every knob

One GPU or a CPU runs the same math through gradient accumulation. Every run logs the source of
this file and of harness.py (flags, record, checkpoints, signals), its environment, hyperparameters
and step lines to records/.
"""

import bisect
import glob
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

import harness
from data.shards import HEADER_BYTES, check_shard
from harness import FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, ShardError, knob

# ----------------------------------------------------------------------------------------------
# Hyperparameters

# The public 8xH100 records (RECIPE.md): each one's flags that differ from the fields' own defaults (8 Nov's)
RECIPES = {
    "2024-11-08": "",
    "2024-11-10": "--unet_skips --embed_lr=0.6 --head_lr=0.008 --scalar_lr=0.04 --muon_lr=0.04 "
    "--num_iterations=3000 --warmdown_iters=900",
    "2024-11-19": "--unet_skips --embed_lr=0.6 --head_lr=0.008 --scalar_lr=0.04 --muon_lr=0.04 "
    "--batch_size=8 --seq_len=65536 --document_mask --window_tokens=1024 --num_iterations=1875 "
    "--warmdown_iters=562",
    "2024-11-24": "--unet_skips --embed_lr=0.6 --head_lr=0.008 --scalar_lr=0.04 --muon_lr=0.05 "
    "--batch_size=8 --seq_len=65536 --document_mask --window_tokens=1792 --window_warmup_start=64 "
    "--adam_beta1=0.8 --num_iterations=1750 --warmdown_iters=640 --muon_momentum_warmup_steps=300",
}
PUBLISHED = {  # 8xH100 train time, tokens and final val loss
    "2024-11-08": "7.79 min, 1.70B tokens, 3.2781",
    "2024-11-10": "7.23 min, 1.57B tokens, 3.2753",
    "2024-11-19": "5.03 min, 0.98B tokens, 3.2783",
    "2024-11-24": "4.66 min, 0.92B tokens, 3.2770 (mean of 7 runs)",
}
RECIPE = (lambda v: v in RECIPES, f"must be one of {', '.join(RECIPES)}")


@dataclass
class Hyperparameters(harness.RunFlags):
    """The recipe's knobs, beside the harness's run, machine and output flags (harness.RunFlags)."""

    RECIPES = RECIPES  # not a field: harness.with_recipe puts the chosen recipe's flags under the given ones
    input_bin: str = knob("data/fineweb10B/fineweb_train_*.bin", "glob of training shards")
    input_val_bin: str = knob("data/fineweb10B/fineweb_val_*.bin", "glob of val shards (the first is used)")
    recipe: str = knob(
        "2024-11-08",
        "the record whose flag defaults this run takes (flags beside it override them); published: "
        + "; ".join(f"{name}: {published}" for name, published in PUBLISHED.items()),
        RECIPE,
    )
    batch_size: int = knob(512, "sequences per optimizer step, over all devices and micro-steps", POSITIVE)
    seq_len: int = knob(1024, "tokens per sequence", POSITIVE)
    num_iterations: int = knob(3242, "optimizer steps", POSITIVE)
    warmdown_iters: int = knob(926, "last steps, over which every lr decays linearly to 0", NON_NEGATIVE)
    embed_lr: float = knob(0.3, "Adam lr of the token embedding", harness.LEARNING_RATE)
    head_lr: float = knob(0.002, "Adam lr of the lm head", harness.LEARNING_RATE)
    scalar_lr: float = knob(0.02, "Adam lr of the value-residual, x0-mixing scalars", harness.LEARNING_RATE)
    adam_beta1: float = knob(0.9, "Adam beta1, all Adam groups", FRACTION)
    adam_beta2: float = knob(0.95, "Adam beta2, all Adam groups", FRACTION)
    muon_lr: float = knob(0.02, "Muon lr of the 2-D block matrices", harness.LEARNING_RATE)
    muon_momentum: float = knob(0.95, "Muon Nesterov momentum after warmup", FRACTION)
    muon_momentum_start: float = knob(0.85, "Muon momentum at step 0, warmed up linearly (-0.013)", FRACTION)
    muon_momentum_warmup_steps: int = knob(500, "steps of the Muon momentum warmup", NON_NEGATIVE)
    muon_ns_steps: int = knob(5, "Newton-Schulz iterations per Muon update", POSITIVE)
    vocab_size: int = knob(50304, "GPT-2's 50257 padded to a multiple of 128", POSITIVE, "shape")
    num_layers: int = knob(12, "transformer blocks", POSITIVE, "shape")
    model_dim: int = knob(768, "residual stream width", POSITIVE, "shape")
    num_heads: int = knob(6, "attention heads (head dim = model_dim / num_heads)", POSITIVE, "shape")
    mlp_ratio: int = knob(4, "MLP hidden width / model_dim", POSITIVE, "shape")
    rope_base: float = knob(10000.0, "rotary embedding base", harness.AT_LEAST_ONE)
    logit_softcap: float = knob(30.0, "logits = cap * tanh(logits / cap) (Gemma 2)", harness.AT_LEAST_ONE)
    unet_skips: bool = knob(
        False, "decoder block n/2+i adds s_i x block n/2-1-i's output (10 Nov)", None, "shape"
    )
    document_mask: bool = knob(False, "attention stays inside documents, each opened by eot_token (19 Nov)")
    eot_token: int = knob(50256, "the token that opens each document: GPT-2's <|endoftext|>", NON_NEGATIVE)
    window_tokens: int = knob(0, "sliding window: query i sees keys j > i - W (19 Nov); 0: all", NON_NEGATIVE)
    window_warmup_start: int = knob(
        0, "the window at step 0, grown by it to window_tokens at the end (24 Nov); 0: fixed", NON_NEGATIVE
    )
    val_tokens: int = knob(10485760, "validation tokens, from the start of the val shard", POSITIVE)
    untimed_steps: int = knob(10, "first steps left out of train_time (compilation, warmup)", NON_NEGATIVE)
    seed: int = knob(0, "seed of weight init", harness.SEED)

    def __post_init__(self):
        harness.check_fields(self)
        if self.warmdown_iters > self.num_iterations:
            raise ConfigError(
                f"--warmdown_iters={self.warmdown_iters} exceeds --num_iterations={self.num_iterations}"
            )
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ConfigError(
                f"--model_dim={self.model_dim} must split into --num_heads={self.num_heads} even-sized heads"
            )
        if self.val_tokens % (self.batch_size * self.seq_len):
            raise ConfigError(
                f"--val_tokens={self.val_tokens} must be a multiple of batch_size*seq_len "
                f"= {self.batch_size * self.seq_len}"
            )
        if self.window_warmup_start and not 0 < self.window_warmup_start <= self.window_tokens:
            raise ConfigError(
                f"--window_warmup_start={self.window_warmup_start} needs a --window_tokens at least as large"
            )
        if self.micro_tokens and self.micro_tokens < self.seq_len and not self.document_mask:
            raise ConfigError(
                f"--micro_tokens={self.micro_tokens} cuts sequences at document starts, exact only under "
                f"--document_mask; without it use --device_batch_size"
            )
        if self.document_mask and not self.eot_token < self.vocab_size:
            raise ConfigError(f"--eot_token={self.eot_token} is not below --vocab_size={self.vocab_size}")

    def grad_accum_steps(self, world_size):
        """Micro-steps per optimizer step that keep the global batch exact on this many devices."""
        if self.batch_size % world_size:
            raise ConfigError(
                f"--batch_size={self.batch_size} does not split evenly over {world_size} devices"
            )
        per_device = self.batch_size // world_size
        if self.device_batch_size and per_device % self.device_batch_size:
            raise ConfigError(
                f"--device_batch_size={self.device_batch_size} does not divide the {per_device} "
                f"sequences per device ({self.batch_size} / {world_size} devices); use a divisor or auto"
            )
        return per_device // (self.device_batch_size or per_device)


# ----------------------------------------------------------------------------------------------
# Optimizer: Muon for the 2-D block matrices (Adam, from torch, for the rest)

# The quintic's coefficients, tuned to push every singular value into about [0.7, 1.2] fast (Muon)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_orthogonalize(grad, steps, dtype):
    """Approximate U V^T of grad = U S V^T: the nearest semi-orthogonal matrix, by a quintic iteration."""
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, inside the iteration's basin
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the wide side: X X^T is then the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalized by Newton-Schulz (Jordan et al., 2024).

    Parameter i is orthogonalized only on rank i % world_size; one all-reduce of a flat buffer
    (zeros except each owner's slices, so the sum is exact) hands every rank every update.
    """

    def __init__(self, params, lr, momentum, ns_steps, rank, world_size, ns_dtype):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.ns_steps, self.rank, self.world_size, self.ns_dtype = ns_steps, rank, world_size, ns_dtype
        self.orthogonalize = newton_schulz_orthogonalize  # build_optimizers swaps in the compiled one

    def _owned(self, params):
        return range(self.rank, len(params), self.world_size)

    def _gather_from_owners(self, params, values, dtype):
        """Every rank gets each owner's value: one all-reduce of a flat buffer, zero elsewhere."""
        offsets = np.cumsum([0] + [p.numel() for p in params])
        flat = torch.zeros(offsets[-1], dtype=dtype, device=params[0].device)
        for index in self._owned(params):
            flat[offsets[index] : offsets[index + 1]] = values(params[index]).flatten()
        harness.all_reduce(flat, self.world_size)  # a sum with one non-zero term per element: exact
        return [flat[start:end].view_as(p) for p, start, end in zip(params, offsets[:-1], offsets[1:])]

    def _orthogonalized_update(self, p, momentum):
        if "momentum_buffer" not in self.state[p]:
            self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = self.state[p]["momentum_buffer"]
        buf.mul_(momentum).add_(p.grad)
        update = self.orthogonalize(p.grad.add(buf, alpha=momentum), self.ns_steps, self.ns_dtype)  # Nesterov
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5  # same RMS per element for tall matrices

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            updates = self._gather_from_owners(
                params,
                lambda p, momentum=group["momentum"]: self._orthogonalized_update(p, momentum),
                self.ns_dtype,
            )
            for p, update in zip(params, updates):
                p.add_(update.to(p.dtype), alpha=-group["lr"])

    @torch.no_grad()
    def state_dict(self):
        """All momentum buffers, gathered from their owners (a collective), so a checkpoint resumes on any
        world size; the lrs and momentum come from the schedule."""
        params = self.param_groups[0]["params"]
        buffer_or_zeros = lambda p: self.state[p].get("momentum_buffer", torch.zeros_like(p))  # noqa: E731
        gathered = self._gather_from_owners(params, buffer_or_zeros, torch.float32)
        return dict(momentum_buffers=[buf.clone() for buf in gathered])

    @torch.no_grad()
    def load_state_dict(self, state):
        params, buffers = self.param_groups[0]["params"], state["momentum_buffers"]
        if [b.shape for b in buffers] != [p.shape for p in params]:
            raise ValueError("Muon momentum buffers of other shapes than the matrices")
        for index in self._owned(params):
            self.state[params[index]]["momentum_buffer"] = buffers[index].to(params[index])


# ----------------------------------------------------------------------------------------------
# Model


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))  # weightless: no gain parameter anywhere


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype inside the matmul."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def rotary_cos_sin(seq_len, head_dim, base, dtype, device, offset=None):
    """cos and sin of the rotary angles, computed in fp32 (no buffer a dtype cast could reach), then cast;
    `offset` (a tensor) is the position of token 0 in its sequence, for a micro-step cut out of it."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    if offset is not None:  # whole numbers below 2^24 are exact in fp32: the whole sequence's angles
        positions = positions + offset
    angles = torch.outer(positions, inv_freq)[None, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):  # x: (batch, seq, heads, head_dim); rotates the two halves of head_dim
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# Attention masks: query i sees key j iff j <= i, both lie in one document and i - j < window (19 Nov), in the
# two forms the kernels take; `docs` holds each token's document id (ascending), `window` is a tensor


def chunked_masks(docs, window, chunk):
    """SDPA masks (the CPU, or CUDA uncompiled). Chunks of chunk >= window - 1 queries see only their own and
    the previous chunk's keys, exactly, so a 64K sequence needs no 64K x 64K mask. [(query slice, key slice,
    mask)]."""
    seq, positions, masks = docs.size(1), torch.arange(docs.size(1), device=docs.device), []
    for start in range(0, seq, chunk):
        q, k = slice(start, min(start + chunk, seq)), slice(max(0, start - chunk), min(start + chunk, seq))
        i, j = positions[q, None], positions[None, k]
        mask = (j <= i) & (i - j < window) & (docs[:, q, None] == docs[:, None, k])
        masks.append((q, k, mask[:, None]))  # one mask for every head
    return masks


def ordered_blocks(blocks):
    """FlexAttention's (counts, indices) of a (batch, query block, key block) boolean: the set ones first."""
    indices = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32)[:, None], indices.to(torch.int32)[:, None]


def flex_block_mask(docs, window, block=128):
    """FlexAttention's BlockMask, built eagerly from (seq/block)^2 block-level facts, never a seq x seq mask;
    outside the compiled graph, so inductor compiles no sort for it (minutes at 512 blocks on torch 2.11:
    pytorch issue 182060). Ids ascend, so blocks i >= j hold a same-document pair iff key block j's last id is
    query block i's first, and only that nearest pair can lie within the window: the block is then partial
    (the rule runs per element) or, all one document and all within the window, full."""
    batch, seq = docs.shape
    pad = -seq % block  # padding: a document of its own, which no real query sees
    docs = torch.cat([docs, (docs[:, -1:] + 1).expand(batch, pad)], 1)
    first, last = docs[:, ::block], docs[:, block - 1 :: block]
    i = torch.arange(first.size(1), device=docs.device)[:, None]
    gap = i - i.T  # query block i - key block j
    near = (gap == 0) | (
        (gap > 0) & ((gap - 1) * block + 1 < window) & (last[:, None, :] == first[:, :, None])
    )
    full = (gap > 0) & ((gap + 1) * block - 1 < window) & (first[:, None, :] == last[:, :, None])

    def document_causal_window(b, h, q, k):
        return (k <= q) & (q - k < window) & (docs[b, q] == docs[b, k])

    return BlockMask.from_kv_blocks(
        *ordered_blocks(near & ~full), *ordered_blocks(full), block, document_causal_window, (seq, seq)
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.out_proj = (CastedLinear(dim, dim) for _ in range(4))
        self.value_residual_lambda = nn.Parameter(torch.empty(()))

    def forward(self, x, v1, rotary, mask=None):
        batch, seq, dim = x.shape
        q, k, v = (proj(x).view(batch, seq, self.num_heads, -1) for proj in (self.q, self.k, self.v))
        if v1 is None:
            v1 = v  # block 0 supplies the first-layer values every later block mixes in
        lam = self.value_residual_lambda
        # value residual learning (Zhou et al., 2024): -0.021 val loss in the recipe
        v = (1 - lam) * v + lam * v1
        # QK-norm keeps the attention logits bounded
        q, k = apply_rotary(rms_norm(q), *rotary), apply_rotary(rms_norm(k), *rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(mask, list):  # chunked_masks
            y = torch.cat(
                [
                    F.scaled_dot_product_attention(q[:, :, a], k[:, :, b], v[:, :, b], attn_mask=m)
                    for a, b, m in mask
                ],
                2,
            )
        else:
            y = flex_attention(q, k, v, block_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, dim)), v1


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up, self.down = CastedLinear(dim, hidden), CastedLinear(hidden, dim)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())  # ReLU^2 (So et al., 2021, Primer)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads)
        self.mlp = MLP(dim, mlp_ratio * dim)
        self.x0_mixing = nn.Parameter(torch.empty(2))

    def forward(self, x, v1, x0, rotary, mask=None):
        # re-inject the embedding: -0.009 val loss in the recipe
        x = self.x0_mixing[0] * x + self.x0_mixing[1] * x0
        y, v1 = self.attn(rms_norm(x), v1, rotary, mask=mask)
        x = x + y
        return x + self.mlp(rms_norm(x)), v1


ATTENTION_CHUNK = 2048  # queries per SDPA call of the masked attention off FlexAttention: 2048 x 4096 masks


class GPT(nn.Module):
    def __init__(
        self, vocab_size, num_layers, model_dim, num_heads, mlp_ratio, rope_base, logit_softcap, **parts
    ):
        super().__init__()
        self.logit_softcap, self.rope_base, self.head_dim = logit_softcap, rope_base, model_dim // num_heads
        self.document_mask, self.eot_token = parts.get("document_mask", False), parts.get("eot_token", 50256)
        self.window_tokens = parts.get("window_tokens", 0)  # the last step's window: a forward without one
        self.use_flex_attention = False  # compile_model's choice on CUDA: FlexAttention, compiled
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, mlp_ratio) for _ in range(num_layers))
        self.skip_weights = nn.Parameter(torch.empty(num_layers // 2)) if parts.get("unet_skips") else None
        self.lm_head = CastedLinear(model_dim, vocab_size)  # untied from the embedding: +38.6M params
        self.reset_parameters()

    @classmethod
    def from_args(cls, args):
        return cls(
            args.vocab_size,
            args.num_layers,
            args.model_dim,
            args.num_heads,
            args.mlp_ratio,
            args.rope_base,
            args.logit_softcap,
            unet_skips=args.unet_skips,
            document_mask=args.document_mask,
            eot_token=args.eot_token,
            window_tokens=args.window_tokens,
        )

    @torch.no_grad()
    def reset_parameters(self):
        """All weight initialization, in one place."""
        nn.init.normal_(self.embed.weight)
        for block in self.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
                bound = linear.in_features**-0.5  # nn.Linear's default range
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.out_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.down.weight)
            block.attn.value_residual_lambda.fill_(0.5)
            block.x0_mixing.copy_(torch.tensor([1.0, 0.0]))
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)  # U-net skips start as plain additions (10 Nov)
        nn.init.zeros_(self.lm_head.weight)  # uniform prediction at step 0: loss = ln(vocab_size)

    def activation_values_per_token(self):
        """What the compiled forward keeps for the backward, per token, for the memory probe's estimate: 21
        values of model_dim per block (traced with inductor's decompositions: 29-30 GiB at 64x1024 for the
        124M model) and the logits."""
        return len(self.blocks) * 21 * self.embed.embedding_dim + self.embed.num_embeddings

    def attention_mask(self, idx, window):
        """None: plain causal attention; else the document-causal sliding-window mask of `idx`."""
        if not (self.document_mask or self.window_tokens):
            return None
        # document id = running count of EOTs up to and including a token: each EOT opens its document
        docs = (idx == self.eot_token).cumsum(1) if self.document_mask else torch.zeros_like(idx)
        if window is None:
            window = torch.tensor(self.window_tokens or idx.size(1), device=idx.device)
        if self.use_flex_attention:
            return flex_block_mask(docs, window)
        # a chunk >= the largest window - 1 is exact for every step's window, and static: no recompile
        return chunked_masks(docs, window, max((self.window_tokens or idx.size(1)) - 1, ATTENTION_CHUNK))

    def forward(self, idx, targets=None, window=None, offset=None):
        """Mean loss over targets (-100: padding, left out), or logits; `window` and `offset` are tensors: the
        step's attention window (default: the last step's) and the rotary position of idx's first token. The
        mask is built here, each call, outside the graph: compile_model compiles only the trunk."""
        return self.trunk(idx, targets, self.attention_mask(idx, window), offset)

    def trunk(self, idx, targets, mask, offset):
        x = x0 = rms_norm(self.embed(idx))  # norm right after the embedding
        rotary = rotary_cos_sin(idx.size(1), self.head_dim, self.rope_base, x.dtype, idx.device, offset)
        v1, skips = None, []
        half = len(self.blocks) // 2 if self.skip_weights is not None else 0
        for index, block in enumerate(self.blocks):
            if index >= len(self.blocks) - half:  # U-net (10 Nov): decoder block n-half+i gets block half-1-i
                x = x + self.skip_weights[index - (len(self.blocks) - half)] * skips.pop()
            x, v1 = block(x, v1, x0, rotary, mask=mask)
            if index < half:
                skips.append(x)
        logits = self.lm_head(rms_norm(x))
        # soft-capping (Gemma 2): -0.005 val loss in the recipe
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        if targets is None:
            return logits.float()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def compute_dtype(device):
    """The one precision switch: bf16 on CUDA (the recipe's casts), fp32 on a CPU (bf16: 25-75x slower)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cast_model(model, dtype):
    """bf16 embedding and scalars; fp32 linear weights, cast in the matmul (154.8 -> 144.7 ms/step)."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    return model


def inductor_options(args):  # the 8 Nov record tuned launches; later public records banned it (slow compiles)
    return {"coordinate_descent_tuning": args.coordinate_descent}


def compile_model(model, args):
    """The model, its trunk compiled (static shapes: one graph per size) and timed (harness.FirstCalls); on
    CUDA its masks are FlexAttention's, which only compiled code runs fast (and has no CPU backward)."""
    model.use_flex_attention = model.embed.weight.is_cuda
    model.trunk = harness.FirstCalls(
        torch.compile(model.trunk, dynamic=False, options=inductor_options(args))
    )
    return model


def build_optimizers(model, args, rank, world_size, device):
    """Adam for embedding, head and scalars; Muon for every 2-D matrix inside the blocks. No weight decay."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.blocks.parameters() if p.ndim < 2]
    scalars += [] if model.skip_weights is None else [model.skip_weights]  # U-net weights: scalar Adam
    adam = torch.optim.Adam(
        [
            dict(params=[model.embed.weight], lr=args.embed_lr),
            dict(params=[model.lm_head.weight], lr=args.head_lr),
            dict(params=scalars, lr=args.scalar_lr),
        ],
        betas=(args.adam_beta1, args.adam_beta2),
        fused=device.type == "cuda",
    )
    muon = Muon(
        matrices,
        lr=args.muon_lr,
        momentum=args.muon_momentum,
        ns_steps=args.muon_ns_steps,
        rank=rank,
        world_size=world_size,
        ns_dtype=compute_dtype(device),
    )
    if args.compile:  # 15 bf16 matmuls + element-wise work per matrix: fused, one graph per matrix shape
        compiled = torch.compile(newton_schulz_orthogonalize, dynamic=False, options=inductor_options(args))
        muon.orthogonalize = harness.FirstCalls(compiled, "newton_schulz")
    return dict(adam=adam, muon=muon)


# ----------------------------------------------------------------------------------------------
# Data: llm.c / FineWeb token shards


def shard_size(path):
    """The token count of one shard, after checking its header against its size."""
    return check_shard(path, ShardError)


def read_tokens(path, start, count):
    """`count` tokens from token `start`, by a positioned read (no memory map: a shard that shrinks or
    vanishes under the run is a ShardError, never a bus error)."""
    try:
        tokens = np.fromfile(path, dtype=np.uint16, count=count, offset=HEADER_BYTES + 2 * start)
    except OSError as e:
        raise ShardError(f"{path}: cannot read it ({e.strerror}): deleted or moved during the run?") from None
    if tokens.size < count:
        raise ShardError(f"{path}: ends before token {start + count}: it shrank during the run; restore it")
    return tokens


def read_shard(path):
    """All the tokens of one shard (the loader reads only windows)."""
    return read_tokens(path, 0, shard_size(path))


class ShardLoader:
    """The shards matching `pattern` as one token stream: each step takes the next batch_size*seq_len+1
    tokens (dropping a shard's leftover) and gives rank r the r-th slice, whatever the world size."""

    def __init__(self, pattern, batch_size, seq_len, rank, world_size, device, vocab_size=2**16):
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise ShardError(
                f"no file matches {pattern!r}: download the data (python data/cached_fineweb10B.py) "
                f"or point the flag at your shards"
            )
        self.seq_len, self.rank, self.device, self.vocab_size = seq_len, rank, device, vocab_size
        self.step_tokens, self.rank_tokens = batch_size * seq_len, batch_size * seq_len // world_size
        # steps before the stream starts over; shards vocab-checked; a data error met by prefetch()
        self.steps_per_pass, self.checked, self.error = 0, set(), None
        for path in self.files:
            tokens = shard_size(path)
            if tokens < self.step_tokens + 1:
                raise ShardError(
                    f"{path}: {tokens} tokens is fewer than one global batch "
                    f"(batch_size*seq_len+1 = {self.step_tokens + 1}); use more data or a smaller batch"
                )
            self.steps_per_pass += (tokens - 1) // self.step_tokens
        self.reset()

    def reset(self):
        self.seek(0, 0)

    def seek(self, shard_index, position):
        """Continue `position` tokens into shard `shard_index` (where a checkpoint's data state points)."""
        if shard_index >= len(self.files):
            raise ShardError(
                f"the run continues in shard {shard_index + 1} but only {len(self.files)} match its "
                f"pattern here: download the same shards (python data/cached_fineweb10B.py)"
            )
        self.shard_index, self.position, self.pending = shard_index, position, None
        path, self.shard_tokens = self.files[shard_index], shard_size(self.files[shard_index])
        if position >= self.shard_tokens:  # never a silent start over on other data
            raise ShardError(f"{path} ends before token {position}, where the run continues: other data?")
        for start in range(0, self.shard_tokens, 2**24) if shard_index not in self.checked else ():
            chunk = read_tokens(path, start, min(2**24, self.shard_tokens - start))  # once per shard, 32 MiB
            if chunk.max() >= self.vocab_size:  # an id past the vocab is a device-side assert on CUDA
                first = int(np.argmax(chunk >= self.vocab_size))
                raise ShardError(
                    f"{path}: token {start + first} is id {chunk[first]}, not below "
                    f"--vocab_size={self.vocab_size}: data of another tokenizer?"
                )
        self.checked.add(shard_index)

    def state_dict(self):
        """Where the next batch starts (a prefetched batch is not consumed yet): what a checkpoint stores."""
        return self.pending[0] if self.pending else dict(shard_index=self.shard_index, position=self.position)

    def load_state_dict(self, state):
        self.seek(state["shard_index"], state["position"])

    def next_batch(self):
        """This rank's (inputs, targets) for one optimizer step, each of shape (batch_size/world, seq_len)."""
        if self.error:
            raise self.error
        (_, batch), self.pending = self.pending or (None, self._load()), None
        return batch

    def prefetch(self):
        """Load the next batch now, while the device is still busy with this step. A data error waits in
        `error`, the state still before the batch, so that the step's model can be saved first."""
        try:
            self.pending = (self.state_dict(), self._load())
        except ShardError as e:
            self.error = e

    def _load(self):
        if self.position + self.step_tokens + 1 > self.shard_tokens:
            self.seek((self.shard_index + 1) % len(self.files), 0)
        start = self.position + self.rank * self.rank_tokens
        tokens = read_tokens(self.files[self.shard_index], start, self.rank_tokens + 1)
        window, self.position = torch.from_numpy(tokens.astype(np.int64)), self.position + self.step_tokens
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)  # one copy; x, y are views of it
        return window[:-1].view(-1, self.seq_len), window[1:].view(-1, self.seq_len)


# ----------------------------------------------------------------------------------------------
# Distributed setup


def setup_distributed(device_choice):
    """(rank, world_size, device) from torchrun's environment; a plain `python` run is a world of one."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA GPU is visible: check nvidia-smi, or use --device=cpu")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            f"lower --nproc_per_node"
        )
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=device if use_cuda else None,
        )
    return rank, world_size, device


# ----------------------------------------------------------------------------------------------
# Schedule and evaluation


def lr_multiplier(step, args):
    """Constant, then linear decay to 0 over the last warmdown_iters steps."""
    return min(1.0, (args.num_iterations - step) / args.warmdown_iters) if args.warmdown_iters else 1.0


def muon_momentum_at(step, args):
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum


def set_schedule(optimizers, args, step):
    """Every learning rate, and Muon's momentum, at `step`."""
    multiplier = lr_multiplier(step, args)
    for group, lr in zip(optimizers["adam"].param_groups, (args.embed_lr, args.head_lr, args.scalar_lr)):
        group["lr"] = lr * multiplier
    optimizers["muon"].param_groups[0].update(
        lr=args.muon_lr * multiplier, momentum=muon_momentum_at(step, args)
    )


def window_at(step, args):
    """The attention window of a step, 0 for none: 24 Nov's W = 64 x (1 + floor(27 step / 1750)), in general
    start x (1 + floor((final - start) step / (start N))): start at step 0, final at step N (validation)."""
    start, final = args.window_warmup_start, args.window_tokens
    return start * (1 + (final - start) * step // (start * args.num_iterations)) if start else final


def forward_kwargs(step, args, device):
    """The model's keyword arguments at `step`: its attention window as a tensor (a fill: no sync; a tensor:
    no recompile per value), or none."""
    window = window_at(step, args)
    return dict(window=torch.full((), window, device=device)) if window else {}


def micro_batches(x, y, args, accum_steps, step, lost_context=None):
    """[(inputs, targets, forward kwargs, loss divisor)] of this rank's batch: accum_steps equal chunks, or
    with --micro_tokens pieces of each sequence cut at document starts (document_micro_steps)."""
    window, kwargs = window_at(step, args), forward_kwargs(step, args, x.device)
    if args.micro_tokens and args.micro_tokens < args.seq_len:
        return document_micro_steps(x, y, args, kwargs, window, lost_context)
    return [(xm, ym, kwargs, accum_steps) for xm, ym in zip(x.chunk(accum_steps), y.chunk(accum_steps))]


def document_pieces(starts, seq_len, size, window):
    """([(start, end)], lost): 0..seq_len cut into pieces of at most `size` tokens, each ending at the last
    document start in reach (`starts`: ascending positions of the tokens that open documents). A document
    longer than a piece is cut after `size` tokens; the tokens after a cut that would have seen (within
    `window`) tokens before it lose that context: `lost` counts them."""
    starts, pieces, start, lost, lost_until = [0] + sorted(starts) + [seq_len], [], 0, 0, 0
    while start < seq_len:
        end = starts[bisect.bisect_right(starts, start + size) - 1]
        if end <= start:  # no document start in reach: cut inside the document
            end = start + size
            next_start = starts[bisect.bisect_right(starts, end - 1)]  # where the cut document ends
            until = min(end - 1 + window, next_start)  # query i saw key end-1 iff i - (end-1) < window
            lost, lost_until = lost + max(0, until - max(end, lost_until)), max(lost_until, until)
        pieces.append((start, end))
        start = end
    return pieces, lost


def document_micro_steps(x, y, args, kwargs, window, lost_context=None):
    """[(inputs, targets, forward kwargs, loss divisor)]: each of this rank's sequences cut at document starts
    (document_pieces), where no attention crosses; each piece padded to micro_tokens (one static shape: no
    recompiles) with targets -100 (outside the loss; causal attention keeps the padding out of every real
    query's view), its rotary positions offset to where it lies, and its loss divided by the rank's tokens
    over its own: the sums equal the whole sequences' loss and gradients."""
    steps, size = [], args.micro_tokens
    for row_x, row_y in zip(x, y):
        starts = (row_x == args.eot_token).nonzero().flatten().tolist()
        pieces, lost = document_pieces(starts, args.seq_len, size, window or args.seq_len)
        for start, end in pieces:
            pad = (0, size - (end - start))
            xm = F.pad(row_x[start:end], pad, value=args.eot_token)
            ym = F.pad(row_y[start:end], pad, value=-100)
            offset = torch.tensor(start, device=x.device)
            steps.append((xm[None], ym[None], dict(kwargs, offset=offset), x.numel() / (end - start)))
        if lost_context is not None:
            lost_context.append(lost)
    return steps


@torch.no_grad()
def evaluate(model, val_loader, args, accum_steps, world_size, step):
    """Mean loss over exactly the first val_tokens tokens of the val shard, averaged over all ranks, under the
    attention window of `step`."""
    model.eval()
    val_loader.reset()
    total, count = torch.zeros((), device=val_loader.device), 0
    for _ in range(args.val_tokens // (args.batch_size * args.seq_len)):
        x, y = val_loader.next_batch()
        for xm, ym, kwargs, divisor in micro_batches(x, y, args, accum_steps, step):
            total += model(xm, ym, **kwargs).float() * (accum_steps / divisor)  # 1.0 in equal chunks
        count += accum_steps
    model.train()
    return (harness.all_reduce(total, world_size) / (count * world_size)).item()


@contextmanager
def attention_backends(device):
    """cuDNN attention first on Hopper (the record's choice, faster than flash there), PyTorch's other kernels
    after it for any shape cuDNN rejects; PyTorch's own order elsewhere. Yields the note for the record."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        yield f"attention: PyTorch's default SDPA order on {harness.device_name(device)}"
        return
    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    with sdpa_kernel(order, set_priority=True):
        yield "attention: cuDNN SDPA first (Hopper), then flash, memory-efficient, math"


# ----------------------------------------------------------------------------------------------
# Training loop


def train(run, monitor):
    """Steps start_step+1 .. num_iterations of `run` (a harness.Run); `monitor` (a harness.Monitor) keeps the
    clock, the record and the agreement of all ranks. Returns None at the end, or why every rank agreed to
    stop early (a signal, the planned stop time, a full disk for the record)."""
    args, model = run.args, run.training_model
    for step in range(run.start_step, args.num_iterations + 1):
        # ---------------- validation and checkpoint, untimed ----------------
        if monitor.validation_due(step):
            with monitor.untimed():
                val_loss = evaluate(model, run.val_loader, args, run.accum_steps, run.world_size, step)
            monitor.validated(step, val_loss)
        if monitor.checkpoint_due(step):
            monitor.save(step)
        if step == args.num_iterations or monitor.stop_agreed:
            return monitor.end(step)

        # ---------------- one optimizer step over the global batch ----------------
        x, y = run.train_loader.next_batch()
        train_loss = torch.zeros((), device=x.device)
        batches = micro_batches(x, y, args, run.accum_steps, step, monitor.lost_context)
        for micro_step, (xm, ym, kwargs, divisor) in enumerate(batches):
            with nullcontext() if micro_step == len(batches) - 1 or run.world_size == 1 else model.no_sync():
                loss = model(xm, ym, **kwargs)  # DDP all-reduces (averages) gradients once, after the last
                (loss / divisor).backward()  # the mean over micro-steps: the same math on any device count
            train_loss += loss.detach() / divisor
        if step + 1 < args.num_iterations:
            run.train_loader.prefetch()  # while the device still runs this step's kernels
        set_schedule(run.optimizers, args, step)
        for optimizer in run.optimizers.values():
            optimizer.step()
        model.zero_grad(set_to_none=True)
        monitor.after_step(step + 1, train_loss, run.train_loader.error)  # the one host sync of the step


# ----------------------------------------------------------------------------------------------
# main


def build_run(args, rank, world_size, device, checkpoint, started=None, run_id=""):
    """Everything training needs, built before the record opens so that bad input fails in one line; with it
    the notes for the record."""
    loader_args = (args.batch_size, args.seq_len, rank, world_size, device, args.vocab_size)
    train_loader = ShardLoader(args.input_bin, *loader_args)
    val_loader = ShardLoader(args.input_val_bin, *loader_args)
    notes = harness.check_data(args, train_loader, val_loader)
    first = read_tokens(train_loader.files[0], 0, min(2**20, shard_size(train_loader.files[0])))
    if args.document_mask and not (first == args.eot_token).any():  # one document: plain causal attention
        notes.append(f"document_mask: no --eot_token={args.eot_token} in the first {first.size} train tokens")
    torch.manual_seed(args.seed)
    with harness.model_fits(device):
        model = cast_model(GPT.from_args(args).to(device), compute_dtype(device))
    optimizers = build_optimizers(model, args, rank, world_size, device)
    start_step, clock = 0, harness.Clock(device)
    if checkpoint is not None:
        start_step, clock = harness.restore_checkpoint(
            checkpoint, args.resume, model, optimizers, train_loader, device
        )
        notes.append(
            f"resumed_from: {args.resume} at step {start_step} (parent record {checkpoint['record']})"
        )
        notes += checkpoint.get("notes", [])  # harness.resolve_args: changed flags, broken checkpoints
    if args.compile:
        compile_model(model, args)
    kwargs = forward_kwargs(start_step, args, device)  # the probe calls the model as the first step will
    note = harness.choose_micro_steps(model, args, world_size, device, kwargs)  # where auto: probed
    notes += [note] if note else []
    training_model = model
    if world_size > 1:  # bucket views: no second copy of the gradients
        device_ids = [device.index] if device.type == "cuda" else None
        training_model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    parts = (model, training_model, optimizers, train_loader, val_loader, args.grad_accum_steps(world_size))
    return harness.Run(args, rank, world_size, device, *parts, start_step, clock, started, run_id), notes


def run_training(argv, stop):
    """One training run from its flags; returns the exit status, or raises what ended it."""
    args, checkpoint = harness.resolve_args(Hyperparameters, argv, __doc__.split("\n\n")[0])
    rank, world_size, device = setup_distributed(args.device)
    started, run_id, notes = harness.start_up(args, rank, world_size, device, stop)
    with attention_backends(device) as attention_note:
        run, run_notes = build_run(args, rank, world_size, device, checkpoint, started, run_id)
        with harness.Monitor(
            run, stop, sys.modules[__name__], [attention_note, *notes, *run_notes]
        ) as monitor:
            train(run, monitor)
        return monitor.exit_status


def main(argv):
    """Exit status 0 on success; a project error ends in one line on stderr, a signal in 128 + its number."""
    return harness.main(run_training, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
