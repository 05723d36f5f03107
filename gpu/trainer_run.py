"""One stage of gpu/check.sh: the trainer as a user starts it, through run.sh, on shards written on the spot.

    python gpu/trainer_run.py --name NAME --out DIR [--untimed 2 --timed 10] [train_gpt2.py flags]

Writes synthetic shards (documents opened by <|endoftext|>, 700 tokens on average) to a temporary folder and
starts `NPROC_PER_NODE=1 ./run.sh` with flags that end the run after --untimed + --timed steps, so no wall
clock can stop it before its first timed step; its record goes to DIR/records/ as it is written. Then it
reads the record's `compile:` and `summary:` lines and prints ms/step, tokens/s, MFU against the card's dense
bf16 peak (named), peak memory reserved, start-up seconds and graphs. With --max_card_gib it passes only if
the run reached timed steps and peak reserved memory plus the CUDA context (--context_mib) stays under it,
as does the most memory nvidia-smi saw in use on the card. A SIGTERM (the stage's deadline) goes on to
run.sh, whose trainer checkpoints at its next step and writes its summary; what it measured is printed.
"""

import argparse
import glob
import json
import math
import os
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

# Dense bf16 tensor peaks from NVIDIA's data sheets (SXM boards; the PCIe H100 is slower), first match wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0)]
DEFAULT_PEAK = 989.0  # a card not in the table: an H100/H200's, and the line says so


def peak_tflops(device):
    """(TFLOP/s, where the number comes from) of this device's dense bf16 peak."""
    found = next(((name, tflops) for name, tflops in PEAK_TFLOPS if name in device), None)
    if found:
        return found[1], f"{found[0]} dense bf16, data sheet"
    return DEFAULT_PEAK, f"H100/H200 dense bf16: {device} is not in gpu/trainer_run.py's table"


