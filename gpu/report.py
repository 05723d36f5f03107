"""The GPU report: where one optimizer step of train_gpt2.py spends its time, and what each speed habit gains.

    python tests/gpu_report.py                  # the full 124M config on one GPU: 8 micro-steps of 64 x 1024 tokens
    python tests/gpu_report.py --preset tiny    # the same plumbing on a CPU with a tiny model (the dry run)

The run is built by train_gpt2.build_run on synthetic shards and stepped by the trainer's own loop,
train_gpt2.train, through stand-ins for its loader, model and optimizers that mark points of each step:
CUDA events on a GPU (when the GPU gets there, so time it spends waiting for the host counts to the part it
waits for), time.perf_counter on a CPU. The numbers are the trainer's own step, host sync included.

1. Breakdown (medians over --steps steps): data (next_batch, and the prefetch of the next batch),
   forward+backward (per micro-step, and its MFU), Adam, Muon (Newton-Schulz and the gather), host sync
   (zero_grad, the votes all-reduce, .tolist()) and other (the step time left over: lr setting,
   logging, the loop); then peak memory and issue 10's targets, each PASS or MISS. A timing never fails it.
2. A/B, interleaved: the step time with every item on against the same with one item off, on and off in
   ABBA order, --repeats samples of each side. Off means:
     coordinate-descent tuning   the model compiled with INDUCTOR_OPTIONS less that key (a second compile)
     compiled Newton-Schulz      muon.orthogonalize set back to the eager newton_schulz_orthogonalize
     prefetch                    the loader's prefetch() never called: next_batch() loads after the host sync
     per-shard vocab check       the old per-batch check added back (max of the batch's uint16 window, on the host)
   On a CPU compile is off, so the first two compare the eager code with itself: they are marked stand-in.

Items that would not finish within --timeout are skipped, and say so.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpu_benchmark  # noqa: E402

import train_gpt2  # noqa: E402

# Steps run in stretches (train() is called again for each); these keep the schedule flat and every pause off.
HARNESS_FLAGS = [
    "--num_iterations=1000000",
    "--warmdown_iters=0",
    "--untimed_steps=0",
    "--val_loss_every=0",
    "--save_every=0",
    "--save_every_minutes=0",
]
PRESETS = {
    "full": dict(
        flags=["--batch_size=512", "--device_batch_size=64", "--val_tokens=524288", "--device=cuda"],
        warmup=3,
        steps=10,
        repeats=4,
    ),
    "tiny": dict(flags=gpu_benchmark.PRESETS["tiny"]["flags"], warmup=2, steps=6, repeats=3),
}
PARTS = ("data", "forward+backward", "Adam", "Muon", "host sync", "other")
TARGETS = [  # issue 10, for one H100 80GB: (what, result key, at most, unit)
    ("forward+backward per micro-step <= 130 ms", "micro_step_ms", 130.0, "ms"),
    ("stretch: forward+backward per micro-step <= 115 ms", "micro_step_ms", 115.0, "ms"),
    ("Muon <= 15 ms per step", "muon_ms", 15.0, "ms"),
    ("outside forward+backward <= 5% of the step", "outside_pct", 5.0, "%"),
]


@dataclass(frozen=True)
class Variant:
    """Which of issue 10's speed items are on; the trainer runs with all of them."""

    coordinate_descent: bool = True
    compiled_ns: bool = True
    prefetch: bool = True
    per_shard_vocab_check: bool = True


AB_ITEMS = [  # cheapest first: the last needs a second compile of the model
    ("per_shard_vocab_check", "per-shard vocab check"),
    ("prefetch", "prefetch"),
    ("compiled_ns", "compiled Newton-Schulz"),
    ("coordinate_descent", "coordinate-descent tuning"),
]


class StretchDone(Exception):
    """Raised by the loader stand-in to leave train() after a stretch's steps."""


class Timeline:
    """Named points of the step loop; the segment before each point takes the point's name."""

    def __init__(self, device):
        self.cuda, self.points, self.step_walls = device.type == "cuda", [], []

    def mark(self, name, step_start=False):
        if self.cuda:
            point = torch.cuda.Event(enable_timing=True)
            point.record()
        else:
            point = time.perf_counter()
        self.points.append((name, point, step_start))
        if step_start:
            self.step_walls.append(time.perf_counter())  # the host has synced at the end of the step before

    def steps(self):
        """One {part: ms} per step, from one step start to the next (call after a device sync); `micro_steps`
        lists each micro-step's forward+backward, and `step` is the host's wall time of the step."""
        steps, current, last = [], None, None
        for name, point, step_start in self.points:
            if current is not None:
                ms = last.elapsed_time(point) if self.cuda else 1000 * (point - last)
                current[name] = current.get(name, 0.0) + ms
                if name == "forward+backward":
                    current["micro_steps"].append(ms)
            if step_start:
                if current is not None:
                    steps.append(current)
                current = dict(micro_steps=[])
            last = point
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

    def __call__(self, x, y):
        first = self.calls % self.accum_steps == 0
        self.timeline.mark("other" if first else "forward+backward")  # the micro-step before is queued
        self.calls += 1
        return self.target(x, y)


