"""The README's CPU route, as a new user meets it: in a fresh copy of the checkout, command by command."""

import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import ROOT
from test_data import vocab_cache

# A model small enough to train in seconds, appended to the README's training line (later flags win)
TINY = [
    "--num_layers=1",
    "--model_dim=32",
    "--num_heads=2",
    "--seq_len=32",
    "--batch_size=8",
    "--val_tokens=256",
]


def cpu_route():
    """The commands between the README's cpu-route markers, continued lines joined."""
    with open(os.path.join(ROOT, "README.md")) as f:
        block = f.read().split("<!-- cpu-route -->\n", 1)[1].split("<!-- /cpu-route -->", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def shell(line, cwd):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": vocab_cache(), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def final_val_loss(console):
    return re.search(r"^summary: final_val_loss:(\S+) ", console, re.M)[1]


def test_the_readmes_cpu_route_runs_in_a_fresh_copy_and_the_continued_run_ends_as_an_uninterrupted_one(
    tmp_path,
):
    copy, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    elsewhere.mkdir()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), copy / name)
    copy_text, fineweb, train, sample, compare = [
        line.replace(".venv/bin/python", shlex.quote(sys.executable)) for line in cpu_route()
    ]
    assert "--max_hours=" in train and "train_gpt2.py" in train
    shell(copy_text, copy)
    assert "train on them with: " in shell(fineweb, copy)
    tiny = " ".join(TINY)
    full = shell(
        f"{train} {tiny} --max_hours=0 --records_dir=../full/records --checkpoint_dir=../full/ck", copy
    )
    stopped = shell(f"{train} {tiny} --max_hours=1e-9", copy)  # past the deadline at the first step boundary
    command = re.search(
        r"^stopped: --max_hours=\S+ reached at step 1: .*; continue with: (.*)$", stopped, re.M
    )[1]
    continued = shell(command, elsewhere)  # pasted as printed, in another folder
    assert final_val_loss(continued) == final_val_loss(full)
    assert list(elsewhere.iterdir()) == []  # its record and checkpoints went where the first part's did
    assert shell(sample, copy).strip()
    report = shell(compare, copy)
    assert re.search(rf"final val loss +{final_val_loss(full)} .*\(n=1\)", report)  # its two parts: one run
