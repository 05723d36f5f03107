"""Train GPT-2 small (124M) on FineWeb to val loss 3.28, speedrun style.

    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the 8xH100 record recipe
    python train_gpt2.py --help                                # every knob

One GPU or a CPU runs the same math through gradient accumulation. Every run logs its
own source, environment, hyperparameters and step lines to records/.
"""

import argparse
import dataclasses
import errno
import gc
import glob
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------------------------
# Hyperparameters


class TrainError(Exception):
    """Bad input the user can fix: main() turns it into one line on stderr and exit status 1."""


class ConfigError(TrainError, ValueError):
    """A flag or a combination of flags that cannot run."""


POSITIVE = (lambda v: v > 0, "must be positive")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def knob(default, help, rule=None):
    """A Hyperparameters field: its default, its --help text, and the (test, reason) its value must pass."""
    return field(default=default, metadata=dict(help=help, rule=rule))


@dataclass
class Hyperparameters:
    input_bin: str = knob("data/fineweb10B/fineweb_train_*.bin", "glob of training shards")
    input_val_bin: str = knob(
        "data/fineweb10B/fineweb_val_*.bin", "glob of validation shards (the first is used)"
    )
    batch_size: int = knob(512, "sequences per optimizer step, over all devices and micro-steps", POSITIVE)
    device_batch_size: int | None = knob(
        None, "sequences per device per micro-step; auto: most that fit, <= 64", POSITIVE
    )
    seq_len: int = knob(1024, "tokens per sequence", POSITIVE)
    num_iterations: int = knob(3242, "optimizer steps", POSITIVE)
    warmdown_iters: int = knob(
        926, "last steps over which every learning rate decays linearly to 0", NON_NEGATIVE
    )
    embed_lr: float = knob(0.3, "Adam lr of the token embedding", POSITIVE)
    head_lr: float = knob(0.002, "Adam lr of the lm head", POSITIVE)
    scalar_lr: float = knob(0.02, "Adam lr of the value-residual and x0-mixing scalars", POSITIVE)
    adam_beta1: float = knob(0.9, "Adam beta1, all Adam groups", FRACTION)
    adam_beta2: float = knob(0.95, "Adam beta2, all Adam groups", FRACTION)
    muon_lr: float = knob(0.02, "Muon lr of the 2-D block matrices", POSITIVE)
    muon_momentum: float = knob(0.95, "Muon Nesterov momentum after warmup", FRACTION)
    muon_momentum_start: float = knob(
        0.85, "Muon momentum at step 0, warmed up linearly (-0.013 val loss)", FRACTION
    )
    muon_momentum_warmup_steps: int = knob(500, "steps of the Muon momentum warmup", NON_NEGATIVE)
    muon_ns_steps: int = knob(5, "Newton-Schulz iterations per Muon update", POSITIVE)
    vocab_size: int = knob(50304, "GPT-2's 50257 padded to a multiple of 128 for fast matmuls", POSITIVE)
    num_layers: int = knob(12, "transformer blocks", POSITIVE)
    model_dim: int = knob(768, "residual stream width", POSITIVE)
    num_heads: int = knob(6, "attention heads (head dim = model_dim / num_heads)", POSITIVE)
    mlp_ratio: int = knob(4, "MLP hidden width / model_dim", POSITIVE)
    rope_base: float = knob(10000.0, "rotary embedding base", POSITIVE)
    logit_softcap: float = knob(30.0, "logits = cap * tanh(logits / cap) (Gemma 2)", POSITIVE)
    val_loss_every: int = knob(
        125, "validate every this many steps, at step 0 and at the end; 0: the end", NON_NEGATIVE
    )
    val_tokens: int = knob(10485760, "validation tokens, from the start of the val shard", POSITIVE)
    untimed_steps: int = knob(10, "first steps left out of train_time (compilation, warmup)", NON_NEGATIVE)
    seed: int = knob(0, "seed of weight init")
    device: str = knob(
        "auto",
        "auto (CUDA if visible, else CPU), cuda or cpu",
        (lambda v: v in ("auto", "cuda", "cpu"), "must be auto, cuda or cpu"),
    )
    compile: bool | None = knob(None, "torch.compile; auto = on for CUDA, off for CPU")
    run_name: str = knob(
        "run",
        "record name: the log goes to records_dir/<date>_<run_name>/",
        (
            lambda v: re.fullmatch(r"\w[\w.-]*", v),
            "takes letters, digits, '.', '_' and '-', and starts with a letter or digit",
        ),
    )
    records_dir: str = knob("records", "where run logs are written")
    checkpoint_dir: str = knob(
        "checkpoints", "where checkpoints are written (outside records/: they are large)"
    )
    save_every: int = knob(0, "checkpoint every this many steps; 0 = off", NON_NEGATIVE)
    save_every_minutes: float = knob(
        30.0, "checkpoint every this many minutes of wall time; 0 = off", NON_NEGATIVE
    )
    keep_checkpoints: int = knob(2, "newest checkpoints of this run kept on disk", POSITIVE)
    resume: str = knob("", "checkpoint to continue from: a path, or latest (the newest of this run_name)")
    memory_limit_gb: float = knob(0.0, "cap GPU memory, to rehearse a smaller card; 0 = no cap", NON_NEGATIVE)
    progress_seconds: float = knob(
        10.0, "console progress line (steps/s, tokens/s, ETA) this often; 0 = off", NON_NEGATIVE
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, rule = getattr(self, f.name), f.metadata["rule"]
            if rule and value is not None and not rule[0](value):
                raise ConfigError(f"--{f.name} {rule[1]}, got {value!r}")
        if self.warmdown_iters > self.num_iterations:
            raise ConfigError(
                f"--warmdown_iters={self.warmdown_iters} exceeds --num_iterations={self.num_iterations}"
            )
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ConfigError(
                f"--model_dim={self.model_dim} must split into --num_heads={self.num_heads} heads of even size"
            )
        if self.val_tokens % (self.batch_size * self.seq_len):
            raise ConfigError(
                f"--val_tokens={self.val_tokens} must be a multiple of batch_size*seq_len "
                f"= {self.batch_size * self.seq_len}"
            )

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

    def as_flags(self):
        return [f"--{f.name}={flag_text(getattr(self, f.name))}" for f in dataclasses.fields(self)]


def flag_text(value):
    return "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def flag_type(kind):
    """argparse's converter for a field type; `T | None` also takes auto (None: decided at start-up)."""
    base = next(t for t in getattr(kind, "__args__", (kind,)) if t is not type(None))

    def convert(text):
        if base is bool and text.lower() not in ("true", "false", "auto"):
            raise ValueError(text)
        return (
            None
            if text == "auto" and base is not kind
            else text.lower() == "true"
            if base is bool
            else base(text)
        )

    convert.__name__ = base.__name__ + (" or auto" if base is not kind else "")  # argparse names it in errors
    return convert


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised, instead of usage text and sys.exit(2)
        raise ConfigError(f"{message} (see --help)")


def flag_parser():
    parser = FlagParser(
        prog="train_gpt2.py",
        usage="%(prog)s [--name value | --name=value ...]",
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
        epilog="Flags take --name value or --name=value.",
    )
    for f in dataclasses.fields(Hyperparameters):
        is_bool = bool in getattr(f.type, "__args__", (f.type,))
        parser.add_argument(
            f"--{f.name}",
            type=flag_type(f.type),
            nargs="?" if is_bool else None,
            const=True if is_bool else None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (default: {flag_text(f.default)})",
        )
    return parser


def parse_flags(argv):
    """The flags given on the command line, as {name: typed value}; anything unknown is a ConfigError."""
    return vars(flag_parser().parse_args(argv))


def parse_args(argv):
    return Hyperparameters(**parse_flags(argv))


MACHINE_FIELDS = (
    "device_batch_size",
    "device",
    "compile",
    "resume",
    "memory_limit_gb",
)  # not inherited on resume
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_ratio")  # a checkpoint fixes these


# ----------------------------------------------------------------------------------------------
# Optimizer: Muon for the 2-D block matrices (Adam, from torch, for the rest)

NS_COEFFICIENTS = (
    3.4445,
    -4.7750,
    2.0315,
)  # quintic tuned to push all singular values into ~[0.7, 1.2] fast (Muon)


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

    def __init__(
        self,
        params,
        lr,
        momentum,
        ns_steps,
        rank,
        world_size,
        ns_dtype,
        orthogonalize=newton_schulz_orthogonalize,
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.ns_steps, self.rank, self.world_size, self.ns_dtype = ns_steps, rank, world_size, ns_dtype
        self.orthogonalize = orthogonalize

    def _owned(self, params):
        return range(self.rank, len(params), self.world_size)

    def _gather_from_owners(self, params, values, dtype):
        """Every rank gets each owner's value: one all-reduce of a flat buffer, zero outside the owners' slices."""
        offsets = np.cumsum([0] + [p.numel() for p in params])
        flat = torch.zeros(offsets[-1], dtype=dtype, device=params[0].device)
        for index in self._owned(params):
            flat[offsets[index] : offsets[index + 1]] = values(params[index]).flatten()
        if self.world_size > 1:
            dist.all_reduce(flat)  # a sum with one non-zero term per element: exact
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
                params, lambda p: self._orthogonalized_update(p, group["momentum"]), self.ns_dtype
            )
            for p, update in zip(params, updates):
                p.add_(update.to(p.dtype), alpha=-group["lr"])

    @torch.no_grad()
    def momentum_buffers(self):
        """All momentum buffers, gathered from their owners, so a checkpoint resumes on any world size."""
        params = self.param_groups[0]["params"]
        buffer_or_zeros = lambda p: self.state[p].get("momentum_buffer", torch.zeros_like(p))  # noqa: E731
        return [buf.clone() for buf in self._gather_from_owners(params, buffer_or_zeros, torch.float32)]

    @torch.no_grad()
    def load_momentum_buffers(self, buffers):
        params = self.param_groups[0]["params"]
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


def rotary_cos_sin(seq_len, head_dim, base, dtype, device):
    """cos and sin of the rotary angles, computed in fp32 (no buffer a dtype cast could reach), then cast."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)[
        None, :, None, :
    ]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):  # x: (batch, seq, heads, head_dim); rotates the two halves of head_dim
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.out_proj = (CastedLinear(dim, dim) for _ in range(4))
        self.value_residual_lambda = nn.Parameter(torch.empty(()))

    def forward(self, x, v1, rotary):
        batch, seq, dim = x.shape
        q, k, v = (proj(x).view(batch, seq, self.num_heads, -1) for proj in (self.q, self.k, self.v))
        if v1 is None:
            v1 = v  # block 0 supplies the first-layer values every later block mixes in
        lam = self.value_residual_lambda
        v = (
            1 - lam
        ) * v + lam * v1  # value residual learning (Zhou et al., 2024): -0.021 val loss in the recipe
        q, k = (
            apply_rotary(rms_norm(q), *rotary),
            apply_rotary(rms_norm(k), *rotary),
        )  # QK-norm: bounded logits
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
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

    def forward(self, x, v1, x0, rotary):
        x = (
            self.x0_mixing[0] * x + self.x0_mixing[1] * x0
        )  # re-inject the embedding: -0.009 val loss in the recipe
        y, v1 = self.attn(rms_norm(x), v1, rotary)
        x = x + y
        return x + self.mlp(rms_norm(x)), v1


class GPT(nn.Module):
    def __init__(self, vocab_size, num_layers, model_dim, num_heads, mlp_ratio, rope_base, logit_softcap):
        super().__init__()
        self.logit_softcap, self.rope_base, self.head_dim = logit_softcap, rope_base, model_dim // num_heads
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, mlp_ratio) for _ in range(num_layers))
        self.lm_head = CastedLinear(
            model_dim, vocab_size
        )  # untied from the embedding: +38.6M params, no extra FLOPs
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
        nn.init.zeros_(self.lm_head.weight)  # uniform prediction at step 0: loss = ln(vocab_size)

    def forward(self, idx, targets=None):
        x = x0 = rms_norm(self.embed(idx))  # norm right after the embedding
        rotary = rotary_cos_sin(
            idx.size(1), self.head_dim, self.rope_base, x.dtype, idx.device
        )  # once per forward
        v1 = None
        for block in self.blocks:
            x, v1 = block(x, v1, x0, rotary)
        logits = self.lm_head(rms_norm(x))
        logits = self.logit_softcap * torch.tanh(
            logits / self.logit_softcap
        )  # soft-capping (Gemma 2): -0.005
        if targets is None:
            return logits.float()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def compute_dtype(device):
    """The one precision switch: bf16 on CUDA (the recipe's casts), fp32 on CPU (bf16 is 25-75x slower there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cast_model(model, dtype):
    """bf16 embedding and scalars; linears keep fp32 master weights and cast in the matmul (154.8 -> 144.7 ms/step)."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    return model


INDUCTOR_OPTIONS = {
    "coordinate_descent_tuning": True
}  # the 8 Nov record's setting: tunes each kernel's launch


def compile_model(model):
    return torch.compile(model, dynamic=False, options=INDUCTOR_OPTIONS)  # static shapes: one graph per size


def build_optimizers(model, args, rank, world_size, device):
    """Adam for embedding, head and scalars; Muon for every 2-D matrix inside the blocks. No weight decay."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.blocks.parameters() if p.ndim < 2]
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
        muon.orthogonalize = torch.compile(
            newton_schulz_orthogonalize, dynamic=False, options=INDUCTOR_OPTIONS
        )
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adam, muon


# ----------------------------------------------------------------------------------------------
# Data: llm.c / FineWeb token shards

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(TrainError, ValueError):
    """A missing, corrupt or too small token shard."""


def read_shard(path):
    """The tokens of one shard as a read-only uint16 memmap, after checking its header against its size."""
    try:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise ShardError(f"{path}: cannot read it ({e.strerror})") from None
    if header.size < HEADER_INTS:
        raise ShardError(
            f"{path}: {os.path.getsize(path)} bytes is too short for the {HEADER_BYTES}-byte shard header"
        )
    if header[0] != SHARD_MAGIC:
        raise ShardError(
            f"{path}: magic number {header[0]} is not {SHARD_MAGIC}: not an llm.c/FineWeb token shard"
        )
    if header[1] != SHARD_VERSION:
        raise ShardError(
            f"{path}: shard version {header[1]} is not {SHARD_VERSION}: re-tokenize with data/fineweb.py"
        )
    num_tokens, size = int(header[2]), os.path.getsize(path)
    if size != HEADER_BYTES + 2 * num_tokens:
        raise ShardError(
            f"{path}: header says {num_tokens} tokens ({HEADER_BYTES + 2 * num_tokens} bytes) but the "
            f"file has {size} bytes: truncated or corrupt, download or tokenize it again"
        )
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


class ShardLoader:
    """The shards matching `pattern` as one token stream: each step takes the next batch_size*seq_len+1 tokens
    (dropping a shard's leftover) and gives rank r the r-th slice: the same tokens on any world size or micro-batch."""

    def __init__(self, pattern, batch_size, seq_len, rank, world_size, device, vocab_size=2**16):
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise ShardError(
                f"no file matches {pattern!r}: download the data (python data/cached_fineweb10B.py) "
                f"or point the flag at your shards"
            )
        self.seq_len, self.rank, self.device, self.vocab_size = seq_len, rank, device, vocab_size
        self.step_tokens, self.rank_tokens = batch_size * seq_len, batch_size * seq_len // world_size
        self.steps_per_pass, self.checked = (
            0,
            set(),
        )  # steps before the stream starts over; shards vocab-checked
        for path in self.files:
            tokens = len(read_shard(path))
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
        self.tokens = read_shard(self.files[shard_index])
        if (
            shard_index not in self.checked
        ):  # once per shard: an id past the vocab is a device-side assert on CUDA
            if self.tokens.max() >= self.vocab_size:
                first = int(np.argmax(self.tokens >= self.vocab_size))
                raise ShardError(
                    f"{self.files[shard_index]}: token {first} is id {self.tokens[first]}, not below "
                    f"--vocab_size={self.vocab_size}: data of another tokenizer?"
                )
            self.checked.add(shard_index)

    def state(self):
        """Where the next batch starts (a prefetched batch is not consumed yet): what a checkpoint stores."""
        return self.pending[0] if self.pending else dict(shard_index=self.shard_index, position=self.position)

    def next_batch(self):
        """This rank's (inputs, targets) for one optimizer step, each of shape (batch_size/world, seq_len)."""
        (_, batch), self.pending = self.pending or (None, self._load()), None
        return batch

    def prefetch(self):
        """Load the next batch now, while the device is still busy with this step."""
        self.pending = (self.state(), self._load())

    def _load(self):
        if self.position + self.step_tokens + 1 > len(self.tokens):
            self.seek((self.shard_index + 1) % len(self.files), 0)
        start = self.position + self.rank * self.rank_tokens
        window = torch.from_numpy(self.tokens[start : start + self.rank_tokens + 1].astype(np.int64))
        self.position += self.step_tokens
        if self.device.type == "cuda":
            window = window.pin_memory().to(
                self.device, non_blocking=True
            )  # one copy; x and y are views of it
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


def all_reduce_sum(value, world_size):
    if world_size > 1:
        dist.all_reduce(value)  # SUM: gloo has no AVG
    return value


# ----------------------------------------------------------------------------------------------
# Logging: the speedrun record format


class OutputError(TrainError):
    """A record or checkpoint that cannot be written: full disk, read-only folder."""


class PeerFailure(TrainError):
    """This rank stops because another rank failed: the rank that failed gives the reason."""


def output_error(path, error):
    if error.errno == errno.ENOSPC:
        return OutputError(
            f"the disk holding {os.path.dirname(path) or '.'} is full: free space there, or point "
            f"--records_dir / --checkpoint_dir at another disk"
        )
    return OutputError(f"cannot write {path}: {error.strerror or error}")


class RunLog:
    """Prints on rank 0 and appends whole lines to a new record file; other ranks stay silent. A line the disk
    cannot take is left out whole and remembered in `error`: the loop then stops the run at the next step."""

    def __init__(self, path):
        self.path, self.fd, self.size, self.error = path, None, 0, None
        if path:
            try:  # O_EXCL: never over an earlier record; O_APPEND: after a failed line, the next goes at the end
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except OSError as e:
                raise output_error(path, e) from None

    def __call__(self, line="", console=True, record=True):
        if self.fd is None:
            return
        if console:
            print(line, flush=True)
        if (
            record and self.error is None
        ):  # after a failure, the console only: no line goes missing mid-record
            data, written = (line + "\n").encode(), 0
            try:
                while written < len(data):
                    written += os.write(self.fd, data[written:])
                self.size += written
            except OSError as e:
                os.ftruncate(self.fd, self.size)  # never half a line: a reader sees whole lines only
                self.error = self.error or output_error(self.path, e)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment_lines(device):
    lines = [
        f"Running Python {sys.version}",
        f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}",
    ]
    if device.type != "cuda":
        return lines + [f"CPU: {cpu_name()} ({os.cpu_count()} cores)"]
    try:
        return lines + [
            subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip()
        ]
    except (OSError, subprocess.SubprocessError) as e:
        return lines + [f"nvidia-smi unavailable: {e}"]


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name()}"


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) // 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