class MarkedOptimizer(StandIn):
    def __init__(self, optimizer, timeline, name):
        super().__init__(optimizer, timeline)
        self.name = name

    def step(self):
        self.timeline.mark("other")  # lr and momentum setting
        self.target.step()
        self.timeline.mark(self.name)


class SyncClock(train_gpt2.Clock):
    """The trainer's clock; its lap follows the one host sync of the step."""

    def __init__(self, device, timeline):
        super().__init__(device)
        self.timeline = timeline

    def lap(self, count_step=True):
        super().lap(count_step)
        self.timeline.mark("host sync")


class HarnessLog(train_gpt2.RunLog):
    """The trainer's record writer (its step lines go to a file, as in a run); keeps the train losses, prints nothing."""

    def __init__(self, path):
        super().__init__(path)
        self.losses = []

    def __call__(self, line="", console=True, record=True):
        if " train_loss:" in line:
            self.losses.append(float(line.split(" train_loss:")[1].split()[0]))
        super().__call__(line, console=False, record=record)


class PerBatchVocabCheck:
    """The vocabulary check as it ran before issue 10: the max of each batch's window of the uint16 shard memmap,
    on the host, before the copy. Keeps its own place in the shard (the loader's is private) and times itself."""

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
            raise train_gpt2.ShardError(f"token id {top} is not below --vocab_size={self.vocab_size}")
        self.host_ms.append(1000 * (time.perf_counter() - start))


class Harness:
    """One training run built as the trainer builds it, stepped by train_gpt2.train in stretches of a few steps."""

    def __init__(self, args, device, log_path):
        self.args, self.device, self.accum_steps = args, device, args.grad_accum_steps(1)
        (self.model, self.compiled, self.adam, self.muon, self.loader, _), self.step, _, self.notes = (
            train_gpt2.build_run(args, 0, 1, device, None)
        )
        self.compiled_ns = self.muon.orthogonalize  # what build_optimizers chose: compiled on CUDA
        self.cd_off_model = None if args.compile else self.model
        self.vocab_check = PerBatchVocabCheck(
            self.loader.files[0], args.batch_size * args.seq_len + 1, args.vocab_size
        )
        self.log, self.compile_s = HarnessLog(log_path), 0.0

    def stand_in(self, field):
        """Whether the item's two sides are the same code here (compile is off on a CPU)."""
        return {
            "coordinate_descent": not self.args.compile,
            "compiled_ns": self.compiled_ns is train_gpt2.newton_schulz_orthogonalize,
        }.get(field, False)

    def model_for(self, variant):
        if variant.coordinate_descent:
            return self.compiled
        if self.cd_off_model is None:
            options = {
                k: v for k, v in train_gpt2.INDUCTOR_OPTIONS.items() if k != "coordinate_descent_tuning"
            }
            self.cd_off_model = torch.compile(self.model, dynamic=False, options=options)
        return self.cd_off_model

    def run(self, steps, variant=Variant()):
        """`steps` optimizer steps of train_gpt2.train with `variant`; returns each step's parts in ms."""
        timeline = Timeline(self.device)
        self.muon.orthogonalize = (
            self.compiled_ns if variant.compiled_ns else train_gpt2.newton_schulz_orthogonalize
        )
        try:
            train_gpt2.train(
                args=self.args,
                world_size=1,
                model=self.model,
                ddp=MarkedModel(self.model_for(variant), timeline, self.accum_steps),
                adam=MarkedOptimizer(self.adam, timeline, "Adam"),
                muon=MarkedOptimizer(self.muon, timeline, "Muon"),
                train_loader=MarkedLoader(self.loader, timeline, steps, variant, self.vocab_check),
                val_loader=None,
                accum_steps=self.accum_steps,
                start_step=self.step,
                clock=SyncClock(self.device, timeline),
                log=self.log,
                checkpoint_path=lambda step: None,
                stop=SimpleNamespace(signal=None),
                progress={},
            )
        except StretchDone:
            pass
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
    flops_per_token = gpu_benchmark.model_flops_per_token(args)[0]
    micro_tokens = args.device_batch_size * args.seq_len
    micro_step_ms = median(micro)
    return dict(
        steps=len(steps),
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
        f"  {'peak memory'.ljust(16)} {peak_memory_mib:10,d} MiB   since the start, as in the trainer's summary",
        "gpu_report: targets (issue 10, for one H100 80GB, full config; never a failure):",
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
        f"  {row['item']}: {row['change_pct']:+.1f}% step time (on {row['on_ms']:.2f} ms, off {row['off_ms']:.2f} ms, "
        f"{row['repeats']} repeats each, spread +/-{row['spread_pct']:.1f}%{extra}){note}"
    )


