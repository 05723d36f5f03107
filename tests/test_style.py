"""The layout is the formatter's: ruff format and ruff check (pyproject.toml) pass on every Python file."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_every_python_file_passes_ruff(command):
    run = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_recipe_stays_small():
    """train_gpt2.py is the recipe a speedrunner reads: 950 lines at most, as the formatter lays it out."""
    with open(f"{ROOT}/train_gpt2.py") as f:
        assert len(f.read().splitlines()) <= 950
