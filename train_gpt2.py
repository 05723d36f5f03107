"""Train GPT-2 small (124M) on FineWeb to val loss 3.28, speedrun style.

    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the 8xH100 record recipe
    python train_gpt2.py --help                                # every knob

One GPU or a CPU runs the same math through gradient accumulation. Every run logs its
own source, environment, hyperparameters and step lines to records/.
"""
import dataclasses
import gc
import glob
import inspect
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
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


class ConfigError(ValueError):
    """A flag or a combination of flags that cannot run."""


@dataclass
class Hyperparameters:
    input_bin: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    input_val_bin: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards (the first is used)
    batch_size: int = 512  # sequences per optimizer step, over all devices and micro-steps
    device_batch_size: int = 0  # sequences per device per micro-step; 0 or auto = the most that fits, up to 64
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
    checkpoint_dir: str = "checkpoints"  # where checkpoints are written (outside records/: they are large)
    save_every: int = 0  # checkpoint every this many steps; 0 = off
    save_every_minutes: float = 30.0  # checkpoint every this many minutes of wall time; 0 = off
    keep_checkpoints: int = 2  # newest checkpoints of this run kept on disk (also one on SIGINT/SIGTERM)
    resume: str = ""  # checkpoint to continue from: a path, or latest (newest under checkpoint_dir)
    memory_limit_gb: float = 0.0  # cap this process's GPU memory, to rehearse a smaller card; 0 = no cap
    progress_seconds: float = 10.0  # console progress line (steps/s, tokens/s, ETA) this often; 0 = off

    def validate(self):
        """Refuse values that cannot run, with a message naming the flag."""
        rules = [("must be positive", lambda v: v > 0, "batch_size seq_len num_iterations vocab_size num_layers "
                  "model_dim num_heads mlp_ratio val_tokens muon_ns_steps embed_lr head_lr scalar_lr muon_lr "
                  "logit_softcap rope_base"),
                 ("must be >= 0", lambda v: v >= 0, "device_batch_size warmdown_iters val_loss_every untimed_steps "
                  "muon_momentum_warmup_steps save_every save_every_minutes keep_checkpoints memory_limit_gb "
                  "progress_seconds"),
                 ("must be in [0, 1)", lambda v: 0 <= v < 1, "adam_beta1 adam_beta2 muon_momentum muon_momentum_start"),
                 ("must be auto, cuda or cpu", lambda v: v in ("auto", "cuda", "cpu"), "device"),
                 ("must be auto, true or false", lambda v: v in ("auto", "true", "false"), "compile"),
                 ("may hold letters, digits, '.', '_' and '-' only", lambda v: re.fullmatch(r"[\w.-]+", v), "run_name")]
        for text, ok, names in rules:
            for name in names.split():
                if not ok(getattr(self, name)):
                    raise ConfigError(f"--{name} {text}, got {getattr(self, name)!r}")
        if self.warmdown_iters > self.num_iterations:
            raise ConfigError(f"--warmdown_iters={self.warmdown_iters} exceeds --num_iterations={self.num_iterations}")
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ConfigError(f"--model_dim={self.model_dim} must split into --num_heads={self.num_heads} heads of even size")
        if self.val_tokens % (self.batch_size * self.seq_len):
            raise ConfigError(f"--val_tokens={self.val_tokens} must be a multiple of batch_size*seq_len "
                              f"= {self.batch_size * self.seq_len}")
        return self

    def grad_accum_steps(self, world_size):
        """Micro-steps per optimizer step that keep the global batch exact on this many devices."""
        if self.batch_size % world_size:
            raise ConfigError(f"--batch_size={self.batch_size} does not split evenly over {world_size} devices")
        per_device = self.batch_size // world_size
        if self.device_batch_size and per_device % self.device_batch_size:
            raise ConfigError(f"--device_batch_size={self.device_batch_size} does not divide the {per_device} "
                              f"sequences per device ({self.batch_size} / {world_size} devices); use a divisor or auto")
        return per_device // (self.device_batch_size or per_device)

    def as_flags(self):
        return [f"--{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]


def field_help():
    """Each field's trailing comment, read from this class's source: the comment is the documentation."""
    source = inspect.getsource(Hyperparameters)
    return dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", source, flags=re.M))


MACHINE_FIELDS = ("device_batch_size", "device", "compile", "resume", "memory_limit_gb")  # not inherited on resume


def parse_flags(argv):
    """The `--name=value` flags as a dict of typed values; any unknown or malformed flag is a ConfigError."""
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
            values[name] = 0 if (name, text) == ("device_batch_size", "auto") else kind(text)
        except ValueError:
            raise ConfigError(f"--{name} takes {kind.__name__}, got {text!r}") from None
    return values


def parse_args(argv):
    return Hyperparameters(**parse_flags(argv)).validate()


def usage():
    helps = field_help()
    return "\n".join([__doc__.strip(), "", "Flags (--name=value, default shown):"] + [
        f"  --{f.name}={f.default}".ljust(52) + helps[f.name] for f in dataclasses.fields(Hyperparameters)])


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

    def _owned(self, params):
        return range(self.rank, len(params), self.world_size)

    def _gather_from_owners(self, params, values, dtype):
        """Every rank gets each owner's value: one all-reduce of a flat buffer, zero outside the owners' slices."""
        offsets = np.cumsum([0] + [p.numel() for p in params])
        flat = torch.zeros(offsets[-1], dtype=dtype, device=params[0].device)
        for index in self._owned(params):
            flat[offsets[index]:offsets[index + 1]] = values(params[index]).flatten()
        if self.world_size > 1:
            dist.all_reduce(flat)  # a sum with one non-zero term per element: exact
        return [flat[start:end].view_as(p) for p, start, end in zip(params, offsets[:-1], offsets[1:])]

    def _orthogonalized_update(self, p, momentum):
        if "momentum_buffer" not in self.state[p]:
            self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = self.state[p]["momentum_buffer"]
        buf.mul_(momentum).add_(p.grad)
        update = newton_schulz_orthogonalize(p.grad.add(buf, alpha=momentum), self.ns_steps, self.ns_dtype)  # Nesterov
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5  # same RMS per element for tall matrices

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            updates = self._gather_from_owners(params, lambda p: self._orthogonalized_update(p, group["momentum"]),
                                               self.ns_dtype)
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
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)[None, :, None, :]
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
        v = (1 - lam) * v + lam * v1  # value residual learning (Zhou et al., 2024): -0.021 val loss in the recipe
        q, k = apply_rotary(rms_norm(q), *rotary), apply_rotary(rms_norm(k), *rotary)  # QK-norm: bounded logits
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
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
        x = self.x0_mixing[0] * x + self.x0_mixing[1] * x0  # re-inject the embedding: -0.009 val loss in the recipe
        y, v1 = self.attn(rms_norm(x), v1, rotary)
        x = x + y
        return x + self.mlp(rms_norm(x)), v1


