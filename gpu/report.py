"""The GPU report: where one optimizer step of train_gpt2.py spends its time, and what each speed habit gains.

    python gpu/report.py              # the full 124M config on one GPU: 8 micro-steps of 64 x 1024 tokens
    python gpu/report.py --preset tiny  # the same plumbing on a CPU with a tiny model (the dry run)

The run is built by train_gpt2.build_run on synthetic shards and stepped by the trainer's own loop,
train_gpt2.train(run, monitor), with the run's training_model, optimizers, train_loader and clock fields
replaced by marked stand-ins that mark points of each step: CUDA events on a GPU (when the GPU gets
there, so time it spends waiting for the host counts to the part it waits for), time.perf_counter on a
CPU. The numbers are the trainer's own step, host sync included. Lines come most valuable first:

0. Compile: the warm-up steps on the wall clock, and the trainer's own `compile:` line (harness.FirstCalls:
   each graph's first call; inductor's cache hits and misses).
1. Headline, after --headline_steps steps: ms per forward+backward micro-step and its MFU, the step's ms
   and tokens/s.
2. Breakdown (medians over --steps steps): data (next_batch, and the prefetch of the next batch),
   forward+backward (per micro-step, and its MFU), Adam, Muon (Newton-Schulz and the gather), host sync
   (zero_grad, the votes all-reduce, .tolist()) and other (the step time left over: lr setting,
   logging, the loop); then peak memory and the speed targets, each PASS or MISS. A timing never fails it.
3. A/B, interleaved: the step time with every item on against the same with one item off, on and off in
   ABBA order, --repeats samples of each side (coordinate-descent tuning needs a cold compile: gpu/check.sh's
   GPU_CHECK_AB=1 runs the trainer with and without it). Off means:
     compiled Newton-Schulz      muon.orthogonalize set back to the eager newton_schulz_orthogonalize
     prefetch                    the loader's prefetch() never called: next_batch() loads after the sync
     per-shard vocab check       the old per-batch check added back (max of the batch's window, on the host)
   With compile off (the CPU) the first compares the eager code with itself: it is marked stand-in.

Items that would not finish within --timeout are skipped, and say so. A SIGTERM (gpu/check.sh's deadline)
prints what was measured up to then (the steps done, as headline and breakdown) and exits 143.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import harness  # noqa: E402
import train_gpt2  # noqa: E402
from gpu import trainer_run  # noqa: E402

# Steps run in stretches (train() is called again for each); these keep the schedule flat and every pause off.
HARNESS_FLAGS = [
    "--num_iterations=1000000",
    "--warmdown_iters=0",
    "--untimed_steps=0",
    "--val_loss_every=0",
    "--save_every=0",
    "--save_every_minutes=0",
]
TINY_FLAGS = ["--num_layers=2", "--model_dim=64", "--num_heads=2", "--vocab_size=256", "--seq_len=32"]
TINY_FLAGS += [
    "--batch_size=8",
    "--device_batch_size=4",
    "--val_tokens=512",
    "--device=cpu",
    "--compile=false",
]
TINY_FLAGS += ["--progress_seconds=0", "--eot_token=255"]  # a document token inside the tiny vocabulary
PRESETS = {
    "full": dict(
        flags=["--batch_size=512", "--device_batch_size=64", "--val_tokens=524288", "--device=cuda"],
        warmup=2,  # step 1 compiles (tens of seconds to minutes), step 2 runs the compiled graphs once
        steps=10,
        repeats=4,
    ),
    "tiny": dict(flags=TINY_FLAGS, warmup=2, steps=6, repeats=3),
}
PARTS = ("data", "forward+backward", "Adam", "Muon", "host sync", "other")
TARGETS = [  # the speed targets for one H100 80GB: (what, result key, at most, unit)
    ("forward+backward per micro-step <= 130 ms", "micro_step_ms", 130.0, "ms"),
    ("stretch: forward+backward per micro-step <= 115 ms", "micro_step_ms", 115.0, "ms"),
    ("Muon <= 15 ms per step", "muon_ms", 15.0, "ms"),
    ("outside forward+backward <= 5% of the step", "outside_pct", 5.0, "%"),
]


@dataclass(frozen=True)
class Variant:
    """Which of the speed items are on; the trainer runs with all of them."""

    compiled_ns: bool = True
    prefetch: bool = True
    per_shard_vocab_check: bool = True


AB_ITEMS = [
    ("per_shard_vocab_check", "per-shard vocab check"),
    ("prefetch", "prefetch"),
    ("compiled_ns", "compiled Newton-Schulz"),
]


class StretchDone(Exception):
    """Raised by the loader stand-in to leave train() after a stretch's steps."""


