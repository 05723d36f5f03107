"""The harness around train_gpt2.py's recipe: flags, the record file, checkpoints and resume, signals, the
micro-batch probe, output checks and the agreement between ranks on why a run failed.

Nobody edits this file for a record, yet every record embeds it beside the recipe. It never imports
train_gpt2: the recipe hands it the Hyperparameters class, its modules and its state.
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
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import uuid
import warnings
from contextlib import contextmanager, suppress
from dataclasses import field
from datetime import datetime, timedelta

import torch
import torch.distributed as dist

from data.flags import FlagParser

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
LEARNING_RATE = (lambda v: 0 < v < 1e38, "must be positive and within float32 (below 1e38)")
AT_LEAST_ONE = (lambda v: v >= 1, "must be >= 1")
SEED = (lambda v: -(2**63) <= v < 2**64, "must fit in 64 bits, as torch.manual_seed takes it")
RUN_NAME = (
    lambda v: re.fullmatch(r"\w[\w.-]*", v),
    "takes letters, digits, '.', '_' and '-', and starts with a letter or digit",
)
CLOCK_TIME = (lambda v: not v or re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v), "takes HH:MM, 00:00 to 23:59")
DEVICES = (lambda v: v in ("auto", "cuda", "cpu"), "must be auto, cuda or cpu")

# What a flag's kind means for a resumed run and for the command that continues a stopped one
KINDS = dict(
    recipe="what is trained: inherited from the checkpoint, a change noted in the record",
    shape="the model's shape: inherited, a change refused",
    output="where and how often the run reports and saves: inherited, a change not noted; repeated in the "
    "continue command",
    machine="this run's hardware: not inherited, repeated in the continue command",
    this_run="this process only: neither inherited nor repeated",
)


def knob(default, help, rule=None, kind="recipe"):
    """A Hyperparameters field: its default, its --help text, the (test, reason) its value must pass, and its
    kind (KINDS)."""
    return field(default=default, metadata=dict(help=help, rule=rule, kind=kind))


@dataclasses.dataclass
class RunFlags:
    """The flags that are not the recipe's, each declared once with its kind: the recipe's Hyperparameters
    adds its knobs to them."""

    run_name: str = knob(
        "run", "record name: the log goes to records_dir/<date>_<run_name>/", RUN_NAME, "output"
    )
    records_dir: str = knob("records", "where run logs are written", None, "output")
    checkpoint_dir: str = knob(
        "checkpoints", "where checkpoints go (outside records/: they are large)", None, "output"
    )
    save_every: int = knob(0, "checkpoint every this many steps; 0 = off", NON_NEGATIVE, "output")
    save_every_minutes: float = knob(
        30.0, "checkpoint every this many minutes; 0 = off", NON_NEGATIVE, "output"
    )
    keep_checkpoints: int = knob(2, "newest checkpoints of this run kept on disk", POSITIVE, "output")
    save_final: bool = knob(True, "checkpoint the finished model; false: no final checkpoint", None, "output")
    progress_seconds: float = knob(10.0, "console progress line this often; 0 = off", NON_NEGATIVE, "output")
    val_loss_every: int = knob(
        125, "validate every this many steps, at 0 and at the end; 0: the end", NON_NEGATIVE, "output"
    )
    device: str = knob("auto", "auto (CUDA if visible, else CPU), cuda or cpu", DEVICES, "machine")
    device_batch_size: int | None = knob(
        None, "sequences per micro-step; auto: most that fit", POSITIVE, "machine"
    )
    micro_tokens: int | None = knob(
        None, "micro-step tokens (sequences cut where documents start); auto: as needed", POSITIVE, "machine"
    )
    compile: bool | None = knob(None, "torch.compile; auto = on for CUDA, off for CPU", None, "machine")
    coordinate_descent: bool = knob(
        False, "inductor tunes each kernel's launch: minutes more compile", None, "machine"
    )
    memory_limit_gb: float = knob(0.0, "cap GPU memory, to rehearse a smaller card", NON_NEGATIVE, "machine")
    resume: str = knob("", "checkpoint to continue from: a path, or latest (of run_name)", None, "this_run")
    stop_at: str = knob(
        "", "checkpoint and stop at the next HH:MM (local time); exit 0", CLOCK_TIME, "this_run"
    )
    max_hours: float = knob(
        0.0, "checkpoint and stop after this many hours; exit 0; 0 = off", NON_NEGATIVE, "this_run"
    )


def flag_fields(cls):
    """The fields, as --help and the record list them: the recipe's knobs first, then RunFlags'."""
    run_flags = {f.name for f in dataclasses.fields(RunFlags)}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in run_flags] + [f for f in fields if f.name in run_flags]


def fields_of_kind(cls, *kinds):
    return [f.name for f in dataclasses.fields(cls) if f.metadata["kind"] in kinds]


def check_fields(args):
    """Each field's own rule; the recipe checks the rules between fields. No float flag takes nan or inf."""
    for f in dataclasses.fields(args):
        value, rule = getattr(args, f.name), f.metadata["rule"]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} must be a finite number, got {value!r}")
        if rule and value is not None and not rule[0](value):
            raise ConfigError(f"--{f.name} {rule[1]}, got {value!r}")


def flag_text(value):
    return "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def as_flags(args):
    return [f"--{f.name}={flag_text(getattr(args, f.name))}" for f in flag_fields(type(args))]


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


def flag_parser(cls, description=""):
    parser = FlagParser(
        error_type=ConfigError,
        prog="train_gpt2.py",
        usage="%(prog)s [--name value | --name=value ...]",
        description=description,
        argument_default=argparse.SUPPRESS,
        epilog="Flags take --name value or --name=value.",
    )
    for f in flag_fields(cls):
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
    return with_recipe(cls, parse_flags(cls, argv))


