"""Time a short training run of train_gpt2.py on synthetic shards and report its speed.

    python gpu/benchmark.py --preset full --steps 50        # 124M, micro-batch 64, compiled, on the GPU
    python gpu/benchmark.py --preset full24gb --steps 15    # 24 GB cap, micro-batch chosen by auto
    python gpu/benchmark.py --preset tiny --json            # 2 layers x 64 wide, on the CPU, in seconds

Any other argument goes to the trainer as a flag (it overrides the preset). The script
writes synthetic shards (data.shards.write_shard) into a work folder, runs the trainer as a
subprocess, reads the record it wrote, and prints: device, ms per optimizer step and per
micro-step, tokens/s, model FLOPs utilization, peak memory and the micro-batch in use.
It needs no network and installs nothing.

MFU counts the model's FLOPs per token as 6 * (non-embedding parameters) + 12 * layers * width
* seq_len (forward + backward of every matmul, plus attention scores and values; the embedding
is a lookup), about 0.85 GFLOP for the full config, against --peak_tflops per device (989:
H100 dense bf16).

--preset full24gb rehearses a 24 GB card on a larger one: the allocator is capped at 23 GiB
(--memory_limit_gb=23: such a card's memory, 24 GB = 22.4-24.0 GiB by make, less its CUDA
context of about 0.5 GiB), the micro-batch is chosen by the trainer's probe, and the run passes
only if no out-of-memory error came after the probe and max_memory_reserved plus the CUDA
context (gpu/trainer_memory.py measures both) stays under --max_memory_gb (24 GiB).
--preset recipe times the trainer under another --recipe (given as a flag) at that recipe's
own batch; --beside LOG prints it next to the default's step from gpu/report.py's headline
in LOG. A SIGTERM (gpu/check.sh's deadline) stops the trainer at its next step and still
prints what it measured.
"""

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.shards import write_shard  # noqa: E402

GPT2_VOCAB = 50257  # real token ids stay below this; the model's vocab is padded to 50304
DIVIDER = "=" * 100

# Per preset: the trainer flags, default steps and untimed steps, a memory ceiling to check (GiB; 0 = none).
PRESETS = {
    "full": dict(
        flags=[
            "--batch_size=64",
            "--device_batch_size=64",
            "--val_tokens=65536",
            "--device=cuda",
            "--compile=true",
        ],
        steps=50,
        untimed=10,
        max_memory_gb=0.0,
    ),
    "full24gb": dict(
        flags=[
            "--batch_size=512",
            "--device_batch_size=auto",
            "--memory_limit_gb=23",
            "--val_tokens=524288",
            "--device=cuda",
            "--compile=true",
        ],
        steps=15,
        untimed=5,
        max_memory_gb=24.0,
    ),
    "recipe": dict(  # the batch and sequence length are the recipe's own; val is cut to one step's tokens
        flags=["--val_tokens=524288", "--device=cuda", "--compile=true"],
        steps=5,
        untimed=2,
        max_memory_gb=0.0,
    ),
    "tiny": dict(
        flags=[
            "--num_layers=2",
            "--model_dim=64",
            "--num_heads=2",
            "--vocab_size=256",
            "--seq_len=32",
            "--batch_size=8",
            "--device_batch_size=4",
            "--val_tokens=512",
            "--device=cpu",
            "--compile=false",
            "--progress_seconds=0",
        ],
        steps=20,
        untimed=2,
        max_memory_gb=0.0,
    ),
}


# ----------------------------------------------------------------------------------------------
# Synthetic data


def synthetic_tokens(n, vocab, noise_seed, period_seed=0):
    """A fixed random 'text' of distinct ids (so each id predicts the next) tiled to n tokens, 10% noise.

    Train and val shards share the text (period_seed) and differ in their noise, so both losses fall."""
    ids = min(vocab, GPT2_VOCAB)
    text = np.random.default_rng(period_seed).permutation(ids)[: min(1024, ids)]
    tokens = np.resize(text, n).astype(np.int64)
    rng = np.random.default_rng(noise_seed)
    noisy = rng.random(n) < 0.1
    tokens[noisy] = rng.integers(0, ids, int(noisy.sum()))
    return tokens


