"""sample.py on a tiny random checkpoint, on the CPU: CLI output, seeds, length, vocab mask, errors."""

import dataclasses
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from train_gpt2 import GPT, Hyperparameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_VOCAB = 50257
PROMPT = "Once upon a time"
SEQ_LEN = 16  # the tiny model's context


@pytest.fixture(scope="module")
def gpt2():
    """tiktoken's gpt2 encoding; the vocabulary comes from PyPI (openai-whisper sdist) if not cached yet."""
    from data.gpt2_vocab import ensure_gpt2

    # Outside the checkout (ensure_gpt2's default is its .cache/); the CLI subprocesses inherit it.
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    if not cache or Path(cache).resolve().is_relative_to(ROOT):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return ensure_gpt2()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, args, checkpoint path): 1 block of width 32, the padded GPT-2 vocab, 16-token context."""
    torch.manual_seed(0)
    args = Hyperparameters(
        vocab_size=50304, num_layers=1, model_dim=32, num_heads=2, seq_len=SEQ_LEN, device="cpu"
    )
    model = GPT.from_args(args)
    with torch.no_grad():
        model.lm_head.weight.normal_()  # the zero-initialized head would predict a uniform distribution
    state = {k: v.to(torch.bfloat16) if k == "embed.weight" else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(
        {
            "format": "train_gpt2 checkpoint",
            "hyperparameters": dataclasses.asdict(args),
            "step": 7,
            "model": state,
            "optimizers": [],
            "rng": {},
        },
        path,
    )
    model.load_state_dict(state)  # the bf16 round trip sample.py will see
    return model.eval(), args, path


class PaddingFavoured(torch.nn.Module):
    """The model, but the padding ids past GPT-2's vocabulary get the top logits: they must stay masked."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        logits = self.model(idx)
        logits[..., GPT2_VOCAB:] = 100.0
        return logits


def cli(*argv, **env):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def test_cli_prints_prompt_and_continuation_deterministically(gpt2, tiny):
    path = tiny[2]
    runs = [cli(path, "--prompt", PROMPT, "--max_new_tokens", 12, "--seed", seed) for seed in (0, 0, 1)]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(PROMPT)
        assert len(r.stdout.rstrip("\n")) > len(PROMPT)
    assert runs[0].stdout == runs[1].stdout  # same seed, separate processes: same text
    assert runs[0].stdout != runs[2].stdout
    assert "step 7" in runs[0].stderr


def test_main_num_samples_greedy_and_empty_prompt(gpt2, tiny, capsys):
    import sample

    sample.main(
        [
            str(tiny[2]),
            "--prompt",
            PROMPT,
            "--max_new_tokens",
            "5",
            "--temperature",
            "0",
            "--num_samples",
            "2",
        ]
    )
    first, second = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")
    assert first.startswith(PROMPT) and first.rstrip("\n") == second.rstrip(
        "\n"
    )  # greedy: both samples agree
    sample.main(
        [str(tiny[2]), "--max_new_tokens", "3"]
    )  # no prompt: continues <|endoftext|>, prints only new text
    assert not capsys.readouterr().out.startswith("<|endoftext|>")


def generate(model, prompt, n, temperature=0, top_k=0, seed=None, **kwargs):
    """sample.generate's new tokens as a list, with GPT-2's vocabulary and the tiny model's context."""
    import sample

    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return list(
        sample.generate(model, prompt, n, temperature, top_k, generator, GPT2_VOCAB, SEQ_LEN, **kwargs)
    )


def test_generate_length_vocab_mask_and_cropping(gpt2, tiny):
    model = PaddingFavoured(tiny[0])
    prompt = gpt2.encode(PROMPT)
    for temperature, top_k in ((1.0, 0), (0.8, 50), (0, 0)):
        new = generate(model, prompt, 12, temperature, top_k, seed=0)
        assert len(new) == 12
        assert all(isinstance(t, int) and 0 <= t < GPT2_VOCAB for t in new)
    long_prompt = gpt2.encode("word " * 40)
    assert len(long_prompt) > SEQ_LEN
    assert len(generate(model, long_prompt, 4, 0.8, 50, seed=0)) == 4
    # cropping: only the last SEQ_LEN tokens matter
    assert generate(model, long_prompt, 3) == generate(model, long_prompt[-SEQ_LEN:], 3)
    assert generate(model, prompt, 0, 0.8, 50, seed=0) == []


def test_generate_seeds_and_top_k(gpt2, tiny):
    model = tiny[0]
    prompt = gpt2.encode(PROMPT)

    def run(seed, top_k=0):
        return generate(model, prompt, 10, 1.0, top_k, seed=seed)

    assert run(0) == run(0)
    assert run(0) != run(1)
    # top_k=1 is greedy whatever the seed
    assert run(0, top_k=1) == run(1, top_k=1) == generate(model, prompt, 10)


def test_temperature_zero_is_argmax(gpt2, tiny):
    model = tiny[0]
    ids = gpt2.encode(PROMPT)
    new = generate(model, ids, 20, 0, 50)
    with torch.no_grad():
        for token in new:
            logits = model(torch.tensor([ids[-SEQ_LEN:]]))[0, -1]
            assert token == int(logits[:GPT2_VOCAB].argmax())
            ids.append(token)