def with_recipe(cls, flags, inherited=None):
    """cls from its defaults, under its named recipe's flags (cls.RECIPES), under a resumed checkpoint's
    values, under the flags given: a recipe's flags never override what a checkpoint inherits."""
    inherited, recipes = inherited or {}, getattr(cls, "RECIPES", {})
    if not recipes:
        return cls(**{**inherited, **flags})
    trained = inherited.get("recipe", cls.recipe)
    name = flags.get("recipe", trained)
    if inherited and name != trained:
        raise CheckpointError(
            f"--recipe={name}, but the checkpoint was trained with --recipe={trained}: a resume continues "
            f"its recipe (give single flags to change its knobs)"
        )
    recipe_flags = parse_flags(cls, recipes[name].split()) if name in recipes else {}  # else cls's own check
    try:
        return cls(**{**recipe_flags, **inherited, **flags})
    except ConfigError as e:  # a value the user never typed is named as the recipe's, with the way out
        given, defaults = {**inherited, **flags}, {f.name: f.default for f in dataclasses.fields(cls)}
        fixes = [
            f"--{n}={flag_text(v)} is --recipe={name}'s: give --{n}={flag_text(defaults[n])} or another value"
            for n, v in recipe_flags.items()
            if n not in given and f"--{n}=" in str(e)
        ]
        raise ConfigError("; ".join([str(e), *fixes])) from None


# ----------------------------------------------------------------------------------------------
# The record: the speedrun's log format, every project file the run imported at its top


def drop_console():
    """Send stdout to /dev/null from now on, its unflushed bytes too: no BrokenPipeError at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout
        sys.stdout = open(os.devnull, "w")
    return True


class RunLog:
    """Prints on rank 0 and appends whole lines to a new record file; other ranks stay silent. A line the disk
    cannot take is left out whole and remembered in `error`: the loop then stops the run at the next step."""

    def __init__(self, path):
        self.path, self.fd, self.size, self.error, self.console_lost = path, None, 0, None, False
        if path:
            try:  # O_EXCL: never over an earlier record; O_APPEND: after a failed line, the next at the end
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except OSError as e:
                raise output_error(path, e) from None

    def __call__(self, line="", console=True, record=True):
        if self.fd is None:
            return
        if console and not self.console_lost:
            try:
                print(line, flush=True)
            except OSError as e:  # a closed pipe (| head), a hung-up terminal, > /dev/full: no reason to stop
                self.console_lost = drop_console()
                self(
                    f"console: lost ({type(e).__name__}: {e}): output only to this record from here on", False
                )
        # after a failure, the console only: no line goes missing mid-record
        if record and self.error is None:
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
        package = sys.modules.get(module.__name__.rpartition(".")[0]) or sys  # imported with its submodule
        for value in [package, *vars(module).values()]:
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
    # nvidia-smi may take seconds: asked before the file exists
    environment = environment_lines(device) if rank == 0 else []
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
    if args.compile:
        log("compiling: the first steps build the compiled graphs, untimed (minutes on a GPU)", record=False)
    return log


class Clock:
    """Device-synchronized train time; validation, checkpoints and the untimed warmup steps are left out."""

    def __init__(self, device, train_ms=0.0, timed_steps=0):
        self.device, self.train_ms, self.timed_steps, self.since = device, train_ms, timed_steps, None
        self.first_started = None  # when this process's timing began: its start-up ends there

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self):
        self.since = self._now()
        self.first_started = self.first_started or time.monotonic()

    def lap(self, count_step=True):
        """Add the time since the last lap (a finished step, or the start of a pause)."""
        if self.since is not None:
            now = self._now()
            self.train_ms += 1000 * (now - self.since)
            self.timed_steps, self.since = self.timed_steps + count_step, now

    def stop(self):
        """The run ends at this step: what follows (validation, the save, the summary) is not train time."""
        self.since = None

    def __str__(self):  # the speedrun's timing fields; step_avg is nan until a step is timed
        step_avg = self.train_ms / self.timed_steps if self.timed_steps else float("nan")
        return f"train_time:{self.train_ms:.0f}ms step_avg:{step_avg:.2f}ms"

    @contextmanager
    def paused(self):
        self.lap(count_step=False)
        yield
        if self.since is not None:
            self.start()


class FirstCalls:
    """A compiled callable whose first call per graph is timed on the host clock, the device synced: its
    compile, any autotuning and one run; a call that needs a gradient until its backward ends (inductor
    compiles the backward graph then). A graph is `name` (default: train or eval, by grad mode) and the first
    argument's shape. `times`: {graph: seconds} of this process, for the record."""

    times = {}

    def __init__(self, compiled, name=""):
        self.compiled, self.name = compiled, name

    def __call__(self, *args, **kwargs):
        name = self.name or ("train" if torch.is_grad_enabled() else "eval")
        graph, started = f"{name} {'x'.join(map(str, args[0].shape))}", time.perf_counter()
        if graph in self.times:
            return self.compiled(*args, **kwargs)

        def done():
            if args[0].is_cuda:
                torch.cuda.synchronize(args[0].device)
            self.times[graph] = time.perf_counter() - started

        self.times[graph] = math.nan  # a first call that fails stays nan
        out = self.compiled(*args, **kwargs)
        done()  # the forward's time; a backward adds its own once it ends
        if out.requires_grad:  # the engine runs a queued callback when the whole backward is done
            out.register_hook(lambda grad: torch.autograd.Variable._execution_engine.queue_callback(done))
        return out


def compile_line():
    """Where a compiled start-up went: each graph's first call (FirstCalls), and inductor's cache hits and
    misses, which tell a warm start from a cold one."""
    cache = torch._dynamo.utils.counters["inductor"]
    graphs = ", ".join(f"{graph} {seconds:.1f}s" for graph, seconds in FirstCalls.times.items())
    hits, misses = cache["fxgraph_cache_hit"], cache["fxgraph_cache_miss"]
    return f"compile: {graphs or 'no graph called yet'}; inductor cache hits {hits} misses {misses}"


# ----------------------------------------------------------------------------------------------
# Start-up: output folders and input checks, before anything slow


def new_run_id():
    """(start time, run id): the record is <records_dir>/<date>_<run_name>/<run id>.txt."""
    started = datetime.now()
    return started, f"{started:%H%M%S}-{uuid.uuid4().hex[:8]}"


def record_folder(args, started):
    return os.path.join(args.records_dir, f"{started:%Y-%m-%d}_{args.run_name}")


