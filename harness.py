"""The harness around train_gpt2.py's recipe: flags, the record file, checkpoints and resume, signals, the
micro-batch probe, output checks and the agreement between ranks on why a run failed.

Nobody edits this file for a record, yet every record embeds it beside the recipe. It never imports
train_gpt2: the recipe hands it the Hyperparameters class, its modules and its state.
"""

import argparse
import dataclasses
import errno
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import uuid
from contextlib import contextmanager
from dataclasses import field
from datetime import datetime, timedelta

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# Errors: each becomes one line on stderr and exit status 1


class TrainError(Exception):
    """Bad input the user can fix: main() turns it into one line on stderr and exit status 1."""


class ConfigError(TrainError, ValueError):
    """A flag or a combination of flags that cannot run."""


class ShardError(TrainError, ValueError):
    """A missing, corrupt or too small token shard."""


class CheckpointError(TrainError, ValueError):
    """A checkpoint that is missing, unreadable, or of another model."""


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


# ----------------------------------------------------------------------------------------------
# Flags: every Hyperparameters field is a --name value / --name=value flag

POSITIVE = (lambda v: v > 0, "must be positive")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def knob(default, help, rule=None, kind="recipe"):
    """A Hyperparameters field: its default, its --help text, the (test, reason) its value must pass, and its
    kind: `shape` (a checkpoint fixes it), `machine` (this run's hardware: a resume does not inherit it)."""
    return field(default=default, metadata=dict(help=help, rule=rule, kind=kind))


def fields_of_kind(cls, kind):
    return [f.name for f in dataclasses.fields(cls) if f.metadata["kind"] == kind]


def check_fields(args):
    """Each field's own rule; the recipe checks the rules between fields."""
    for f in dataclasses.fields(args):
        value, rule = getattr(args, f.name), f.metadata["rule"]
        if rule and value is not None and not rule[0](value):
            raise ConfigError(f"--{f.name} {rule[1]}, got {value!r}")


def flag_text(value):
    return "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def as_flags(args):
    return [f"--{f.name}={flag_text(getattr(args, f.name))}" for f in dataclasses.fields(args)]


def flag_type(kind):
    """argparse's converter for a field type; `T | None` also takes auto (None: decided at start-up)."""
    base = next(t for t in getattr(kind, "__args__", (kind,)) if t is not type(None))

    def convert(text):
        if text == "auto" and base is not kind:
            return None
        if base is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        return base(text)

    convert.__name__ = base.__name__ + (" or auto" if base is not kind else "")  # argparse names it in errors
    return convert


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised, instead of usage text and sys.exit(2)
        raise ConfigError(f"{message} (see --help)")


def flag_parser(cls, description=""):
    parser = FlagParser(
        prog="train_gpt2.py",
        usage="%(prog)s [--name value | --name=value ...]",
        allow_abbrev=False,
        description=description,
        argument_default=argparse.SUPPRESS,
        epilog="Flags take --name value or --name=value.",
    )
    for f in dataclasses.fields(cls):
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


def parse_flags(cls, argv, description=""):
    """The flags given on the command line, as {name: typed value}; anything unknown is a ConfigError."""
    return vars(flag_parser(cls, description).parse_args(argv))


def parse_args(cls, argv):
    return cls(**parse_flags(cls, argv))


# ----------------------------------------------------------------------------------------------
# The record: the speedrun's log format, every project file the run imported at its top


class RunLog:
    """Prints on rank 0 and appends whole lines to a new record file; other ranks stay silent. A line the disk
    cannot take is left out whole and remembered in `error`: the loop then stops the run at the next step."""

    def __init__(self, path):
        self.path, self.fd, self.size, self.error = path, None, 0, None
        if path:
            try:  # O_EXCL: never over an earlier record; O_APPEND: after a failed line, the next at the end
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


def project_sources(recipe):
    """The files of `recipe` and of every project module it imports, directly or through another, in that
    order; installed packages and the standard library are not the project's."""
    outside = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    root, files, seen = os.path.dirname(os.path.realpath(recipe.__file__)), [], set()

    def visit(module):
        path = getattr(module, "__file__", None) or ""
        path = os.path.realpath(path) if os.path.isabs(path) and path.endswith(".py") else ""
        if not path or module.__name__ in seen or any(map(path.startswith, outside)):
            return
        seen.add(module.__name__)
        files.append(path)
        for value in vars(module).values():
            used = value if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            visit(sys.modules.get(used) if isinstance(used, str) else used or sys)

    visit(recipe)
    return [
        (os.path.relpath(p, root) if p.startswith(root + os.sep) else os.path.basename(p), p) for p in files
    ]


