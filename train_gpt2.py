"""Train GPT-2 small (124M) on FineWeb to val loss 3.28, speedrun style: the recipe.

    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the 8xH100 record recipe
    python train_gpt2.py --help                                # every knob

One GPU or a CPU runs the same math through gradient accumulation. Every run logs the source of
this file and of harness.py (flags, record, checkpoints, signals), its environment, hyperparameters
and step lines to records/.
"""

import glob
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

import harness
from harness import FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, ShardError, knob

# ----------------------------------------------------------------------------------------------
# Hyperparameters

RUN_NAME = (
    lambda v: re.fullmatch(r"\w[\w.-]*", v),
    "takes letters, digits, '.', '_' and '-', and starts with a letter or digit",
)
DEVICES = (lambda v: v in ("auto", "cuda", "cpu"), "must be auto, cuda or cpu")


@dataclass
class Hyperparameters:
    input_bin: str = knob("data/fineweb10B/fineweb_train_*.bin", "glob of training shards")
    input_val_bin: str = knob("data/fineweb10B/fineweb_val_*.bin", "glob of val shards (the first is used)")
    batch_size: int = knob(512, "sequences per optimizer step, over all devices and micro-steps", POSITIVE)
    seq_len: int = knob(1024, "tokens per sequence", POSITIVE)
    num_iterations: int = knob(3242, "optimizer steps", POSITIVE)
    warmdown_iters: int = knob(926, "last steps, over which every lr decays linearly to 0", NON_NEGATIVE)
    embed_lr: float = knob(0.3, "Adam lr of the token embedding", POSITIVE)
    head_lr: float = knob(0.002, "Adam lr of the lm head", POSITIVE)
    scalar_lr: float = knob(0.02, "Adam lr of the value-residual and x0-mixing scalars", POSITIVE)
    adam_beta1: float = knob(0.9, "Adam beta1, all Adam groups", FRACTION)
    adam_beta2: float = knob(0.95, "Adam beta2, all Adam groups", FRACTION)
    muon_lr: float = knob(0.02, "Muon lr of the 2-D block matrices", POSITIVE)
    muon_momentum: float = knob(0.95, "Muon Nesterov momentum after warmup", FRACTION)
    muon_momentum_start: float = knob(0.85, "Muon momentum at step 0, warmed up linearly (-0.013)", FRACTION)
    muon_momentum_warmup_steps: int = knob(500, "steps of the Muon momentum warmup", NON_NEGATIVE)
    muon_ns_steps: int = knob(5, "Newton-Schulz iterations per Muon update", POSITIVE)
    vocab_size: int = knob(50304, "GPT-2's 50257 padded to a multiple of 128", POSITIVE, "shape")
    num_layers: int = knob(12, "transformer blocks", POSITIVE, "shape")
    model_dim: int = knob(768, "residual stream width", POSITIVE, "shape")
    num_heads: int = knob(6, "attention heads (head dim = model_dim / num_heads)", POSITIVE, "shape")
    mlp_ratio: int = knob(4, "MLP hidden width / model_dim", POSITIVE, "shape")
    rope_base: float = knob(10000.0, "rotary embedding base", POSITIVE)
    logit_softcap: float = knob(30.0, "logits = cap * tanh(logits / cap) (Gemma 2)", POSITIVE)
    val_loss_every: int = knob(
        125, "validate every this many steps, at 0 and at the end; 0: the end", NON_NEGATIVE
    )
    val_tokens: int = knob(10485760, "validation tokens, from the start of the val shard", POSITIVE)
    untimed_steps: int = knob(10, "first steps left out of train_time (compilation, warmup)", NON_NEGATIVE)
    seed: int = knob(0, "seed of weight init")
    run_name: str = knob("run", "record name: the log goes to records_dir/<date>_<run_name>/", RUN_NAME)
    records_dir: str = knob("records", "where run logs are written")
    checkpoint_dir: str = knob("checkpoints", "where checkpoints go (outside records/: they are large)")
    save_every: int = knob(0, "checkpoint every this many steps; 0 = off", NON_NEGATIVE)
    save_every_minutes: float = knob(30.0, "checkpoint every this many minutes; 0 = off", NON_NEGATIVE)
    keep_checkpoints: int = knob(2, "newest checkpoints of this run kept on disk", POSITIVE)
    progress_seconds: float = knob(10.0, "console progress line this often; 0 = off", NON_NEGATIVE)
    device: str = knob("auto", "auto (CUDA if visible, else CPU), cuda or cpu", DEVICES, "machine")
    device_batch_size: int | None = knob(
        None, "sequences per micro-step; auto: most that fit", POSITIVE, "machine"
    )
    compile: bool | None = knob(None, "torch.compile; auto = on for CUDA, off for CPU", None, "machine")
    memory_limit_gb: float = knob(0.0, "cap GPU memory, to rehearse a smaller card", NON_NEGATIVE, "machine")
    resume: str = knob("", "checkpoint to continue from: a path, or latest (of run_name)", None, "machine")

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
        """Every rank gets each owner's value: one all-reduce of a flat buffer, zero elsewhere."""
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
                params,
                lambda p, momentum=group["momentum"]: self._orthogonalized_update(p, momentum),
                self.ns_dtype,
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
    """The one precision switch: bf16 on CUDA (the recipe's casts), fp32 on CPU (25-75x faster there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cast_model(model, dtype):
    """bf16 embedding and scalars; fp32 linear weights, cast in the matmul (154.8 -> 144.7 ms/step)."""
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
    return adam, muon


# ----------------------------------------------------------------------------------------------
# Data: llm.c / FineWeb token shards

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


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
# Training loop


def lr_multiplier(step, args):
    """Constant, then linear decay to 0 over the last warmdown_iters steps."""
    return min(1.0, (args.num_iterations - step) / args.warmdown_iters) if args.warmdown_iters else 1.0


def muon_momentum_at(step, args):
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum


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


@dataclass
class Run:
    """One run's parts, built by build_run() and stepped by train()."""

    args: Hyperparameters
    rank: int
    world_size: int
    device: torch.device
    started: object  # datetime: the record's folder is dated by it
    run_id: str
    model: nn.Module  # the parameters, which the optimizers and checkpoints hold
    ddp: nn.Module  # the model as trained: compiled, wrapped in DDP on more than one rank
    adam: torch.optim.Adam
    muon: Muon
    train_loader: ShardLoader
    val_loader: ShardLoader
    accum_steps: int
    start_step: int
    clock: harness.Clock