def check_outputs(args, started):
    """The record and checkpoint folders proven writable before anything slow starts; each is made only when
    its first file is written (a run that saves nothing leaves no empty folder)."""
    folders = dict(
        records_dir=record_folder(args, started),
        checkpoint_dir=os.path.join(args.checkpoint_dir, args.run_name),
    )
    for flag, folder in folders.items():
        existing = folder
        while not os.path.lexists(existing) and os.path.dirname(os.path.abspath(existing)) != existing:
            existing = os.path.dirname(os.path.abspath(existing))  # where makedirs will start
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise OutputError(f"cannot write to {folder}: {e.strerror}; pick another --{flag}") from None
    stale = glob.glob(os.path.join(glob.escape(folders["checkpoint_dir"]), "*.pt.tmp"))
    return [
        f"stale: {path} ({os.path.getsize(path) / 2**20:.0f} MiB), a checkpoint an earlier run was "
        f"writing when it was killed: delete it"
        for path in stale
    ]


def start_up(args, rank, world_size, device, stop):
    """What comes before anything slow: the planned stop, the batch split checked, the memory cap, compile's
    default, the run's id and its output folders (proven writable). Returns (start time, run id, notes for the
    record, which rank 0 also prints)."""
    args.grad_accum_steps(world_size)
    # not a field: the flags given as auto, which a continued run decides again on its own machine
    args.given_auto = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) is None}
    notes = [note for note in (stop.plan(args), cap_memory(args, device)) if note]
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    started, run_id = new_run_id()
    notes = notes + check_outputs(args, started) if rank == 0 else []
    for note in notes:
        with suppress(OSError):  # a console already gone: the record still gets the note
            print(note, flush=True)
    return started, run_id, notes


def check_data(args, train_loader, val_loader):
    """Refuse data that would make the run meaningless; notes for what is only worth knowing."""
    overlap = {os.path.realpath(p) for p in train_loader.files} & {os.path.realpath(val_loader.files[0])}
    if overlap:
        raise ConfigError(
            f"--input_bin also matches the validation shard {overlap.pop()}: training on it makes "
            f"val loss meaningless; narrow the glob"
        )
    if val_loader.shard_tokens < args.val_tokens + 1:  # the loader has the first val shard open
        raise ShardError(
            f"{val_loader.files[0]}: {val_loader.shard_tokens} tokens is fewer than "
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


def all_reduce(tensor, world_size, op=dist.ReduceOp.SUM):
    """The tensor reduced over all ranks, in place (SUM by default: gloo has no AVG)."""
    if world_size > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def cap_memory(args, device):
    """Caps this process's CUDA memory at --memory_limit_gb; a note where that cannot apply."""
    if args.memory_limit_gb and device.type != "cuda":
        return (
            f"memory_limit_gb: {args.memory_limit_gb} ignored: it caps GPU memory, and this run is on the CPU"
        )
    if args.memory_limit_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gb * 2**30 / total), device)
    return None


# ----------------------------------------------------------------------------------------------
# The micro-batch probe: the largest micro-batch that fits this device


