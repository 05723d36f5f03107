"""Every knob is a --name=value flag, checked once at start-up."""
import dataclasses

import pytest

import train_gpt2
from train_gpt2 import ConfigError, Hyperparameters, parse_args


def test_defaults_are_the_record_recipe():
    args = parse_args([])
    assert (args.batch_size, args.device_batch_size, args.seq_len) == (512, 0, 1024)  # 0: auto, 64 on an H100
    assert (args.num_iterations, args.warmdown_iters, args.val_tokens, args.val_loss_every) == (3242, 926, 10485760, 125)
    assert (args.embed_lr, args.head_lr, args.scalar_lr, args.muon_lr) == (0.3, 0.002, 0.02, 0.02)
    assert parse_args(["--device_batch_size=auto"]).device_batch_size == 0
    args = parse_args(["--device_batch_size=64"])
    assert args.grad_accum_steps(8) == 1 and args.grad_accum_steps(1) == 8


def test_an_override_works():
    args = parse_args(["--muon_lr=0.05", "--num_layers=3", "--run_name=my-idea"])
    assert (args.muon_lr, args.num_layers, args.run_name) == (0.05, 3, "my-idea")
    assert args.as_flags()[:2] == ["--input_bin=data/fineweb10B/fineweb_train_*.bin",
                                   "--input_val_bin=data/fineweb10B/fineweb_val_*.bin"]


@pytest.mark.parametrize("argv, message", [
    (["--muon_lrr=0.1"], "unknown flag --muon_lrr"),
    (["--num_layers=two"], "--num_layers takes int, got 'two'"),
    (["--num_layers", "3"], "flags look like --name=value"),
    (["--num_layers=0"], "--num_layers must be positive"),
    (["--adam_beta2=1.5"], "--adam_beta2 must be in \\[0, 1\\)"),
    (["--model_dim=100", "--num_heads=3"], "must split into --num_heads=3 heads"),
    (["--warmdown_iters=5000"], "exceeds --num_iterations"),
    (["--val_tokens=1000"], "must be a multiple of batch_size\\*seq_len"),
    (["--compile=maybe"], "--compile must be auto, true or false"),
    (["--run_name=../escape"], "--run_name may hold"),
])
def test_an_invalid_flag_is_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_an_indivisible_batch_is_refused_not_changed():
    with pytest.raises(ConfigError, match="--device_batch_size=48 does not divide the 64 sequences per device"):
        parse_args(["--device_batch_size=48"]).grad_accum_steps(8)


def test_main_refuses_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(["--bogus=1"])
    assert str(stop.value) == "train_gpt2.py: unknown flag --bogus (see --help for the list)"


def test_help_lists_every_flag_with_its_comment(capsys):
    assert train_gpt2.main(["--help"]) == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(Hyperparameters):
        assert f"--{field.name}=" in text
    assert train_gpt2.field_help().keys() == {f.name for f in dataclasses.fields(Hyperparameters)}