class Terminated(Exception):
    """SIGTERM: gpu/check.sh's deadline for this stage. Carries the steps measured in the cut stretch."""

    steps = ()


def raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals this process, then its group: once
    raise Terminated


def unique_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Timeline:
    """Named points of the step loop; the segment before each point takes the point's name. With `wall`
    (the warm-up) every point syncs the device and reads the host clock, so compile time shows; each point
    also notes torch._dynamo's graph count."""

    def __init__(self, device, wall=False):
        self.cuda, self.wall, self.points, self.step_walls = device.type == "cuda" and not wall, wall, [], []
        self.device, self.graphs = device, []

    def mark(self, name, step_start=False):
        if self.cuda:
            point = torch.cuda.Event(enable_timing=True)
            point.record()
        else:
            if self.wall and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            point = time.perf_counter()
        self.graphs.append(unique_graphs())
        self.points.append((name, point, step_start))
        if step_start:
            self.step_walls.append(time.perf_counter())  # the host has synced at the end of the step before

    def steps(self):
        """One {part: ms} per step, from one step start to the next (call after a device sync); `micro_steps`
        lists each micro-step's forward+backward, and `step` is the host's wall time of the step."""
        steps, current, last, last_graphs = [], None, None, 0
        for (name, point, step_start), graphs in zip(self.points, self.graphs):
            if current is not None:
                ms = last.elapsed_time(point) if self.cuda else 1000 * (point - last)
                current[name] = current.get(name, 0.0) + ms
                current["graphs"][name] = current["graphs"].get(name, 0) + graphs - last_graphs
                if name == "forward+backward":
                    current["micro_steps"].append(ms)
            if step_start:
                if current is not None:
                    steps.append(current)
                current = dict(micro_steps=[], graphs={})
            last, last_graphs = point, graphs
        for step, start, end in zip(steps, self.step_walls, self.step_walls[1:]):
            step["step"] = 1000 * (end - start)
        return steps


class StandIn:
    """Forwards every attribute train() uses to the real object; subclasses mark points around calls."""

    def __init__(self, target, timeline):
        self.target, self.timeline = target, timeline

    def __getattr__(self, name):
        return getattr(self.target, name)


class MarkedLoader(StandIn):
    def __init__(self, loader, timeline, steps, variant, vocab_check):
        super().__init__(loader, timeline)
        self.steps_left, self.variant, self.vocab_check = steps, variant, vocab_check

    def next_batch(self):
        self.timeline.mark("other", step_start=True)  # the step before ends here: its logging and the loop
        if self.steps_left == 0:
            raise StretchDone
        self.steps_left -= 1
        if not self.variant.per_shard_vocab_check and not self.variant.prefetch:
            self.vocab_check()
        batch = self.target.next_batch()
        self.timeline.mark("data")
        return batch

    def prefetch(self):
        self.timeline.mark("forward+backward")  # the last micro-step's backward is queued
        if self.variant.prefetch:
            if not self.variant.per_shard_vocab_check:
                self.vocab_check()  # the old check ran inside the load, so here in the prefetch
            self.target.prefetch()
        self.timeline.mark("data")


class MarkedModel(StandIn):
    def __init__(self, model, timeline, accum_steps):
        super().__init__(model, timeline)
        self.accum_steps, self.calls = accum_steps, 0

    def __call__(self, x, y, **kwargs):
        first = self.calls % self.accum_steps == 0
        self.timeline.mark("other" if first else "forward+backward")  # the micro-step before is queued
        self.calls += 1
        return self.target(x, y, **kwargs)


class MarkedOptimizer(StandIn):
    def __init__(self, optimizer, timeline, name):
        super().__init__(optimizer, timeline)
        self.name = name

    def step(self):
        self.timeline.mark("other")  # lr and momentum setting
        self.target.step()
        self.timeline.mark(self.name)