def probe_fits(model, args, size, device, tokens=None, forward_kwargs=None):
    """Whether a real forward+backward of `size` sequences (of `tokens` tokens, default seq_len) fits, beside
    room for the optimizer states.
    `model` is the compiled model training will use: eager needs far more memory (unfused softcap and loss).
    It is called as training calls it (inputs and targets two views of one window, as the loader makes them;
    the step's forward_kwargs; a rotary offset for a piece of a sequence), so training reuses the graph."""
    state_bytes = optimizer_state_bytes(model)
    kwargs = dict(forward_kwargs or {}, **({"offset": torch.tensor(0, device=device)} if tokens else {}))
    reserve = window = None
    try:
        reserve = torch.empty(state_bytes, dtype=torch.uint8, device=device)
        window = torch.zeros(size * (tokens or args.seq_len) + 1, dtype=torch.long, device=device)
        model(window[:-1].view(size, -1), window[1:].view(size, -1), **kwargs).backward()
        return True
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            return False
        raise
    finally:
        del reserve, window
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def optimizer_state_bytes(model):
    """Room for what training adds beside the activations: Adam's and Muon's states and DDP's buckets."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def activation_bytes(model, args, size, device):
    """What the compiled forward keeps for the backward, as the model estimates it per token."""
    per_value = 2 if device.type == "cuda" else 4  # bf16 on CUDA, fp32 on the CPU
    return size * args.seq_len * model.activation_values_per_token() * per_value


def room_for_activations(free, reserved, memory_limit_gb, state_bytes):
    """Bytes left for a micro-batch's activations: the device's free memory (torch.cuda.mem_get_info, blind to
    the allocator's cap) or, under --memory_limit_gb, the cap less what the allocator already holds, whichever
    is less; less the optimizer states to come."""
    capped = memory_limit_gb * 2**30 - reserved if memory_limit_gb else math.inf
    return min(free, capped) - state_bytes


def activation_room(model, args, device):
    """room_for_activations on this CUDA device now (math.inf on a CPU)."""
    if device.type != "cuda":
        return math.inf
    free, reserved = torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device)
    return room_for_activations(free, reserved, args.memory_limit_gb, optimizer_state_bytes(model))


def smallest_of_all_ranks(chosen, world_size, device):
    """The smallest of every rank's choice, so all ranks run the same micro-steps; the peak memory counts
    from here, after the probe."""
    if world_size > 1:
        chosen = int(all_reduce(torch.tensor(chosen, device=device), world_size, dist.ReduceOp.MIN))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return chosen


def choose_device_batch_size(model, args, world_size, device, fits=None, forward_kwargs=None):
    """(micro-batch, note): the largest divisor of the per-device batch, at most 64 (the recipe), that fits;
    all ranks take the smallest choice. The probe starts at the largest size the estimate lets fit, so a
    small card compiles once or twice, not once per size. On a CPU it probes only with --compile (a warm-up
    that compiles the training graph), or with `fits` (tests)."""
    per_device = args.batch_size // world_size
    candidates = [size for size in range(min(64, per_device), 0, -1) if per_device % size == 0]
    if fits is None and device.type != "cuda" and not args.compile:
        return candidates[0], "auto on CPU: no memory probe, the largest candidate"
    estimate = ""
    if fits is None:
        free = activation_room(model, args, device)
        # a 64K sequence that cannot fit goes to --micro_tokens unprobed: no compile of a graph never used
        last_resort = [] if args.document_mask and args.micro_tokens is None else [1]
        candidates = [
            s for s in candidates if activation_bytes(model, args, s, device) <= free
        ] or last_resort
        gib = activation_bytes(model, args, (candidates or [1])[0], device) / 2**30
        estimate = f"; estimated activations {gib:.1f} GiB"
        estimate += f" at {(candidates or [1])[0]}" + (
            f" of {free / 2**30:.1f} GiB free" if free < math.inf else ""
        )
        fits = lambda size: probe_fits(model, args, size, device, forward_kwargs=forward_kwargs)  # noqa: E731
    # every rank takes the smallest choice, "none fits" (0) included: no rank branches to micro_tokens alone
    chosen = smallest_of_all_ranks(next((size for size in candidates if fits(size)), 0), world_size, device)
    if not chosen:
        where = f"in {device_name(device)}'s memory" if candidates else "by the estimate"
        raise ConfigError(f"not even one sequence of {args.seq_len} tokens fits {where}")
    larger = [size for size in candidates if size > chosen]
    return chosen, f"auto: the largest that fits{f'; {larger[-1]} did not' if larger else ''}{estimate}"


def choose_micro_steps(model, args, world_size, device, forward_kwargs=None):
    """Sets --device_batch_size, and --micro_tokens where auto and not one whole sequence fits (cutting them
    at document starts is exact only under --document_mask); the note for the record, or None. The probe
    calls the model with the first step's `forward_kwargs`, as training will."""
    if args.micro_tokens and args.micro_tokens < args.seq_len:
        args.device_batch_size = 1  # a micro-step is a piece of one sequence
    if args.device_batch_size is not None:
        return None
    try:
        args.device_batch_size, reason = choose_device_batch_size(
            model, args, world_size, device, None, forward_kwargs
        )
    except ConfigError:
        if args.micro_tokens is not None or not args.document_mask:
            raise
        args.micro_tokens, reason = choose_micro_tokens(model, args, world_size, device, None, forward_kwargs)
        args.device_batch_size, reason = 1, f"{reason}: --micro_tokens={args.micro_tokens}"
    if world_size > 1 and args.compile:
        # The probe compiled outside DDP, and dynamo splits a graph for DDP's bucketed all-reduce only when it
        # compiles it: forget the probe's graphs, so that training compiles once more inside DDP.
        torch._dynamo.reset()
        FirstCalls.times.clear()
    return f"device_batch_size: {args.device_batch_size} ({reason})"


def choose_micro_tokens(model, args, world_size, device, fits=None, forward_kwargs=None):
    """(tokens, note) for --micro_tokens=auto once not one whole sequence fits: the largest seq_len / 2^k (at
    least 1024) whose micro-step fits, the smallest choice of all ranks."""
    candidates = [args.seq_len >> k for k in range(1, 32) if args.seq_len >> k >= 1024]
    if fits is None:  # the estimate's sizes only (the smallest at the least): one compile per graph
        room, per_sequence = activation_room(model, args, device), activation_bytes(model, args, 1, device)
        candidates = [t for t in candidates if per_sequence * t / args.seq_len <= room] or candidates[-1:]
    fits = fits or (lambda tokens: probe_fits(model, args, 1, device, tokens, forward_kwargs))
    chosen = next((tokens for tokens in candidates if fits(tokens)), None)
    if chosen is None:
        raise ConfigError(f"not even a micro-step of 1024 tokens fits in {device_name(device)}'s memory")
    chosen = smallest_of_all_ranks(chosen, world_size, device)
    return chosen, f"auto: one sequence of {args.seq_len} tokens does not fit; micro-steps of {chosen} do"


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume

CHECKPOINT_FORMAT = "train_gpt2 checkpoint"
CHECKPOINT_KEYS = {"hyperparameters", "step", "model", "optimizers", "data", "rng", "train_ms"}
CHECKPOINT_KEYS |= {"timed_steps", "record"}


def load_checkpoint(path):
    """The checkpoint dict, loaded safely (weights_only: tensors and plain data, no code)."""
    if not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "a dangling link" if os.path.islink(path) else "nothing"
        raise CheckpointError(f"no checkpoint at {path}: {what} there")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle with code, ...: all mean "not a checkpoint we wrote"
        # the first sentence only: the advice torch gives after it (weights_only=False) is unsafe
        reason = " ".join(str(e).split()).split(". ")[0]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a train_gpt2.py checkpoint")
    if "muon_momentum" in checkpoint and "adam" in checkpoint:  # written before optimizers were saved by name
        muon = dict(momentum_buffers=checkpoint.pop("muon_momentum"))
        checkpoint["optimizers"] = dict(adam=checkpoint.pop("adam"), muon=muon)
    return checkpoint


def load_trained_model(path, cls, build):
    """(model built by `build(args)` with the checkpoint's weights, its `cls` hyperparameters, its step), for
    tools such as sample.py; a CheckpointError for anything but a complete checkpoint of finite weights."""
    checkpoint = load_checkpoint(path)
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        args = cls(**{k: v for k, v in checkpoint["hyperparameters"].items() if k in fields})
        model = build(args)
        model.load_state_dict(checkpoint["model"])
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e} entry: not a complete train_gpt2.py checkpoint") from None
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:  # wrong types or shapes, bad values
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: the weights do not fit the model its hyperparameters describe ({first})"
        ) from None
    if not all(t.isfinite().all() for t in model.state_dict().values()):
        raise CheckpointError(
            f"{path} holds NaN or infinite weights (a diverged run?): use an earlier checkpoint"
        )
    return model, args, checkpoint.get("step")


