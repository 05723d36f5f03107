"""CPU siblings of the GPU report (tests/gpu_report.py) and of the whole check's dry run.

`GPU_CHECK_DRY_RUN=1 bash tests/gpu_check.sh` runs every stage of the GPU check with tiny models on the CPU;
the report's breakdown, targets and A/B rows must come out numeric, and add up. In-process, the report's
harness must train exactly like train_gpt2.py, with each A/B item on or off.
"""

import json
import math
import os
import re
import subprocess
import sys
from datetime import date

import gpu_report
import pytest
import torch
from conftest import ROOT, TINY_FLAGS, losses, parse_args, read_record
from gpu_report import Variant

import train_gpt2

NUMBER = r"([-+]?\d[\d,]*\.?\d*)"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole check's dry run, once: (exit status, console output, the log it wrote under $OUT)."""
    out = tmp_path_factory.mktemp("out")
    env = {
        **os.environ,
        "GPU_CHECK_DRY_RUN": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    env.pop("GPU_CHECK_LOG", None)
    proc = subprocess.run(
        ["bash", "tests/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    log = out / f"gpu_check_{date.today():%Y-%m-%d}_cpu-dry-run.txt"
    return proc.returncode, proc.stdout + proc.stderr, log.read_text() if log.exists() else ""


def test_dry_run_passes_every_stage_and_writes_its_log_under_out(dry_run):
    status, console, log = dry_run
    assert status == 0, console
    assert log == console  # tee: the file holds everything printed
    assert log.rstrip().endswith("gpu_check: PASS")
    assert len(re.findall(r"^=== .*: PASS \(\d+s\)$", log, re.M)) == 3  # GPU tests, report, 24 GB
    assert "DRY RUN" in log and "gpu_report.py --preset tiny --json --timeout" in log


def test_dry_run_report_has_a_numeric_breakdown_that_adds_up(dry_run):
    log = dry_run[2]
    rows = {
        part: float(re.search(rf"^  {re.escape(part)} +{NUMBER} ms +{NUMBER}%", log, re.M)[1])
        for part in gpu_report.PARTS + ("step",)
    }
    assert all(math.isfinite(ms) and ms >= 0 for part, ms in rows.items() if part != "other")
    assert sum(rows[part] for part in gpu_report.PARTS) == pytest.approx(rows["step"], abs=0.05)
    assert re.search(rf"^  peak memory +{NUMBER} MiB", log, re.M)
    verdicts = re.findall(rf"^  (.+): (PASS|MISS) \({NUMBER} (?:ms|%)\)$", log, re.M)
    assert [v[0] for v in verdicts] == [what for what, *_ in gpu_report.TARGETS]

    result = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
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
    flops = gpu_report.gpu_benchmark.model_flops_per_token(parse_args(TINY_FLAGS))[0]
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
    result = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
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
    trainer = losses(read_record(shards[2].split("=", 1)[1]))
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