def write_shards(folder, trainer_args, steps):
    """One train shard (at most 64 global batches: the loader cycles it) and one val shard; their globs."""
    os.makedirs(folder, exist_ok=True)
    step_tokens = trainer_args.batch_size * trainer_args.seq_len
    write_shard(
        os.path.join(folder, "bench_train_000001.bin"),
        synthetic_tokens(min(max(steps, 1), 64) * step_tokens + 1, trainer_args.vocab_size, noise_seed=1),
    )
    write_shard(
        os.path.join(folder, "bench_val_000000.bin"),
        synthetic_tokens(trainer_args.val_tokens + 1, trainer_args.vocab_size, noise_seed=2),
    )
    return os.path.join(folder, "bench_train_*.bin"), os.path.join(folder, "bench_val_*.bin")


# ----------------------------------------------------------------------------------------------
# The numbers


def model_flops_per_token(trainer_args):
    """(FLOPs per token, parameters, non-embedding parameters) of the model these Hyperparameters build."""
    import torch

    import train_gpt2

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = train_gpt2.GPT.from_args(trainer_args)
    params = sum(p.numel() for p in model.parameters())
    non_embedding = params - model.embed.weight.numel()
    attention = 12 * trainer_args.num_layers * trainer_args.model_dim * trainer_args.seq_len
    return 6 * non_embedding + attention, params, non_embedding


def parse_record(text):
    """The parts of a record the benchmark needs: flags, notes, train losses, summary fields."""
    parts = text.split(DIVIDER + "\n")
    environment = parts[1] if len(parts) >= 3 else ""
    body = parts[2] if len(parts) >= 3 else ""
    env_lines = environment.splitlines()
    flags, notes, section = [], [], None
    for line in env_lines:
        if line in ("Hyperparameters:", "Notes:"):
            section = line
        elif section == "Hyperparameters:" and line.startswith("--"):
            flags.append(line)
        elif section == "Notes:":
            notes.append(line)
    train_losses, summary, stopped = [], {}, None
    for line in body.splitlines():
        if line.startswith("step:") and " train_loss:" in line:
            train_losses.append(float(line.split(" train_loss:")[1].split()[0]))
        elif line.startswith("summary: "):
            fields = line[len("summary: ") :]
            head, _, device = fields.partition(" device:")
            summary = dict(field.split(":", 1) for field in head.split())
            summary["device"] = device
        elif line.startswith("stopped: "):
            stopped = line[len("stopped: ") :]
    return dict(flags=flags, notes=notes, train_losses=train_losses, summary=summary, stopped=stopped)


def number(text, unit=""):
    try:
        return float(text[: -len(unit)] if unit and text.endswith(unit) else text)
    except (TypeError, ValueError):
        return float("nan")


MEMORY_LINE = re.compile(
    r"^trainer_memory: context_mib:(\d+) max_reserved_mib:(\d+) max_allocated_mib:(\d+) "
    r"device_total_mib:(\d+)$",
    re.M,
)
OOM_TEXT = "out of GPU memory"  # the trainer's one line for an OOM during training, after the probe


def trainer_memory(output):
    """gpu/trainer_memory.py's last report in the trainer's output, as {name: MiB}, or None."""
    found = MEMORY_LINE.findall(output)
    if not found:
        return None
    return dict(
        zip(("context_mib", "max_reserved_mib", "max_allocated_mib", "device_total_mib"), map(int, found[-1]))
    )