def resolve_args(cls, argv, description=""):
    """Hyperparameters from the flags; with --resume, the checkpoint's training knobs under given flags.

    A resume may change any flag but the model's shape (refused in one line) and is told so in the record, a
    `resume_changes:` note per training flag that differs from the checkpoint's. --batch_size and --seq_len
    continue at the very token the checkpoint stopped at, in windows of the new size; a changed --input_bin
    continues at the same shard number and token of the files it matches, refused in one line (by the loader)
    when they have fewer shards or a shorter shard: never a silent start over at token 0 of other data."""
    flags = parse_flags(cls, argv, description)
    if not flags.get("resume"):
        return with_recipe(cls, flags), None
    path = flags["resume"]
    path, checkpoint = latest_checkpoint(cls, flags) if path == "latest" else (path, load_checkpoint(path))
    shape = fields_of_kind(cls, "shape")
    missing = CHECKPOINT_KEYS - checkpoint.keys() or set(shape) - checkpoint["hyperparameters"].keys()
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(sorted(missing))}: not a complete training checkpoint"
        )
    known = fields_of_kind(cls, "recipe", "shape", "output")
    inherited = {k: v for k, v in checkpoint["hyperparameters"].items() if k in known}
    args = with_recipe(cls, {**flags, "resume": path}, inherited)
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
    checkpoint["notes"] = checkpoint.get("notes", []) + [  # for the record: build_run adds them
        f"resume_changes: --{name}={flag_text(getattr(args, name))} (the checkpoint's: {flag_text(old)})"
        for name, old in inherited.items()
        if getattr(args, name) != old and name in fields_of_kind(cls, "recipe")
    ]
    return args, checkpoint


def checkpoints_by_step(folder):
    """The *.pt entries of `folder`, highest step (in save_checkpoint's names) first, newest first among
    equals; names without a step last. Entries, not files: a folder or a dangling link is among them."""
    try:
        names = [name for name in os.listdir(folder) if name.endswith(".pt")]
    except OSError:
        return []
    steps = [int(m[1]) if (m := re.search(r"-step(\d+)\.pt$", name)) else -1 for name in names]
    paths = [os.path.join(folder, name) for name in names]
    order = sorted(zip(steps, [os.lstat(p).st_mtime for p in paths], paths), reverse=True)
    return [path for *_, path in order]


def latest_checkpoint(cls, flags):
    """--resume=latest: (path, checkpoint) of the highest step among this run_name's readable checkpoints,
    its earlier parts' included; each broken one skipped is named on stderr and in the record."""
    run_name = flags.get("run_name", cls.run_name)
    folder = os.path.join(flags.get("checkpoint_dir", cls.checkpoint_dir), run_name)
    skipped = []
    for path in checkpoints_by_step(folder):
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as e:
            skipped.append(f"resume_skipped: {e}")
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"train_gpt2.py: --resume=latest skips a broken checkpoint: {e}", file=sys.stderr)
            continue
        checkpoint["notes"] = skipped
        return path, checkpoint
    raise CheckpointError(
        f"--resume=latest found no {'readable ' if skipped else ''}checkpoint of --run_name={run_name} in "
        f"{folder}/{f' ({len(skipped)} broken: {skipped[0][16:]})' if skipped else ''}"
    )


def checkpoint_path(run, step):
    return os.path.join(run.args.checkpoint_dir, run.args.run_name, f"{run.run_id}-step{step:06d}.pt")


def prune_checkpoints(path, keep, parts):
    """Keep the checkpoint just written and the `keep` - 1 others of this run with the highest steps, the
    part it was resumed from included (`parts`: run ids); delete the rest. Other runs of the same run_name
    are never touched, nor files named otherwise than save_checkpoint names them."""
    ours = [p for p in checkpoints_by_step(os.path.dirname(path)) if os.path.basename(p).startswith(parts)]
    others = [p for p in ours if p != path]
    for other in others[keep - 1 :]:
        if re.fullmatch(r"\d{6}-[0-9a-f]{8}-step\d{6,}\.pt", os.path.basename(other)) and (
            os.path.isfile(other) or os.path.islink(other)
        ):
            os.remove(other)


def save_checkpoint(run, step, record):
    """Everything a resumed run needs, written atomically (temp file, then rename) by rank 0, which prunes
    older ones and returns its path; a failure to write it ends every rank (agreed by an all-reduce). The
    optimizers and the loader are saved through their state_dict(), which every rank calls: Muon's gathers
    every rank's momentum, so a checkpoint resumes on any world size."""
    path = checkpoint_path(run, step) if run.rank == 0 else None
    state = dict(
        format=CHECKPOINT_FORMAT,
        hyperparameters=dataclasses.asdict(run.args),
        step=step,
        model=run.model.state_dict(),
        optimizers={name: optimizer.state_dict() for name, optimizer in run.optimizers.items()},
        data=run.train_loader.state_dict(),
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
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)  # deleted mid-run: made again
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # never a half-written file under the final name
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as some RuntimeError of its own
        full = getattr(e, "errno", None) == errno.ENOSPC or free_bytes(os.path.dirname(path)) < 2**20
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        error = output_error(path, OSError(errno.ENOSPC if full else errno.EIO, str(e)))
    if all_reduce(torch.tensor(float(error is not None), device=run.device), run.world_size).item():
        raise error or PeerFailure("rank 0 could not write the checkpoint")
    if path is not None:
        parent = os.path.basename(run.args.resume).split("-step")[0] if run.args.resume else run.run_id
        prune_checkpoints(path, run.args.keep_checkpoints, (f"{run.run_id}-", f"{parent}-"))
    return path


def load_optimizer_state(optimizer, saved):
    """A saved optimizer state under this run's settings of each group (lrs, betas, kernel): Adam puts its
    step counters where the groups' kernel wants them, so a CPU checkpoint resumed on CUDA takes the fused
    kernel."""
    if "param_groups" in saved:
        own = optimizer.state_dict()["param_groups"]
        saved = dict(
            saved, param_groups=[dict(o, params=s["params"]) for o, s in zip(own, saved["param_groups"])]
        )
    optimizer.load_state_dict(saved)


def restore_checkpoint(checkpoint, path, model, optimizers, train_loader, device):
    """Load a checkpoint into a freshly built run's parts; returns (the step to continue from, the clock)."""
    try:
        model.load_state_dict(checkpoint["model"])
        for name, optimizer in optimizers.items():
            load_optimizer_state(optimizer, checkpoint["optimizers"][name])
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
    broken = [
        name for name, p in model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()
    ]
    if broken:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights ({broken[0]}{' and more' if broken[1:] else ''}): "
            f"the run had diverged when it was saved; resume from an earlier checkpoint"
        )
    train_loader.load_state_dict(data)
    return step, Clock(device, train_ms, timed_steps)


def free_bytes(folder):
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # the folder is gone
        return math.inf