class GPT(nn.Module):
    def __init__(self, vocab_size, num_layers, model_dim, num_heads, mlp_ratio, rope_base, logit_softcap):
        super().__init__()
        self.logit_softcap, self.rope_base, self.head_dim = logit_softcap, rope_base, model_dim // num_heads
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, mlp_ratio) for _ in range(num_layers))
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
        rotary = rotary_cos_sin(idx.size(1), self.head_dim, self.rope_base, x.dtype, idx.device)  # once per forward
        v1 = None
        for block in self.blocks:
            x, v1 = block(x, v1, x0, rotary)
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
    try:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise ShardError(f"{path}: cannot read it ({e.strerror})") from None
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

    def __init__(self, pattern, batch_size, seq_len, rank, world_size, device, vocab_size=2**16):
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise ShardError(f"no file matches {pattern!r}: download the data (python data/cached_fineweb10B.py) "
                             f"or point the flag at your shards")
        self.seq_len, self.rank, self.device, self.vocab_size = seq_len, rank, device, vocab_size
        self.step_tokens, self.rank_tokens = batch_size * seq_len, batch_size * seq_len // world_size
        self.steps_per_pass = 0  # optimizer steps before the stream starts over at the first shard
        for path in self.files:
            tokens = len(read_shard(path))
            if tokens < self.step_tokens + 1:
                raise ShardError(f"{path}: {tokens} tokens is fewer than one global batch "
                                 f"(batch_size*seq_len+1 = {self.step_tokens + 1}); use more data or a smaller batch")
            self.steps_per_pass += (tokens - 1) // self.step_tokens
        self.reset()

    def reset(self):
        self.seek(0, 0)

    def seek(self, shard_index, position):
        self.shard_index, self.position, self.tokens = shard_index, position, read_shard(self.files[shard_index])

    def next_batch(self):
        """This rank's (inputs, targets) for one optimizer step, each of shape (batch_size/world, seq_len)."""
        if self.position + self.step_tokens + 1 > len(self.tokens):
            self.seek((self.shard_index + 1) % len(self.files), 0)
        start = self.position + self.rank * self.rank_tokens
        window = self.tokens[start:start + self.rank_tokens + 1]
        if window.max() >= self.vocab_size:  # else an embedding lookup out of range: a device-side assert on CUDA
            raise ShardError(f"{self.files[self.shard_index]}: token id {window.max()} near token {start} is not below "
                             f"--vocab_size={self.vocab_size}: data of another tokenizer?")
        window = torch.from_numpy(window.astype(np.int64))
        self.position += self.step_tokens
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)  # one copy; x and y are views of it
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
        raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          f"lower --nproc_per_node")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=device if use_cuda else None)
    return rank, world_size, device