def compute_metrics(record, peak_tflops, max_memory_gb=0.0, memory=None, oom=False):
    """The benchmark's numbers from a parsed record (see parse_record). With `memory` (trainer_memory's
    numbers) the memory verdict judges max_memory_reserved plus the CUDA context, else the record's peak;
    an out-of-memory error after the probe (`oom`) fails it either way."""
    import harness
    import train_gpt2

    args = harness.parse_args(
        train_gpt2.Hyperparameters, record["flags"]
    )  # the run's resolved flags, auto micro-batch included
    summary = record["summary"]
    world_size = int(number(summary.get("world_size", "1")) or 1)
    accum = args.grad_accum_steps(world_size)
    ms_per_step = number(summary.get("step_avg"), "ms")
    step_tokens = args.batch_size * args.seq_len
    tokens_per_s = step_tokens / (ms_per_step / 1000) if ms_per_step > 0 else float("nan")
    flops_per_token, params, non_embedding = model_flops_per_token(args)
    mfu = flops_per_token * tokens_per_s / (peak_tflops * 1e12 * world_size)
    peak_mib = number(summary.get("peak_memory"), "MiB")
    note = next((n for n in record["notes"] if n.startswith("device_batch_size:")), "")
    losses = record["train_losses"]
    card_mib = memory["context_mib"] + memory["max_reserved_mib"] if memory else peak_mib
    result = dict(
        device=summary.get("device", "?"),
        world_size=world_size,
        steps=args.num_iterations,
        untimed_steps=args.untimed_steps,
        steps_done=len(losses),
        timed_steps=max(0, len(losses) - args.untimed_steps),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        step_tokens=step_tokens,
        device_batch_size=args.device_batch_size,
        device_batch_size_note=note,
        accum_steps=accum,
        ms_per_step=ms_per_step,
        ms_per_micro_step=ms_per_step / accum,
        tokens_per_s=tokens_per_s,
        params=params,
        non_embedding_params=non_embedding,
        flops_per_token=flops_per_token,
        peak_tflops=peak_tflops,
        mfu=mfu,
        peak_memory_mib=peak_mib,
        peak_memory_gib=peak_mib / 1024,
        max_memory_gb=max_memory_gb,
        memory=memory,
        card_memory_gib=card_mib / 1024,
        oom=oom,
        memory_ok=None if not max_memory_gb else bool(card_mib / 1024 < max_memory_gb and not oom),
        startup_s=number(summary.get("startup_s")),
        compiled_graphs=number(summary.get("compiled_graphs")),
        first_train_loss=losses[0] if losses else float("nan"),
        last_train_loss=losses[-1] if losses else float("nan"),
        final_val_loss=number(summary.get("final_val_loss")),
        notes=[n for n in record["notes"] if n != note],
        stopped=record["stopped"],
    )
    return result