def progress_line(step, args, train_loss, steps_per_s, clock):
    return (
        f"step {step}/{args.num_iterations} train_loss {train_loss:.4f} | {steps_per_s:.2f} steps/s "
        f"{steps_per_s * args.batch_size * args.seq_len:,.0f} tokens/s | train_time "
        f"{timedelta(seconds=round(clock.train_ms / 1000))} eta "
        f"{timedelta(seconds=round((args.num_iterations - step) / steps_per_s))}"
    )


def open_record(args, run_id, now, rank, device, world_size, accum_steps, notes):
    """The record file (rank 0): source, environment, flags and notes, in the speedrun layout."""
    path = os.path.join(args.records_dir, f"{now:%Y-%m-%d}_{args.run_name}", f"{run_id}.txt")
    environment = (
        environment_lines(device) if rank == 0 else []
    )  # nvidia-smi may take seconds: before the file
    log = RunLog(path if rank == 0 else None)
    with open(__file__) as f:
        log(f.read().rstrip("\n"), console=False)  # the record starts with the exact source
    for line in ["=" * 100, *environment, "Hyperparameters:", *args.as_flags(), "Notes:", *notes, "=" * 100]:
        log(line, console=False)
    log(
        f"record: {log.path}  (world size {world_size}, {device_name(device)}, device_batch_size "
        f"{args.device_batch_size} x {accum_steps} micro-steps)",
        record=False,
    )
    return log