def open_record(run, recipe, notes):
    """The record file (rank 0): every source file, environment, flags and notes, in the speedrun layout."""
    args, device, rank = run.args, run.device, run.rank
    path = os.path.join(record_folder(args, run.started), f"{run.run_id}.txt")
    environment = (
        environment_lines(device) if rank == 0 else []
    )  # nvidia-smi may take seconds: before the file
    log = RunLog(path if rank == 0 else None)
    for index, (name, source_path) in enumerate(project_sources(recipe)):
        with open(source_path) as f:
            header = ["-" * 40, f"# {name}", "-" * 40] if index else []  # the public speedrun's layout
            log("\n".join(header + [f.read().rstrip("\n")]), console=False)
    if device.type == "cpu":
        notes = notes + [f"cpu_threads: {torch.get_num_threads()}"]  # a replay on the CPU repeats it exactly
    for line in ["=" * 100, *environment, "Hyperparameters:", *as_flags(args), "Notes:", *notes, "=" * 100]:
        log(line, console=False)
    log(
        f"record: {log.path}  (world size {run.world_size}, {device_name(device)}, device_batch_size "
        f"{args.device_batch_size} x {run.accum_steps} micro-steps)",
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


@dataclasses.dataclass
class Latest:
    """What the run has reached: the last finished step and the last validation, for the summary."""

    step: int
    val_loss: float = float("nan")


def progress_line(step, args, train_loss, steps_per_s, clock):
    return (
        f"step {step}/{args.num_iterations} train_loss {train_loss:.4f} | {steps_per_s:.2f} steps/s "
        f"{steps_per_s * args.batch_size * args.seq_len:,.0f} tokens/s | train_time "
        f"{timedelta(seconds=round(clock.train_ms / 1000))} eta "
        f"{timedelta(seconds=round((args.num_iterations - step) / steps_per_s))}"
    )


# ----------------------------------------------------------------------------------------------
# Start-up: output folders and input checks, before anything slow


def new_run_id():
    """(start time, run id): the record is <records_dir>/<date>_<run_name>/<run id>.txt."""
    started = datetime.now()
    return started, f"{started:%H%M%S}-{uuid.uuid4().hex[:8]}"


def record_folder(args, started):
    return os.path.join(args.records_dir, f"{started:%Y-%m-%d}_{args.run_name}")


def prepare_outputs(args, started):
    """The record and checkpoint folders, created and proven writable before anything slow starts."""
    folders = dict(
        records_dir=record_folder(args, started),
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
        f"stale: {path} ({os.path.getsize(path) / 2**20:.0f} MiB), a checkpoint an earlier run was "
        f"writing when it was killed: delete it"
        for path in stale
    ]


def check_data(args, train_loader, val_loader):
    """Refuse data that would make the run meaningless; notes for what is only worth knowing."""
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
    if args.num_iterations <= train_loader.steps_per_pass:
        return []
    return [
        f"data: the train shards hold {train_loader.steps_per_pass} steps; later steps see the same "
        f"tokens again (download more shards to avoid it)"
    ]


def is_out_of_memory(error):
    """CUDA raises OutOfMemoryError; the CPU allocator, cuBLAS and cuDNN a RuntimeError of their own."""
    text = str(error)
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and ("alloc" in text.lower() or "out of memory" in text)
    )


@contextmanager
def model_fits(device):
    """Building the model: a device too small for it is one line."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise ConfigError(
            f"the model does not fit in {device_name(device)}'s memory ({type(e).__name__}); "
            f"check --vocab_size, --model_dim and --num_layers"
        ) from None


def cap_memory(args, device):
    if args.memory_limit_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gb * 2**30 / total), device)


# ----------------------------------------------------------------------------------------------
# The micro-batch probe: the largest micro-batch that fits this device


def probe_fits(model, args, size, device):
    """Whether a real forward+backward of `size` sequences fits, beside room for the optimizer states.
    `model` is the compiled model training will use: eager needs far more memory (unfused softcap and loss).
    Inputs and targets are two views of one window, as the loader makes them, so training reuses the graph."""
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # Adam, Muon, DDP buckets
    try:
        reserve = torch.empty(state_bytes, dtype=torch.uint8, device=device)
        window = torch.zeros(size * args.seq_len + 1, dtype=torch.long, device=device)
        model(window[:-1].view(size, -1), window[1:].view(size, -1)).backward()
        return True
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            return False
        raise
    finally:
        del reserve, window
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


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume

CHECKPOINT_FORMAT = "train_gpt2 checkpoint"
CHECKPOINT_KEYS = {"hyperparameters", "step", "model", "adam", "muon_momentum", "data", "rng", "train_ms"}
CHECKPOINT_KEYS |= {"timed_steps", "record"}


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


def resolve_args(cls, argv, description=""):
    """Hyperparameters from the flags; with --resume, the checkpoint's training knobs under given flags."""
    flags = parse_flags(cls, argv, description)
    if not flags.get("resume"):
        return cls(**flags), None
    path = flags["resume"]
    if path == "latest":
        run_name = flags.get("run_name", cls.run_name)
        folder = os.path.join(flags.get("checkpoint_dir", cls.checkpoint_dir), run_name)
        paths = glob.glob(os.path.join(glob.escape(folder), "*.pt"))
        if not paths:
            raise CheckpointError(
                f"--resume=latest found no checkpoint of --run_name={run_name} in {folder}/"
            )
        path = max(paths, key=os.path.getmtime)
    checkpoint = load_checkpoint(path)
    shape = fields_of_kind(cls, "shape")
    missing = CHECKPOINT_KEYS - checkpoint.keys() or set(shape) - checkpoint["hyperparameters"].keys()
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(sorted(missing))}: not a complete training checkpoint"
        )
    known = {f.name for f in dataclasses.fields(cls)} - set(fields_of_kind(cls, "machine"))
    inherited = {k: v for k, v in checkpoint["hyperparameters"].items() if k in known}
    args = cls(**{**inherited, **flags, "resume": path})
    for name in shape:
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