class SyncClock(harness.Clock):
    """The trainer's clock; its lap follows the one host sync of the step."""

    def __init__(self, device, timeline):
        super().__init__(device)
        self.timeline = timeline

    def lap(self, count_step=True):
        super().lap(count_step)
        self.timeline.mark("host sync")


class HarnessLog(harness.RunLog):
    """The trainer's record writer (its step lines go to a file, as in a run); keeps the train losses and
    prints nothing."""

    def __init__(self, path):
        super().__init__(path)
        self.losses = []

    def __call__(self, line="", console=True, record=True):
        if " train_loss:" in line:
            self.losses.append(float(line.split(" train_loss:")[1].split()[0]))
        super().__call__(line, console=False, record=record)


class PerBatchVocabCheck:
    """The old per-batch vocabulary check: the max of each batch's window of the uint16 shard,
    on the host, before the copy. Keeps its own place in the shard (the loader's is private), times itself."""

    def __init__(self, path, window, vocab_size):
        self.tokens, self.window, self.vocab_size, self.position = (
            train_gpt2.read_shard(path),
            window,
            vocab_size,
            0,
        )
        self.host_ms = []

    def __call__(self):
        start = time.perf_counter()
        if self.position + self.window > len(self.tokens):
            self.position = 0
        top = self.tokens[self.position : self.position + self.window].max()
        self.position += self.window - 1
        if top >= self.vocab_size:
            raise harness.ShardError(f"token id {top} is not below --vocab_size={self.vocab_size}")
        self.host_ms.append(1000 * (time.perf_counter() - start))


class Harness:
    """One training run built as the trainer builds it (train_gpt2.build_run), stepped by train_gpt2.train
    in stretches of a few steps, with marked stand-ins in the run's fields."""

    def __init__(self, args, device, log_path):
        self.args, self.device = args, device
        self.trainer_run, self.notes = train_gpt2.build_run(args, 0, 1, device, None)
        run = self.trainer_run
        self.model, self.compiled = run.model, run.training_model
        self.adam, self.muon = run.optimizers["adam"], run.optimizers["muon"]
        self.loader, self.step, self.accum_steps = run.train_loader, run.start_step, run.accum_steps
        self.compiled_ns = self.muon.orthogonalize  # what build_optimizers chose: compiled with --compile
        self.measured = []  # every step of the breakdown's stretches, for a report cut short
        self.vocab_check = PerBatchVocabCheck(
            self.loader.files[0], args.batch_size * args.seq_len + 1, args.vocab_size
        )
        self.log = HarnessLog(log_path)

    def stand_in(self, field):
        """Whether the item's two sides are the same code here (compile is off on a CPU)."""
        return field == "compiled_ns" and self.compiled_ns is train_gpt2.newton_schulz_orthogonalize

    def run(self, steps, variant=Variant(), wall=False):
        """`steps` optimizer steps of train_gpt2.train with `variant`; returns each step's parts in ms. On a
        SIGTERM the steps finished so far ride on the Terminated exception."""
        timeline = Timeline(self.device, wall)
        self.muon.orthogonalize = (
            self.compiled_ns if variant.compiled_ns else train_gpt2.newton_schulz_orthogonalize
        )
        optimizers = dict(
            adam=MarkedOptimizer(self.adam, timeline, "Adam"),
            muon=MarkedOptimizer(self.muon, timeline, "Muon"),
        )
        marked = dataclasses.replace(
            self.trainer_run,
            training_model=MarkedModel(self.compiled, timeline, self.accum_steps),
            optimizers=optimizers,
            train_loader=MarkedLoader(self.loader, timeline, steps, variant, self.vocab_check),
            start_step=self.step,
            clock=SyncClock(self.device, timeline),
        )
        monitor = harness.Monitor(marked, harness.StopRequest(), train_gpt2, [])
        monitor.log = self.log  # the trainer's bookkeeping, on a log of its own rather than a record
        try:
            train_gpt2.train(marked, monitor)
        except StretchDone:
            pass
        except Terminated as e:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            e.steps = timeline.steps()
            raise
        finally:
            self.muon.orthogonalize = self.compiled_ns
        self.step += steps
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return timeline.steps()


