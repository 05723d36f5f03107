"""Tests for records/compare.py on hand-built public-format logs and on a real CPU record of the trainer."""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "records"))
sys.path.insert(0, ROOT)
import compare  # noqa: E402

DIV = "=" * 100
SRC_A = ["import torch", "", "def main():", "    lr = 0.02", "    steps = 100", "    return lr", ""]
SRC_B = ["import torch", "", "def main():", "    lr = 0.03", "    steps = 100", "    return lr", ""]


def curve(step, n, final):
    """A smooth made-up val curve from ln(50304) at step 0 down to exactly `final` at step n."""
    return final + (math.log(50304) - final) * (1 - step / n) ** 3


def make_log(path, src=SRC_A, n=100, final=3.27, ms=150.0, val_every=25, stop_at=None, hparams=None,
             extra=(), tail=("peak memory consumption: 31245 MiB",), nan_from=None, val=True, newline="\n"):
    """Write a log in the public speedrun format. Train time counts only steps after step 10,
    so train_time at step s is ms * max(0, s - 10), and step_avg is nan up to step 10."""
    lines = list(src) + [DIV, "Running Python 3.11.7", "Running PyTorch 2.13.0+cpu compiled for CUDA none",
                         "CPU: Intel(R) Xeon(R) Processor"]
    if hparams:
        lines += ["Hyperparameters:"] + [f"--{k}={v}" for k, v in hparams.items()]
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


@pytest.fixture
def sides(tmp_path):
    a, b = tmp_path / "2024-11-06_base", tmp_path / "2024-11-08_bf16"
    a.mkdir(), b.mkdir()
    for i, (v, ms) in enumerate(zip(A_FINALS, A_MS)):
        make_log(a / f"seed{i}.txt", SRC_A, final=v, ms=ms, hparams={"muon_lr": 0.02, "seq_len": 1024})
    for i, (v, ms) in enumerate(zip(B_FINALS, B_MS)):
        make_log(b / f"seed{i}.txt", SRC_B, final=v, ms=ms, hparams={"muon_lr": 0.03, "seq_len": 1024})
    (b / "README.md").write_text("what changed\n")  # not a run: skipped silently
    return str(a), str(b)


def run_json(capsys, *args):
    compare.main([*args, "--json"])
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def test_numbers_match_independent_computation(sides, capsys):
    rep, err = run_json(capsys, *sides)
    assert err == ""  # clean logs give no warnings
    n, target = 100, 3.28
    for side, finals, mss in (("a", A_FINALS, A_MS), ("b", B_FINALS, B_MS)):
        runs, st = rep[side]["runs"], rep[side]["stats"]
        assert [r["val_loss"] for r in runs] == pytest.approx(finals, abs=1e-4)
        assert all(r["steps"] == n and r["total_steps"] == n and r["complete"] for r in runs)
        times = np.array([ms * (n - 10) for ms in mss])
        assert [r["train_time_ms"] for r in runs] == pytest.approx(times, abs=0.5)
        assert [r["ms_per_step"] for r in runs] == pytest.approx(mss, abs=0.01)
        # first val step <= target: the made-up curve is above 3.28 until the final step
        first = [next(s for s in range(0, n + 1, 25) if round(curve(s, n, v), 4) <= target) for v in finals]
        assert [r["target_step"] for r in runs] == first
        vals = np.round(finals, 4)
        assert st["val_loss"]["mean"] == pytest.approx(vals.mean(), abs=1e-9)
        assert st["val_loss"]["std"] == pytest.approx(vals.std(ddof=1), rel=1e-6)
        assert st["val_loss"]["n"] == len(finals)
        assert st["train_time_ms"]["mean"] == pytest.approx(times.mean(), abs=0.5)
        assert st["ms_per_step"]["std"] == pytest.approx(np.std(mss, ddof=1), abs=0.01)
        t = rep[side]["below_target_test"]
        want = stats.ttest_1samp(vals, target, alternative="less")
        assert t["p"] == pytest.approx(want.pvalue, rel=1e-9) and t["t"] == pytest.approx(want.statistic)
        assert ("p < 0.01" in t["verdict"]) == (want.pvalue < 0.01)
    c = rep["comparison"]
    ta, tb = np.mean(A_MS) * 90, np.mean(B_MS) * 90
    assert c["train_time_ratio"] == pytest.approx(tb / ta, rel=1e-4)
    assert c["ms_per_step_ratio"] == pytest.approx(np.mean(B_MS) / np.mean(A_MS), rel=1e-4)
    welch = stats.ttest_ind(np.round(B_FINALS, 4), np.round(A_FINALS, 4), equal_var=False)
    assert c["welch_val_loss"]["p"] == pytest.approx(welch.pvalue, rel=1e-9)
    assert c["welch_val_loss"]["t"] == pytest.approx(welch.statistic, rel=1e-9)
    assert rep["hyperparameter_diff"] == {"muon_lr": ["0.02", "0.03"]}