class Clock:
    """Device-synchronized train time; validation, checkpoints and the untimed warmup steps are left out."""

    def __init__(self, device, train_ms=0.0, timed_steps=0):
        self.device, self.train_ms, self.timed_steps, self.since = device, train_ms, timed_steps, None

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self):
        self.since = self._now()

    def lap(self, count_step=True):
        """Add the time since the last lap (a finished step, or the start of a pause)."""
        if self.since is not None:
            now = self._now()
            self.train_ms += 1000 * (now - self.since)
            self.timed_steps, self.since = self.timed_steps + count_step, now

    def __str__(self):  # the speedrun's timing fields; step_avg is nan until a step is timed
        step_avg = self.train_ms / self.timed_steps if self.timed_steps else float("nan")
        return f"train_time:{self.train_ms:.0f}ms step_avg:{step_avg:.2f}ms"

    @contextmanager
    def paused(self):
        self.lap(count_step=False)
        yield
        if self.since is not None:
            self.start()


# ----------------------------------------------------------------------------------------------
# Checkpoints and stop signals

CHECKPOINT_FORMAT = "train_gpt2 checkpoint"


class CheckpointError(TrainError, ValueError):
    """A checkpoint that is missing, unreadable, or of another model."""


def load_checkpoint(path):
    """The checkpoint dict, loaded safely (weights_only: tensors and plain data, no code)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle with code, ...: all mean "not a checkpoint we wrote"
        reason = " ".join(str(e).split()).split(". ")[
            0
        ]  # the first sentence: torch's advice that follows is unsafe
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a train_gpt2.py checkpoint")
    return checkpoint


def resolve_args(argv):
    """Hyperparameters from the flags; with --resume, the checkpoint's training knobs under the given flags."""
    flags = parse_flags(argv)
    if not flags.get("resume"):
        return Hyperparameters(**flags), None
    path = flags["resume"]
    if path == "latest":
        run_name = flags.get("run_name", Hyperparameters.run_name)
        folder = os.path.join(flags.get("checkpoint_dir", Hyperparameters.checkpoint_dir), run_name)
        paths = glob.glob(os.path.join(folder, "*.pt"))
        if not paths:
            raise CheckpointError(
                f"--resume=latest found no checkpoint of --run_name={run_name} in {folder}/"
            )
        path = max(paths, key=os.path.getmtime)
    checkpoint = load_checkpoint(path)
    missing = {
        "hyperparameters",
        "step",
        "model",
        "adam",
        "muon_momentum",
        "data",
        "rng",
        "train_ms",
        "timed_steps",
        "record",
    } - checkpoint.keys() or set(SHAPE_FIELDS) - checkpoint["hyperparameters"].keys()
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(sorted(missing))}: not a complete training checkpoint"
        )
    known = {f.name for f in dataclasses.fields(Hyperparameters)} - set(MACHINE_FIELDS)
    inherited = {k: v for k, v in checkpoint["hyperparameters"].items() if k in known}
    args = Hyperparameters(**{**inherited, **flags, "resume": path})
    for name in SHAPE_FIELDS:
        if getattr(args, name) != inherited[name]:
            raise CheckpointError(
                f"{path} holds a model with --{name}={inherited[name]}, not {getattr(args, name)}: "
                f"resume it without changing the model shape"
            )
    if args.num_iterations <= checkpoint["step"]:
        raise CheckpointError(
            f"{path} is at step {checkpoint['step']}: nothing to train up to "
            f"--num_iterations={args.num_iterations}; raise it to continue"
        )
    return args, checkpoint


