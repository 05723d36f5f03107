"""CPU siblings of the GPU report (gpu/report.py) and of the whole check's dry run.

`GPU_CHECK_DRY_RUN=1 bash gpu/check.sh` runs every stage of the GPU check with tiny models on the CPU;
the report's headline, breakdown, targets and A/B rows must come out numeric, and add up, also under a
60 s budget. In-process, the report's harness must train exactly like train_gpt2.py, with each A/B item on
or off; a SIGTERM must still print what was measured.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
from datetime import date

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, losses, parse_args, read_record

import train_gpt2
from gpu import report as gpu_report
from gpu.report import Variant

NUMBER = r"([-+]?\d[\d,]*\.?\d*)"


def check_dry_run(out, seconds=None):
    """The whole check's dry run: (exit status, console output, the log it wrote under $OUT, its folder)."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable}
    env.update(OMP_NUM_THREADS="1", **({"GPU_CHECK_SECONDS": str(seconds)} if seconds else {}))
    env.pop("GPU_CHECK_LOG", None)
    proc = subprocess.run(
        ["bash", "gpu/check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    log = out / f"gpu_check_{date.today():%Y-%m-%d}_cpu-dry-run.txt"
    return proc.returncode, proc.stdout + proc.stderr, log.read_text() if log.exists() else "", out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole check's dry run, once, under the default budget."""
    return check_dry_run(tmp_path_factory.mktemp("out"))


def json_lines(log):
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_dry_run_passes_every_stage_in_order_and_writes_its_log_under_out(dry_run):
    status, console, log, out = dry_run
    assert status == 0, console
    assert log == console  # tee: the file holds everything printed
    assert log.rstrip().endswith("gpu_check: PASS")
    stages = re.findall(r"^=== (.*): PASS \(\d+s\)$", log, re.M)
    assert [re.sub(r"^DRY RUN, tiny model for: ", "", s).split(" ")[0] for s in stages] == [
        "headline",
        "GPU",
        "A/B",
        "one",  # one step of --recipe 2024-11-24 beside the default
        "24",
    ]
    assert "DRY RUN" in log and "gpu/report.py --preset tiny --ab  --json --timeout" in log
    # the most valuable numbers first: the headline before the breakdown, the tests, the A/B and the 24 GB
    order = [
        log.index(text)
        for text in (
            "gpu_report: headline:",
            "  forward+backward",
            "test_gpu.py::",
            "  prefetch: ",
            "memory check",
        )
    ]
    assert order == sorted(order)
    assert re.search(
        r"--recipe=2024-11-24: [\d.]+ ms per step of 256 tokens .* beside the default recipe", log
    )
    copied = [name for name in os.listdir(out) if name.startswith("bench_tiny_")]
    assert len(copied) == 1  # the 24 GB stage's record, beside the log; no checkpoint
    assert sorted(os.listdir(out)) == sorted(copied + [log_name()])


def log_name():
    return f"gpu_check_{date.today():%Y-%m-%d}_cpu-dry-run.txt"


def test_a_short_budget_still_puts_the_first_numbers_in_the_log(tmp_path):
    status, console, log, _ = check_dry_run(tmp_path, seconds=60)
    assert re.search(
        r"^gpu_report: headline: forward\+backward [\d.]+ ms per micro-step of 4x32 .* MFU ", log, re.M
    )
    assert re.search(r"^=== .*headline and breakdown.* \(deadline 25s\)$", log, re.M)  # 190 of 450, scaled
    assert log == console and "budget 60s" in log


def test_dry_run_report_has_a_numeric_breakdown_that_adds_up(dry_run):
    log = dry_run[2]
    rows = {
        part: float(re.search(rf"^  {re.escape(part)} +{NUMBER} ms +{NUMBER}%", log, re.M)[1])
        for part in gpu_report.PARTS + ("step",)
    }
    assert all(math.isfinite(ms) and ms >= 0 for part, ms in rows.items() if part != "other")
    assert sum(rows[part] for part in gpu_report.PARTS) == pytest.approx(rows["step"], abs=0.05)
    assert re.search(rf"^  peak memory +{NUMBER} MiB", log, re.M)
    verdicts = re.findall(rf"^  (.+): (PASS|MISS) \({NUMBER} (?:ms|%)\)$", log, re.M)[
        : len(gpu_report.TARGETS)
    ]  # the first report's
    assert [v[0] for v in verdicts] == [what for what, *_ in gpu_report.TARGETS]

    result = json_lines(log)[0]  # the headline-and-breakdown stage
    assert result["ab"] == [] and result["compile"]["graphs"] == 0  # compile is off in the dry run
    assert (result["preset"], result["accum_steps"], result["micro_batch"], result["seq_len"]) == (
        "tiny",
        2,
        4,
        32,
    )
    assert result["step_ms"] == pytest.approx(rows["step"], abs=0.01)
    assert result["micro_step_min_ms"] <= result["micro_step_ms"] <= result["micro_step_max_ms"]
    fwd_bwd = result["parts_ms"]["forward+backward"]
    assert result["outside_pct"] == pytest.approx(100 * (1 - fwd_bwd / result["step_ms"]))
    flops = gpu_report.benchmark.model_flops_per_token(parse_args(TINY_FLAGS))[0]
    assert result["flops_per_token"] == flops
    assert result["mfu_micro_step"] == pytest.approx(
        flops * 4 * 32 / (result["micro_step_ms"] / 1000) / 989e12
    )
    assert result["tokens_per_s"] == pytest.approx(8 * 32 / (result["step_ms"] / 1000))
    assert [t[1] for t in result["targets"]] == [v[1] for v in verdicts]
    assert result["first_loss"] == pytest.approx(math.log(256), abs=1e-3)  # the tiny model trains
    assert result["last_loss"] < result["first_loss"]


def test_dry_run_report_has_a_numeric_ab_row_per_item(dry_run):
    log = dry_run[2]
    result = json_lines(log)[1]  # the A/B stage
    assert [row["item"] for row in result["ab"]] == [label for _, label in gpu_report.AB_ITEMS]
    for row in result["ab"]:
        line = next(line for line in log.splitlines() if line.startswith(f"  {row['item']}: "))
        match = re.search(
            rf": {NUMBER}% step time \(on {NUMBER} ms, off {NUMBER} ms, 3 repeats each, "
            rf"spread \+/-{NUMBER}%",
            line,
        )
        change, on, off, spread = map(float, match.groups())
        assert row["on_ms"] > 0 and row["off_ms"] > 0 and row["spread_pct"] >= 0
        assert row["change_pct"] == pytest.approx(100 * (row["on_ms"] / row["off_ms"] - 1))
        assert (change, on, off, spread) == pytest.approx(  # the line prints the JSON's numbers, rounded
            (row["change_pct"], row["on_ms"], row["off_ms"], row["spread_pct"]), abs=0.051
        )
        stand_in = row["item"] in (
            "coordinate-descent tuning",
            "compiled Newton-Schulz",
        )  # compile is off on a CPU
        assert row["stand_in"] is stand_in and ("[stand-in" in line) is stand_in
    assert result["ab"][0]["check_host_ms"] > 0  # the old per-batch check, timed on the host


def harness(tmp_path, shards, name="steps"):
    args = parse_args(TINY_FLAGS + shards + ["--compile=false"] + gpu_report.HARNESS_FLAGS)
    return gpu_report.Harness(args, torch.device("cpu"), str(tmp_path / f"{name}.txt"))


def test_harness_trains_exactly_like_the_trainer_with_every_item_on_or_off(tmp_path, shards):
    assert (
        train_gpt2.main(
            TINY_FLAGS
            + shards
            + ["--num_iterations=6", "--warmdown_iters=0", "--val_loss_every=0", "--save_every_minutes=0"]
        )
        == 0
    )
    trainer = losses(read_record(shards.records_dir))
    on = harness(tmp_path, shards, "on")
    steps = on.run(3) + on.run(3)  # two stretches: the schedule and the prefetched batch carry over
    assert on.log.losses == pytest.approx(trainer, abs=1e-6)
    assert len(steps) == 6 and all(len(s["micro_steps"]) == 2 for s in steps)
    assert all(
        s[part] >= 0 for s in steps for part in ("data", "forward+backward", "Adam", "Muon", "host sync")
    )
    off = harness(tmp_path, shards, "off")
    off.run(
        6, Variant(coordinate_descent=False, compiled_ns=False, prefetch=False, per_shard_vocab_check=False)
    )
    assert off.log.losses == pytest.approx(trainer, abs=1e-6)


def test_each_ab_item_switches_off(tmp_path, shards, monkeypatch):
    h = harness(tmp_path, shards)
    calls = dict(prefetch=0, check=0, compiled_ns=0)
    real_prefetch, real_check = h.loader.prefetch, h.vocab_check.__call__

    def count(name, real):
        def counted(*a, **k):
            calls[name] += 1
            return real(*a, **k)

        return counted

    monkeypatch.setattr(h.loader, "prefetch", count("prefetch", real_prefetch))
    monkeypatch.setattr(h, "vocab_check", count("check", real_check))
    h.compiled_ns = count(
        "compiled_ns", train_gpt2.newton_schulz_orthogonalize
    )  # stands in for the compiled one
    h.run(2)
    assert calls == dict(prefetch=2, check=0, compiled_ns=2 * len(h.muon.param_groups[0]["params"]))
    for field, name in (("prefetch", "prefetch"), ("compiled_ns", "compiled_ns")):
        before = dict(calls)
        h.run(2, Variant(**{field: False}))
        assert calls[name] == before[name]
        assert h.muon.orthogonalize is h.compiled_ns  # restored after the stretch
    h.run(2, Variant(per_shard_vocab_check=False))  # the old check, in the prefetch
    h.run(2, Variant(per_shard_vocab_check=False, prefetch=False))  # the old check, in next_batch
    assert calls["check"] == 4
    assert (
        h.model_for(Variant(coordinate_descent=False)) is h.model
    )  # compile is off: the eager model both sides
    assert h.stand_in("coordinate_descent") and not h.stand_in("prefetch")


def test_targets_pass_at_or_under_their_limit_and_miss_over_it_or_on_nan():
    verdicts = lambda **r: [v for _, v, *_ in gpu_report.targets(r)]  # noqa: E731
    assert verdicts(micro_step_ms=115.0, muon_ms=15.0, outside_pct=5.0) == ["PASS"] * 4
    assert verdicts(micro_step_ms=125.0, muon_ms=15.1, outside_pct=4.0) == ["PASS", "MISS", "MISS", "PASS"]
    assert verdicts(micro_step_ms=float("nan"), muon_ms=1.0, outside_pct=9.0) == [
        "MISS",
        "MISS",
        "PASS",
        "MISS",
    ]


def test_ab_rows_skip_what_would_overrun_the_timeout(tmp_path, shards):
    h = harness(tmp_path, shards)
    row = gpu_report.run_ab(h, "prefetch", "prefetch", repeats=4, step_s=10.0, deadline=0.0)
    assert row["item"] == "prefetch" and "needs about 160 s" in row["skipped"]
    assert gpu_report.ab_text(row) == f"  prefetch: skipped ({row['skipped']})"
    assert h.log.losses == []  # nothing ran


def test_headline_line_matches_the_breakdown_numbers_and_benchmark_reads_it(dry_run):
    log = dry_run[2]
    result = json_lines(log)[0]
    line = next(line for line in log.splitlines() if line.startswith("gpu_report: headline:"))
    assert f"(median of {result['micro_step_count'] // 3})" in line  # printed after 2 of the 6 steps
    match = gpu_report.benchmark.HEADLINE.search(line)
    assert match and float(match[1]) > 0 and int(match[2].replace(",", "")) > 0


def test_first_calls_time_each_shape_once_and_count_its_graphs():
    torch._dynamo.reset()
    compiled = torch.compile(train_gpt2.newton_schulz_orthogonalize, backend="eager", dynamic=False)
    timed = gpu_report.FirstCalls(compiled, torch.device("cpu"))
    for shape in ((8, 16), (16, 8), (8, 16)):
        out = timed(torch.randn(shape), 5, torch.float32)
        assert out.shape == shape
    assert sorted(timed.first) == [(8, 16), (16, 8)]
    assert [graphs for _, graphs in timed.first.values()] == [1, 1]  # one graph per shape, no third
    assert all(seconds > 0 for seconds, _ in timed.first.values())


def test_sigterm_prints_what_was_measured(tmp_path):
    """gpu/check.sh's deadline: `timeout` sends SIGTERM; the report prints the steps done and exits 143."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "gpu/report.py", "--preset", "tiny", "--ab", "", "--steps", "1000000", "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:  # the headline comes after 2 steps; the breakdown would take hours
            lines.append(line)
            if line.startswith("gpu_report: headline:"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 143, out
    assert "gpu_report: SIGTERM during the breakdown: what was measured by then:" in out
    result = json.loads(out.splitlines()[-1])
    assert result["steps"] >= 2 and result["step_ms"] > 0  # the headline's steps and those of the cut stretch
    assert re.search(r"^  step +[\d.]+ ms  100\.0%", out, re.M)
    assert out.count("gpu_report: headline:") == 2  # once as measured, once for what SIGTERM left
