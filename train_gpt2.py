"""Train GPT-2 small (124M) on FineWeb to val loss 3.28, speedrun style.

    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the 8xH100 record recipe
    python train_gpt2.py --help                                # every knob

One GPU or a CPU runs the same math through gradient accumulation. Every run logs its
own source, environment, hyperparameters and step lines to records/.
"""
import dataclasses
import glob
import inspect
import math
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------------------------
# Hyperparameters


class ConfigError(ValueError):
    """A flag or a combination of flags that cannot run."""


@dataclass
class Hyperparameters:
    input_bin: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    input_val_bin: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards (the first is used)
    batch_size: int = 512  # sequences per optimizer step, over all devices and micro-steps
    device_batch_size: int = 64  # sequences per device per micro-step (accumulation makes up the rest)
    seq_len: int = 1024  # tokens per sequence
    num_iterations: int = 3242  # optimizer steps
    warmdown_iters: int = 926  # last steps over which every learning rate decays linearly to 0
    embed_lr: float = 0.3  # Adam lr of the token embedding
    head_lr: float = 0.002  # Adam lr of the lm head
    scalar_lr: float = 0.02  # Adam lr of the value-residual and x0-mixing scalars
    adam_beta1: float = 0.9  # Adam beta1, all Adam groups
    adam_beta2: float = 0.95  # Adam beta2, all Adam groups
    muon_lr: float = 0.02  # Muon lr of the 2-D block matrices
    muon_momentum: float = 0.95  # Muon Nesterov momentum after warmup
    muon_momentum_start: float = 0.85  # Muon momentum at step 0, warmed up linearly (recipe: -0.013 val loss)
    muon_momentum_warmup_steps: int = 500  # steps of the Muon momentum warmup
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128 for fast matmuls
    num_layers: int = 12  # transformer blocks
    model_dim: int = 768  # residual stream width
    num_heads: int = 6  # attention heads (head dim = model_dim / num_heads)
    mlp_ratio: int = 4  # MLP hidden width / model_dim
    rope_base: float = 10000.0  # rotary embedding base
    logit_softcap: float = 30.0  # logits = cap * tanh(logits / cap) (Gemma 2)
    val_loss_every: int = 125  # validate every this many steps (and at step 0 and the end); 0 = only at the end
    val_tokens: int = 10485760  # validation tokens, from the start of the val shard
    untimed_steps: int = 10  # first steps left out of train_time (compilation, warmup)
    seed: int = 0  # seed of weight init
    device: str = "auto"  # auto (CUDA if visible, else CPU), cuda or cpu
    compile: str = "auto"  # torch.compile: auto (on for CUDA, off for CPU), true or false
    run_name: str = "run"  # record name: the log goes to records_dir/<date>_<run_name>/
    records_dir: str = "records"  # where run logs are written

    def validate(self):
        """Refuse values that cannot run, with a message naming the flag."""
        for name in ("batch_size", "device_batch_size", "seq_len", "num_iterations", "vocab_size", "num_layers",
                     "model_dim", "num_heads", "mlp_ratio", "val_tokens", "muon_ns_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("warmdown_iters", "val_loss_every", "untimed_steps", "muon_momentum_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("embed_lr", "head_lr", "scalar_lr", "muon_lr", "logit_softcap", "rope_base"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "muon_momentum", "muon_momentum_start"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmdown_iters > self.num_iterations:
            raise ConfigError(f"--warmdown_iters={self.warmdown_iters} exceeds --num_iterations={self.num_iterations}")
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ConfigError(f"--model_dim={self.model_dim} must split into --num_heads={self.num_heads} heads of even size")
        if self.val_tokens % (self.batch_size * self.seq_len):
            raise ConfigError(f"--val_tokens={self.val_tokens} must be a multiple of batch_size*seq_len "
                              f"= {self.batch_size * self.seq_len}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.compile not in ("auto", "true", "false"):
            raise ConfigError(f"--compile must be auto, true or false, got {self.compile!r}")
        if not re.fullmatch(r"[\w.-]+", self.run_name):
            raise ConfigError(f"--run_name may hold letters, digits, '.', '_' and '-' only, got {self.run_name!r}")
        return self

    def grad_accum_steps(self, world_size):
        """Micro-steps per optimizer step that keep the global batch exact on this many devices."""
        per_step = self.device_batch_size * world_size
        if self.batch_size % per_step:
            raise ConfigError(f"--batch_size={self.batch_size} is not a multiple of --device_batch_size="
                              f"{self.device_batch_size} x {world_size} devices; pick a device_batch_size that divides "
                              f"{self.batch_size // world_size if self.batch_size % world_size == 0 else self.batch_size}")
        return self.batch_size // per_step

    def as_flags(self):
        return [f"--{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]


def field_help():
    """Each field's trailing comment, read from this class's source: the comment is the documentation."""
    source = inspect.getsource(Hyperparameters)
    return dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", source, flags=re.M))


def parse_args(argv):
    """Build Hyperparameters from `--name=value` flags; any unknown or malformed flag is a ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    values = {}
    for arg in argv:
        match = re.fullmatch(r"--(\w+)=(.*)", arg)
        if not match:
            raise ConfigError(f"cannot read argument {arg!r}: flags look like --name=value (see --help)")
        name, text = match.groups()
        if name not in fields:
            raise ConfigError(f"unknown flag --{name} (see --help for the list)")
        kind = fields[name].type
        try:
            values[name] = kind(text)
        except ValueError:
            raise ConfigError(f"--{name} takes {kind.__name__}, got {text!r}") from None
    return Hyperparameters(**values).validate()


def usage():
    helps = field_help()
    lines = [__doc__.strip(), "", "Flags (--name=value, default shown):"]
    for f in dataclasses.fields(Hyperparameters):
        lines.append(f"  --{f.name}={f.default}".ljust(52) + helps.get(f.name, ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Optimizer: Muon for the 2-D block matrices (Adam, from torch, for the rest)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic tuned to push all singular values into ~[0.7, 1.2] fast (Muon)


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

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), dtype=self.ns_dtype, device=params[0].device)
            offsets = np.cumsum([0] + [p.numel() for p in params])
            for index in range(self.rank, len(params), self.world_size):
                p = params[index]
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                update = newton_schulz_orthogonalize(update, self.ns_steps, self.ns_dtype)
                update *= max(1.0, p.size(0) / p.size(1)) ** 0.5  # same RMS per element for tall matrices
                flat[offsets[index]:offsets[index + 1]] = update.flatten()
            if self.world_size > 1:
                dist.all_reduce(flat)
            for p, start, end in zip(params, offsets[:-1], offsets[1:]):
                p.add_(flat[start:end].view_as(p).to(p.dtype), alpha=-group["lr"])


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


class Rotary(nn.Module):
    def __init__(self, head_dim, base):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, x):  # x: (batch, seq, heads, head_dim); rotates the two halves of head_dim
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, rope_base):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.out_proj = (CastedLinear(dim, dim) for _ in range(4))
        self.value_residual_lambda = nn.Parameter(torch.empty(()))
        self.rotary = Rotary(dim // num_heads, rope_base)

    def forward(self, x, v1):
        batch, seq, dim = x.shape
        q, k, v = (proj(x).view(batch, seq, self.num_heads, -1) for proj in (self.q, self.k, self.v))
        if v1 is None:
            v1 = v  # block 0 supplies the first-layer values every later block mixes in
        lam = self.value_residual_lambda
        v = (1 - lam) * v + lam * v1  # value residual learning (Zhou et al., 2024): -0.021 val loss in the recipe
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))  # QK-norm keeps attention logits bounded
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, dim)), v1


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up, self.down = CastedLinear(dim, hidden), CastedLinear(hidden, dim)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())  # ReLU^2 (So et al., 2021, Primer)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, rope_base):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, rope_base)
        self.mlp = MLP(dim, mlp_ratio * dim)
        self.x0_mixing = nn.Parameter(torch.empty(2))

    def forward(self, x, v1, x0):
        x = self.x0_mixing[0] * x + self.x0_mixing[1] * x0  # re-inject the embedding: -0.009 val loss in the recipe
        y, v1 = self.attn(rms_norm(x), v1)
        x = x + y
        return x + self.mlp(rms_norm(x)), v1


class GPT(nn.Module):
    def __init__(self, vocab_size, num_layers, model_dim, num_heads, mlp_ratio, rope_base, logit_softcap):
        super().__init__()
        self.logit_softcap = logit_softcap
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, mlp_ratio, rope_base) for _ in range(num_layers))
        self.lm_head = CastedLinear(model_dim, vocab_size)  # untied from the embedding: +38.6M params, no extra FLOPs
        self.reset_parameters()

    @classmethod
    def from_args(cls, args):
        return cls(args.vocab_size, args.num_layers, args.model_dim, args.num_heads, args.mlp_ratio, args.rope_base,
                   args.logit_softcap)

    @torch.no_grad()
    def reset_parameters(self):
        """All weight initialization, in one place."""
        nn.init.normal_(self.embed.weight)
        for block in self.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
                bound = linear.in_features ** -0.5  # nn.Linear's default range
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.out_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.down.weight)
            block.attn.value_residual_lambda.fill_(0.5)
            block.x0_mixing.copy_(torch.tensor([1.0, 0.0]))
        nn.init.zeros_(self.lm_head.weight)  # uniform prediction at step 0: loss = ln(vocab_size)

    def forward(self, idx, targets=None):
        x = x0 = rms_norm(self.embed(idx))  # norm right after the embedding
        v1 = None
        for block in self.blocks:
            x, v1 = block(x, v1, x0)
        logits = self.lm_head(rms_norm(x))
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)  # soft-capping (Gemma 2): -0.005
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


# ----------------------------------------------------------------------------------------------
# Data: llm.c / FineWeb token shards

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    """A missing, corrupt or too small token shard."""


def read_shard(path):
    """The tokens of one shard as a read-only uint16 memmap, after checking its header against its size."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header.size < HEADER_INTS:
        raise ShardError(f"{path}: {os.path.getsize(path)} bytes is too short for the {HEADER_BYTES}-byte shard header")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: magic number {header[0]} is not {SHARD_MAGIC}: not an llm.c/FineWeb token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: shard version {header[1]} is not {SHARD_VERSION}: re-tokenize with data/fineweb.py")
    num_tokens, size = int(header[2]), os.path.getsize(path)
    if size != HEADER_BYTES + 2 * num_tokens:
        raise ShardError(f"{path}: header says {num_tokens} tokens ({HEADER_BYTES + 2 * num_tokens} bytes) but the "
                         f"file has {size} bytes: truncated or corrupt, download or tokenize it again")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


class ShardLoader:
    """Streams the shards matching `pattern` as one token sequence, one global batch per step.

    Each step takes the next contiguous window of batch_size*seq_len+1 tokens (moving to the next shard,
    leftover dropped, when one runs out); rank r gets the r-th slice of it. So every optimizer step sees
    the same tokens whatever the world size or micro-batch.
    """

    def __init__(self, pattern, batch_size, seq_len, rank, world_size, device):
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise ShardError(f"no file matches {pattern!r}: download the data (python data/cached_fineweb10B.py) "
                             f"or point the flag at your shards")
        self.seq_len, self.rank, self.device = seq_len, rank, device
        self.step_tokens, self.rank_tokens = batch_size * seq_len, batch_size * seq_len // world_size
        for path in self.files:
            if len(read_shard(path)) < self.step_tokens + 1:
                raise ShardError(f"{path}: {len(read_shard(path))} tokens is fewer than one global batch "
                                 f"(batch_size*seq_len+1 = {self.step_tokens + 1}); use more data or a smaller batch")
        self.reset()

    def reset(self):
        self.shard_index, self.position, self.tokens = 0, 0, read_shard(self.files[0])

    def next_batch(self):
        """This rank's (inputs, targets) for one optimizer step, each of shape (batch_size/world, seq_len)."""
        if self.position + self.step_tokens + 1 > len(self.tokens):
            self.shard_index = (self.shard_index + 1) % len(self.files)
            self.position, self.tokens = 0, read_shard(self.files[self.shard_index])
        start = self.position + self.rank * self.rank_tokens
        window = torch.from_numpy(self.tokens[start:start + self.rank_tokens + 1].astype(np.int64))
        self.position += self.step_tokens
        if self.device.type == "cuda":
            window = window.pin_memory()
        x, y = window[:-1].view(-1, self.seq_len), window[1:].view(-1, self.seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


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
        raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          f"lower --nproc_per_node")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=device if use_cuda else None)
    return rank, world_size, device


def all_reduce_mean(value, world_size):
    if world_size > 1:
        dist.all_reduce(value)  # SUM: gloo has no AVG
    return value / world_size


# ----------------------------------------------------------------------------------------------
# Logging: the speedrun record format


class RunLog:
    """Prints on rank 0 and appends to a new record file; other ranks stay silent."""

    def __init__(self, path):
        self.path, self.file = path, None
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "x")  # "x": never overwrite an earlier record

    def __call__(self, line="", console=True):
        if self.file is None:
            return
        if console:
            print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def record_path(args, now):
    run_id = f"{now:%H%M%S}-{uuid.uuid4().hex[:8]}"
    return os.path.join(args.records_dir, f"{now:%Y-%m-%d}_{args.run_name}", f"{run_id}.txt")


def environment_lines(device):
    lines = [f"Running Python {sys.version}", f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    if device.type == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            smi = f"nvidia-smi unavailable: {e}"
        lines.append(smi.rstrip())
    else:
        lines.append(f"CPU: {cpu_name()} ({os.cpu_count()} cores)")
    return lines


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name()}"


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) // 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


def step_line(step, num_iterations, kind, loss, train_ms, timed_steps):
    step_avg = train_ms / timed_steps if timed_steps > 0 else float("nan")
    return f"step:{step}/{num_iterations} {kind}:{loss:.4f} train_time:{train_ms:.0f}ms step_avg:{step_avg:.2f}ms"


# ----------------------------------------------------------------------------------------------
# Training loop


def build_optimizers(model, args, rank, world_size, device):
    """Adam for embedding, head and scalars; Muon for every 2-D matrix inside the blocks. No weight decay."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.blocks.parameters() if p.ndim < 2]
    adam = torch.optim.Adam([dict(params=[model.embed.weight], lr=args.embed_lr),
                             dict(params=[model.lm_head.weight], lr=args.head_lr),
                             dict(params=scalars, lr=args.scalar_lr)],
                            betas=(args.adam_beta1, args.adam_beta2), fused=device.type == "cuda")
    muon = Muon(matrices, lr=args.muon_lr, momentum=args.muon_momentum, ns_steps=args.muon_ns_steps, rank=rank,
                world_size=world_size, ns_dtype=compute_dtype(device))
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step, args):
    """Constant, then linear decay to 0 over the last warmdown_iters steps."""
    return min(1.0, (args.num_iterations - step) / args.warmdown_iters) if args.warmdown_iters else 1.0


def muon_momentum(step, args):
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
    return all_reduce_mean(total / count, world_size).item()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, rank, world_size, device, log, summary):
    """Run the recipe, keeping `summary` current so that a stopped run still logs one.

    Raises FloatingPointError on a non-finite loss."""
    accum_steps = args.grad_accum_steps(world_size)
    train_loader = ShardLoader(args.input_bin, args.batch_size, args.seq_len, rank, world_size, device)
    val_loader = ShardLoader(args.input_val_bin, args.batch_size, args.seq_len, rank, world_size, device)
    if len(read_shard(val_loader.files[0])) < args.val_tokens + 1:
        raise ShardError(f"{val_loader.files[0]}: {len(read_shard(val_loader.files[0]))} tokens is fewer than "
                         f"--val_tokens={args.val_tokens} (+1); lower --val_tokens")
    torch.manual_seed(args.seed)
    raw_model = cast_model(GPT.from_args(args).to(device), compute_dtype(device))
    model = torch.compile(raw_model) if args.compile == "true" else raw_model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizers = build_optimizers(raw_model, args, rank, world_size, device)

    train_ms, t0 = 0.0, time.perf_counter()
    for step in range(args.num_iterations + 1):
        last_step = step == args.num_iterations
        if step == args.untimed_steps:
            synchronize(device)
            train_ms, t0 = 0.0, time.perf_counter()  # the clock starts after compilation and warmup
        timed_steps = max(0, step - args.untimed_steps)
        if last_step or (args.val_loss_every and step % args.val_loss_every == 0):
            synchronize(device)
            train_ms += 1000 * (time.perf_counter() - t0) if timed_steps else 0.0
            val_loss = evaluate(model, val_loader, args, accum_steps, world_size)
            log(step_line(step, args.num_iterations, "val_loss", val_loss, train_ms, timed_steps))
            summary.update(final_val_loss=val_loss, train_ms=train_ms, timed_steps=timed_steps, step=step)
            synchronize(device)
            t0 = time.perf_counter()  # validation is not timed
        if last_step:
            break

        x, y = train_loader.next_batch()
        train_loss = torch.zeros((), device=device)
        for micro_step, (xm, ym) in enumerate(zip(x.chunk(accum_steps), y.chunk(accum_steps))):
            sync_grads = micro_step == accum_steps - 1 or world_size == 1
            with nullcontext() if sync_grads else model.no_sync():  # all-reduce only once, after the last micro-step
                loss = model(xm, ym)
                (loss / accum_steps).backward()  # mean, not sum, over micro-steps: same math on any device count
            train_loss += loss.detach().float() / accum_steps
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(step, args)
        optimizers[1].param_groups[0]["momentum"] = muon_momentum(step, args)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

        train_loss = all_reduce_mean(train_loss, world_size).item()  # .item() also synchronizes the device
        timed_steps = max(0, step + 1 - args.untimed_steps)
        elapsed = train_ms + 1000 * (time.perf_counter() - t0) if timed_steps else 0.0
        log(step_line(step + 1, args.num_iterations, "train_loss", train_loss, elapsed, timed_steps))
        summary.update(train_ms=elapsed, timed_steps=timed_steps, step=step + 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"train loss is {train_loss} at step {step + 1}: lower the learning rates "
                                     f"or check the data")


# ----------------------------------------------------------------------------------------------
# main


def summary_line(summary, device, world_size):
    step_avg = summary["train_ms"] / summary["timed_steps"] if summary["timed_steps"] else float("nan")
    return (f"summary: final_val_loss:{summary['final_val_loss']:.4f} train_time:{summary['train_ms']:.0f}ms "
            f"step_avg:{step_avg:.2f}ms peak_memory:{peak_memory_mib(device)}MiB world_size:{world_size} "
            f"device:{device_name(device)}")


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    try:
        args = parse_args(argv)
        rank, world_size, device = setup_distributed(args.device)
        args.grad_accum_steps(world_size)
    except ConfigError as e:
        raise SystemExit(f"train_gpt2.py: {e}") from None
    if args.compile == "auto":
        args.compile = "true" if device.type == "cuda" else "false"

    log = RunLog(record_path(args, datetime.now()) if rank == 0 else None)
    with open(__file__) as f:
        log(f.read().rstrip("\n"), console=False)  # the record starts with the exact source
    log("=" * 100, console=False)
    for line in environment_lines(device) + ["Hyperparameters:"] + args.as_flags():
        log(line, console=False)
    log("=" * 100, console=False)
    if rank == 0:
        print(f"record: {log.path}  (world size {world_size}, {device_name(device)}, "
              f"{args.grad_accum_steps(world_size)} micro-steps per step)", flush=True)

    summary, status = dict(final_val_loss=float("nan"), train_ms=0.0, timed_steps=0, step=0), 0
    try:
        train(args, rank, world_size, device, log, summary)
    except (ShardError, ConfigError, FloatingPointError) as e:
        log(f"stopped: {e}", console=False)
        status = f"train_gpt2.py: {e}"
    except KeyboardInterrupt:
        log(f"stopped: interrupted (Ctrl-C) after step {summary['step']}")
        status = 130
    finally:
        log(summary_line(summary, device, world_size))
        log.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if status:
        raise SystemExit(status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