# ----------------------------------------------------------------------------------------------
# The numbers


def median(values):
    values = list(values)
    return statistics.median(values) if values else float("nan")


def breakdown(steps, args, peak_tflops):
    """The report's part 1 from Harness.run's steps: medians per part, MFU, and the targets' inputs."""
    parts = {part: median(s.get(part, 0.0) for s in steps) for part in PARTS[:-1]}
    step_ms = median(s["step"] for s in steps)
    parts["other"] = step_ms - sum(parts.values())  # so the parts add up to the step
    micro = [ms for s in steps for ms in s["micro_steps"]]
    flops_per_token = trainer_run.model_flops_per_token(args)
    micro_tokens = args.device_batch_size * args.seq_len
    micro_step_ms = median(micro)
    return dict(
        steps=len(steps),
        micro_step_count=len(micro),
        accum_steps=args.grad_accum_steps(1),
        micro_batch=args.device_batch_size,
        seq_len=args.seq_len,
        parts_ms=parts,
        step_ms=step_ms,
        micro_step_ms=micro_step_ms,
        micro_step_min_ms=min(micro, default=float("nan")),
        micro_step_max_ms=max(micro, default=float("nan")),
        muon_ms=parts["Muon"],
        outside_pct=100 * (1 - parts["forward+backward"] / step_ms),
        tokens_per_s=args.batch_size * args.seq_len / (step_ms / 1000),
        flops_per_token=flops_per_token,
        peak_tflops=peak_tflops,
        mfu_micro_step=flops_per_token * micro_tokens / (micro_step_ms / 1000) / (peak_tflops * 1e12),
        mfu_step=flops_per_token * args.batch_size * args.seq_len / (step_ms / 1000) / (peak_tflops * 1e12),
    )


def targets(result):
    """[(target, verdict, value, unit)]: PASS when the value is at most the target (NaN misses)."""
    return [
        (what, "PASS" if result[key] <= limit else "MISS", result[key], unit)
        for what, key, limit, unit in TARGETS
    ]


def ab_row(label, samples, stand_in):
    on, off = median(samples[True]), median(samples[False])
    spread = max((max(v) - min(v)) / 2 / median(v) for v in samples.values())  # half the range, relative
    return dict(
        item=label,
        on_ms=on,
        off_ms=off,
        change_pct=100 * (on / off - 1),
        repeats=len(samples[True]),
        spread_pct=100 * spread,
        stand_in=stand_in,
    )


# ----------------------------------------------------------------------------------------------
# The report


def breakdown_text(result, device_name, peak_memory_mib):
    parts, step = result["parts_ms"], result["step_ms"]
    detail = {
        "forward+backward": f"{result['accum_steps']} micro-steps of {result['micro_batch']} x "
        f"{result['seq_len']}: {result['micro_step_ms']:.2f} ms each (min "
        f"{result['micro_step_min_ms']:.2f}, max {result['micro_step_max_ms']:.2f}), "
        f"MFU {100 * result['mfu_micro_step']:.3g}%",
        "Adam": "embedding, head and scalars",
        "data": "next_batch, and the prefetch of the next batch",
        "Muon": "Newton-Schulz and the gather",
        "host sync": "zero_grad, votes all-reduce, .tolist()",
        "other": "the rest: lr setting, logging, loop",
    }
    lines = [
        f"gpu_report: breakdown of one optimizer step on {device_name}, median of {result['steps']} steps:"
    ]
    lines += [
        f"  {part.ljust(16)} {parts[part]:10.2f} ms {100 * parts[part] / step:6.1f}%   {detail.get(part, '')}"
        for part in PARTS
    ]
    lines += [
        f"  {'step'.ljust(16)} {step:10.2f} ms  100.0%   {result['tokens_per_s']:,.0f} tokens/s, MFU "
        f"{100 * result['mfu_step']:.3g}% of {result['peak_tflops']:g} TFLOP/s",
        f"  {'peak memory'.ljust(16)} {peak_memory_mib:10,d} MiB   since the start, as in the trainer's "
        "summary",
        "gpu_report: targets (for one H100 80GB, full config; never a failure):",
    ]
    lines += [f"  {what}: {verdict} ({value:.2f} {unit})" for what, verdict, value, unit in targets(result)]
    return "\n".join(lines)


