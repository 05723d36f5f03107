"""sample.py on a tiny random checkpoint, on the CPU: CLI output, seeds, length, vocab mask, greedy, errors."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from train_gpt2 import GPT, Hyperparameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_VOCAB = 50257
PROMPT = "Once upon a time"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small to split; a second thread only waits for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2():
    """tiktoken's gpt2 encoding; the vocabulary comes from PyPI (openai-whisper sdist) if not cached yet."""
    from data.gpt2_vocab import ensure_gpt2
    return ensure_gpt2()  # also sets TIKTOKEN_CACHE_DIR, which the CLI subprocesses inherit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, args, checkpoint path): 1 block of width 32, the padded GPT-2 vocab, 16-token context."""
    torch.manual_seed(0)
    args = Hyperparameters(vocab_size=50304, num_layers=1, model_dim=32, num_heads=2, seq_len=16, device="cpu")
    model = GPT.from_args(args)
    with torch.no_grad():
        model.lm_head.weight.normal_()  # the zero-initialized head would predict a uniform distribution
    state = {k: v.to(torch.bfloat16) if k == "embed.weight" else v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"format": "train_gpt2 checkpoint", "hyperparameters": dataclasses.asdict(args), "step": 7,
                "model": state, "optimizers": [], "rng": {}}, path)
    model.load_state_dict(state)  # the bf16 round trip sample.py will see
    return model.eval(), args, path


class PaddingFavoured(torch.nn.Module):
    """The model, but the padding ids past GPT-2's vocabulary get the highest logits: they must stay masked."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        logits = self.model(idx)
        logits[..., GPT2_VOCAB:] = 100.0
        return logits


def cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


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
    sample.main([str(tiny[2]), "--prompt", PROMPT, "--max_new_tokens", "5", "--temperature", "0", "--num_samples", "2"])
    first, second = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")
    assert first.startswith(PROMPT) and first.rstrip("\n") == second.rstrip("\n")  # greedy: both samples agree
    sample.main([str(tiny[2]), "--max_new_tokens", "3"])  # no prompt: continues <|endoftext|>, prints only new text
    assert not capsys.readouterr().out.startswith("<|endoftext|>")


def test_generate_length_vocab_mask_and_cropping(gpt2, tiny):
    import sample
    model, args, _ = tiny
    model = PaddingFavoured(model)
    prompt = gpt2.encode(PROMPT)
    for temperature, top_k in ((1.0, 0), (0.8, 50), (0, 0)):
        new = sample.generate(model, prompt, 12, temperature, top_k, torch.Generator().manual_seed(0), GPT2_VOCAB,
                              args.seq_len)
        assert len(new) == 12
        assert all(isinstance(t, int) and 0 <= t < GPT2_VOCAB for t in new)
    long_prompt = gpt2.encode("word " * 40)
    assert len(long_prompt) > args.seq_len
    new = sample.generate(model, long_prompt, 4, 0.8, 50, torch.Generator().manual_seed(0), GPT2_VOCAB, args.seq_len)
    assert len(new) == 4
    # cropping: only the last seq_len tokens matter
    greedy = lambda ids: sample.generate(model, ids, 3, 0, 0, None, GPT2_VOCAB, args.seq_len)  # noqa: E731
    assert greedy(long_prompt) == greedy(long_prompt[-args.seq_len:])
    assert sample.generate(model, prompt, 0, 0.8, 50, torch.Generator(), GPT2_VOCAB, args.seq_len) == []


def test_generate_seeds_and_top_k(gpt2, tiny):
    import sample
    model, args, _ = tiny
    prompt = gpt2.encode(PROMPT)

    def run(seed, top_k=0):
        return sample.generate(model, prompt, 10, 1.0, top_k, torch.Generator().manual_seed(seed), GPT2_VOCAB,
                               args.seq_len)

    assert run(0) == run(0)
    assert run(0) != run(1)
    # top_k=1 is greedy whatever the seed
    assert run(0, top_k=1) == run(1, top_k=1) == sample.generate(model, prompt, 10, 0, 0, None, GPT2_VOCAB,
                                                                 args.seq_len)


def test_temperature_zero_is_argmax(gpt2, tiny):
    import sample
    model, args, _ = tiny
    ids = gpt2.encode(PROMPT)
    new = sample.generate(model, ids, 20, 0, 50, None, GPT2_VOCAB, args.seq_len)
    with torch.no_grad():
        for token in new:
            logits = model(torch.tensor([ids[-args.seq_len:]]))[0, -1]
            assert token == int(logits[:GPT2_VOCAB].argmax())
            ids.append(token)


def test_stop_at_eot(gpt2, tiny):
    import sample
    model, args, _ = tiny
    prompt = gpt2.encode(PROMPT)
    greedy = sample.generate(model, prompt, 10, 0, 0, None, GPT2_VOCAB, args.seq_len)
    stopped = sample.generate(model, prompt, 10, 0, 0, None, GPT2_VOCAB, args.seq_len, stop_id=greedy[3])
    assert stopped == greedy[:greedy.index(greedy[3])]


def test_errors_are_one_line(gpt2, tiny, tmp_path):
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello\nworld\n")
    other_dict = tmp_path / "weights.pt"
    torch.save({"model": {}}, other_dict)
    cases = [(tmp_path / "missing.pt", "no checkpoint at"), (not_ckpt, "is not a readable checkpoint"),
             (other_dict, "is not a train_gpt2.py checkpoint")]
    r = cli(cases[0][0])  # one real process: the message is all the user sees
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sample.py: no checkpoint at")
    import sample
    for path, words in cases:
        with pytest.raises(SystemExit) as e:
            sample.main([str(path)])
        message = str(e.value.code)
        assert message.startswith("sample.py: ") and words in message and "\n" not in message
    for flags in (["--temperature", "-1"], ["--max_new_tokens", "-2"], ["--top_k", "-1"]):
        with pytest.raises(SystemExit) as e:
            sample.main([str(tiny[2]), *flags])
        assert "\n" not in str(e.value.code) and flags[0] in str(e.value.code)