def test_text_table_and_code_diff(sides, capsys):
    compare.main(list(sides))
    out = capsys.readouterr().out
    assert "-    lr = 0.02" in out and "+    lr = 0.03" in out
    assert "    steps = 100" in out and "-    steps" not in out  # context, not a change
    assert "muon_lr" in out and "seq_len" not in out  # only changed hyperparameters
    assert f"{np.mean(np.round(A_FINALS, 4)):.4f} ± {np.std(np.round(A_FINALS, 4), ddof=1):.4f} (n=3)" in out
    assert f"ms/step B/A: {np.mean(B_MS) / np.mean(A_MS):.4f}" in out
    assert "Welch" in out and out.count("one-sided") == 2
    assert "n=4" in out
    rows = [line for line in out.splitlines() if line.startswith(("  A  ", "  B  "))]
    assert len(rows) == 7 and len({line.index("100/100") for line in rows}) == 1  # aligned columns


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
    assert w > 1000 and h > 400


@pytest.mark.parametrize("case, kwargs, message", [
    ("early", dict(stop_at=60, tail=("stopped: killed",)), "ended early at step 61 of 100"),  # + the train line of step 61
    ("nan", dict(nan_from=37, tail=("stopped: NaN loss at step 37",)), "NaN/inf loss at step 37"),
    ("trainonly", dict(val=False), "train-loss lines only"),
    ("extra", dict(extra=("some newer script prints this", "lr:0.01 warmup done")), "2 unrecognised line(s)"),
    ("malformed", dict(extra=("step:51/100 val_lo",)), "1 malformed step line(s)"),
])
def test_malformed_logs_warn(tmp_path, capsys, case, kwargs, message):
    good = [make_log(tmp_path / f"good{i}.txt", final=3.27 + i / 1000) for i in range(3)]
    bad = make_log(tmp_path / f"{case}.txt", **kwargs)
    folder = tmp_path / "side"
    folder.mkdir()
    for p in good + [bad]:
        os.replace(p, folder / p.name)
    rep, err = run_json(capsys, str(folder), str(folder))
    assert f"{folder / bad.name}: warning: {message}" in err
    runs = {os.path.basename(r["file"]): r for r in rep["a"]["runs"]}
    assert len(runs) == 4  # the bad run is still reported
    if case in ("early", "nan", "trainonly"):
        assert rep["a"]["stats"]["val_loss"]["n"] == 3 and "left out of val-loss" in err
    if case == "early":
        assert runs["early.txt"]["steps"] == 61 and not runs["early.txt"]["complete"]
        assert runs["early.txt"]["train_time_ms"] == pytest.approx(150 * 51)
    if case == "nan":
        assert runs["nan.txt"]["val_loss"] is None  # NaN becomes null in JSON
    if case == "trainonly":
        assert runs["trainonly.txt"]["ms_per_step"] == pytest.approx(150.0)


def test_windows_line_endings(tmp_path, capsys):
    a = make_log(tmp_path / "a.txt", SRC_A, final=3.275, hparams={"x": 1}, newline="\r\n")
    b = make_log(tmp_path / "b.txt", SRC_B, final=3.271, hparams={"x": 2}, newline="\r\n")
    assert b"\r\n" in a.read_bytes()
    rep, err = run_json(capsys, str(a), str(b))
    assert err == ""
    assert rep["a"]["runs"][0]["val_loss"] == pytest.approx(3.275) and rep["a"]["runs"][0]["complete"]
    assert rep["hyperparameter_diff"] == {"x": ["1", "2"]}
    assert "\r" not in rep["code_diff"] and "+    lr = 0.03" in rep["code_diff"]