def save_checkpoint(path, args, step, model, adam, muon, train_loader, clock, record, world_size):
    """Everything a resumed run needs, written atomically (temp file, then rename) by rank 0; a failure to write
    it ends every rank (agreed by an all-reduce), so none waits in the next step's collectives."""
    state = dict(
        format=CHECKPOINT_FORMAT,
        hyperparameters=dataclasses.asdict(args),
        step=step,
        model=model.state_dict(),
        adam=adam.state_dict(),
        muon_momentum=muon.momentum_buffers(),
        data=train_loader.state(),
        train_ms=clock.train_ms,
        timed_steps=clock.timed_steps,
        record=record,
        rng=dict(
            cpu=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0),
        ),
    )
    error = None
    try:
        if path is not None:  # ranks other than 0 only take part in the momentum gather
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # never a half-written file under the final name
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as some RuntimeError of its own
        full = (
            getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(os.path.dirname(path)).free < 2**20
        )
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        error = output_error(path, OSError(errno.ENOSPC if full else errno.EIO, str(e)))
    if all_reduce_sum(torch.tensor(float(error is not None), device=train_loader.device), world_size).item():
        raise error or PeerFailure("rank 0 could not write the checkpoint")


def restore_checkpoint(checkpoint, path, model, adam, muon, train_loader):
    """Load a checkpoint into a freshly built run; returns (step to continue from, the clock to go on with)."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in adam.param_groups]
    try:
        model.load_state_dict(checkpoint["model"])
        adam.load_state_dict(checkpoint["adam"])
        muon.load_momentum_buffers(checkpoint["muon_momentum"])
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if torch.cuda.is_available() and checkpoint["rng"]["cuda"].numel():
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        step, data, train_ms, timed_steps = (
            checkpoint[k] for k in ("step", "data", "train_ms", "timed_steps")
        )
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError) as e:
        raise CheckpointError(
            f"{path} does not match the model its own flags describe "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    for group, setting in zip(adam.param_groups, settings):
        group.update(
            setting
        )  # this run's lrs, betas and fused kernel; load_state_dict brought the saved ones
    train_loader.seek(**data)
    return step, Clock(train_loader.device, train_ms, timed_steps)


class Interrupted(Exception):
    """A signal that ends the run where it is: exit status 128 + its number."""

    def __init__(self, signum, why):
        super().__init__(f"{signal.Signals(signum).name} {why}")
        self.exit_code = 128 + signum


class StopRequest:
    """SIGINT/SIGTERM: before training, stop at once; during it, checkpoint and stop at the next step
    boundary (a Ctrl-C more than 5 s later aborts at once: torchrun's forwarded copy of the first is
    not a second); once the record is closed, exit at once without a traceback."""

    def __init__(self):
        self.signal, self.since, self.previous, self.phase = None, 0.0, {}, "start-up"

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.phase == "finishing":
            return  # the record's last lines take milliseconds: torchrun's SIGTERM to the other ranks waits for them
        if self.phase == "shutdown":
            os._exit(128 + signum)  # the record is closed: nothing is lost
        if self.phase == "start-up":
            raise Interrupted(signum, "before the first step was done: nothing to save")
        if self.signal is None:
            self.signal, self.since = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.since > 5:
            raise Interrupted(signum, "a second time: stopped at once, no checkpoint")


# ----------------------------------------------------------------------------------------------
# Training loop


def lr_multiplier(step, args):
    """Constant, then linear decay to 0 over the last warmdown_iters steps."""
    return min(1.0, (args.num_iterations - step) / args.warmdown_iters) if args.warmdown_iters else 1.0


def muon_momentum(step, args):
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum


def probe_fits(model, args, size, device):
    """Whether a real forward+backward of `size` sequences fits, beside room for the optimizer states.
    `model` is the compiled model training will use: eager needs far more memory (unfused softcap and loss)."""
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # Adam, Muon, DDP buckets
    try:
        reserve = torch.empty(state_bytes, dtype=torch.uint8, device=device)
        tokens = torch.zeros(size, args.seq_len, dtype=torch.long, device=device)
        model(tokens, tokens).backward()
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as e:  # cuBLAS/cuDNN workspaces fail with their own error when memory runs out
        if "ALLOC" in str(e) or "out of memory" in str(e):
            return False
        raise
    finally:
        reserve = tokens = None
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def choose_device_batch_size(model, args, world_size, device, fits=None):
    """(micro-batch, note): the largest divisor of the per-device batch, at most 64 (the recipe), that fits;
    all ranks take the smallest choice. On a CPU nothing is probed unless `fits` is given (tests)."""
    per_device = args.batch_size // world_size
    candidates = [size for size in range(min(64, per_device), 0, -1) if per_device % size == 0]
    if fits is None and device.type != "cuda":
        return candidates[0], "auto on CPU: no memory probe, the largest candidate"
    fits = fits or (lambda size: probe_fits(model, args, size, device))
    chosen = next((size for size in candidates if fits(size)), None)
    if chosen is None:
        raise ConfigError(
            f"not even one sequence of {args.seq_len} tokens fits in {device_name(device)}'s memory"
        )
    if world_size > 1:
        chosen_tensor = torch.tensor(chosen, device=device)
        dist.all_reduce(chosen_tensor, op=dist.ReduceOp.MIN)
        chosen = int(chosen_tensor)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    larger = [size for size in candidates if size > chosen]
    return chosen, f"auto: the largest that fits{f'; {larger[-1]} did not' if larger else ''}"


@torch.no_grad()
def evaluate(model, val_loader, args, accum_steps, world_size):
    """Mean loss over exactly the first val_tokens tokens of the val shard, averaged over all ranks."""
    model.eval()
    val_loader.reset()
    total, count = torch.zeros((), device=val_loader.device), 0
    for _ in range(args.val_tokens // (args.batch_size * args.seq_len)):
        x, y = val_loader.next_batch()
        for xm, ym in zip(x.chunk(accum_steps), y.chunk(accum_steps)):
            total += model(xm, ym).float()
            count += 1
    model.train()
    return (all_reduce_sum(total, world_size) / (count * world_size)).item()


@contextmanager
def attention_backends(device):
    """cuDNN attention first on Hopper (the record's choice, faster than flash there), PyTorch's other kernels
    after it for any shape cuDNN rejects; PyTorch's own order elsewhere. Yields the note for the record."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        yield f"attention: PyTorch's default SDPA order on {device_name(device)}"
        return
    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    with sdpa_kernel(order, set_priority=True):
        yield "attention: cuDNN SDPA first (Hopper), then flash, memory-efficient, math"


def prune_checkpoints(saved, keep):
    """Delete all but the newest `keep` of this run's checkpoints (never the one just written: keep >= 1)."""
    for path in saved[:-keep]:
        if path and os.path.exists(path):
            os.remove(path)
    return saved[-keep:]


def train(
    args,
    world_size,
    model,
    ddp,
    adam,
    muon,
    train_loader,
    val_loader,
    accum_steps,
    start_step,
    clock,
    log,
    checkpoint_path,
    stop,
    progress,
):
    """Steps start_step+1 .. num_iterations; `progress` keeps the last step and val loss for the summary.
    Returns None at the end, or why every rank agreed to stop early (a signal, or a full disk for the record)."""
    progress_at, progress_step = time.monotonic(), start_step
    last_save, save_now, stop_now, saved = time.monotonic(), False, False, []
    for step in range(start_step, args.num_iterations + 1):
        last_step = step == args.num_iterations
        if step == start_step + args.untimed_steps:
            clock.start()  # after compilation and warmup, in every (resumed) process

        # ---------------- validation and checkpoint, with the clock paused ----------------
        if last_step or (args.val_loss_every and step % args.val_loss_every == 0):
            with clock.paused():
                progress["val_loss"] = evaluate(ddp, val_loader, args, accum_steps, world_size)
            log(f"step:{step}/{args.num_iterations} val_loss:{progress['val_loss']:.4f} {clock}")
        if step > start_step and (
            save_now or stop_now or (last_step and (args.save_every or args.save_every_minutes))
        ):
            with clock.paused():
                path = checkpoint_path(step)
                save_checkpoint(
                    path, args, step, model, adam, muon, train_loader, clock, log.path, world_size
                )
                saved, last_save = prune_checkpoints(saved + [path], args.keep_checkpoints), time.monotonic()
            log(f"checkpoint: {path}", record=stop_now or last_step)
        if last_step:
            return None
        if stop_now:
            why = log.error or signal.Signals(stop.signal or signal.SIGTERM).name
            return f"{why} at step {step}: checkpoint saved, resume with --resume"

        # ---------------- one optimizer step over the global batch ----------------
        x, y = train_loader.next_batch()
        train_loss = torch.zeros((), device=x.device)
        for micro_step, (xm, ym) in enumerate(zip(x.chunk(accum_steps), y.chunk(accum_steps))):
            with nullcontext() if micro_step == accum_steps - 1 or world_size == 1 else ddp.no_sync():
                loss = ddp(xm, ym)  # DDP all-reduces (averages) gradients once, after the last micro-step
                (
                    loss / accum_steps
                ).backward()  # mean, not sum, over micro-steps: same math on any device count
            train_loss += loss.detach() / accum_steps
        if step + 1 < args.num_iterations:
            train_loader.prefetch()  # while the device still runs this step's kernels
        for opt in (adam, muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(step, args)
        muon.param_groups[0]["momentum"] = muon_momentum(step, args)
        adam.step()
        muon.step()
        ddp.zero_grad(set_to_none=True)

        # ---------------- the one host sync: every rank agrees on the loss, a stop and a save ----------------
        due = bool(args.save_every and (step + 1) % args.save_every == 0) or bool(
            args.save_every_minutes and time.monotonic() - last_save >= 60 * args.save_every_minutes
        )
        votes = torch.zeros(3, device=x.device)
        votes[0] = (
            train_loss  # fill_ with a Python number launches a kernel; `votes[i] = number` would copy and sync
        )
        votes[1].fill_(float(stop.signal is not None or log.error is not None))
        votes[2].fill_(float(due))
        loss_sum, stop_votes, save_votes = all_reduce_sum(votes, world_size).tolist()
        clock.lap()
        train_loss, stop_now, save_now, progress["step"] = (
            loss_sum / world_size,
            stop_votes > 0,
            save_votes > 0,
            step + 1,
        )
        stop.phase = "training"  # from here a signal waits for the step boundary (the first step may compile)
        log(f"step:{step + 1}/{args.num_iterations} train_loss:{train_loss:.4f} {clock}", console=False)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"train loss is {train_loss} at step {step + 1}: lower the learning rates or check the data"
            )
        if args.progress_seconds and time.monotonic() - progress_at >= args.progress_seconds:
            rate = (step + 1 - progress_step) / (time.monotonic() - progress_at)
            log(progress_line(step + 1, args, train_loss, rate, clock), record=False)
            progress_at, progress_step = time.monotonic(), step + 1


# ----------------------------------------------------------------------------------------------
# main


def build_run(args, rank, world_size, device, checkpoint):
    """Everything training needs, built before the record opens so that bad input fails in one line."""
    notes = []
    loader_args = (args.batch_size, args.seq_len, rank, world_size, device, args.vocab_size)
    train_loader = ShardLoader(args.input_bin, *loader_args)
    val_loader = ShardLoader(args.input_val_bin, *loader_args)
    overlap = {os.path.realpath(p) for p in train_loader.files} & {os.path.realpath(val_loader.files[0])}
    if overlap:
        raise ConfigError(
            f"--input_bin also matches the validation shard {overlap.pop()}: training on it makes "
            f"val loss meaningless; narrow the glob"
        )
    if len(val_loader.tokens) < args.val_tokens + 1:  # the loader has the first val shard open
        raise ShardError(
            f"{val_loader.files[0]}: {len(val_loader.tokens)} tokens is fewer than "
            f"--val_tokens={args.val_tokens} (+1); lower --val_tokens"
        )
    if args.num_iterations > train_loader.steps_per_pass:
        notes.append(
            f"data: the train shards hold {train_loader.steps_per_pass} steps; later steps see the same "
            f"tokens again (download more shards to avoid it)"
        )
    torch.manual_seed(args.seed)
    try:
        model = cast_model(GPT.from_args(args).to(device), compute_dtype(device))
    except (RuntimeError, MemoryError) as e:  # CUDA raises OutOfMemoryError, the CPU allocator a RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e) and "out of memory" not in str(e):
            raise
        raise ConfigError(
            f"the model does not fit in {device_name(device)}'s memory ({type(e).__name__}); "
            f"check --vocab_size, --model_dim and --num_layers"
        ) from None
    adam, muon = build_optimizers(model, args, rank, world_size, device)
    start_step, clock = 0, Clock(device)
    if checkpoint is not None:
        start_step, clock = restore_checkpoint(checkpoint, args.resume, model, adam, muon, train_loader)
        notes.append(
            f"resumed_from: {args.resume} at step {start_step} (parent record {checkpoint['record']})"
        )
    compiled = (
        compile_model(model) if args.compile else model
    )  # the probe's compilation is the one training reuses
    if args.device_batch_size is None:
        args.device_batch_size, reason = choose_device_batch_size(compiled, args, world_size, device)
        notes.append(f"device_batch_size: {args.device_batch_size} ({reason})")
    ddp = (
        compiled
        if world_size == 1
        else DDP(  # bucket views: no second copy of the gradients
            compiled,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    )
    return (model, ddp, adam, muon, train_loader, val_loader), start_step, clock, notes


def prepare_outputs(args, now):
    """The record and checkpoint folders, created and proven writable before anything slow starts."""
    folders = dict(
        records_dir=os.path.join(args.records_dir, f"{now:%Y-%m-%d}_{args.run_name}"),
        checkpoint_dir=os.path.join(args.checkpoint_dir, args.run_name),
    )
    for flag, folder in folders.items():
        try:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise OutputError(f"cannot write to {folder}: {e.strerror}; pick another --{flag}") from None
    stale = glob.glob(os.path.join(folders["checkpoint_dir"], "*.pt.tmp"))
    return [
        f"stale: {path} ({os.path.getsize(path) / 2**20:.0f} MiB), a checkpoint an earlier run was writing when "
        f"it was killed: delete it"
        for path in stale
    ]


def first_failure(error, rank, world_size):
    """Why the run failed, agreed in the process group's store. Only a rank that failed itself posts its reason;
    a rank that only saw a collective fail, or another rank's agreed failure, waits for that reason."""
    reason = f"rank {rank} failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if world_size == 1:
        return reason.split(": ", 1)[1]
    try:
        store = dist.distributed_c10d._get_default_store()
        if not isinstance(error, (PeerFailure, dist.DistError)):
            return store.compare_set("first_failure", "", reason).decode()  # the first own failure wins
        store.wait(["first_failure"], timedelta(seconds=10))
        return store.get("first_failure").decode()
    except Exception:  # no reason posted in time, or the store went with the failing rank's node
        return reason


def finish_record(log, stopped, progress, clock, device, world_size):
    """The record's last lines, `stopped:` and `summary:`."""
    lines = ([f"stopped: {stopped}"] if stopped else []) + [
        f"summary: final_val_loss:{progress['val_loss']:.4f} {clock} peak_memory:{peak_memory_mib(device)}MiB "
        f"world_size:{world_size} device:{device_name(device)}"
    ]
    for line in lines:
        log(line)  # on the console too, where it survives a full disk
    log.close()


def run(argv, stop):
    """One training run; returns the exit status, or raises what ended it."""
    args, checkpoint = resolve_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    args.grad_accum_steps(world_size)
    if args.memory_limit_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gb * 2**30 / total), device)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    now = datetime.now()
    run_id = f"{now:%H%M%S}-{uuid.uuid4().hex[:8]}"
    notes = prepare_outputs(args, now) if rank == 0 else []
    with attention_backends(device) as attention_note:
        parts, start_step, clock, run_notes = build_run(args, rank, world_size, device, checkpoint)
        accum_steps = args.grad_accum_steps(world_size)
        log = open_record(
            args, run_id, now, rank, device, world_size, accum_steps, [attention_note] + notes + run_notes
        )
        for note in notes:
            log(note, record=False)
        checkpoint_prefix = os.path.join(args.checkpoint_dir, args.run_name, run_id)
        checkpoint_path = lambda step: f"{checkpoint_prefix}-step{step:06d}.pt" if rank == 0 else None  # noqa: E731
        progress, error = dict(step=start_step, val_loss=float("nan")), None
        try:
            stopped = train(
                args, world_size, *parts, accum_steps, start_step, clock, log, checkpoint_path, stop, progress
            )
        except BaseException as e:
            if isinstance(e, torch.OutOfMemoryError):
                e = TrainError(
                    f"out of GPU memory: --device_batch_size={args.device_batch_size} does not fit in "
                    f"{device_name(device)}; use --device_batch_size=auto or a smaller divisor"
                )
            stopped = first_failure(e, rank, world_size)
            error = e if world_size == 1 or stopped.startswith(f"rank {rank} ") else TrainError(stopped)
        finally:
            stop.phase = "finishing"
            finish_record(log, stopped, progress, clock, device, world_size)
            stop.phase = "shutdown"
            del (
                parts
            )  # DDP holds the process group: freed at exit, gloo aborted 5 of 150 two-rank runs (0 of 150 so)
            gc.collect()
    if error or log.error:
        raise error or log.error
    return 128 + (stop.signal or signal.SIGTERM) if stopped else 0


def main(argv):
    """Exit status 0 on success; a project error ends in one line on stderr, a signal in 128 + its number."""
    stop = StopRequest()
    try:
        with stop:  # the process group goes inside it: a Ctrl-C there exits without a traceback
            try:
                return run(argv, stop)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
    except (TrainError, FloatingPointError) as e:
        rank = int(os.environ.get("RANK", 0))
        raise SystemExit(f"train_gpt2.py{f' [rank {rank}]' if rank else ''}: {e}") from None
    except Interrupted as e:
        print(f"train_gpt2.py: stopped: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
