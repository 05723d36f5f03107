"""Tests for records/compare.py on hand-built logs of both layouts and on a real CPU record of the trainer."""

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_one_line_error
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "records"))
sys.path.insert(0, ROOT)
import compare  # noqa: E402

COMPARE = os.path.join(ROOT, "records", "compare.py")
DIV = "=" * 100
SRC_A = ["import torch", "", "def main():", "    lr = 0.02", "    steps = 100", "    return lr", ""]
SRC_B = ["import torch", "", "def main():", "    lr = 0.03", "    steps = 100", "    return lr", ""]
OUR_ENV = [
    "Running Python 3.11.7",
    "Running PyTorch 2.13.0+cpu compiled for CUDA None",
    "CPU: Intel(R) Xeon(R) (2 cores)",
]


def nvidia_smi(gpus=8, name="NVIDIA H100 80GB HBM3"):
    """The table nvidia-smi prints (driver 550), as the public logs hold it."""
    rule = "+-----------------------------------------+------------------------+----------------------+"
    lines = [
        "Fri Nov  8 01:23:45 2024       ",
        "+" + "-" * 89 + "+",
        "| NVIDIA-SMI 550.90.07              Driver Version: 550.90.07      CUDA Version: 12.4     |",
        rule,
        "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |",
        "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |",
        "|                                         |                        |               MIG M. |",
        "|=========================================+========================+======================|",
    ]
    for i in range(gpus):
        lines += [
            f"|   {i}  {name:<28}On  |   00000000:{0x19 + i:02X}:00.0 Off |                    0 |",
            "| N/A   38C    P0            117W /  700W |    7734MiB /  81559MiB |      0%      Default |",
            "|                                         |                        |             Disabled |",
            rule,
        ]
    return lines + [
        "",
        "+" + "-" * 89 + "+",
        "| Processes:                                                                              |",
        "|  GPU   GI   CI        PID   Type   Process name                              GPU Memory |",
        "|        ID   ID                                                               Usage      |",
        "|" + "=" * 89 + "|",
        "+" + "-" * 89 + "+",
        "",
    ]


def curve(step, n, final):
    """A smooth made-up val curve from ln(50304) at step 0 down to exactly `final` at step n."""
    return final + (math.log(50304) - final) * (1 - step / n) ** 3


def make_log(
    path,
    src=SRC_A,
    n=100,
    final=3.27,
    ms=150.0,
    val_every=25,
    stop_at=None,
    hparams=None,
    extra=(),
    tail=("peak memory consumption: 31245 MiB",),
    nan_from=None,
    val=True,
    newline="\n",
    public=False,
    env=OUR_ENV,
):
    """Write a run log: ours (source, '=', environment, '=', steps) or the public speedrun's (a '=' line
    first, 'Running pytorch', nvidia-smi). Train time counts only steps after step 10, so train_time at
    step s is ms * max(0, s - 10), and step_avg is nan up to step 10."""
    if public:
        lines = [
            DIV,
            *src,
            DIV,
            "Running pytorch 2.5.1+cu124 compiled for CUDA 12.4",
            "nvidia-smi:",
            *nvidia_smi(),
        ]
    else:
        flags = (
            [
                "Hyperparameters:",
                *[f"--{k}={v}" for k, v in hparams.items()],
                "Notes:",
                "--device_batch_size=auto chose 64 (a note that looks like a flag)",
            ]
            if hparams
            else []
        )
        lines = [*src, DIV, *env, *flags]
    lines.append(DIV)
    last = n if stop_at is None else stop_at
    for s in range(last + 1):
        t = ms * max(0, s - 10)
        avg = f"{t / (s - 10):.2f}" if s > 10 else "nan"
        if val and (s % val_every == 0 or s == n):
            v = math.nan if nan_from is not None and s >= nan_from else curve(s, n, final)
            lines.append(f"step:{s}/{n} val_loss:{v:.4f} train_time:{t:.0f}ms step_avg:{avg}ms")
        if s < n:
            loss = math.nan if nan_from is not None and s + 1 >= nan_from else curve(s + 1, n, final) + 0.05
            t1 = ms * max(0, s + 1 - 10)
            avg1 = f"{t1 / (s + 1 - 10):.2f}" if s + 1 > 10 else "nan"
            lines.append(f"step:{s + 1}/{n} train_loss:{loss:.4f} train_time:{t1:.0f}ms step_avg:{avg1}ms")
        if s == 50:
            lines += list(extra)
    lines += list(tail)
    with open(path, "w", newline="") as f:
        f.write(newline.join(lines) + newline)
    return path


A_FINALS, A_MS = [3.2790, 3.2770, 3.2775], [150.0, 152.0, 149.0]
B_FINALS, B_MS = [3.2740, 3.2730, 3.2755, 3.2748], [140.0, 141.0, 139.5, 140.5]


def make_side(folder, src, finals, mss, muon_lr, **kwargs):
    folder.mkdir()
    for i, (v, ms) in enumerate(zip(finals, mss)):  # seeds differ, yet the runs are one configuration
        make_log(
            folder / f"seed{i}.txt",
            src,
            final=v,
            ms=ms,
            hparams={"muon_lr": muon_lr, "seq_len": 1024, "seed": i},
            **kwargs,
        )
    return str(folder)


@pytest.fixture
def sides(tmp_path):
    a = make_side(tmp_path / "2024-11-06_base", SRC_A, A_FINALS, A_MS, 0.02)
    b = make_side(tmp_path / "2024-11-08_bf16", SRC_B, B_FINALS, B_MS, 0.03)
    (tmp_path / "2024-11-08_bf16" / "README.md").write_text("what changed\n")  # not a run: skipped silently
    return a, b