def run_ab(harness, field, label, repeats, step_s, deadline):
    """One A/B row: on and off in ABBA order, `repeats` single-step samples of each side."""
    settle = (
        1 if field == "prefetch" else 0
    )  # the first step after a switch still eats (or lacks) a prefetched batch
    compile_s = 0.0
    if field == "coordinate_descent" and harness.cd_off_model is None:
        compile_s = harness.compile_s
    need = compile_s + 2 * repeats * (settle + 1) * step_s
    left = deadline - time.monotonic()
    if need * 1.2 > left:
        return dict(item=label, skipped=f"needs about {need:.0f} s, {left:.0f} s left of --timeout")
    if compile_s:
        started, graphs = time.monotonic(), torch._dynamo.utils.counters["stats"]["unique_graphs"]
        harness.run(2, Variant(coordinate_descent=False))
        graphs = (
            torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        )  # 0: the off side reused a graph
        print(
            f"gpu_report: compile without coordinate-descent tuning ({graphs} new graphs), 2 steps: "
            f"{time.monotonic() - started:.1f} s",
            flush=True,
        )
    samples = {True: [], False: []}
    harness.vocab_check.host_ms.clear()
    for repeat in range(repeats):
        for on in (True, False) if repeat % 2 == 0 else (False, True):
            samples[on].append(harness.run(settle + 1, replace(Variant(), **{field: on}))[-1]["step"])
    row = ab_row(label, samples, harness.stand_in(field))
    if field == "per_shard_vocab_check":
        row["check_host_ms"] = median(harness.vocab_check.host_ms)
    return row


def report(harness, opts, deadline):
    device_name = train_gpt2.device_name(harness.device)
    started = time.monotonic()
    harness.run(opts.warmup)
    harness.compile_s = time.monotonic() - started
    print(
        f"gpu_report: warm-up ({opts.warmup} steps, compile included): {harness.compile_s:.1f} s", flush=True
    )
    result = breakdown(harness.run(opts.steps), harness.args, opts.peak_tflops)
    peak = int(train_gpt2.peak_memory_mib(harness.device))
    result.update(
        device=device_name,
        peak_memory_mib=peak,
        first_loss=harness.log.losses[0],
        last_loss=harness.log.losses[-1],
        targets=targets(result),
    )
    print(breakdown_text(result, device_name, peak), flush=True)
    print(
        "gpu_report: A/B, each item on and off in turn (ABBA), the step time with everything on against "
        "the same with that one item off:",
        flush=True,
    )
    result["ab"] = []
    for field, label in AB_ITEMS:
        if field not in opts.ab:
            continue
        row = run_ab(harness, field, label, opts.repeats, result["step_ms"] / 1000, deadline)
        print(ab_text(row), flush=True)
        result["ab"].append(row)
    result["last_loss"] = harness.log.losses[-1]
    print(
        f"gpu_report: train loss {result['first_loss']:.4f} -> {result['last_loss']:.4f} over "
        f"{len(harness.log.losses)} steps; {time.monotonic() - started:.0f} s in all",
        flush=True,
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Other arguments are train_gpt2.py flags; they override the preset's.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--warmup", type=int, default=0, help="untimed first steps (default: the preset's)")
    parser.add_argument("--steps", type=int, default=0, help="steps of the breakdown (default: the preset's)")
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
    workdir = tempfile.mkdtemp(prefix="gpu_report_")
    try:
        try:
            args = train_gpt2.parse_args(HARNESS_FLAGS + preset["flags"] + trainer_flags)
            _, _, device = train_gpt2.setup_distributed(args.device)
        except train_gpt2.ConfigError as e:
            raise SystemExit(f"gpu_report: {e}") from None
        args.input_bin, args.input_val_bin = gpu_benchmark.write_shards(
            os.path.join(workdir, "data"), args, 64
        )
        args.compile = (
            device.type == "cuda" if args.compile is None else args.compile
        )  # as train_gpt2.run does
        print(
            f"gpu_report: preset {opts.preset}: {args.num_layers} layers x {args.model_dim}, "
            f"{args.grad_accum_steps(1)} micro-steps of {args.device_batch_size} x {args.seq_len} tokens per step; "
            f"compile {'on, options ' + str(train_gpt2.INDUCTOR_OPTIONS) if args.compile else 'off'}; "
            f"PyTorch {torch.__version__}, python {sys.executable}",
            flush=True,
        )
        with train_gpt2.attention_backends(device) as attention_note:
            print(f"gpu_report: {attention_note}", flush=True)
            harness = Harness(args, device, os.path.join(workdir, "steps.txt"))
            result = report(harness, opts, deadline)
            harness.log.close()
        result["preset"] = opts.preset
        if opts.json:
            print(json.dumps(result), flush=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