def test_no_divider_and_empty_run_warn(tmp_path, capsys):
    bare = tmp_path / "bare.txt"
    bare.write_text("step:0/10 val_loss:10.8258 train_time:0ms step_avg:nanms\n"
                    "step:10/10 val_loss:6.0000 train_time:0ms step_avg:nanms\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("print('hi')\n" + DIV + "\nRunning Python 3.11\n" + DIV + "\n")
    rep, err = run_json(capsys, str(bare), str(empty))
    assert f"{bare}: warning: no line of 100 '='" in err
    assert f"{empty}: warning: no step lines" in err
    assert rep["a"]["runs"][0]["val_loss"] == 6.0 and rep["b"]["runs"][0]["steps"] == -1


def test_bad_input_is_refused(tmp_path, capsys):
    good = make_log(tmp_path / "good.txt")
    notes = tmp_path / "notes.txt"
    notes.write_text("just some notes\nnothing to see\n")
    binary = tmp_path / "shard.bin"
    binary.write_bytes(b"\x00\x01" * 100)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for args, message in [((notes, good), f"compare.py: {notes} is not a run log"),
                          ((good, binary), f"compare.py: {binary} is not a run log (binary data)"),
                          ((tmp_path / "missing.txt", good), "no such file or folder"),
                          ((good, empty_dir), "no run logs")]:
        with pytest.raises(SystemExit) as e:
            compare.main([str(a) for a in args])
        assert message in str(e.value) and "\n" not in str(e.value)
    # a non-log .txt inside a folder is skipped with a warning, not fatal
    side = tmp_path / "side"
    side.mkdir()
    os.replace(good, side / "good.txt")
    os.replace(notes, side / "notes.txt")
    rep, err = run_json(capsys, str(side), str(side))
    assert len(rep["a"]["runs"]) == 1 and f"{side / 'notes.txt'}: warning: skipped" in err


def test_ten_thousand_steps_parse_fast(tmp_path):
    path = make_log(tmp_path / "long.txt", n=10_000, val_every=125)
    assert sum(1 for _ in open(path)) > 10_000
    t0 = time.perf_counter()
    run = compare.parse_log(str(path), 3.28)
    elapsed = time.perf_counter() - t0
    assert run.complete and run.last_step == 10_000 and len(run.train) == 10_000 and len(run.val) == 81
    assert elapsed < 0.5, f"parsing 10k steps took {elapsed:.3f}s"


def test_cli_runs_as_script(sides):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "records", "compare.py"), *sides, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["b"]["stats"]["val_loss"]["n"] == 4
    r = subprocess.run([sys.executable, os.path.join(ROOT, "records", "compare.py"), sides[0], "/nonexistent"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "compare.py: /nonexistent: no such file or folder"


TRAINER = os.path.join(ROOT, "train_gpt2.py")


@pytest.mark.skipif(not os.path.exists(TRAINER), reason="train_gpt2.py not written yet")
def test_trainer_cpu_record_parses(tmp_path, capsys):
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(str(tmp_path / "fineweb_train_000001.bin"), rng.integers(0, 256, 20_000))
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), rng.integers(0, 256, 5_000))
    records = tmp_path / "records"
    cmd = [sys.executable, TRAINER, "--num_layers=2", "--model_dim=64", "--num_heads=2", "--vocab_size=256",
           "--seq_len=32", "--batch_size=8", "--device_batch_size=8", "--num_iterations=4", "--val_tokens=512",
           "--warmdown_iters=2", "--val_loss_every=2", "--untimed_steps=1", "--device=cpu",
           f"--checkpoint_dir={tmp_path}/checkpoints",           f"--input_bin={tmp_path}/fineweb_train_*.bin", f"--input_val_bin={tmp_path}/fineweb_val_*.bin",
           f"--records_dir={records}", "--run_name=x"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    logs = [os.path.join(d, f) for d, _, fs in os.walk(records) for f in fs if f.endswith(".txt")]
    assert len(logs) == 1, logs
    run = compare.parse_log(logs[0], 3.28)
    assert capsys.readouterr().err == ""
    assert "\n".join(run.source).rstrip() == open(TRAINER).read().rstrip()  # verbatim source
    assert run.hparams["num_layers"] == "2" and run.hparams["num_iterations"] == "4"
    assert run.complete and run.last_step == run.total_steps == 4
    assert run.val[0][0] == 0 and math.isfinite(run.final_val) and run.final_val < run.val[0][1] + 0.5
    assert [p[0] for p in run.train] == [1, 2, 3, 4]
    compare.main([logs[0], logs[0], "--json", "--plot", str(tmp_path / "cpu.png")])
    rep = json.loads(capsys.readouterr().out)
    assert (tmp_path / "cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert rep["code_diff"] == "" and rep["a"]["runs"][0]["val_loss"] == pytest.approx(run.final_val)