def test_extreme_temperatures_still_sample(gpt2, tiny):
    """fp32 logits (soft-capped at 30) / T overflowed below T = 8.8e-38 and gave 0/0 above 3.4e38."""
    model = tiny[0]
    prompt = gpt2.encode(PROMPT)
    greedy = generate(model, prompt, 8)
    for temperature in (5e-324, 1e-45, 8e-38):
        assert generate(model, prompt, 8, temperature, seed=0) == greedy
    for temperature in (3.5e38, 1e308):
        new = generate(model, prompt, 8, temperature, seed=0)
        assert len(new) == 8 and all(0 <= t < GPT2_VOCAB for t in new)


def test_stop_at_eot(gpt2, tiny):
    model = tiny[0]
    prompt = gpt2.encode(PROMPT)
    greedy = generate(model, prompt, 10)
    assert generate(model, prompt, 10, stop_id=greedy[3]) == greedy[: greedy.index(greedy[3])]


def test_streamed_text_equals_decoding_at_once(gpt2, capsys):
    """Characters split across tokens (emoji, CJK, a cut-off sequence) print as enc.decode prints them."""
    import sample

    ids = gpt2.encode(" ünïcode 🚀 日本語 🤖!")
    assert any(
        not ok_utf8(gpt2.decode_single_token_bytes(t)) for t in ids
    )  # some token holds part of a character
    for case in (ids, ids[3:], ids[:-2]):
        sample.write_text(gpt2, case)
        assert capsys.readouterr().out == gpt2.decode(case) + "\n"


def test_text_stdout_cannot_encode_prints_escaped(gpt2, tiny):
    """An ASCII-only stdout (PYTHONIOENCODING=ascii, a C locale) gets \\u escapes, not a traceback."""
    flags = [tiny[2], "--prompt", "日本 🚀", "--max_new_tokens", 6, "--temperature", 0]
    utf8, ascii_only = cli(*flags, PYTHONIOENCODING="utf-8"), cli(*flags, PYTHONIOENCODING="ascii")
    assert utf8.returncode == ascii_only.returncode == 0, ascii_only.stderr
    assert "Traceback" not in ascii_only.stderr
    assert utf8.stdout.startswith("日本 🚀")
    assert ascii_only.stdout.startswith("\\u65e5\\u672c \\U0001f680")
    assert ascii_only.stdout == utf8.stdout.encode("ascii", "backslashreplace").decode()


def ok_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_ctrl_c_keeps_the_streamed_text(gpt2, tiny):
    """A long generation prints as it goes; Ctrl-C keeps that text and ends with one line and status 130."""
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "sample.py"),
            str(tiny[2]),
            "--prompt",
            PROMPT,
            "--max_new_tokens=1000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    streamed = b""
    while (
        len(streamed) < len(PROMPT) + 20
    ):  # the continuation arrives long before the million tokens are done
        if not select.select([proc.stdout], [], [], 60)[0]:
            proc.kill()
            pytest.fail("no text within 60 s: the tokens are not streamed")
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, proc.stderr.read().decode()
        streamed += chunk
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    out = (streamed + rest).decode()
    assert out.startswith(PROMPT) and out.endswith("\n")
    err = err.decode()
    assert "Traceback" not in err and "interrupted" in err.splitlines()[-1]


def test_errors_are_one_line(gpt2, tiny, tmp_path, capsys):
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello\nworld\n")
    other_dict = tmp_path / "weights.pt"
    torch.save({"model": {}}, other_dict)
    checkpoint = torch.load(tiny[2], weights_only=True)
    no_weights = tmp_path / "no_weights.pt"
    torch.save({k: v for k, v in checkpoint.items() if k != "model"}, no_weights)
    diverged = tmp_path / "diverged.pt"
    torch.save(
        {**checkpoint, "model": {k: v * float("nan") for k, v in checkpoint["model"].items()}}, diverged
    )
    r = cli(tmp_path / "missing.pt")  # one real process: the message is all the user sees
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sample.py: ") and "missing.pt" in r.stderr
    import sample

    for path, words in [(not_ckpt, ""), (other_dict, ""), (no_weights, "'model'"), (diverged, "NaN")]:
        with pytest.raises(SystemExit) as e:
            sample.main([str(path)])
        message = str(e.value.code)
        assert message.startswith("sample.py: ") and str(path) in message and words in message
        assert "\n" not in message


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "-1"],
        ["--temperature=nan"],
        ["--temperature", "inf"],
        ["--temperature", "1e-400"],
        ["--temperature", "warm"],
        ["--max_new_tokens", "-2"],
        ["--top_k=-1"],
        ["--num_samples", "0"],
        ["--seed", "-1"],
        ["--seed", str(2**64)],
        ["--temp", "0"],
        ["--stop_at_eot=yes"],
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(tiny, capsys, flags):
    import sample

    with pytest.raises(SystemExit) as e:
        sample.main([str(tiny[2]), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert flags[0].split("=")[0] in err


def test_flags_take_both_forms_and_warn_of_a_long_prompt(gpt2, tiny, capsys):
    import sample

    sample.main(
        [str(tiny[2]), "--prompt", "word " * 40, "--max_new_tokens=2", "--temperature", "0", "--seed=3"]
    )
    out, err = capsys.readouterr()
    assert out.startswith("word ")
    assert "prompt" in err.splitlines()[-1] and str(SEQ_LEN) in err.splitlines()[-1]


def test_the_checkout_gets_no_vocabulary_cache(gpt2):
    """The tests cache the GPT-2 vocabulary outside the checkout, which a fresh clone must not gain."""
    assert not Path(os.environ["TIKTOKEN_CACHE_DIR"]).resolve().is_relative_to(ROOT)