def all_reduce_sum(value, world_size):
    if world_size > 1:
        dist.all_reduce(value)  # SUM: gloo has no AVG
    return value


# ----------------------------------------------------------------------------------------------
# Logging: the speedrun record format


class RunLog:
    """Prints on rank 0 and appends to a new record file (line-buffered); other ranks stay silent."""

    def __init__(self, path):
        self.path, self.file = path, None
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "x", buffering=1)  # "x": never overwrite an earlier record

    def __call__(self, line="", console=True, record=True):
        if self.file and console:
            print(line, flush=True)
        if self.file and record:
            self.file.write(line + "\n")


def environment_lines(device):
    lines = [f"Running Python {sys.version}", f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    if device.type != "cuda":
        return lines + [f"CPU: {cpu_name()} ({os.cpu_count()} cores)"]
    try:
        return lines + [subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip()]
    except (OSError, subprocess.SubprocessError) as e:
        return lines + [f"nvidia-smi unavailable: {e}"]


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


def step_line(step, num_iterations, kind, loss, clock):
    return f"step:{step}/{num_iterations} {kind}:{loss:.4f} {clock}"


def summary_line(final_val_loss, clock, device, world_size):
    return (f"summary: final_val_loss:{final_val_loss:.4f} {clock} peak_memory:{peak_memory_mib(device)}MiB "
            f"world_size:{world_size} device:{device_name(device)}")


# ----------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_FORMAT = "train_gpt2 checkpoint"
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "mlp_ratio")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another model."""


def find_latest_checkpoint(checkpoint_dir):
    paths = glob.glob(os.path.join(checkpoint_dir, "**", "*.pt"), recursive=True)
    if not paths:
        raise CheckpointError(f"--resume=latest found no checkpoint under {checkpoint_dir}/")
    return max(paths, key=os.path.getmtime)


def load_checkpoint(path):
    """The checkpoint dict, loaded safely (weights_only: tensors and plain data, no code)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle with code, ...: all mean "not a checkpoint we wrote"
        reason = " ".join(str(e).split()).split(". ")[0]  # the first sentence: torch's advice that follows is unsafe
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a train_gpt2.py checkpoint")
    return checkpoint


def resolve_args(argv):
    """Hyperparameters from the flags; with --resume, the checkpoint's training knobs under the given flags."""
    flags = parse_flags(argv)
    if not flags.get("resume"):
        return Hyperparameters(**flags).validate(), None
    checkpoint_dir = flags.get("checkpoint_dir", Hyperparameters.checkpoint_dir)
    path = find_latest_checkpoint(checkpoint_dir) if flags["resume"] == "latest" else flags["resume"]
    checkpoint = load_checkpoint(path)
    known = {f.name for f in dataclasses.fields(Hyperparameters)} - set(MACHINE_FIELDS)
    inherited = {k: v for k, v in checkpoint["hyperparameters"].items() if k in known}
    args = Hyperparameters(**{**inherited, **flags, "resume": path}).validate()
    for name in SHAPE_FIELDS:
        if getattr(args, name) != inherited[name]:
            raise CheckpointError(f"{path} holds a model with --{name}={inherited[name]}, not {getattr(args, name)}: "
                                  f"resume it without changing the model shape")
    return args, checkpoint