# ----------------------------------------------------------------------------------------------
# The run, and the bookkeeping of its loop


@dataclasses.dataclass
class Run:
    """One run's parts, built by the recipe's build_run() and stepped by its train(). The harness saves and
    restores the optimizers and the loader through their state_dict() and load_state_dict() only."""

    args: object  # the recipe's Hyperparameters
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # the parameters, which the optimizers and checkpoints hold
    training_model: torch.nn.Module  # the model as train() calls it: compiled, and in DDP on several ranks
    optimizers: dict  # name -> optimizer
    train_loader: object
    val_loader: object
    accum_steps: int
    start_step: int = 0
    clock: Clock = None
    started: datetime = None  # the record's folder is dated by it
    run_id: str = ""


class Monitor:
    """What train() hands over a few times a step: when to validate and to save, the one vote of every rank
    per step (the loss, a stop, a save), the step and progress lines. As a context manager it holds the
    record: it opens it, and on the way out writes its last lines however the run ended."""

    def __init__(self, run, stop, recipe, notes):
        self.run, self.args, self.stop, self.recipe, self.notes = run, run.args, stop, recipe, notes
        self.step, self.val_loss, self.val_step = run.start_step, float("nan"), None  # for the summary
        self.save_agreed = self.stop_agreed = False
        self.data_error = self.stopped = None
        self.lost_context = []  # per sequence: tokens that lost context at a --micro_tokens cut
        self.last_save = self.progress_at = time.monotonic()
        self.progress_step, self.exit_status = run.start_step, 0

    def _start_clock_after(self, step):
        if step == self.run.start_step + self.args.untimed_steps:
            self.run.clock.start()  # after compilation and warmup, in every (resumed) process

    def validation_due(self, step):
        self.stop.check()
        every = self.args.val_loss_every
        return step == self.args.num_iterations or bool(every and step % every == 0 and not self.stop_agreed)

    def untimed(self):
        return self.run.clock.paused()

    def validated(self, step, val_loss):
        """The val line; a stop asked for during validation is agreed on now, so it saves at this step."""
        self.stop.check()
        self.val_loss, self.val_step = val_loss, step
        self.log(f"step:{step}/{self.args.num_iterations} val_loss:{val_loss:.4f} {self.run.clock}")
        if self.run.start_step < step < self.args.num_iterations and not self.stop_agreed:
            wanted = torch.tensor(float(self.stop.requested()), device=self.run.device)
            self.stop_agreed = all_reduce(wanted, self.run.world_size).item() > 0
            if self.stop_agreed:
                self.run.clock.stop()

    def checkpoint_due(self, step):
        """A save every rank agreed on, a stop (which saves first: torchrun kills its workers 30 s after it
        forwards a signal), or the end of a run that saves at all."""
        if step == self.args.num_iterations:  # the run is done: only --save_final decides
            return step > self.run.start_step and self.args.save_final
        return step > self.run.start_step and (self.save_agreed or self.stop_agreed)

    def save(self, step):
        with self.untimed():
            path = save_checkpoint(self.run, step, self.log.path)  # and prunes the older ones
        self.last_save = time.monotonic()
        self.log(f"checkpoint: {path}", record=self.stop_agreed or step == self.args.num_iterations)

    def end(self, step):
        """None at the last step; at a stop every rank agreed on, why (a data error ends the run here, raised
        on the rank that met it, which names it, and as a peer failure on the others)."""
        if step == self.args.num_iterations:
            if not self.args.save_final:
                self.log("checkpoint: none (--save_final=false)")
            if self.lost_context:
                self.log(f"context: {sum(self.lost_context)} train tokens lost context at micro_tokens cuts")
            return None
        failed = all_reduce(
            torch.tensor(float(self.data_error is not None), device=self.run.device), self.run.world_size
        )
        if self.data_error:
            raise data_error_saved(self.data_error, step)
        if failed.item():
            raise PeerFailure("another rank met a data error")
        self.stopped = f"{self.log.error or self.stop.reason()} at step {step}: checkpoint saved"
        return self.stopped

    def after_step(self, step, train_loss, data_error=None):
        """The one host sync of a step: every rank agrees on the mean loss, a stop (a signal, the planned
        time, a record the disk cannot take, a data error met by the loader's prefetch) and a save."""
        run, args = self.run, self.args
        self.stop.check()
        self.data_error = data_error
        stop_wanted = self.stop.requested() or self.log.error is not None or data_error is not None
        save_wanted = bool(args.save_every and step % args.save_every == 0) or bool(
            args.save_every_minutes and time.monotonic() - self.last_save >= 60 * args.save_every_minutes
        )
        votes = torch.stack(
            [train_loss, torch.full_like(train_loss, stop_wanted), torch.full_like(train_loss, save_wanted)]
        )
        loss_sum, stop_votes, save_votes = all_reduce(votes, run.world_size).tolist()
        run.clock.lap()
        train_loss, self.stop_agreed, self.save_agreed = (
            loss_sum / run.world_size,
            stop_votes > 0,
            save_votes > 0,
        )
        self.step = step
        self.stop.phase = "training"  # from here a signal waits for the step boundary
        self.log(f"step:{step}/{args.num_iterations} train_loss:{train_loss:.4f} {run.clock}", console=False)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"train loss is {train_loss} at step {step}: lower the learning rates or check the data"
            )
        self._start_clock_after(step)
        if self.stop_agreed or step == args.num_iterations:
            run.clock.stop()
        if args.compile and step == run.start_step + args.untimed_steps + 1:  # the first timed step is done
            self.log(compile_line())
        if args.progress_seconds and time.monotonic() - self.progress_at >= args.progress_seconds:
            rate = (step - self.progress_step) / (time.monotonic() - self.progress_at)
            self.log(self._progress_line(step, train_loss, rate), record=False)
            self.progress_at, self.progress_step = time.monotonic(), step

    def _progress_line(self, step, train_loss, steps_per_s):
        """The console's progress; the ETA comes from timed steps only, once there are any."""
        args, clock = self.args, self.run.clock
        line = f"step {step}/{args.num_iterations} train_loss {train_loss:.4f} | {steps_per_s:.2f} steps/s"
        if not clock.timed_steps:
            return (
                line
                + f" | untimed warmup steps ({args.untimed_steps}{', compiling' if args.compile else ''})"
            )
        eta = (args.num_iterations - step) * clock.train_ms / clock.timed_steps / 1000
        return (
            f"{line} {steps_per_s * args.batch_size * args.seq_len:,.0f} tokens/s | train_time "
            f"{timedelta(seconds=round(clock.train_ms / 1000))} eta {timedelta(seconds=round(eta))}"
        )

    def __enter__(self):
        """Opens the record. A signal meanwhile waits until it is open, then ends it in its last lines."""
        self.stop.phase = "opening"
        try:
            self.log = open_record(self.run, self.recipe, self.notes)
        finally:
            self.stop.phase = "start-up"
        self._start_clock_after(self.run.start_step)
        if self.stop.signal:
            why = "before the first step was done: nothing to save"
            self.__exit__(Interrupted, Interrupted(self.stop.signal, why), None)  # raises it
        return self

    def __exit__(self, kind, error, traceback):
        """The record's last lines whatever ended the run. A data error the loop did not save before (a
        deleted val shard) is saved here on a single rank: the model is whole, at the last finished step.
        Several ranks cannot agree on it safely: they end unsaved. Raises the error as the user should see it;
        a clean end or a stop leaves the exit status in `exit_status`."""
        run, stop = self.run, self.stop
        error = interruption(error) or error  # a signal while inductor compiles comes wrapped
        if error is not None:
            if isinstance(error, ShardError) and run.world_size == 1 and self.step > run.start_step:
                error = error if "checkpoint saved" in str(error) else self._save_before(error)
            if isinstance(error, torch.OutOfMemoryError):
                error = TrainError(
                    f"out of GPU memory: --device_batch_size={self.args.device_batch_size} does not fit in "
                    f"{device_name(run.device)}; use --device_batch_size=auto or a smaller divisor"
                )
            self.stopped = first_failure(error, run.rank, run.world_size)
            if run.world_size > 1 and not self.stopped.startswith(f"rank {run.rank} "):
                error = TrainError(self.stopped)
        stop.phase = "finishing"
        stopped = self.stopped
        if stopped and error is None:
            stopped += f"; continue with: {continue_command(run, self.step)}"
        lines = [f"stopped: {stopped}"] if stopped else []
        if self.args.compile and run.clock.first_started is None:  # no step was timed: no compile line yet
            lines.insert(0, compile_line())
        for line in lines + [self._summary_line(finished=not stopped)]:
            self.log(line)  # on the console too, where it survives a full disk
        self.log.close()
        stop.phase = "shutdown"
        # DDP holds the process group until freed: free it, and its reference cycles, before the group goes
        vars(run).clear()
        gc.collect()
        if error is not None or self.log.error:
            raise error or self.log.error
        self.exit_status = 128 + stop.signal if stop.signal and stopped else 0  # a planned stop is no failure
        return False

    def _save_before(self, error):
        try:
            self.log(f"checkpoint: {save_checkpoint(self.run, self.step, self.log.path)}")
            return data_error_saved(error, self.step)
        except TrainError as e:
            return ShardError(f"{error} (no checkpoint: {e})")

    def _summary_line(self, finished):
        """`key:value` fields only: tools split on them. A stopped run has a last val loss, never a final."""
        run, clock, fields = self.run, self.run.clock, []
        if finished:
            fields.append(f"final_val_loss:{self.val_loss:.4f}")
        elif self.val_step is not None:
            fields.append(f"last_val_loss:{self.val_loss:.4f} last_val_step:{self.val_step}")
        fields.append(f"train_time:{clock.train_ms:.0f}ms")
        if clock.timed_steps:
            tokens_per_s = (
                self.args.batch_size * self.args.seq_len * clock.timed_steps / (clock.train_ms / 1000)
            )
            fields.append(
                f"step_avg:{clock.train_ms / clock.timed_steps:.2f}ms tokens_per_s:{tokens_per_s:.0f}"
            )
        startup = (
            clock.first_started or time.monotonic()
        ) - self.stop.started  # flags to the first timed step
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if self.args.compile else 0
        fields.append(f"startup_s:{startup:.1f} compiled_graphs:{graphs}")
        fields.append(f"peak_memory:{peak_memory_mib(run.device)}MiB")
        # what a card must hold, the allocator's cache included (no CPU counterpart)
        if run.device.type == "cuda":
            fields.append(f"peak_reserved:{torch.cuda.max_memory_reserved(run.device) // 2**20}MiB")
        fields.append(f"world_size:{run.world_size}")
        return "summary: " + " ".join(fields) + f" device:{device_name(run.device)}"