def document_tokens(n, vocab, eot, mean, seed):
    """n tokens of documents, each opened by `eot`, of geometric lengths of mean `mean`; between them a fixed
    random text of distinct ids (each predicts the next: the loss falls) with 10% noise."""
    rng, ids = np.random.default_rng(seed), min(vocab, eot)
    tokens = np.resize(np.random.default_rng(0).permutation(ids)[:1024], n)
    noisy = rng.random(n) < 0.1
    tokens[noisy] = rng.integers(0, ids, int(noisy.sum()))
    starts = np.cumsum(rng.geometric(1 / mean, 2 * n // mean + 8)) - 1
    tokens[starts[starts < n]] = eot
    tokens[0] = eot
    return tokens


def write_shards(folder, args, steps, mean=700):
    """A train shard of min(steps, 8) global batches (the loader cycles it) and a val shard; their globs."""
    step_tokens = args.batch_size * args.seq_len
    write_shard(
        os.path.join(folder, "check_train_000001.bin"),
        document_tokens(min(steps, 8) * step_tokens + 1, args.vocab_size, args.eot_token, mean, seed=1),
    )
    write_shard(
        os.path.join(folder, "check_val_000000.bin"),
        document_tokens(args.val_tokens + 1, args.vocab_size, args.eot_token, mean, seed=2),
    )
    return os.path.join(folder, "check_train_*.bin"), os.path.join(folder, "check_val_*.bin")


def model_flops_per_token(args):
    """6 x non-embedding parameters + 12 x layers x width x seq_len: forward and backward of every matmul,
    attention scores and values; the embedding is a lookup (about 0.85 GFLOP for the 124M model)."""
    import torch

    import train_gpt2

    with torch.device("meta"):  # shapes only
        model = train_gpt2.GPT.from_args(args)
    non_embedding = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    return 6 * non_embedding + 12 * args.num_layers * args.model_dim * args.seq_len


def read_record(path):
    """(summary fields, the compile line or None, the record's last lines) of a trainer record."""
    with open(path) as f:
        lines = f.read().splitlines()
    summary = next((line for line in reversed(lines) if line.startswith("summary: ")), "")
    head, _, device = summary.removeprefix("summary: ").partition(" device:")
    fields = dict(field.split(":", 1) for field in head.split())
    fields.update(device=device) if summary else None
    compile_line = next((line for line in lines if line.startswith("compile: ")), None)
    return fields, compile_line, lines[-3:]


def number(text, unit=""):
    try:
        return float(text.removesuffix(unit))
    except (AttributeError, ValueError):
        return math.nan


def measure(fields, args, context_mib=0, card_peak_mib=0, max_card_gib=0.0):
    """The stage's numbers from the summary's fields, and its verdict (a list of failures)."""
    ms, tokens_per_s = number(fields.get("step_avg"), "ms"), number(fields.get("tokens_per_s"))
    peak, source = peak_tflops(fields.get("device", ""))
    flops = model_flops_per_token(args)
    result = dict(
        device=fields.get("device"),
        ms_per_step=ms,
        timed_steps=round(number(fields.get("train_time"), "ms") / ms) if ms > 0 else 0,
        tokens_per_s=tokens_per_s,
        flops_per_token=flops,
        peak_tflops=peak,
        peak_source=source,
        mfu=flops * tokens_per_s / (peak * 1e12),
        startup_s=number(fields.get("startup_s")),
        compiled_graphs=number(fields.get("compiled_graphs")),
        peak_memory_mib=number(fields.get("peak_memory"), "MiB"),
        peak_reserved_mib=number(fields.get("peak_reserved"), "MiB"),  # CUDA only: nan on a CPU
        context_mib=context_mib,
        card_peak_mib=card_peak_mib,
    )
    failures = [] if result["timed_steps"] else ["no timed step"]
    if max_card_gib:
        held = result["peak_reserved_mib"]
        held = result["peak_memory_mib"] if math.isnan(held) else held  # a CPU: its max resident set
        result["card_gib"] = (held + context_mib) / 1024
        if not result["card_gib"] < max_card_gib or card_peak_mib / 1024 >= max_card_gib:
            failures.append(f"over {max_card_gib:g} GiB")
    return result, failures


def report_lines(name, result, compile_line, failures, max_card_gib):
    r, cuda = result, not math.isnan(result["peak_reserved_mib"])
    lines = [
        f"gpu_check: {name}: {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU "
        f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s ({r['peak_source']}); "
        f"{r['timed_steps']} timed steps on {r['device']}",
        f"gpu_check: {name}: start-up {r['startup_s']:.1f} s to the first timed step, "
        f"{r['compiled_graphs']:.0f} compiled graphs; {compile_line or 'no compile line in the record'}",
        f"gpu_check: {name}: peak_memory {r['peak_memory_mib']:,.0f} MiB, "
        + (f"peak_reserved {r['peak_reserved_mib']:,.0f} MiB" if cuda else "no peak_reserved (no CUDA)"),
    ]
    if max_card_gib:
        held = f"reserved + CUDA context ({r['context_mib']:,} MiB)" if cuda else "the CPU's max resident set"
        seen = f"; nvidia-smi saw at most {r['card_peak_mib']:,} MiB used" if r["card_peak_mib"] else ""
        verdict = "FAIL" if failures else "PASS"
        lines.append(
            f"gpu_check: {name}: {max_card_gib:g} GiB card: {verdict}: {held} = {r['card_gib']:.2f} GiB{seen}"
        )
    return lines


class CardMemory(threading.Thread):
    """The most memory nvidia-smi reports in use on GPU 0, polled each second (0 where there is none)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib, self.running = 0, True

    def run(self):
        while self.running:
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.strip()
                self.peak_mib = max(self.peak_mib, int(out or 0))
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            time.sleep(1)


def forward_sigterm(proc):
    def handle(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals this process, then its group: once
        print("gpu_check: SIGTERM: passed on to run.sh; the trainer stops at its next step", flush=True)
        os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, handle)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--name", required=True, help="the stage's name, in its lines and its run_name")
    parser.add_argument("--out", required=True, help="the record goes to OUT/records/")
    parser.add_argument("--untimed", type=int, default=2, help="untimed first steps (compile)")
    parser.add_argument("--timed", type=int, default=10, help="timed steps after them")
    parser.add_argument("--max_card_gib", type=float, default=0.0, help="the card-size verdict; 0: none")
    parser.add_argument("--context_mib", type=int, default=0, help="the CUDA context, for the verdict")
    opts, trainer_flags = parser.parse_known_args(argv)

    import harness
    import train_gpt2

    steps = opts.untimed + opts.timed
    stage = [f"--num_iterations={steps}", f"--untimed_steps={opts.untimed}", "--warmdown_iters=0"]
    stage += [
        "--save_every_minutes=0",
        "--save_final=false",
        "--progress_seconds=5",
        f"--run_name=check_{opts.name}",
    ]
    try:
        args = harness.parse_args(train_gpt2.Hyperparameters, stage + trainer_flags)
    except harness.ConfigError as e:
        raise SystemExit(f"gpu_check: {e}") from None
    args.val_tokens = args.batch_size * args.seq_len  # one batch: validation at step 0 and at the end
    records = os.path.join(os.path.abspath(opts.out), "records")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        train_glob, val_glob = write_shards(work, args, steps)
        flags = [f"--input_bin={train_glob}", f"--input_val_bin={val_glob}", f"--records_dir={records}"]
        flags += [
            f"--checkpoint_dir={work}/checkpoints",
            *stage,
            *trainer_flags,
            f"--val_tokens={args.val_tokens}",
        ]
        print(f"gpu_check: {opts.name}: NPROC_PER_NODE=1 ./run.sh {' '.join(flags)}", flush=True)
        env = {**os.environ, "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
        memory = CardMemory()
        memory.start()
        proc = subprocess.Popen(
            ["bash", "run.sh", *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # out of `timeout`'s group: this script passes the SIGTERM on
        )
        forward_sigterm(proc)
        for line in proc.stdout:
            print(f"trainer| {line}", end="", flush=True)
        returncode = proc.wait()
        memory.running = False
    found = sorted(glob.glob(os.path.join(glob.escape(records), f"*_check_{opts.name}", "*.txt")))
    if not found:
        print(
            f"gpu_check: {opts.name}: FAIL: run.sh exited with {returncode} before a record existed",
            flush=True,
        )
        return 1
    fields, compile_line, last = read_record(found[-1])
    if "step_avg" not in fields:
        print(
            f"gpu_check: {opts.name}: FAIL: no timed step (exit {returncode}); the record ends:", flush=True
        )
        print("\n".join(f"  {line}" for line in last), flush=True)
        return 1
    result, failures = measure(fields, args, opts.context_mib, memory.peak_mib, opts.max_card_gib)
    failures += [f"run.sh exited with {returncode}"] if returncode else []
    print("\n".join(report_lines(opts.name, result, compile_line, failures, opts.max_card_gib)), flush=True)
    print(json.dumps(dict(result, name=opts.name, record=found[-1], compile=compile_line)), flush=True)
    print(f"gpu_check: {opts.name}: {'FAIL: ' + '; '.join(failures) if failures else 'PASS'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