class Checkpointer:
    """Atomic checkpoints (temp file, then rename) of everything a resumed run needs; keeps the newest K."""

    def __init__(self, args, run_id, rank):
        self.args, self.rank, self.saved = args, rank, []
        self.prefix = os.path.join(args.checkpoint_dir, args.run_name, run_id)
        self.last_save = time.monotonic()

    def due(self, step):
        minutes = self.args.save_every_minutes
        return bool(self.args.save_every and step % self.args.save_every == 0) or \
            bool(minutes and time.monotonic() - self.last_save >= 60 * minutes)

    def save(self, step, run, record):
        momentum = run.muon.momentum_buffers()  # a collective: every rank takes part
        self.last_save = time.monotonic()
        if self.rank != 0:
            return None
        path = f"{self.prefix}-step{step:06d}.pt"
        state = dict(format=CHECKPOINT_FORMAT, hyperparameters=dataclasses.asdict(self.args), step=step,
                     model=run.model.state_dict(), adam=run.adam.state_dict(), muon_momentum=momentum,
                     data=dict(shard_index=run.train_loader.shard_index, position=run.train_loader.position),
                     train_ms=run.clock.train_ms, timed_steps=run.clock.timed_steps, record=record,
                     rng=dict(cpu=torch.get_rng_state(),
                              cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0)))
        try:
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # never a half-written file under the final name
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise OSError(f"cannot write checkpoint {path}: {' '.join(str(e).split())}") from None
        self.saved.append(path)
        while len(self.saved) > self.args.keep_checkpoints:
            os.remove(self.saved.pop(0))
        return path


def restore(checkpoint, run):
    """Load a checkpoint into a freshly built run; returns the step to continue from."""
    run.model.load_state_dict(checkpoint["model"])
    run.adam.load_state_dict(checkpoint["adam"])
    run.muon.load_momentum_buffers(checkpoint["muon_momentum"])
    run.train_loader.seek(**checkpoint["data"])
    run.clock.train_ms, run.clock.timed_steps = checkpoint["train_ms"], checkpoint["timed_steps"]
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"].numel():
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    return checkpoint["step"]


# ----------------------------------------------------------------------------------------------
# Training loop


class Clock:
    """Device-synchronized train time; validation, checkpoints and the untimed warmup steps are left out."""

    def __init__(self, device):
        self.device, self.train_ms, self.timed_steps, self.since = device, 0.0, 0, None

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


class StopRequest:
    """SIGINT/SIGTERM ask the run to checkpoint and stop at the next step boundary; a Ctrl-C more than
    5 s later aborts at once (torchrun forwards the first signal to its workers: that copy is not a second)."""

    def __init__(self):
        self.signal, self.since, self.previous = None, 0.0, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self.since = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.since > 5:
            raise KeyboardInterrupt


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
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adam, muon


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
        raise ConfigError(f"not even one sequence of {args.seq_len} tokens fits in {device_name(device)}'s memory")
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
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield "attention: cuDNN SDPA first (Hopper), then flash, memory-efficient, math"


