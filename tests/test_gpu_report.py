"""CPU siblings of the GPU check (gpu/check.sh, gpu/trainer_run.py, gpu/report.py) in its dry run.

`GPU_CHECK_DRY_RUN=1 bash gpu/check.sh` runs every stage of the GPU check with tiny models on the CPU, the
trainer through run.sh and its summary lines; the stages' numbers, the report's breakdown, targets and A/B
rows must come out numeric, and add up, also under a 60 s budget. In-process, the report's harness must
train exactly like train_gpt2.py, with each A/B item on or off; a SIGTERM must still print what was measured.
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
from gpu import trainer_run
from gpu.report import Variant
from harness import FirstCalls, compile_line

NUMBER = r"([-+]?\d[\d,]*\.?\d*)"


def check_dry_run(out, seconds=None, ab=False):
    """The whole check's dry run: (exit status, console output, the log it wrote under $OUT, its folder)."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable}
    env.update(OMP_NUM_THREADS="1", GPU_CHECK_AB=str(int(ab)))
    env.update({"GPU_CHECK_SECONDS": str(seconds)} if seconds else {})
    proc = subprocess.run(
        ["bash", "gpu/check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    log = out / f"gpu_check_{date.today():%Y-%m-%d}_cpu-dry-run.txt"
    return proc.returncode, proc.stdout + proc.stderr, log.read_text() if log.exists() else "", out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole check's dry run, once, under the default budget."""
    return check_dry_run(tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def ab_run(tmp_path_factory):
    """The separate A/B call's dry run, once."""
    return check_dry_run(tmp_path_factory.mktemp("out"), ab=True)


def json_lines(log, key="preset"):
    """The JSON lines that hold `key`: preset for gpu/report.py's, name for gpu/trainer_run.py's."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{") and key in json.loads(line)]


def test_dry_run_passes_every_stage_in_order_through_run_sh_within_its_budget(dry_run):
    status, console, log, out = dry_run
    assert status == 0, console
    assert log == console  # tee: the file holds everything printed
    assert log.rstrip().endswith("gpu_check: PASS")
    assert re.search(r"^ +default recipe +170 +230 ", log, re.M)  # the plan, printed first
    stages = re.findall(r"^=== (.*): PASS \(\d+s\)$", log, re.M)
    assert [s.split(" ")[0] for s in stages] == ["default", "--recipe", "GPU", "per-phase"]
    assert int(re.search(r"failed, (\d+)s in all", log)[1]) < 420
    default, long = json_lines(log, "name")
    assert log.count("NPROC_PER_NODE=1 ./run.sh ") == 2 and "--recipe=2024-11-24 --memory_limit_gb=23" in log
    summaries = [line for line in log.splitlines() if line.startswith("trainer| summary:")]
    assert len(summaries) == 2 and all(
        " tokens_per_s:" in s and " compiled_graphs:0 " in s for s in summaries
    )
    for stage in (default, long):
        assert stage["timed_steps"] == 10 and stage["ms_per_step"] > 0 and stage["tokens_per_s"] > 0
        with open(stage["record"]) as f:
            record = f.read()
        assert f"step_avg:{stage['ms_per_step']:.2f}ms tokens_per_s:{stage['tokens_per_s']:.0f} " in record
        assert stage["mfu"] == pytest.approx(stage["flops_per_token"] * stage["tokens_per_s"] / 989e12)
        assert "is not in gpu/trainer_run.py's table" in stage["peak_source"]  # the peak used is named
    assert "card_gib" in long and "card_gib" not in default  # only the 24 GB stage is judged
    assert re.search(r"^gpu_check: 2024-11-24: 24 GiB card: PASS: the CPU's max resident set", log, re.M)
    # what lies under $OUT: the log and the two trainer records, written as they ran (at most 8 files)
    files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
    assert len(files) == 3 and sorted(os.path.relpath(f, out).split(os.sep)[0] for f in files) == [
        log_name(),
        "records",
        "records",
    ]


def log_name():
    return f"gpu_check_{date.today():%Y-%m-%d}_cpu-dry-run.txt"


def test_a_short_budget_still_puts_the_first_numbers_in_the_log(tmp_path):
    status, console, log, _ = check_dry_run(tmp_path, seconds=60)
    assert re.search(r"^gpu_check: default: [\d.]+ ms/step, [\d,]+ tokens/s, MFU ", log, re.M), log
    # its deadline: 170 of 420 scaled to 60 (24 s), cut shorter when the versions stage ran long (under load)
    deadline = re.search(r"^=== default recipe through run.sh \(deadline (\d+)s\)$", log, re.M)
    assert deadline and 5 <= int(deadline[1]) <= 24, log
    assert log == console and "budget 60s" in log


def test_the_ab_call_runs_the_trainer_with_coordinate_descent_off_and_on_then_the_report_items(ab_run):
    status, console, log, out = ab_run
    assert status == 0, console
    off, on = json_lines(log, "name")
    assert (off["name"], on["name"]) == ("cd_off", "cd_on") and off["timed_steps"] == on["timed_steps"] == 10
    for stage, value in ((off, "false"), (on, "true")):
        with open(stage["record"]) as f:
            assert f"\n--coordinate_descent={value}\n" in f.read()
    assert "budget 540s" in log


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

    [result] = json_lines(log)  # the breakdown stage
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
    flops = trainer_run.model_flops_per_token(parse_args(TINY_FLAGS))
    assert result["flops_per_token"] == flops
    assert result["mfu_micro_step"] == pytest.approx(
        flops * 4 * 32 / (result["micro_step_ms"] / 1000) / 989e12
    )
    assert result["tokens_per_s"] == pytest.approx(8 * 32 / (result["step_ms"] / 1000))
    assert [t[1] for t in result["targets"]] == [v[1] for v in verdicts]
    assert result["first_loss"] == pytest.approx(math.log(256), abs=1e-3)  # the tiny model trains
    assert result["last_loss"] < result["first_loss"]


def test_dry_run_report_has_a_numeric_ab_row_per_item(ab_run):
    log = ab_run[2]
    [result] = json_lines(log)  # the A/B stage
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
        stand_in = row["item"] == "compiled Newton-Schulz"  # compile is off on a CPU
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
    off.run(6, Variant(compiled_ns=False, prefetch=False, per_shard_vocab_check=False))
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
    assert not h.stand_in("prefetch")


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


def test_headline_line_matches_the_breakdown_numbers(dry_run):
    log = dry_run[2]
    [result] = json_lines(log)
    line = next(line for line in log.splitlines() if line.startswith("gpu_report: headline:"))
    assert f"(median of {result['micro_step_count'] // 3})" in line  # printed after 2 of the 6 steps
    match = re.search(r"; step ([\d.]+) ms, ([\d,]+) tokens/s$", line)
    assert match and float(match[1]) > 0 and int(match[2].replace(",", "")) > 0


def test_first_calls_time_each_graph_once_a_training_call_until_its_backward_ends(monkeypatch):
    monkeypatch.setattr(FirstCalls, "times", {})
    compiled = torch.compile(lambda x, w: (x @ w).square().sum(), backend="eager", dynamic=False)
    timed, w = FirstCalls(compiled), torch.randn(16, 4, requires_grad=True)
    loss = timed(torch.randn(8, 16), w)
    forward = FirstCalls.times["train 8x16"]
    loss.backward()
    assert FirstCalls.times["train 8x16"] > forward > 0  # the backward's end counts
    with torch.no_grad():
        timed(torch.randn(8, 16), w)
    timed(torch.randn(2, 16), w).backward()
    timed(torch.randn(8, 16), w).backward()  # a graph met before: not timed again
    assert list(FirstCalls.times) == ["train 8x16", "eval 8x16", "train 2x16"]
    assert compile_line().startswith("compile: train 8x16 ")


def test_a_24gb_verdict_judges_reserved_memory_plus_the_context_and_the_card_s_own_count():
    """The 24 GB stage's numbers from a summary: the H200's step of 4 Dec 2026, memory numbers made up."""
    args = parse_args(["--recipe=2024-11-24"])
    summary = "train_time:11020ms step_avg:1102.00ms tokens_per_s:475917 startup_s:69.5 compiled_graphs:5 "
    summary += "peak_memory:19000MiB peak_reserved:22528MiB world_size:1"
    fields = dict(field.split(":", 1) for field in summary.split()) | dict(device="NVIDIA H200")
    result, failures = trainer_run.measure(fields, args, 600, 23900, max_card_gib=24)
    assert failures == [] and result["card_gib"] == pytest.approx((22528 + 600) / 1024)
    assert result["timed_steps"] == 10 and result["peak_tflops"] == 989.0 and "H200" in result["peak_source"]
    assert result["mfu"] == pytest.approx(result["flops_per_token"] * 475917 / 989e12)
    assert trainer_run.measure(fields, args, 2048, 0, 24)[1] == ["over 24 GiB"]  # 24.0 GiB is not under
    assert trainer_run.measure(fields, args, 600, 24600, 24)[1] == ["over 24 GiB"]  # nvidia-smi saw more
    assert trainer_run.measure(dict(fields, train_time="0ms", step_avg="nan"), args)[1] == ["no timed step"]
    assert trainer_run.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0


def test_check_shards_hold_documents_of_700_tokens_on_average():
    tokens = trainer_run.document_tokens(2_000_000, 50304, 50256, 700, seed=1)
    starts = (tokens == 50256).nonzero()[0]
    assert (
        starts[0] == 0 and tokens.max() == 50256 and len(tokens) / len(starts) == pytest.approx(700, rel=0.05)
    )


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