def ab_text(row):
    if "skipped" in row:
        return f"  {row['item']}: skipped ({row['skipped']})"
    note = " [stand-in: compile is off here, both sides run the same eager code]" if row["stand_in"] else ""
    extra = (
        f"; the per-batch check took {row['check_host_ms']:.2f} ms of host time"
        if "check_host_ms" in row
        else ""
    )
    return (
        f"  {row['item']}: {row['change_pct']:+.1f}% step time (on {row['on_ms']:.2f} ms, off "
        f"{row['off_ms']:.2f} ms, "
        f"{row['repeats']} repeats each, spread +/-{row['spread_pct']:.1f}%{extra}){note}"
    )


def run_ab(h, field, label, repeats, step_s, deadline):
    """One A/B row: on and off in ABBA order, `repeats` single-step samples of each side."""
    settle = 1 if field == "prefetch" else 0  # the first step after a switch still eats (or lacks) a prefetch
    need = 2 * repeats * (settle + 1) * step_s
    left = deadline - time.monotonic()
    if need * 1.2 > left:
        return dict(item=label, skipped=f"needs about {need:.0f} s, {left:.0f} s left of --timeout")
    samples = {True: [], False: []}
    h.vocab_check.host_ms.clear()
    for repeat in range(repeats):
        for on in (True, False) if repeat % 2 == 0 else (False, True):
            samples[on].append(h.run(settle + 1, replace(Variant(), **{field: on}))[-1]["step"])
    row = ab_row(label, samples, h.stand_in(field))
    if field == "per_shard_vocab_check":
        row["check_host_ms"] = median(h.vocab_check.host_ms)
    return row


def headline_text(result):
    """The most valuable numbers first."""
    return (
        f"gpu_report: headline: forward+backward {result['micro_step_ms']:.2f} ms per micro-step of "
        f"{result['micro_batch']}x{result['seq_len']} (median of {result['micro_step_count']}), MFU "
        f"{100 * result['mfu_micro_step']:.3g}% of {result['peak_tflops']:g} TFLOP/s; step "
        f"{result['step_ms']:.2f} ms, {result['tokens_per_s']:,.0f} tokens/s"
    )


def report(h, opts, deadline, result):
    """Fills `result` as it goes (a SIGTERM leaves what was done in it); prints each part once it exists."""
    device_name = harness.device_name(h.device)
    started = time.monotonic()
    result["phase"] = "warm-up (compile)"
    h.run(opts.warmup, wall=True)
    result["compile"] = dict(
        warmup_s=time.monotonic() - started, graphs=unique_graphs(), line=harness.compile_line()
    )
    warmup_s = result["compile"]["warmup_s"]
    print(
        f"gpu_report: warm-up of {opts.warmup} steps {warmup_s:.1f} s; {harness.compile_line()}", flush=True
    )
    result["phase"] = "headline"
    h.measured += h.run(min(opts.headline_steps, opts.steps))
    result.update(breakdown(h.measured, h.args, opts.peak_tflops))
    result["phase"] = (
        "breakdown"  # before the headline is printed: a SIGTERM on reading it cuts the breakdown
    )
    print(headline_text(result), flush=True)
    h.measured += h.run(opts.steps - len(h.measured))
    result.update(breakdown(h.measured, h.args, opts.peak_tflops))
    peak = int(harness.peak_memory_mib(h.device))
    result.update(device=device_name, peak_memory_mib=peak, targets=targets(result))
    print(breakdown_text(result, device_name, peak), flush=True)
    result["phase"], result["ab"] = "A/B", []
    if opts.ab:
        print(
            "gpu_report: A/B, each item on and off in turn (ABBA), the step time with everything on against "
            "the same with that one item off:",
            flush=True,
        )
    for field, label in AB_ITEMS:
        if field in opts.ab:
            row = run_ab(h, field, label, opts.repeats, result["step_ms"] / 1000, deadline)
            print(ab_text(row), flush=True)
            result["ab"].append(row)
    result.update(phase="done", first_loss=h.log.losses[0], last_loss=h.log.losses[-1])
    print(f"gpu_report: {loss_text(h)}; {time.monotonic() - started:.0f} s in all", flush=True)