class Run:
    """Everything one training run holds, built before the record opens so bad input fails in one line."""

    def __init__(self, args, rank, world_size, device, checkpoint):
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.notes = []
        loader_args = (args.batch_size, args.seq_len, rank, world_size, device, args.vocab_size)
        self.train_loader = ShardLoader(args.input_bin, *loader_args)
        self.val_loader = ShardLoader(args.input_val_bin, *loader_args)
        val_shard = read_shard(self.val_loader.files[0])
        if len(val_shard) < args.val_tokens + 1:
            raise ShardError(f"{self.val_loader.files[0]}: {len(val_shard)} tokens is fewer than "
                             f"--val_tokens={args.val_tokens} (+1); lower --val_tokens")
        if args.num_iterations > self.train_loader.steps_per_pass:
            self.notes.append(f"data: the train shards hold {self.train_loader.steps_per_pass} steps; later steps "
                              f"see the same tokens again (download more shards to avoid it)")
        torch.manual_seed(args.seed)
        self.model = cast_model(GPT.from_args(args).to(device), compute_dtype(device))
        self.adam, self.muon = build_optimizers(self.model, args, rank, world_size, device)
        self.clock, self.start_step, self.parent = Clock(device), 0, None
        if checkpoint is not None:
            self.start_step = restore(checkpoint, self)
            self.parent = f"resumed_from: {args.resume} at step {self.start_step} (parent record {checkpoint['record']})"
        self.last_step, self.final_val_loss = self.start_step, float("nan")  # what the summary reports
        # static shapes: the probe's compilation at the chosen size is the one training reuses
        compiled = torch.compile(self.model, dynamic=False) if args.compile == "true" else self.model
        if not args.device_batch_size:
            args.device_batch_size, reason = choose_device_batch_size(compiled, args, world_size, device)
            self.notes.append(f"device_batch_size: {args.device_batch_size} ({reason})")
        self.accum_steps = args.grad_accum_steps(world_size)
        self.ddp = compiled if world_size == 1 else DDP(  # bucket views: no second copy of the gradients
            compiled, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)

    def train_step(self, step):
        """One optimizer step over the global batch; returns this rank's mean micro-step loss (on device)."""
        x, y = self.train_loader.next_batch()
        train_loss = torch.zeros((), device=self.device)
        for micro_step, (xm, ym) in enumerate(zip(x.chunk(self.accum_steps), y.chunk(self.accum_steps))):
            last_micro_step = micro_step == self.accum_steps - 1
            with nullcontext() if last_micro_step or self.world_size == 1 else self.ddp.no_sync():
                loss = self.ddp(xm, ym)  # DDP all-reduces (averages) gradients once, after the last micro-step
                (loss / self.accum_steps).backward()  # mean, not sum, over micro-steps: same math on any device count
            train_loss += loss.detach().float() / self.accum_steps
        for opt in (self.adam, self.muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_multiplier(step, self.args)
        self.muon.param_groups[0]["momentum"] = muon_momentum(step, self.args)
        self.adam.step()
        self.muon.step()
        self.ddp.zero_grad(set_to_none=True)
        return train_loss

    def loop(self, log, checkpointer, stop):
        """Train to num_iterations, validating, checkpointing and stopping on request at step boundaries.

        Returns None at the end, or why it stopped early."""
        args, clock = self.args, self.clock
        progress_at, progress_step = time.monotonic(), self.start_step
        save_now = stop_now = False
        for step in range(self.start_step, args.num_iterations + 1):
            last_step = step == args.num_iterations
            if step == self.start_step + args.untimed_steps:
                clock.start()  # after compilation and warmup, in every (resumed) process
            validate = last_step or (args.val_loss_every and step % args.val_loss_every == 0)
            save = step > self.start_step and (save_now or stop_now or (
                last_step and (args.save_every or args.save_every_minutes)))
            if validate or save:
                with clock.paused():
                    if validate:
                        self.final_val_loss = evaluate(self.ddp, self.val_loader, args, self.accum_steps,
                                                       self.world_size)
                        log(step_line(step, args.num_iterations, "val_loss", self.final_val_loss, clock))
                    if save:
                        path = checkpointer.save(step, self, log.path)
                        log(f"checkpoint: {path}", record=stop_now or last_step)
            if stop_now:
                return f"{signal.Signals(stop.signal).name} at step {step}: checkpoint saved, resume with --resume"
            if last_step:
                return None

            requests = torch.zeros(3, device=self.device)  # loss, stop, save: one all-reduce makes every rank agree
            requests[0] = self.train_step(step)
            requests[1], requests[2] = float(stop.signal is not None), float(checkpointer.due(step + 1))
            loss_sum, stop_votes, save_votes = all_reduce_sum(requests, self.world_size).tolist()
            clock.lap()
            train_loss, stop_now, save_now = loss_sum / self.world_size, stop_votes > 0, save_votes > 0
            log(step_line(step + 1, args.num_iterations, "train_loss", train_loss, clock), console=False)
            self.last_step = step + 1
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train loss is {train_loss} at step {step + 1}: lower the learning rates "
                                         f"or check the data")
            if args.progress_seconds and time.monotonic() - progress_at >= args.progress_seconds:
                rate = (step + 1 - progress_step) / (time.monotonic() - progress_at)
                log(f"step {step + 1}/{args.num_iterations} train_loss {train_loss:.4f} | {rate:.2f} steps/s "
                    f"{rate * args.batch_size * args.seq_len:,.0f} tokens/s | train_time "
                    f"{timedelta(seconds=round(clock.train_ms / 1000))} eta "
                    f"{timedelta(seconds=round((args.num_iterations - step - 1) / rate))}", record=False)
                progress_at, progress_step = time.monotonic(), step + 1