def save_checkpoint(run, step, record):
    """Everything a resumed run needs, written atomically (temp file, then rename) by rank 0, which returns
    its path; a failure to write it ends every rank (agreed by an all-reduce), so none waits."""
    name = f"{run.run_id}-step{step:06d}.pt"
    path = os.path.join(run.args.checkpoint_dir, run.args.run_name, name) if run.rank == 0 else None
    state = dict(
        format=CHECKPOINT_FORMAT,
        hyperparameters=dataclasses.asdict(run.args),
        step=step,
        model=run.model.state_dict(),
        adam=run.adam.state_dict(),
        muon_momentum=run.muon.momentum_buffers(),
        data=run.train_loader.state(),
        train_ms=run.clock.train_ms,
        timed_steps=run.clock.timed_steps,
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
    failed = torch.tensor(float(error is not None), device=run.train_loader.device)
    if run.world_size > 1:
        dist.all_reduce(failed)
    if failed.item():
        raise error or PeerFailure("rank 0 could not write the checkpoint")
    return path


def restore_checkpoint(checkpoint, path, model, adam, muon, train_loader):
    """Load a checkpoint into a freshly built run; returns (the step to continue from, the clock)."""
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


def prune_checkpoints(saved, keep):
    """Delete all but the newest `keep` of this run's checkpoints (never the one just written: keep >= 1)."""
    for path in saved[:-keep]:
        if path and os.path.exists(path):
            os.remove(path)
    return saved[-keep:]


# ----------------------------------------------------------------------------------------------
# Signals and the end of a run


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
            return  # the record's last lines take milliseconds: torchrun's SIGTERM to the others waits
        if self.phase == "shutdown":
            os._exit(128 + signum)  # the record is closed: nothing is lost
        if self.phase == "start-up":
            raise Interrupted(signum, "before the first step was done: nothing to save")
        if self.signal is None:
            self.signal, self.since = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.since > 5:
            raise Interrupted(signum, "a second time: stopped at once, no checkpoint")


def first_failure(error, rank, world_size):
    """Why the run failed, agreed in the process group's store. Only a rank that failed itself posts its
    reason; a rank that only saw a collective fail, or another rank's agreed failure, waits for it."""
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


def finish_record(log, stopped, latest, run):
    """The record's last lines, `stopped:` and `summary:`."""
    lines = ([f"stopped: {stopped}"] if stopped else []) + [
        f"summary: final_val_loss:{latest.val_loss:.4f} {run.clock} "
        f"peak_memory:{peak_memory_mib(run.device)}MiB world_size:{run.world_size} "
        f"device:{device_name(run.device)}"
    ]
    for line in lines:
        log(line)  # on the console too, where it survives a full disk
    log.close()


def train_to_the_end(train, run, log, stop):
    """train(run, log, stop, latest), then the record's last lines whatever ended it; the exit status."""
    latest, error, stopped = Latest(step=run.start_step), None, None
    try:
        stopped = train(run, log, stop, latest)
    except BaseException as e:
        if isinstance(e, torch.OutOfMemoryError):
            e = TrainError(
                f"out of GPU memory: --device_batch_size={run.args.device_batch_size} does not fit in "
                f"{device_name(run.device)}; use --device_batch_size=auto or a smaller divisor"
            )
        stopped = first_failure(e, run.rank, run.world_size)
        error = e if run.world_size == 1 or stopped.startswith(f"rank {run.rank} ") else TrainError(stopped)
    finally:
        stop.phase = "finishing"
        finish_record(log, stopped, latest, run)
        stop.phase = "shutdown"
        vars(run).clear()  # DDP holds the process group: freed at exit, gloo aborted 5 of 150 two-rank runs
    if error or log.error:
        raise error or log.error
    return 128 + (stop.signal or signal.SIGTERM) if stopped else 0


def main(run, argv):
    """run(argv, stop)'s exit status; a project error ends in one line on stderr, a signal in 128 + n."""
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


def signal_name(signum):
    return signal.Signals(signum or signal.SIGTERM).name