def data_error_saved(error, step):
    return ShardError(
        f"{error} (at step {step}: checkpoint saved; resume with --resume=latest once it is fixed)"
    )


# ----------------------------------------------------------------------------------------------
# Signals and the end of a run


def process_start_time():
    """When this process started, before its imports (Linux's /proc: boot time plus the process's start in
    clock ticks), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def interruption(error):
    """The Interrupted behind `error`, however deep another exception wrapped it (inductor wraps whatever a
    signal raises while it compiles), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class Interrupted(Exception):
    """A signal that ends the run where it is: exit status 128 + its number."""

    def __init__(self, signum, why):
        self.message = f"{signal.Signals(signum).name} {why}"  # kept: a compiler may append to the args
        super().__init__(self.message)
        self.exit_code = 128 + signum


class StopRequest:
    """SIGINT, SIGTERM and every other signal that means "end now" without meaning "lose the work" (SIGHUP:
    SSH dropped or terminal closed; SIGUSR1: a scheduler's warning; SIGQUIT): before training, stop at once;
    during it, checkpoint and stop at the next step boundary, exit 128 + n (a Ctrl-C more than 5 s later
    aborts at once: torchrun's forwarded copy of the first is not a second); once the record is closed,
    exit at once without a traceback."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT)

    deadline, planned = math.inf, ""  # plan() sets them for this run

    def __init__(self, started=None):
        """`started`: the wall-clock time the stop plan and startup_s count from, the process's own start."""
        self.signal, self.since, self.previous, self.phase = None, 0.0, {}, "start-up"
        self.started_at = started or process_start_time()
        self.started = time.monotonic() - (time.time() - self.started_at)  # the same moment, monotonic

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = self.previous_hook

    def _unraisable(self, unraisable):
        """An Interrupted raised inside a callback that cannot raise (a weakref's, say) is lost there:
        check() raises it again at the next step of the loop, so its report is noise."""
        if not isinstance(unraisable.exc_value, Interrupted):
            self.previous_hook(unraisable)

    def check(self):
        """Raises a signal that came before the first step was done, should a callback have swallowed it."""
        if self.signal and self.phase == "start-up":
            raise Interrupted(self.signal, "before the first step was done: nothing to save")

    def _handle(self, signum, frame):
        if self.phase == "finishing":
            return  # the record's last lines take milliseconds: torchrun's SIGTERM to the others waits
        if self.phase == "shutdown":
            os._exit(128 + signum)  # the record is closed: nothing is lost
        if self.phase == "opening":
            self.signal = signum  # the record is being opened: it ends in its last lines first
            return
        if self.phase == "start-up":
            self.signal = signum
            # what torch warns about the compile this interrupts (a traceback of the forward) is noise now
            warnings.filterwarnings("ignore")
            self.check()
        if self.signal is None:
            self.signal, self.since = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.since > 5:
            raise Interrupted(signum, "a second time: stopped at once, no checkpoint")

    def plan(self, args):
        """A planned stop, counted from the process's start: --max_hours after it, or the first --stop_at
        HH:MM of the local clock after it. Returns the note that says when, or None."""
        self.deadline = math.inf
        if args.max_hours:
            self.deadline, self.planned = (
                self.started + 3600 * args.max_hours,
                f"--max_hours={args.max_hours}",
            )
        if args.stop_at:
            start = datetime.fromtimestamp(self.started_at)
            at = start.replace(
                hour=int(args.stop_at[:2]), minute=int(args.stop_at[3:]), second=0, microsecond=0
            )
            at += timedelta(days=at <= start)  # the next such time
            if self.started + (at - start).total_seconds() < self.deadline:
                self.deadline = self.started + (at - start).total_seconds()
                self.planned = f"--stop_at={args.stop_at}"
        if self.deadline == math.inf:
            return None
        at = datetime.fromtimestamp(self.started_at + self.deadline - self.started)
        left = timedelta(seconds=max(0, round(self.deadline - time.monotonic())))
        return f"planned_stop: {at:%Y-%m-%d %H:%M:%S} ({self.planned}), in {left}"

    def requested(self):
        """A signal came, or the planned stop time has passed: stop at this step boundary."""
        return self.signal is not None or time.monotonic() >= self.deadline

    def reason(self):
        return signal.Signals(self.signal).name if self.signal else f"{self.planned} reached"


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