def loss_text(h):
    losses = h.log.losses
    if not losses:
        return "no step finished"
    return f"train loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps"


def cut_short(h, result, error, opts):
    """What a SIGTERM left: the steps measured so far, as headline and breakdown."""
    print(
        f"gpu_report: SIGTERM during the {result.get('phase', 'start-up')}: what was measured by then:",
        flush=True,
    )
    if h is None:
        print("gpu_report: nothing: the run was still being built", flush=True)
        return
    phase = result.get("phase")
    steps = h.measured + (list(error.steps) if phase in ("headline", "breakdown") else [])
    if phase in (None, "warm-up (compile)", "headline", "breakdown"):
        if steps:
            result.update(breakdown(steps, h.args, opts.peak_tflops))
            peak = int(harness.peak_memory_mib(h.device))
            result.update(device=harness.device_name(h.device), peak_memory_mib=peak, targets=targets(result))
            print(headline_text(result), flush=True)
            print(breakdown_text(result, result["device"], peak), flush=True)
        else:
            print("gpu_report: no measured step finished (still compiling?)", flush=True)
    print(f"gpu_report: {loss_text(h)}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Other arguments are train_gpt2.py flags; they override the preset's.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--warmup", type=int, default=0, help="untimed first steps (default: the preset's)")
    parser.add_argument("--steps", type=int, default=0, help="steps of the breakdown (default: the preset's)")
    parser.add_argument(
        "--headline_steps", type=int, default=2, help="steps before the headline is printed (default: 2)"
    )
    parser.add_argument("--repeats", type=int, default=0, help="A/B samples per side (default: the preset's)")
    parser.add_argument(
        "--ab",
        default=",".join(f for f, _ in AB_ITEMS),
        help="comma-separated A/B items to run (default: all); empty: none",
    )
    parser.add_argument(
        "--peak_tflops", type=float, default=989.0, help="per-device peak for MFU (H100 bf16: 989)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="skip A/B items that would end later than this many seconds after the start (0: no limit)",
    )
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line, last")
    opts, trainer_flags = parser.parse_known_args(argv)
    opts.ab = [f for f in opts.ab.split(",") if f]
    unknown = set(opts.ab) - {f for f, _ in AB_ITEMS}
    if unknown:
        parser.error(
            f"unknown A/B item(s) {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(f for f, _ in AB_ITEMS)}"
        )
    deadline = time.monotonic() + opts.timeout if opts.timeout > 0 else math.inf
    preset = PRESETS[opts.preset]
    for key in ("warmup", "steps", "repeats"):
        setattr(opts, key, getattr(opts, key) or preset[key])
    workdir, h, result, status = tempfile.mkdtemp(prefix="gpu_report_"), None, dict(preset=opts.preset), 0
    try:
        try:
            args = harness.parse_args(
                train_gpt2.Hyperparameters, HARNESS_FLAGS + preset["flags"] + trainer_flags
            )
            _, _, device = train_gpt2.setup_distributed(args.device)
        except harness.ConfigError as e:
            raise SystemExit(f"gpu_report: {e}") from None
        args.input_bin, args.input_val_bin = trainer_run.write_shards(workdir, args, 8)
        args.compile = device.type == "cuda" if args.compile is None else args.compile  # as train_gpt2.run
        print(
            f"gpu_report: preset {opts.preset}: {args.num_layers} layers x {args.model_dim}, "
            f"{args.grad_accum_steps(1)} micro-steps of {args.device_batch_size} x {args.seq_len} tokens per "
            f"step; compile {f'on, options {train_gpt2.inductor_options(args)}' if args.compile else 'off'}; "
            f"PyTorch {torch.__version__}, python {sys.executable}",
            flush=True,
        )
        with train_gpt2.attention_backends(device) as attention_note:
            print(f"gpu_report: {attention_note}", flush=True)
            try:
                h = Harness(args, device, os.path.join(workdir, "steps.txt"))
                report(h, opts, deadline, result)
            except Terminated as e:
                cut_short(h, result, e, opts)
                status = 143
            finally:
                if h is not None:
                    h.log.close()
        if opts.json:
            clean = {k: v for k, v in result.items() if k != "phase"}
            print(json.dumps(clean), flush=True)
        return status
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_terminated)
    sys.exit(main())
