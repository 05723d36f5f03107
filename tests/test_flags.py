"""Every knob is a flag, `--name value` or `--name=value`, checked once at start-up."""

import dataclasses
import subprocess
import sys

import pytest
from conftest import ROOT, parse_args

import train_gpt2
from harness import as_flags
from train_gpt2 import ConfigError, Hyperparameters


def test_defaults_are_the_record_recipe():
    args = parse_args([])
    assert (args.batch_size, args.device_batch_size, args.seq_len) == (
        512,
        None,
        1024,
    )  # None: auto, 64 on an H100
    assert (args.num_iterations, args.warmdown_iters, args.val_tokens, args.val_loss_every) == (
        3242,
        926,
        10485760,
        125,
    )
    assert (args.embed_lr, args.head_lr, args.scalar_lr, args.muon_lr) == (0.3, 0.002, 0.02, 0.02)
    assert parse_args(["--device_batch_size=auto"]).device_batch_size is None
    args = parse_args(["--device_batch_size=64"])
    assert args.grad_accum_steps(8) == 1 and args.grad_accum_steps(1) == 8


def test_both_flag_forms_give_the_same_hyperparameters():
    spaced = parse_args(
        ["--num_iterations", "2000", "--muon_lr", "0.05", "--run_name", "my-idea", "--compile", "false"]
    )
    joined = parse_args(["--num_iterations=2000", "--muon_lr=0.05", "--run_name=my-idea", "--compile=false"])
    assert spaced == joined
    assert (joined.num_iterations, joined.muon_lr, joined.run_name, joined.compile) == (
        2000,
        0.05,
        "my-idea",
        False,
    )


def test_booleans_and_auto_are_typed():
    assert parse_args(["--compile"]).compile is True
    assert (
        parse_args(["--compile=true"]).compile is True and parse_args(["--compile", "auto"]).compile is None
    )
    assert parse_args([]).compile is None


def test_the_record_lists_flags_that_parse_back_to_the_same_run():
    args = parse_args(["--muon_lr=0.05", "--compile=false", "--device_batch_size=16"])
    flags = as_flags(args)
    assert flags[:2] == [
        "--input_bin=data/fineweb10B/fineweb_train_*.bin",
        "--input_val_bin=data/fineweb10B/fineweb_val_*.bin",
    ]
    assert "--compile=false" in flags and "--device_batch_size=16" in flags
    assert parse_args(flags) == args
    assert "--device_batch_size=auto" in as_flags(parse_args([]))


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--muon_lrr=0.1"], "--muon_lrr"),
        (["--num_layers=two"], "--num_layers"),
        (["--num_layers=0"], "--num_layers"),
        (["--adam_beta2", "1.5"], "--adam_beta2"),
        (["--model_dim=100", "--num_heads=3"], "--num_heads"),
        (["--warmdown_iters=5000"], "--warmdown_iters"),
        (["--val_tokens=1000"], "--val_tokens"),
        (["--compile=maybe"], "--compile"),
        (["--run_name=../escape"], "--run_name"),
        (["--run_name=.."], "--run_name"),
        (["--keep_checkpoints=0"], "--keep_checkpoints"),  # would delete the checkpoint just written
        (["--num_layers"], "--num_layers"),
        (["--num_lay=3"], "--num_lay"),  # no abbreviations: a typo must not pick some other flag
    ],
)
def test_an_invalid_flag_is_refused_naming_it(argv, flag):
    with pytest.raises(ConfigError, match=flag) as error:
        parse_args(argv)
    assert "\n" not in str(error.value)


def test_an_indivisible_batch_is_refused_not_changed():
    with pytest.raises(ConfigError, match="--device_batch_size=48") as error:
        parse_args(["--device_batch_size=48"]).grad_accum_steps(8)
    assert "64" in str(error.value)  # the sequences per device it does not divide


def test_a_bad_flag_is_one_line_and_exit_status_1():
    run = subprocess.run(
        [sys.executable, "train_gpt2.py", "--bogus", "1"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and "--bogus" in run.stderr and "Traceback" not in run.stderr


def test_help_is_argparse_and_lists_every_flag_with_its_help(capsys):
    with pytest.raises(SystemExit) as done:
        train_gpt2.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(Hyperparameters):
        assert f"--{field.name}" in text
        assert " ".join(field.metadata["help"].split()) in text