def train(run, log, stop, latest):
    """Steps start_step+1 .. num_iterations, keeping `latest` up to date for the summary. Returns None at the
    end, or why every rank agreed to stop early (a signal, or a full disk for the record)."""
    args, ddp, clock, accum_steps = run.args, run.ddp, run.clock, run.accum_steps
    progress_at, progress_step, last_save, saved = time.monotonic(), run.start_step, time.monotonic(), []
    save_now = stop_now = False
    for step in range(run.start_step, args.num_iterations + 1):
        last_step = step == args.num_iterations
        if step == run.start_step + args.untimed_steps:
            clock.start()  # after compilation and warmup, in every (resumed) process

        # ---------------- validation and checkpoint, with the clock paused ----------------
        if last_step or (args.val_loss_every and step % args.val_loss_every == 0):
            with clock.paused():
                latest.val_loss = evaluate(ddp, run.val_loader, args, accum_steps, run.world_size)
            log(f"step:{step}/{args.num_iterations} val_loss:{latest.val_loss:.4f} {clock}")
        if step > run.start_step and (
            save_now or stop_now or (last_step and (args.save_every or args.save_every_minutes))
        ):
            with clock.paused():
                path = harness.save_checkpoint(run, step, log.path)
                saved, last_save = (
                    harness.prune_checkpoints(saved + [path], args.keep_checkpoints),
                    time.monotonic(),
                )
            log(f"checkpoint: {path}", record=stop_now or last_step)
        if last_step:
            return None
        if stop_now:
            why = log.error or harness.signal_name(stop.signal)
            return f"{why} at step {step}: checkpoint saved, resume with --resume"

        # ---------------- one optimizer step over the global batch ----------------
        x, y = run.train_loader.next_batch()
        train_loss = torch.zeros((), device=x.device)
        for micro_step, (xm, ym) in enumerate(zip(x.chunk(accum_steps), y.chunk(accum_steps))):
            with nullcontext() if micro_step == accum_steps - 1 or run.world_size == 1 else ddp.no_sync():
                loss = ddp(xm, ym)  # DDP all-reduces (averages) gradients once, after the last micro-step
                (
                    loss / accum_steps
                ).backward()  # the mean over micro-steps: the same math on any device count
            train_loss += loss.detach() / accum_steps
        if step + 1 < args.num_iterations:
            run.train_loader.prefetch()  # while the device still runs this step's kernels
        for group, lr in zip(run.adam.param_groups, (args.embed_lr, args.head_lr, args.scalar_lr)):
            group["lr"] = lr * lr_multiplier(step, args)
        run.muon.param_groups[0].update(
            lr=args.muon_lr * lr_multiplier(step, args), momentum=muon_momentum_at(step, args)
        )
        run.adam.step()
        run.muon.step()
        ddp.zero_grad(set_to_none=True)

        # ---------------- the one host sync: every rank agrees on the loss, a stop and a save ---------------
        stop_wanted = stop.signal is not None or log.error is not None
        save_due = bool(args.save_every and (step + 1) % args.save_every == 0) or bool(
            args.save_every_minutes and time.monotonic() - last_save >= 60 * args.save_every_minutes
        )
        votes = [train_loss, torch.full_like(train_loss, stop_wanted), torch.full_like(train_loss, save_due)]
        loss_sum, stop_votes, save_votes = all_reduce_sum(
            torch.stack(votes), run.world_size
        ).tolist()  # no sync before
        clock.lap()
        train_loss, stop_now, save_now, latest.step = (
            loss_sum / run.world_size,
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
            log(harness.progress_line(step + 1, args, train_loss, rate, clock), record=False)
            progress_at, progress_step = time.monotonic(), step + 1


# ----------------------------------------------------------------------------------------------
# main


def build_run(args, rank, world_size, device, checkpoint, started=None, run_id=""):
    """Everything training needs, built before the record opens so that bad input fails in one line; with it
    the notes for the record."""
    loader_args = (args.batch_size, args.seq_len, rank, world_size, device, args.vocab_size)
    train_loader = ShardLoader(args.input_bin, *loader_args)
    val_loader = ShardLoader(args.input_val_bin, *loader_args)
    notes = harness.check_data(args, train_loader, val_loader)
    torch.manual_seed(args.seed)
    with harness.model_fits(device):
        model = cast_model(GPT.from_args(args).to(device), compute_dtype(device))
    adam, muon = build_optimizers(model, args, rank, world_size, device)
    start_step, clock = 0, harness.Clock(device)
    if checkpoint is not None:
        start_step, clock = harness.restore_checkpoint(
            checkpoint, args.resume, model, adam, muon, train_loader
        )
        notes.append(
            f"resumed_from: {args.resume} at step {start_step} (parent record {checkpoint['record']})"
        )
    compiled = compile_model(model) if args.compile else model
    if args.device_batch_size is None:
        args.device_batch_size, reason = harness.choose_device_batch_size(compiled, args, world_size, device)
        notes.append(f"device_batch_size: {args.device_batch_size} ({reason})")
    ddp = compiled
    if world_size > 1:  # bucket views: no second copy of the gradients
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DDP(compiled, device_ids=device_ids, gradient_as_bucket_view=True)
    parts = (
        model,
        ddp,
        adam,
        muon,
        train_loader,
        val_loader,
        args.grad_accum_steps(world_size),
        start_step,
        clock,
    )
    return Run(args, rank, world_size, device, started, run_id, *parts), notes


def run(argv, stop):
    """One training run; returns the exit status, or raises what ended it."""
    args, checkpoint = harness.resolve_args(Hyperparameters, argv, __doc__.split("\n\n")[0])
    rank, world_size, device = setup_distributed(args.device)
    args.grad_accum_steps(world_size)
    harness.cap_memory(args, device)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    started, run_id = harness.new_run_id()
    notes = harness.prepare_outputs(args, started) if rank == 0 else []
    with attention_backends(device) as attention_note:
        run, run_notes = build_run(args, rank, world_size, device, checkpoint, started, run_id)
        log = harness.open_record(run, sys.modules[__name__], [attention_note] + notes + run_notes)
        for note in notes:
            log(note, record=False)
        return harness.train_to_the_end(train, run, log, stop)


def main(argv):
    """Exit status 0 on success; a project error ends in one line on stderr, a signal in 128 + its number."""
    return harness.main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