# ----------------------------------------------------------------------------------------------
# main


def fail(message):
    """Exit with one line on stderr; ranks other than 0 say which they are."""
    rank = int(os.environ.get("RANK", 0))
    raise SystemExit(f"train_gpt2.py{f' [rank {rank}]' if rank else ''}: {message}")


def open_record(args, run_id, now, rank, device, run, notes):
    """The record file (rank 0): source, environment, flags and notes, in the speedrun layout."""
    path = os.path.join(args.records_dir, f"{now:%Y-%m-%d}_{args.run_name}", f"{run_id}.txt")
    log = RunLog(path if rank == 0 else None)
    with open(__file__) as f:
        log(f.read().rstrip("\n"), console=False)  # the record starts with the exact source
    log("=" * 100, console=False)
    for line in environment_lines(device) + ["Hyperparameters:"] + args.as_flags() + ["Notes:"] + notes:
        log(line, console=False)
    log("=" * 100, console=False)
    log(f"record: {log.path}  (world size {run.world_size}, {device_name(device)}, device_batch_size "
        f"{args.device_batch_size} x {run.accum_steps} micro-steps)", record=False)
    if run.parent:
        log(run.parent)
    return log


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    try:
        args, checkpoint = resolve_args(argv)
        rank, world_size, device = setup_distributed(args.device)
        args.grad_accum_steps(world_size)
        if args.memory_limit_gb and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gb * 2**30 / total), device)
        args.compile = {"auto": "true" if device.type == "cuda" else "false"}.get(args.compile, args.compile)
        if rank == 0:
            for folder in (args.records_dir, os.path.join(args.checkpoint_dir, args.run_name)):
                os.makedirs(folder, exist_ok=True)
    except (ConfigError, CheckpointError) as e:
        fail(e)
    except OSError as e:
        fail(f"cannot create {e.filename}: {e.strerror}; pick another --records_dir or --checkpoint_dir")

    now = datetime.now()
    run_id = f"{now:%H%M%S}-{uuid.uuid4().hex[:8]}"
    with attention_backends(device) as attention_note, StopRequest() as stop:
        try:
            run = Run(args, rank, world_size, device, checkpoint)
        except (ConfigError, ShardError) as e:
            fail(e)
        except torch.OutOfMemoryError:
            fail("out of GPU memory while building the model: use a GPU with more memory")
        log = open_record(args, run_id, now, rank, device, run, [attention_note] + run.notes)
        outcome = 0
        try:
            stopped = run.loop(log, Checkpointer(args, run_id, rank), stop)
            if stopped:
                log(f"stopped: {stopped}")
                outcome = 128 + stop.signal
        except (ShardError, FloatingPointError, OSError) as e:
            log(f"stopped: {e}", console=False)
            outcome = str(e)
        except torch.OutOfMemoryError:
            log("stopped: out of GPU memory", console=False)
            outcome = (f"--device_batch_size={args.device_batch_size} does not fit in {device_name(device)}'s "
                       f"memory: use --device_batch_size=auto or a smaller divisor")
        except KeyboardInterrupt:
            log(f"stopped: interrupted by a second Ctrl-C after step {run.last_step}, no checkpoint")
            outcome = 130
        finally:
            log(summary_line(run.final_val_loss, run.clock, device, world_size))
            if log.file:
                log.file.close()
            del run  # DDP holds the process group: freed at exit, gloo aborted 5 of 150 two-rank runs (0 of 150 so)
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()
    return outcome if isinstance(outcome, int) else fail(outcome)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