def run_json(capsys, *args):
    compare.main([*args, "--json"])
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def cli(*args):
    return subprocess.run(
        [sys.executable, COMPARE, *map(str, args)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy, on the identical step-0 losses
def test_numbers_match_independent_computation(sides, capsys):
    rep, err = run_json(capsys, *sides)
    assert err == ""  # clean logs give no warnings
    n, target = 100, 3.28
    for side, finals, mss in zip(rep["sides"], (A_FINALS, B_FINALS), (A_MS, B_MS)):
        runs, st = side["runs"], side["stats"]
        assert [r["val_loss"] for r in runs] == pytest.approx(finals, abs=1e-4)
        assert all(r["steps"] == n and r["total_steps"] == n and r["complete"] for r in runs)
        times = np.array([ms * (n - 10) for ms in mss])
        assert [r["train_time_ms"] for r in runs] == pytest.approx(times, abs=0.5)
        assert [r["ms_per_step"] for r in runs] == pytest.approx(mss, abs=0.01)
        # time to target: linear between the last val point above 3.28 (step 75) and the first below (100)
        for r, v, ms in zip(runs, finals, mss):
            above, below = round(curve(75, n, v), 4), round(curve(100, n, v), 4)
            frac = (above - target) / (above - below)
            assert r["target_step"] == pytest.approx(75 + 25 * frac, abs=1e-9)
            assert r["target_time_ms"] == pytest.approx(ms * 65 + frac * ms * 25, abs=1.0)
        vals = np.round(finals, 4)
        assert st["val_loss"]["mean"] == pytest.approx(vals.mean(), abs=1e-9)
        assert st["val_loss"]["std"] == pytest.approx(vals.std(ddof=1), rel=1e-6)
        assert st["val_loss"]["n"] == len(finals)
        assert st["train_time_ms"]["mean"] == pytest.approx(times.mean(), abs=0.5)
        assert st["ms_per_step"]["std"] == pytest.approx(np.std(mss, ddof=1), abs=0.01)
        t = side["below_target_test"]
        want = stats.ttest_1samp(vals, target, alternative="less")
        assert t["p"] == pytest.approx(want.pvalue, rel=1e-9) and t["t"] == pytest.approx(want.statistic)
        assert ("p < 0.01" in t["verdict"]) == (want.pvalue < 0.01)
        # the earliest val step where the runs are below the target with p < 0.01, by brute force
        at_step = {s: [round(curve(s, n, v), 4) for v in finals] for s in range(0, n + 1, 25)}
        first = next(
            (
                s
                for s, vs in at_step.items()
                if stats.ttest_1samp(vs, target, alternative="less").pvalue < 0.01
            ),
            None,
        )
        assert side["earliest_significant_step"] == first
    assert (
        rep["sides"][0]["earliest_significant_step"] is None
        and rep["sides"][1]["earliest_significant_step"] == 100
    )
    c = rep["comparisons"][0]
    ta, tb = np.mean(A_MS) * 90, np.mean(B_MS) * 90
    assert c["train_time_ratio"] == pytest.approx(tb / ta, rel=1e-4)
    assert c["ms_per_step_ratio"] == pytest.approx(np.mean(B_MS) / np.mean(A_MS), rel=1e-4)
    welch = stats.ttest_ind(np.round(B_FINALS, 4), np.round(A_FINALS, 4), equal_var=False)
    assert c["welch_val_loss"]["p"] == pytest.approx(welch.pvalue, rel=1e-9)
    assert c["welch_val_loss"]["t"] == pytest.approx(welch.statistic, rel=1e-9)
    assert c["hyperparameter_diff"] == {"muon_lr": ["0.02", "0.03"]}  # seed differs too, but is per run
    hparams = compare.parse_log(os.path.join(sides[0], "seed1.txt"), target).hparams
    assert hparams == {"muon_lr": "0.02", "seq_len": "1024", "seed": "1"}  # the flags block, not the notes
    assert c["timings_comparable"] is True


def sample_with(mean, std, n):
    """n values whose mean and sample std are exactly these."""
    z = np.linspace(-1, 1, n)
    return mean + std * (z - z.mean()) / z.std(ddof=1)


@pytest.mark.parametrize("mean, std", [(3.2778, 0.00104), (3.2790, 0.0015), (3.2799, 0.002), (3.27, 0.0001)])
def test_planner_gives_the_smallest_n(mean, std):
    def p(k):
        return stats.ttest_1samp(sample_with(mean, std, k), 3.28, alternative="less").pvalue

    n = compare.runs_needed(mean, std, 3.28)
    assert p(n) < 0.01 and (n == 2 or p(n - 1) >= 0.01), n


def test_planner_in_the_report(sides, capsys):
    rep, _ = run_json(capsys, *sides)
    for side, finals in zip(rep["sides"], (A_FINALS, B_FINALS)):
        vals = np.round(finals, 4)
        need = next(
            k
            for k in itertools.count(2)
            if stats.ttest_1samp(
                sample_with(vals.mean(), vals.std(ddof=1), k), 3.28, alternative="less"
            ).pvalue
            < 0.01
        )
        assert side["planner"]["runs_needed"] == need
    assert rep["sides"][0]["planner"]["runs_needed"] > 3  # A is not significant with its 3 runs
    rep, _ = run_json(capsys, *sides, "--target", "3.274")  # A's mean is above this target
    plan = rep["sides"][0]["planner"]
    assert plan["runs_needed"] is None and "no number of runs" in plan["note"]


def test_text_table_and_code_diff(sides, capsys):
    compare.main(list(sides))
    out = capsys.readouterr().out
    assert "-    lr = 0.02" in out and "+    lr = 0.03" in out
    assert "    steps = 100" in out and "-    steps" not in out  # context, not a change
    flags = out.split("== hyperparameters")[1].split("\n\n")[0]
    assert (
        "muon_lr" in flags and "seq_len" not in flags and "seed" not in flags
    )  # only changed configuration flags
    assert f"{np.mean(np.round(A_FINALS, 4)):.4f} ± {np.std(np.round(A_FINALS, 4), ddof=1):.4f} (n=3)" in out
    assert f"ms/step B/A: {np.mean(B_MS) / np.mean(A_MS):.4f}" in out
    assert "Welch" in out and out.count("one-sided") == 2 and out.count("planner") == 2
    assert "n=4" in out and "not comparable" not in out
    rows = [line for line in out.splitlines() if line.startswith(("  A  ", "  B  "))]
    assert len(rows) == 7 and len({line.index("100/100") for line in rows}) == 1  # aligned columns


def test_public_layout(tmp_path, capsys):
    a = make_log(tmp_path / "a.txt", SRC_A, final=3.2791, public=True)
    b = make_log(tmp_path / "b.txt", SRC_B, final=3.2781, public=True)
    rep, err = run_json(capsys, str(a), str(b))
    assert err == ""  # no spurious warnings: the nvidia-smi table is environment, not steps
    changed = [line for line in rep["comparisons"][0]["code_diff"].splitlines()[2:] if line[:1] in "+-"]
    assert changed == ["-    lr = 0.02", "+    lr = 0.03"]
    run = compare.parse_log(str(a), 3.28)
    assert run.source == SRC_A  # the source, without the dividers
    assert run.complete and run.final_val == 3.2791
    assert run.machine == "8x NVIDIA H100 80GB HBM3"
    assert run.env["pytorch"] == "2.5.1+cu124" and run.env["cuda"] == "12.4"
    assert rep["sides"][0]["environment"] == [
        {"setup": "8x NVIDIA H100 80GB HBM3, PyTorch 2.5.1+cu124, CUDA 12.4", "runs": 1}
    ]
    assert rep["comparisons"][0]["timings_comparable"] is True


def test_different_machines_are_not_comparable(tmp_path, capsys):
    public = make_log(tmp_path / "h100.txt", public=True)
    ours = make_log(
        tmp_path / "cpu.txt",
        tail=(
            "summary: final_val_loss:3.2700 train_time:13500ms step_avg:150.00ms "
            "peak_memory:900MiB world_size:1 device:CPU Intel(R) Xeon(R)",
        ),
    )
    compare.main([str(public), str(ours)])
    out = capsys.readouterr().out
    assert (
        "8x NVIDIA H100 80GB HBM3, PyTorch 2.5.1+cu124" in out and "1x CPU Intel(R) Xeon(R) (2 cores)" in out
    )
    assert sum("not comparable" in line for line in out.splitlines()) == 1


def test_one_side_one_configuration(tmp_path, capsys):
    side = tmp_path / "side"
    make_side(side, SRC_A, [3.270, 3.272, 3.274], [150, 150, 150], 0.02)
    make_log(
        side / "x_other_source.txt", SRC_B, final=3.30, hparams={"muon_lr": 0.02, "seq_len": 1024, "seed": 8}
    )
    make_log(
        side / "y_longer.txt", SRC_A, n=120, final=3.25, hparams={"muon_lr": 0.02, "seq_len": 1024, "seed": 9}
    )
    rep, err = run_json(capsys, str(side), str(side / "seed0.txt"))
    assert "5 runs hold 3 configurations" in err and "--pool" in err
    assert "configuration 1: 3 run(s): seed0.txt, seed1.txt, seed2.txt" in err  # the first finished run's
    assert "2: 1 run(s), differs from 1 in source: x_other_source.txt" in err
    assert "3: 1 run(s), differs from 1 in total steps 120 vs 100: y_longer.txt" in err
    a = rep["sides"][0]
    assert a["stats"]["val_loss"]["n"] == 3 and a["stats"]["val_loss"]["mean"] == pytest.approx(3.272)
    assert [os.path.basename(r["file"]) for r in a["runs"] if not r["used"]] == [
        "x_other_source.txt",
        "y_longer.txt",
    ]
    assert len(a["configurations"]) == 3
    rep, err = run_json(capsys, str(side), str(side / "seed0.txt"), "--pool")
    assert rep["sides"][0]["stats"]["val_loss"]["n"] == 5 and "pool them all" in err


def test_several_variants(tmp_path, capsys):
    base = make_side(tmp_path / "base", SRC_A, A_FINALS, A_MS, 0.02)
    v1 = make_side(tmp_path / "v1", SRC_B, B_FINALS, B_MS, 0.03)
    v2_finals, v2_ms = [3.2800, 3.2810, 3.2795], [130.0, 131.0, 129.0]
    v2 = make_side(tmp_path / "v2", SRC_B, v2_finals, v2_ms, 0.04)
    rep, err = run_json(capsys, base, v1, v2)
    assert err == "" and [s["name"] for s in rep["sides"]] == ["base", "V1", "V2"]
    a = np.round(A_FINALS, 4)
    for c, finals, mss in zip(rep["comparisons"], (B_FINALS, v2_finals), (B_MS, v2_ms)):
        v = np.round(finals, 4)
        assert c["welch_val_loss"]["p"] == pytest.approx(
            stats.ttest_ind(v, a, equal_var=False).pvalue, rel=1e-9
        )
        assert c["welch_val_loss"]["mean_diff"] == pytest.approx(v.mean() - a.mean())
        assert c["train_time_ratio"] == pytest.approx(np.mean(mss) / np.mean(A_MS), rel=1e-4)
        assert c["train_time_diff_ms"] == pytest.approx((np.mean(mss) - np.mean(A_MS)) * 90, abs=1)
    compare.main([base, v1, v2])
    out = capsys.readouterr().out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.startswith(("  base ", "  V1 ", "  V2 ")) and "±" in line
    ]
    assert [r[0] for r in rows] == ["base", "V1", "V2"]
    assert (
        f"{np.mean(v2_ms) / np.mean(A_MS):.4f}" in rows[2] and rows[0].count("-") == 4
    )  # the base has no deltas
    assert "code diff" not in out  # one row per variant, not the full report


def test_markdown(sides, capsys):
    compare.main([*sides, "--markdown"])
    out = capsys.readouterr().out
    assert "```diff\n" in out and "+    lr = 0.03" in out
    tables = [line for line in out.splitlines() if line.startswith("|")]
    assert any(set(line) <= set("|:-") for line in tables)  # a header separator
    assert sum(line.startswith("| A ") or line.startswith("| B ") for line in tables) == 7
    assert f"| {np.mean(np.round(A_FINALS, 4)):.4f} ± " in out and "### comparison" in out


def test_single_files_and_identical_sources(tmp_path, capsys):
    a = make_log(tmp_path / "a.txt", final=3.27)
    b = make_log(tmp_path / "b.txt", final=3.29)
    compare.main([str(a), str(b)])
    out = capsys.readouterr().out
    assert "script sources identical" in out and "needs >= 2 finished runs" in out


def test_plot_is_png(sides, tmp_path, capsys):
    out = tmp_path / "curves.png"
    compare.main([*sides, "--plot", str(out)])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 2_000_000
    import matplotlib.image

    h, w = matplotlib.image.imread(str(out)).shape[:2]
    assert w > 1000 and h > 800  # two rows: the whole curves, and zoomed near the target


def test_mean_curve_and_band(tmp_path):
    finals = [3.270, 3.280, 3.275]
    runs = [
        compare.parse_log(str(make_log(tmp_path / f"{i}.txt", final=v, ms=140 + i)), 3.28)
        for i, v in enumerate(finals)
    ]
    steps, times, mean, low, high = compare.mean_curve(runs)
    assert list(steps) == [0, 25, 50, 75, 100]
    losses = np.array([[round(curve(s, 100, v), 4) for v in finals] for s in steps])
    assert mean == pytest.approx(losses.mean(1)) and low == pytest.approx(losses.min(1))
    assert high == pytest.approx(losses.max(1))
    assert times == pytest.approx(
        [np.mean([(140 + i) * max(0, s - 10) / 1000 for i in range(3)]) for s in steps], abs=1e-3
    )
    no_val = compare.parse_log(str(make_log(tmp_path / "train_only.txt", val=False)), 3.28)
    assert all(len(x) == 0 for x in compare.mean_curve([no_val]))  # nothing to draw, and no error


@pytest.mark.parametrize(
    "case, kwargs, message",
    [
        (
            "early",
            dict(stop_at=60, tail=("stopped: killed",)),
            "ended early at step 61 of 100",
        ),  # train line of step 61
        ("nan", dict(nan_from=37, tail=("stopped: NaN loss at step 37",)), "NaN/inf loss at step 37"),
        ("trainonly", dict(val=False), "train-loss lines only"),
        (
            "extra",
            dict(extra=("some newer script prints this", "lr:0.01 warmup done")),
            "2 unrecognised line(s)",
        ),
        ("malformed", dict(extra=("step:51/100 val_lo",)), "1 malformed step line(s)"),
    ],
)
def test_malformed_logs_warn(tmp_path, capsys, case, kwargs, message):
    folder = tmp_path / "side"
    folder.mkdir()
    for i in range(3):
        make_log(folder / f"good{i}.txt", final=3.27 + i / 1000)
    bad = make_log(folder / f"{case}.txt", **kwargs)
    rep, err = run_json(capsys, str(folder), str(folder))
    assert f"{bad}: warning: {message}" in err
    runs = {os.path.basename(r["file"]): r for r in rep["sides"][0]["runs"]}
    assert len(runs) == 4  # the bad run is still reported
    if case in ("early", "nan", "trainonly"):
        assert rep["sides"][0]["stats"]["val_loss"]["n"] == 3 and "left out of val-loss" in err
    if case == "early":
        assert runs["early.txt"]["steps"] == 61 and not runs["early.txt"]["complete"]
        assert runs["early.txt"]["train_time_ms"] == pytest.approx(150 * 51)
    if case == "nan":
        assert runs["nan.txt"]["val_loss"] is None  # NaN becomes null in JSON
    if case == "trainonly":
        assert runs["trainonly.txt"]["ms_per_step"] == pytest.approx(150.0)


def test_log_cut_mid_number_is_not_a_complete_run(tmp_path):
    """A run killed while writing its final val line (no newline, no summary:)."""
    side = tmp_path / "side"
    make_side(
        side,
        SRC_A,
        [3.270, 3.272],
        [150, 150],
        0.02,
        tail=("summary: final_val_loss:3.2700 train_time:13500ms step_avg:150.00ms",),
    )
    full = make_log(
        side / "killed.txt",
        final=3.2791,
        hparams={"muon_lr": 0.02, "seq_len": 1024, "seed": 2},
        tail=("summary: final_val_loss:3.2791 train_time:13500ms",),
    )
    text = full.read_text()
    cut = text.index("step:100/100 val_loss:") + len("step:100/100 val_loss:3.2")
    full.write_text(text[:cut])  # reads as val loss 3.2 if taken at face value
    r = cli(side, side / "seed0.txt", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    warned = [line for line in r.stderr.splitlines() if "killed.txt" in line and "cut off" in line]
    assert len(warned) == 1, r.stderr
    a = json.loads(r.stdout)["sides"][0]
    killed = next(run for run in a["runs"] if run["file"].endswith("killed.txt"))
    assert not killed["complete"] and killed["val_loss"] == pytest.approx(round(curve(75, 100, 3.2791), 4))
    assert a["stats"]["val_loss"]["n"] == 2 and a["stats"]["val_loss"]["mean"] == pytest.approx(3.271)
    full.write_text(text)  # the same log whole is a complete run
    assert compare.parse_log(str(full), 3.28).complete


def test_target_must_be_a_finite_loss(sides):
    """A target that no loss can be compared with is refused in one line."""
    for bad in ("nan", "inf", "-1"):
        assert_one_line_error(cli(*sides, "--target", bad), "--target", bad)


def test_unwritable_plot_is_refused_before_the_report(sides, tmp_path):
    """--plot into a missing folder or with an unknown image type fails before any report."""
    assert_one_line_error(cli(*sides, "--plot", tmp_path / "missing" / "c.png"), "--plot", "does not exist")
    assert_one_line_error(
        cli(*sides, "--plot", tmp_path / "c.foo"), "--plot", "unknown image type .foo", ".png"
    )
    with pytest.raises(SystemExit, match="no image type"):
        compare.main([*sides, "--plot", str(tmp_path / "curves")])
    assert not any(p.name.startswith("c") for p in tmp_path.iterdir())


def test_windows_line_endings(tmp_path, capsys):
    a = make_log(tmp_path / "a.txt", SRC_A, final=3.275, hparams={"x": 1}, newline="\r\n")
    b = make_log(tmp_path / "b.txt", SRC_B, final=3.271, hparams={"x": 2}, newline="\r\n")
    assert b"\r\n" in a.read_bytes()
    rep, err = run_json(capsys, str(a), str(b))
    assert err == ""
    assert (
        rep["sides"][0]["runs"][0]["val_loss"] == pytest.approx(3.275)
        and rep["sides"][0]["runs"][0]["complete"]
    )
    c = rep["comparisons"][0]
    assert c["hyperparameter_diff"] == {"x": ["1", "2"]}
    assert "\r" not in c["code_diff"] and "+    lr = 0.03" in c["code_diff"]


def test_no_divider_and_empty_run_warn(tmp_path, capsys):
    bare = tmp_path / "bare.txt"
    bare.write_text(
        "step:0/10 val_loss:10.8258 train_time:0ms step_avg:nanms\n"
        "step:10/10 val_loss:6.0000 train_time:0ms step_avg:nanms\n"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("print('hi')\n" + DIV + "\nRunning Python 3.11\n" + DIV + "\n")
    rep, err = run_json(capsys, str(bare), str(empty))
    assert f"{bare}: warning: no line of 100 '='" in err
    assert f"{empty}: warning: no step lines" in err
    assert rep["sides"][0]["runs"][0]["val_loss"] == 6.0 and rep["sides"][1]["runs"][0]["steps"] == -1


def test_bad_input_is_refused(tmp_path, capsys):
    good = make_log(tmp_path / "good.txt")
    notes = tmp_path / "notes.txt"
    notes.write_text("just some notes\nnothing to see\n")
    binary = tmp_path / "shard.bin"
    binary.write_bytes(b"\x00\x01" * 100)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for args, message in [
        ((notes, good), f"compare.py: {notes} is not a run log"),
        ((good, binary), f"compare.py: {binary} is not a run log (binary data)"),
        ((tmp_path / "missing.txt", good), "no such file or folder"),
        ((good, empty_dir), "no run logs"),
    ]:
        with pytest.raises(SystemExit) as e:
            compare.main([str(a) for a in args])
        assert message in str(e.value) and "\n" not in str(e.value)
    # a non-log .txt inside a folder is skipped with a warning, not fatal
    side = tmp_path / "side"
    side.mkdir()
    os.replace(good, side / "good.txt")
    os.replace(notes, side / "notes.txt")
    rep, err = run_json(capsys, str(side), str(side))
    assert len(rep["sides"][0]["runs"]) == 1 and f"{side / 'notes.txt'}: warning: skipped" in err


def test_ten_thousand_steps_parse_whole(tmp_path):
    path = make_log(tmp_path / "long.txt", n=10_000, val_every=125)
    assert sum(1 for _ in open(path)) > 10_000
    run = compare.parse_log(str(path), 3.28)
    assert run.complete and run.last_step == 10_000 and len(run.train) == 10_000 and len(run.val) == 81


def test_cli_runs_as_script(sides):
    r = cli(*sides, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sides"][1]["stats"]["val_loss"]["n"] == 4
    assert_one_line_error(cli(sides[0], "/nonexistent"), "/nonexistent", "no such file or folder")


def test_compare_never_imports_torch(sides):
    code = (
        f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'records')!r}); import compare; "
        f"compare.main([{sides[0]!r}, {sides[1]!r}, '--json']); assert 'torch' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


TRAINER = os.path.join(ROOT, "train_gpt2.py")


def test_trainer_cpu_record_parses(tmp_path, capsys):
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(str(tmp_path / "fineweb_train_000001.bin"), rng.integers(0, 256, 20_000))
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), rng.integers(0, 256, 5_000))
    records = tmp_path / "records"
    cmd = [
        sys.executable,
        TRAINER,
        "--num_layers=2",
        "--model_dim=64",
        "--num_heads=2",
        "--vocab_size=256",
        "--seq_len=32",
        "--batch_size=8",
        "--device_batch_size=8",
        "--num_iterations=4",
        "--val_tokens=512",
        "--warmdown_iters=2",
        "--val_loss_every=2",
        "--untimed_steps=1",
        "--device=cpu",
        f"--checkpoint_dir={tmp_path}/checkpoints",
        f"--input_bin={tmp_path}/fineweb_train_*.bin",
        f"--input_val_bin={tmp_path}/fineweb_val_*.bin",
        f"--records_dir={records}",
        "--run_name=x",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    logs = [os.path.join(d, f) for d, _, fs in os.walk(records) for f in fs if f.endswith(".txt")]
    assert len(logs) == 1, logs
    run = compare.parse_log(logs[0], 3.28)
    assert capsys.readouterr().err == ""
    assert "\n".join(run.files["train_gpt2.py"]).rstrip() == open(TRAINER).read().rstrip()  # verbatim source
    for name, lines in run.files.items():  # every further file (harness.py, ...) under its own name, verbatim
        assert "\n".join(lines).rstrip() == open(os.path.join(ROOT, name)).read().rstrip(), name
    assert run.hparams["num_layers"] == "2" and run.hparams["num_iterations"] == "4"
    assert run.complete and run.last_step == run.total_steps == 4
    assert run.val[0][0] == 0 and math.isfinite(run.final_val) and run.final_val < run.val[0][1] + 0.5
    assert [p[0] for p in run.train] == [1, 2, 3, 4]
    assert run.machine.startswith("1x CPU ") and run.env["pytorch"]  # from our environment lines and summary
    compare.main([logs[0], logs[0], "--json", "--plot", str(tmp_path / "cpu.png")])
    rep = json.loads(capsys.readouterr().out)
    assert (tmp_path / "cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert rep["comparisons"][0]["code_diff"] == ""
    assert rep["sides"][0]["runs"][0]["val_loss"] == pytest.approx(run.final_val)


def test_a_non_numeric_target_is_one_line():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "records", "compare.py"), "a", "b", "--target", "x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--target" in r.stderr


# ---- layouts: every variant of the format reads to the plain layout's numbers, with no warning ----

RULE = "-" * 40
HARNESS = ["import os", "", "def log(line):", "    print(line)", ""]


def variant(path, public, features):
    """The plain log of make_log, rewritten with the given format features."""
    make_log(path, SRC_A, final=3.2771, public=public, hparams=None if public else {"untimed_steps": 10})
    lines = path.read_text().splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step:"))
    head, steps = lines[:first_step], lines[first_step:]
    if "second_file" in features:  # after the main source, before the first '=' line that closes it
        close = head.index(DIV, 1 if public else 0)
        head[close:close] = [RULE, "# harness.py", RULE, *HARNESS]
    if "third_section" in features:
        head += [
            "Training DataLoader: total number of tokens: 1800000000 across 18 files",
            "Validation DataLoader: total number of tokens: 10485760 across 1 files",
            DIV,
        ]
    if "compile_notes" in features:
        head += ["Compiling model and warming up kernels (~7 minutes on first execution)", "warmup done"]
    if "train_without_loss" in features:
        steps = [re.sub(r" train_loss:\S+", "", line) for line in steps]
    if "parameters" in features:
        steps += [
            DIV,
            "scalars: torch.Size([64]) torch.float32 1.0 5.0",
            "embed: torch.Size([50304, 768]) bf16",
        ]
    path.write_text("\n".join(head + steps) + "\n")
    return path


FEATURES = ["second_file", "third_section", "compile_notes", "train_without_loss", "parameters"]
NUMBERS = ("steps", "total_steps", "complete", "val_loss", "train_time_ms", "ms_per_step", "target_step")


@pytest.mark.parametrize("public", [True, False])
@pytest.mark.parametrize("features", [[f] for f in FEATURES] + [FEATURES])
def test_format_variants_read_like_the_plain_layout(tmp_path, capsys, public, features):
    plain = variant(tmp_path / "plain.txt", public, [])
    other = variant(tmp_path / "variant.txt", public, features)
    rep, err = run_json(capsys, str(plain), str(other))
    assert err == ""
    a, b = (s["runs"][0] for s in rep["sides"])
    assert a["steps"] == 100 and a["complete"] and a["train_time_ms"] == 13500
    assert {k: b[k] for k in NUMBERS} == {k: a[k] for k in NUMBERS}
    run = compare.parse_log(str(other), 3.28)
    assert run.files["train_gpt2.py"] == SRC_A  # the source is never mixed with metadata
    assert ("harness.py" in run.files) == ("second_file" in features)
    if "second_file" in features:
        assert run.files["harness.py"] == HARNESS
    assert run.env.get("pytorch") and run.machine  # the environment is the section after the source
    if "third_section" in features:
        assert "Training DataLoader: total number of tokens: 1800000000 across 18 files" in run.metadata
        assert not any("DataLoader" in line for line in run.source)
    if "parameters" in features:
        assert run.metadata[-1].startswith("embed: torch.Size")


def test_cut_log_reports_its_last_whole_line(tmp_path):
    """A log cut anywhere in its steps is read to its last whole line: that line's step and train time."""
    full = make_log(tmp_path / "full.txt", tail=())
    data = full.read_bytes()
    begin = data.index(b"step:")
    for frac in np.linspace(0.05, 0.999, 23):
        cut = begin + int((len(data) - begin) * frac)
        part = tmp_path / "cut.txt"
        part.write_bytes(data[:cut])
        whole = data[: data.rindex(b"\n", 0, cut) + 1].decode().splitlines()
        last = next(line for line in reversed(whole) if line.startswith("step:"))
        step, t = int(last.split()[0][5:].split("/")[0]), float(last.split("train_time:")[1].split("ms")[0])
        run = compare.parse_log(str(part), 3.28)
        assert (run.last_step, run.train_time_ms) == (step, t), frac
        assert not run.complete


def test_time_to_target_counts_runs_that_never_reached(tmp_path, capsys):
    side = tmp_path / "side"
    make_side(side, SRC_A, [3.270, 3.275, 3.300], [150, 150, 150], 0.02)
    rep, _ = run_json(capsys, str(side))
    st = rep["sides"][0]["stats"]
    reached = sorted(r["target_time_ms"] for r in rep["sides"][0]["runs"] if r["target_time_ms"] is not None)
    assert len(reached) == 2 and st["target_time_ms"]["reached"] == 2 and st["target_time_ms"]["n"] == 3
    assert st["target_time_ms"]["median"] == pytest.approx(
        reached[1]
    )  # the miss counts as +inf, not as absent
    make_log(side / "seed3.txt", final=3.31, hparams={"muon_lr": 0.02, "seq_len": 1024, "seed": 3})
    rep, _ = run_json(capsys, str(side))
    assert rep["sides"][0]["stats"]["target_step"] == {"median": None, "reached": 2, "n": 4}
    compare.main([str(side)])
    assert "(2 of 4 reached)" in capsys.readouterr().out


def test_unknown_environment_is_one_line(tmp_path, capsys):
    a = make_log(tmp_path / "a.txt")
    b = make_log(tmp_path / "b.txt", env=["Running Python 3.11.7"])
    compare.main([str(a), str(b)])
    out = capsys.readouterr().out
    assert sum("comparability is unknown" in line for line in out.splitlines()) == 1
    assert "not comparable" not in out


def test_machine_flags_do_not_split_a_configuration(tmp_path, capsys):
    side = tmp_path / "abrec[x]"  # a path, never a pattern
    side.mkdir()
    for i, extra in enumerate([{}, {"device_batch_size": 8, "compile": "true"}, {"device": "cpu"}]):
        make_log(side / f"r{i}.txt", final=3.27, hparams={"muon_lr": 0.02, "seed": i, **extra})
    rep, err = run_json(capsys, str(side), str(side / "r0.txt"))
    assert err == "" and len(rep["sides"][0]["configurations"]) == 1 and len(rep["sides"][0]["runs"]) == 3


# ---- resumed runs ----


def our_record(path, n=100, last=None, start=0, ms=150.0, untimed=10, parent=None, final=3.27, tail=None):
    """A record of ours from `start` to `last`: the trainer's clock goes on from the checkpoint's (restored at
    step `start`), and the part leaves its own first `untimed` steps out."""
    last = n if last is None else last
    restored = ms * max(0, start - untimed)  # what the parent's clock held at the checkpoint

    def clock(s):
        timed = restored / ms + max(0, s - start - untimed)
        return f"train_time:{ms * timed:.0f}ms step_avg:{ms if timed else math.nan:.2f}ms"

    notes = (
        [f"resumed_from: ck/run-step{start:06d}.pt at step {start} (parent record {parent})"]
        if parent
        else []
    )
    lines = [*SRC_A, DIV, *OUR_ENV, "Hyperparameters:", f"--untimed_steps={untimed}", "--seed=0"]
    lines += [f"--resume={'ck.pt' if parent else ''}", "Notes:", *notes, "cpu_threads: 2", DIV]
    for s in range(start, last + 1):
        if s % 25 == 0 or s == n:
            lines.append(f"step:{s}/{n} val_loss:{curve(s, n, final):.4f} {clock(s)}")
        if s < last:
            lines.append(f"step:{s + 1}/{n} train_loss:{curve(s + 1, n, final) + 0.05:.4f} {clock(s + 1)}")
    lines += tail if tail is not None else [f"summary: final_val_loss:{final:.4f} {clock(last)} world_size:1"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("resume_at, killed_at", [(50, 60), (95, 95), (5, 8)])
def test_a_resumed_run_is_one_run_with_the_same_time(tmp_path, capsys, resume_at, killed_at):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    our_record(a / "fresh.txt")
    stopped = ["stopped: SIGTERM at step 60: checkpoint saved", "summary: last_val_loss:3.4 last_val_step:50"]
    our_record(b / "1-parent.txt", last=killed_at, tail=stopped)
    our_record(b / "2-child.txt", start=resume_at, parent=f"records/2024-01-01_other/{'1-parent.txt'}")
    rep, err = run_json(capsys, str(a), str(b))
    assert err == ""
    runs = rep["sides"][1]["runs"]
    assert len(runs) == 1 and [os.path.basename(p) for p in runs[0]["parts"]] == [
        "1-parent.txt",
        "2-child.txt",
    ]
    fresh, chained = rep["sides"][0]["runs"][0], runs[0]
    assert fresh["train_time_ms"] == 150 * 90 and fresh["estimated_ms"] == 0
    # the child's untimed steps that the fresh run timed: those after step 10
    assert chained["estimated_ms"] == 150 * (min(resume_at + 10, 100) - max(resume_at, 10))
    assert rep["comparisons"][0]["train_time_ratio"] == 1.0  # exactly, by the rule
    assert chained["ms_per_step"] == 150.0 and chained["complete"]
    for key in ("val_loss", "target_step", "target_time_ms", "steps"):
        assert chained[key] == pytest.approx(fresh[key])
    compare.main([str(a), str(b)])
    out = capsys.readouterr().out
    assert "+1 part" in out and "13.5s*" in out and "estimated" in out and " 0.00 " not in out


def test_a_resumed_part_alone_never_shows_zero_ms_per_step(tmp_path, capsys):
    child = our_record(tmp_path / "child.txt", start=95, parent="records/x/gone.txt")
    rep, err = run_json(capsys, str(child))
    r = rep["sides"][0]["runs"][0]
    assert "not found" in err and len(err.strip().splitlines()) == 1
    assert r["ms_per_step"] == 150.0 and r["train_time_ms"] == 150 * 90


def test_duplicate_step_lines_are_flagged_once(tmp_path, capsys):
    parent = our_record(tmp_path / "p.txt", last=60, tail=[])
    child = our_record(tmp_path / "c.txt", start=50)
    text = parent.read_text() + "\n".join(
        line for line in child.read_text().splitlines() if line.startswith(("step:", "summary:"))
    )
    parent.write_text(text + "\n")
    rep, err = run_json(capsys, str(parent))
    warned = [line for line in err.splitlines() if "repeat earlier steps" in line]
    assert len(warned) == 1 and "11 step line(s)" in warned[0] and "step 50" in warned[0], err
    assert rep["sides"][0]["runs"][0]["steps"] == 100


# ---- code diff per file, --markdown ----


@pytest.mark.parametrize("public", [True, False])
def test_diff_per_embedded_file(tmp_path, capsys, public):
    a = variant(tmp_path / "a.txt", public, ["second_file"])
    b = variant(tmp_path / "b.txt", public, ["second_file"])
    b.write_text(b.read_text().replace("    print(line)", "    print(line, flush=True)"))
    rep, err = run_json(capsys, str(a), str(b))
    c = rep["comparisons"][0]
    assert err == "" and c["changed_files"] == ["harness.py"]
    assert c["code_diff"].splitlines()[:2] == ["--- a/harness.py", "+++ b/harness.py"]
    assert [x for x in c["code_diff"].splitlines()[3:] if x[:1] in "+-"] == [
        "-    print(line)",
        "+    print(line, flush=True)",
    ]
    compare.main([str(a), str(a)])
    assert "(script sources identical)" in capsys.readouterr().out


def test_markdown_diff_is_short(tmp_path, capsys):
    src = [f"x{i} = {i}" for i in range(400)]
    changed = [f"x{i} = {i + 1}" if i % 20 == 0 else line for i, line in enumerate(src)]
    a, b = make_log(tmp_path / "a.txt", src), make_log(tmp_path / "b.txt", changed)
    compare.main([str(a), str(b), "--markdown"])
    out = capsys.readouterr().out
    shown = out.split("```diff\n")[1].split("```")[0].splitlines()
    assert 0 < sum(line.startswith("@@") for line in shown) < 20 and len(shown) <= 40 + 2
    assert "- `train_gpt2.py`:" in out and "<details><summary>full diff" in out and "</details>" in out
    full = out.split("<details>")[1].split("```diff\n")[1].split("```")[0]
    assert sum(line.startswith("+x") for line in full.splitlines()) == 20


# ---- one side, watched ----


def test_one_side_is_reported(tmp_path, capsys):
    live = our_record(tmp_path / "live.txt", last=70, tail=[])
    with open(live, "a") as f:
        f.write("step:71/100 train_loss:3.4")  # being written
    compare.main([str(live), "--plot", str(tmp_path / "live.png")])
    out = capsys.readouterr()
    row = next(line for line in out.out.splitlines() if line.startswith("  A  "))
    assert "70/100 early" in row and f"{150 * 60 / 1000:.1f}s" in row
    assert (tmp_path / "live.png").read_bytes()[:4] == b"\x89PNG" and "Traceback" not in out.err


def test_follow_stops_on_ctrl_c(tmp_path):
    import signal

    log = make_log(tmp_path / "a.txt")
    p = subprocess.Popen(
        [sys.executable, COMPARE, str(log), "--follow", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    first = p.stdout.readline()
    while b"----" not in p.stdout.readline() and time.monotonic() < deadline:
        pass
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert first and p.returncode == 130 and b"Traceback" not in err and err.strip().count(b"\n") == 0
    assert_one_line_error(cli(log, "--follow", "0"), "--follow")


def test_the_runs_table_shows_tokens_per_s_and_peak_reserved_where_a_summary_has_them(tmp_path, capsys):
    summary = "summary: final_val_loss:3.2700 train_time:13500ms step_avg:150.00ms tokens_per_s:475917 "
    summary += "startup_s:69.5 compiled_graphs:5 peak_memory:31742MiB peak_reserved:33000MiB world_size:1"
    a = our_record(tmp_path / "a.txt", tail=[summary + " device:NVIDIA H200"])
    b = our_record(tmp_path / "b.txt")  # a record from before the fields: shown as -
    rep, _ = run_json(capsys, str(a), str(b))
    run = rep["sides"][0]["runs"][0]
    assert (run["tokens_per_s"], run["peak_reserved_mib"], run["startup_s"]) == (475917, 33000, 69.5)
    assert rep["sides"][1]["runs"][0]["tokens_per_s"] is None  # JSON null: not in its summary
    compare.main([str(a), str(b)])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "tokens/s" in line)
    assert re.search(r"time@3\.28 +tokens/s +startup +peak reserved", header), header
    assert re.search(r"475,917 +69\.5s \(5 graphs\) +33,000 MiB", out), out