# flags that name files: a printed command gives them absolute, so it runs from any folder
PATH_FLAGS = ("input_bin", "input_val_bin", "records_dir", "checkpoint_dir")


def absolute_flag(name, value):
    """A path flag's relative `value` made absolute (in the --input_* globs the folder is escaped: a path,
    never a pattern); any other value as it is."""
    if name not in PATH_FLAGS or not value or os.path.isabs(value):
        return value
    return os.path.join(glob.escape(os.getcwd()) if name.startswith("input") else os.getcwd(), value)


def launcher(run):
    """(environment assignments, argv) that start the trainer again as this run was started: through run.sh
    (TRAIN_GPT2_LAUNCHER: its NAME=value variables, one a line, then its path), torchrun, or plainly."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if os.environ.get("TRAIN_GPT2_LAUNCHER"):
        *variables, run_sh = os.environ["TRAIN_GPT2_LAUNCHER"].split("\n")
        variables += [f"NPROC_PER_NODE={local}", f"PYTHON={sys.executable}"]
        return [variable.split("=", 1) for variable in variables], [run_sh]
    script = os.path.abspath(sys.argv[0])
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return [], [sys.executable, script]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if local == run.world_size:
        return [], [*torchrun, "--standalone", "--local-addr=127.0.0.1", f"--nproc_per_node={local}", script]
    # several nodes: the same rendezvous, on every node
    endpoint = f"{os.environ.get('MASTER_ADDR', 'MASTER_ADDR')}:{os.environ.get('MASTER_PORT', 29500)}"
    nodes = [f"--nnodes={run.world_size // local}", f"--nproc_per_node={local}", "--rdzv-backend=c10d"]
    return [], [*torchrun, *nodes, f"--rdzv-endpoint={endpoint}", script]


def continue_command(run, step):
    """The command that continues a stopped run from its checkpoint of `step` (that one: `latest` could be
    another run's of the same name), pasted as is in any folder: its launcher, the flags a resume does not
    inherit or repeats (their kinds), and those that name files relative to this run's folder. Several
    nodes: the command of this node."""
    args, (variables, argv) = run.args, launcher(run)
    names = dict.fromkeys([*fields_of_kind(type(args), "machine", "output"), *PATH_FLAGS])
    names = [name for name in names if name not in getattr(args, "given_auto", ())]  # auto decides again
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    run_sh = bool(variables)  # starts the trainer in run.sh's folder: a relative default means the same there
    flags = [
        f"--{name}={flag_text(absolute_flag(name, value))}"
        for name in names
        if (value := getattr(args, name)) != defaults[name]
        or (absolute_flag(name, value) != value and not run_sh)
    ]
    checkpoint = os.path.abspath(checkpoint_path(run, step))
    # a NAME=value quoted whole would be a command's name: only its value is quoted
    assignments = [f"{name}={shlex.quote(value)}" for name, value in variables]
    command = " ".join([*assignments, shlex.join([*argv, f"--resume={checkpoint}", *flags])])
    if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) < run.world_size:
        own = ", with its own NODE_RANK and LOCAL_ADDR" if run_sh else ""
        command += f" (on every node{own}; every node must see {os.path.dirname(checkpoint)})"
    return command


def main(run, argv):
    """run(argv, stop)'s exit status: the recipe's run from its flags. A project error ends in one line on
    stderr, a signal in 128 + n."""
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
    except Exception as e:
        interrupted = interruption(e)
        if interrupted is None:
            raise
        with suppress(OSError):  # a terminal that hung up
            print(f"train_gpt2.py: stopped: {interrupted.message}", file=sys.stderr, flush=True)
        return interrupted.exit_code