def table(result, preset):
    rows = [
        ("device", f"{result['device']} (world size {result['world_size']})"),
        (
            "steps",
            f"{result['steps_done']} of {result['steps']} done ({result['untimed_steps']} untimed: compile, "
            f"warmup); "
            f"{result['step_tokens']:,} tokens per step",
        ),
        (
            "micro-batch",
            f"{result['device_batch_size']} sequences x {result['accum_steps']} micro-steps per step"
            + (f"  [{result['device_batch_size_note']}]" if result["device_batch_size_note"] else ""),
        ),
        ("ms per step", f"{result['ms_per_step']:.2f}"),
        ("ms per micro-step", f"{result['ms_per_micro_step']:.2f}"),
        ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
        (
            "FLOPs per token",
            f"{result['flops_per_token'] / 1e9:.4f} GFLOP = 6 x {result['non_embedding_params']:,} "
            f"non-embedding params + 12 x layers x width x seq_len",
        ),
        (
            "MFU",
            f"{100 * result['mfu']:.3g}% of {result['peak_tflops']:g} TFLOP/s x {result['world_size']} "
            f"device(s)",
        ),
        ("peak memory", f"{result['peak_memory_mib']:,.0f} MiB ({result['peak_memory_gib']:.2f} GiB)"),
        (
            "start-up",
            f"{result['startup_s']:.1f} s from the flags to the first timed step (compile included), "
            f"{result['compiled_graphs']:.0f} compiled graphs",
        ),
        (
            "train loss",
            f"{result['first_train_loss']:.4f} -> {result['last_train_loss']:.4f}; "
            f"final val {result['final_val_loss']:.4f}",
        ),
    ]
    rows += [("note", n) for n in result["notes"]]
    memory = result.get("memory")
    if memory:
        rows.append(
            (
                "card memory",
                f"{'max_memory_reserved' if memory['device_total_mib'] else 'peak resident set (CPU)'} "
                f"{memory['max_reserved_mib']:,} MiB + CUDA context "
                f"{memory['context_mib']:,} MiB = {result['card_memory_gib']:.2f} GiB (after the probe; "
                f"max_memory_allocated {memory['max_allocated_mib']:,} MiB)",
            )
        )
    if result.get("oom"):
        rows.append(("out of memory", "the trainer ran out of memory after the probe had chosen"))
    if result["memory_ok"] is not None:
        verdict = "PASS" if result["memory_ok"] else "FAIL"
        sign = "<" if result["card_memory_gib"] < result["max_memory_gb"] else ">="
        what = "reserved + context" if memory else "peak"
        rows.append(
            (
                "memory check",
                f"{verdict}: {what} {result['card_memory_gib']:.2f} GiB {sign} "
                f"{result['max_memory_gb']:g} GiB" + (", but out of memory" if result.get("oom") else ""),
            )
        )
    if result["stopped"]:
        rows.append(("stopped", result["stopped"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        [f"gpu_benchmark --preset {preset}:"] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
    )


# ----------------------------------------------------------------------------------------------
# Running the trainer


class Terminated(Exception):
    """This script got SIGTERM (gpu/check.sh's deadline): stop the trainer, report what it measured."""


def run_trainer(flags, timeout):
    """Run train_gpt2.py (through gpu/trainer_memory.py, which adds its memory line) with `flags`, echoing its
    output; past `timeout` seconds, or on a SIGTERM to this script, SIGTERM it (it stops at the next step
    boundary and writes its summary), then SIGKILL. Returns (return code, timed out, its output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    output = []
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "gpu", "trainer_memory.py"), *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )

    def echo():
        for line in proc.stdout:
            output.append(line)
            print(f"trainer| {line}", end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout if timeout > 0 else None)
    except (subprocess.TimeoutExpired, Terminated) as e:
        timed_out = True
        why = "got SIGTERM" if isinstance(e, Terminated) else f"ran past {timeout:g}s"
        print(f"gpu_benchmark: {why}: SIGTERM to the trainer, which stops at its next step", flush=True)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(
                    timeout=10
                )  # gpu/check.sh's `timeout -k 15` kills this script 15 s after its SIGTERM
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    return proc.returncode, timed_out, "".join(output)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Other arguments are train_gpt2.py flags; they override the preset's.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (default: the preset's)")
    parser.add_argument(
        "--peak_tflops", type=float, default=989.0, help="per-device peak for MFU (H100 bf16: 989)"
    )
    parser.add_argument(
        "--max_memory_gb",
        type=float,
        default=None,
        help="FAIL unless reserved memory + CUDA context < this many GiB (full24gb: 24; 0 = no check)",
    )
    parser.add_argument(
        "--copy_record",
        default="",
        help="copy the trainer's record file (not its checkpoints) into this folder",
    )
    parser.add_argument(
        "--beside",
        default="",
        help="a gpu/check.sh log: print this run's step beside the last gpu/report.py headline in it",
    )
    parser.add_argument(
        "--timeout", type=float, default=0, help="SIGTERM the trainer after this many seconds"
    )
    parser.add_argument(
        "--workdir",
        default="",
        help="shards, records and checkpoints go here (default: a temp folder, removed at the end)",
    )
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line, last")
    opts, passthrough = parser.parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--"]

    import harness
    import train_gpt2

    preset = PRESETS[opts.preset]
    steps = opts.steps or preset["steps"]
    untimed = min(preset["untimed"], steps // 2)
    max_memory_gb = preset["max_memory_gb"] if opts.max_memory_gb is None else opts.max_memory_gb
    workdir = opts.workdir or tempfile.mkdtemp(prefix="gpu_benchmark_")
    started = time.monotonic()
    try:
        base = [
            f"--num_iterations={steps}",
            "--warmdown_iters=0",
            f"--untimed_steps={untimed}",
            "--val_loss_every=0",
            "--save_every=0",
            "--save_every_minutes=0",
            f"--run_name=bench_{opts.preset}",
            f"--records_dir={workdir}/records",
            f"--checkpoint_dir={workdir}/checkpoints",
        ]
        flags = base + preset["flags"] + passthrough
        try:
            shard_args = harness.parse_args(train_gpt2.Hyperparameters, flags)
        except harness.ConfigError as e:
            raise SystemExit(f"gpu_benchmark: {e}") from None
        train_glob, val_glob = write_shards(os.path.join(workdir, "data"), shard_args, steps)
        flags = [f"--input_bin={train_glob}", f"--input_val_bin={val_glob}"] + flags
        print(
            f"gpu_benchmark: preset {opts.preset}, {steps} steps; python {sys.executable}; "
            f"work folder {workdir}",
            flush=True,
        )
        print("gpu_benchmark: train_gpt2.py " + " ".join(flags), flush=True)
        returncode, timed_out, output = run_trainer(flags, opts.timeout)
        records = sorted(glob.glob(os.path.join(workdir, "records", "*", "*.txt")), key=os.path.getmtime)
        if not records:
            print(
                f"gpu_benchmark: FAIL: the trainer exited with {returncode} before writing a record",
                flush=True,
            )
            return 1
        if opts.copy_record:
            os.makedirs(opts.copy_record, exist_ok=True)
            copied = os.path.join(opts.copy_record, f"bench_{opts.preset}_{os.path.basename(records[-1])}")
            shutil.copy(records[-1], copied)
            print(f"gpu_benchmark: record copied to {copied}", flush=True)
        with open(records[-1]) as f:
            record = parse_record(f.read())
        if not record["summary"]:
            print(
                f"gpu_benchmark: FAIL: the record has no summary line (trainer exit {returncode})", flush=True
            )
            return 1
        memory = trainer_memory(output)
        result = compute_metrics(record, opts.peak_tflops, max_memory_gb, memory, OOM_TEXT in output)
        result.update(
            preset=opts.preset,
            returncode=returncode,
            timed_out=timed_out,
            wall_s=round(time.monotonic() - started, 1),
            record=records[-1] if opts.workdir else None,
        )
        print(table(result, opts.preset), flush=True)
        if opts.beside:
            print(beside_line(result, shard_args, opts.beside), flush=True)
        failures = []
        if returncode != 0:
            failures.append(f"the trainer exited with {returncode}" + (" (timed out)" if timed_out else ""))
        if not math.isfinite(result["ms_per_step"]):
            failures.append("no timed step")
        if result["oom"]:
            failures.append("out of memory after the probe")
        if result["memory_ok"] is False and result["card_memory_gib"] >= max_memory_gb:
            what = "reserved memory + CUDA context" if memory else "peak memory"
            failures.append(f"{what} {result['card_memory_gib']:.2f} GiB is not under {max_memory_gb:g} GiB")
        print(
            f"gpu_benchmark: {'FAIL: ' + '; '.join(failures) if failures else 'PASS'} "
            f"({result['wall_s']:.0f}s wall)",
            flush=True,
        )
        if opts.json:
            clean = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
            }
            print(json.dumps(clean), flush=True)
        return 1 if failures else 0
    except Terminated:
        print("gpu_benchmark: FAIL: SIGTERM before the trainer started: nothing measured", flush=True)
        return 143
    finally:
        if not opts.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


HEADLINE = re.compile(r"^gpu_report: headline: .*; step ([\d.]+) ms, ([\d,]+) tokens/s", re.M)


def beside_line(result, args, log_path):
    """This run's step time and tokens/s beside the default recipe's, from gpu/report.py's last headline."""
    ours = (
        f"--recipe={args.recipe}: {result['ms_per_step']:.2f} ms per step of {result['step_tokens']:,} "
        f"tokens ({result['accum_steps']} micro-steps of {result['device_batch_size']} x "
        f"{result['seq_len']}), "
        f"{result['tokens_per_s']:,.0f} tokens/s"
    )
    try:
        with open(log_path) as f:
            found = HEADLINE.findall(f.read())
    except OSError:
        found = []
    if not found:
        return f"gpu_benchmark: {ours}; the default's step was not measured in {log_path}"
    ms, tokens = float(found[-1][0]), float(found[-1][1].replace(",", ""))
    return (
        f"gpu_benchmark: {ours}; beside the default recipe (gpu/report.py, same card): {ms:.2f} ms per step, "
        f"{tokens:,.0f} tokens/s: {result['tokens_per_s'] / tokens:.2f}x the tokens/s"
    )


def exit_on_sigterm(signum, frame):
    """`timeout` signals this process, then its whole group: act on the first signal only (a second one must
    not cut short stopping the trainer, reading its record and removing the work folder)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sys.exit(main())
