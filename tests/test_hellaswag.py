"""hellaswag.py on the CPU: the scoring against a direct computation, a model that knows the answers, the data
formats, the download from a local fake hub, offline, the JSON, and the one-line errors.

No network is used except PyPI, once, when the GPT-2 vocabulary is not cached yet (data/gpt2_vocab.py).
"""

import copy
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hellaswag  # noqa: E402
from train_gpt2 import GPT, Hyperparameters, cast_model  # noqa: E402

VOCAB = 50304  # GPT-2's 50257, padded as the trainer pads it
SHAPE = dict(vocab_size=VOCAB, num_layers=2, model_dim=64, num_heads=2, mlp_ratio=4)
# Made-up examples in the dataset's format; the right endings differ from the others from their first word on.
EXAMPLES = [
    dict(
        ctx="A man is standing on a ladder next to a house. He",
        endings=[
            "paints the window frame white.",
            "eats a sandwich in the kitchen.",
            "jumps into the swimming pool.",
            "reads a newspaper on the sofa.",
        ],
        label=0,
    ),
    dict(
        ctx="The chef cracks two eggs into a bowl and",
        endings=["drives off to work.", "whisks them with a fork.", "plays the violin.", "goes to sleep."],
        label=1,
    ),
    dict(
        ctx="A girl ties her running shoes. She",
        endings=["sings loudly.", "opens an umbrella.", "starts jogging down the road.", "buys a car."],
        label=2,
    ),
    dict(
        ctx="Two dogs chase a ball across the park, then",
        endings=[
            "the sky turns green.",
            "a boat sails.",
            "it starts to snow indoors.",
            "they bring it back.",
        ],
        label=3,
    ),
    dict(
        ctx="She pours hot water over the tea leaves",
        endings=["and waits for it to steep.", "then skis.", "before mowing.", "so the piano"],
        label=0,
    ),
    dict(ctx="", endings=["Hello there.", "x", "A longer ending of several words here.", "Fine."], label=1),
]


@pytest.fixture(scope="module")
def gpt2():
    """tiktoken's gpt2 encoding, its cache outside the checkout (tiktoken's own default unless
    TIKTOKEN_CACHE_DIR says otherwise), filled from PyPI by data/gpt2_vocab.py the first time only;
    the CLI subprocesses inherit TIKTOKEN_CACHE_DIR."""
    from data.gpt2_vocab import ensure_gpt2

    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not old or Path(old).resolve().is_relative_to(ROOT):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    yield ensure_gpt2()
    if old is None:
        del os.environ["TIKTOKEN_CACHE_DIR"]
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = old


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(**SHAPE, rope_base=10000.0, logit_softcap=30.0)


def randomize(model):
    """Every weight random: the zero-initialized head and output projections would hide the blocks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "embed.weight":
                p.normal_(0, 2 * p.shape[1] ** -0.5)
    return model


def save_checkpoint(model, path, seq_len=64):
    """A checkpoint in the trainer's format (format, hyperparameters, step, model), embedding in bf16."""
    args = Hyperparameters(**SHAPE, seq_len=seq_len, device="cpu")
    state = {k: v.to(torch.bfloat16) if k == "embed.weight" else v for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": "train_gpt2 checkpoint",
            "hyperparameters": dataclasses.asdict(args),
            "step": 5,
            "model": state,
        },
        path,
    )
    return path


def encoded(gpt2, examples=EXAMPLES):
    return [hellaswag.encode(gpt2, e["ctx"], e["endings"]) for e in examples]


def direct(model, context, ending):
    """(summed, mean) cross-entropy of `ending` after `context`, from one unpadded forward of their tokens."""
    tokens = torch.tensor([context + ending])
    with torch.no_grad():
        logits = model(tokens)[0]
    losses = F.cross_entropy(logits[len(context) - 1 : -1], tokens[0, len(context) :], reduction="none")
    return losses.sum().item(), losses.mean().item()


def test_batched_scores_equal_one_forward_per_candidate(gpt2):
    model = randomize(tiny_gpt()).eval()
    examples = encoded(gpt2)
    assert examples[5][0] == [gpt2.eot_token]  # an empty context reads as the start of a document
    assert examples[0][1][0] == gpt2.encode(" paints the window frame white.")  # the leading space
    expected = torch.tensor(
        [[direct(model, c, e) for e in endings] for c, endings in examples], dtype=torch.float64
    )
    lengths = {len(c) + len(e) for c, es in examples for e in es}
    assert len(lengths) > 5  # rows of many lengths: the padding is exercised
    for batch_size in (1, 3, 100):
        sums, counts = hellaswag.score(model, examples, batch_size)
        assert counts.tolist() == [[len(e) for e in es] for _, es in examples]
        torch.testing.assert_close(sums, expected[..., 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sums / counts, expected[..., 1], rtol=1e-5, atol=1e-5)
    assert expected[..., 1].std() > 0.1  # the candidates are told apart
    acc_pred, norm_pred = hellaswag.predictions(sums, counts)
    assert acc_pred.tolist() == expected[..., 0].argmin(1).tolist()
    assert norm_pred.tolist() == expected[..., 1].argmin(1).tolist()


def test_sum_and_mean_choose_differently():
    sums = torch.tensor([[4.0, 6.0, 9.0, 9.0]], dtype=torch.float64)  # 2 tokens at 2.0 vs 6 tokens at 1.0
    counts = torch.tensor([[2, 6, 3, 3]])
    assert [p.tolist() for p in hellaswag.predictions(sums, counts)] == [[0], [1]]


def test_context_is_cut_from_the_left_to_fit():
    context, endings = list(range(10)), [[20, 21], [30, 31, 32]]
    assert hellaswag.fit(context, endings, 8) == ([5, 6, 7, 8, 9], True)
    assert hellaswag.fit(context, endings, 13) == (context, False)
    assert hellaswag.fit(context, [[1] * 20], 8) == ([9], True)  # one context token always stays


def test_wilson_interval():
    lo, hi = hellaswag.wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
    assert hellaswag.wilson(4, 4)[1] == 1.0 and hellaswag.wilson(0, 4)[0] == 0.0
    lo, hi = hellaswag.wilson(round(0.2955 * 10042), 10042)
    assert 0.0085 < (hi - lo) / 2 < 0.0095  # about +-0.9 points on the full split


def test_progress_line_is_rate_limited(capsys):
    progress = hellaswag.Progress(10, 1000, 3600.0)
    progress(5, 750)
    assert capsys.readouterr().err == ""
    progress.seconds, progress.start = 1e-9, progress.start - 6.0
    progress(5, 750)  # half the examples, but three quarters of the tokens: 2 s to go, not 6
    assert re.search(r"5/10 examples \(50%\), 0\.8 examples/s, ETA 0m0[12]s", capsys.readouterr().err)


@pytest.fixture(scope="module")
def trained(gpt2, tmp_path_factory):
    """(checkpoint path, model): a tiny GPT trained with Adam on each context + its right ending."""
    model = tiny_gpt(seed=1)
    rows = [c + es[e["label"]] for (c, es), e in zip(encoded(gpt2), EXAMPLES)]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    targets = torch.tensor([r[1:] + [-100] * (width - len(r) + 1) for r in rows])  # no loss on the padding
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # about 40 steps: the examples are memorized
        loss = model(tokens, targets)
        if loss.item() < 0.05:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "trained.pt")
    return path, model.eval()


def write_jsonl(path, examples=EXAMPLES, **changes):
    path.write_text("".join(json.dumps({**e, **changes}) + "\n" for e in examples))
    return path


def write_parquet(path, examples=EXAMPLES, label_as_text=True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {k: [e[k] for e in examples] for k in ("ctx", "endings", "label")}
    if label_as_text:  # as the hub's parquet stores it
        columns["label"] = [str(v) for v in columns["label"]]
    columns["activity_label"] = ["made up"] * len(examples)  # other fields are ignored
    pq.write_table(pa.table(columns), path)
    return path


def test_trained_model_scores_1_and_jsonl_equals_parquet(trained, tmp_path, capsys):
    path, model = trained
    sums, counts = hellaswag.score(model, encoded(hellaswag.gpt2_encoding()), 2)
    labels = [e["label"] for e in EXAMPLES]
    assert [p.tolist() for p in hellaswag.predictions(sums, counts)] == [labels, labels]
    bf16 = cast_model(copy.deepcopy(model), torch.bfloat16)  # as on a GPU: bf16 embedding and activations
    bf16_sums, _ = hellaswag.score(bf16, encoded(hellaswag.gpt2_encoding()), 4)
    assert [p.tolist() for p in hellaswag.predictions(bf16_sums, counts)] == [labels, labels]
    torch.testing.assert_close(bf16_sums, sums, rtol=0.05, atol=0.5)

    results = []
    for data in (write_jsonl(tmp_path / "val.jsonl"), write_parquet(tmp_path / "val.parquet")):
        results.append(hellaswag.main([str(path), "--data", str(data), "--progress_seconds", "0"]))
        out = capsys.readouterr().out
        assert re.search(r"acc_norm\s+1\.0000 \[0\.\d+, 1\.0000\]\s+0\.2955\s+0\.25", out)
        assert re.search(r"acc\s+1\.0000 \[0\.\d+, 1\.0000\]\s+0\.2859\s+0\.25", out)
        written = json.loads(Path(f"{path}.hellaswag.json").read_text())
        assert written == results[-1] and written["data"] == str(data)
    for r in results:
        assert (r["n"], r["acc"], r["acc_norm"], r["limited"], r["limit"]) == (6, 1.0, 1.0, False, None)
        assert r["acc_norm_ci95"] == r["acc_ci95"] == list(hellaswag.wilson(6, 6))
        assert r["reference"]["gpt2_124m"] == {"acc_norm": 0.2955, "acc": 0.2859}
    assert {k: v for k, v in results[0].items() if k != "data"} == {
        k: v for k, v in results[1].items() if k != "data"
    }


def test_limit_and_a_random_model(gpt2, tmp_path, capsys):
    """A random model's scores from the CLI are the direct computation's; --limit takes the first N."""
    model = randomize(tiny_gpt(seed=2))
    path = save_checkpoint(model, tmp_path / "random.pt")
    model.load_state_dict(torch.load(path)["model"])  # the bf16 embedding the CLI sees
    data = write_jsonl(tmp_path / "val.jsonl")
    out = tmp_path / "elsewhere.json"
    r = hellaswag.main([str(path), "--data", str(data), "--limit", "4", "--out", str(out), "--batch_size=3"])
    assert json.loads(out.read_text()) == r and not Path(f"{path}.hellaswag.json").exists()
    assert (r["n"], r["examples_in_file"], r["limit"], r["limited"]) == (4, 6, 4, True)
    expected = torch.tensor([[direct(model.eval(), c, e) for e in es] for c, es in encoded(gpt2)[:4]])
    labels = torch.tensor([e["label"] for e in EXAMPLES[:4]])
    assert r["acc"] == (expected[..., 0].argmin(1) == labels).float().mean().item()
    assert r["acc_norm"] == (expected[..., 1].argmin(1) == labels).float().mean().item()
    assert "the first 4 of 6" in capsys.readouterr().out

    short = save_checkpoint(model, tmp_path / "short.pt", seq_len=8)
    assert hellaswag.main([str(short), "--data", str(data), "--progress_seconds=0"])["contexts_cut"] == 5
    assert "5 contexts were cut" in capsys.readouterr().err


def one_line(excinfo):
    message = str(excinfo.value.code)
    assert "\n" not in message and message.startswith("hellaswag.py: ")
    return message


def test_errors_are_one_line(trained, tmp_path, capsys):
    path = str(trained[0])
    Path(f"{path}.hellaswag.json").unlink(missing_ok=True)  # another test's result
    data = str(write_jsonl(tmp_path / "val.jsonl"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    no_model = tmp_path / "no_model.pt"
    torch.save({"format": "train_gpt2 checkpoint", "hyperparameters": {}}, no_model)
    cases = [
        ([str(tmp_path / "missing.pt"), "--data", data], ["no checkpoint at", "missing.pt"]),
        ([str(garbage), "--data", data], ["garbage.pt", "not a readable checkpoint"]),
        ([str(other), "--data", data], ["other.pt", "not a train_gpt2.py checkpoint"]),
        ([str(no_model), "--data", data], ["no_model.pt", "'model'"]),
        ([path, "--data", str(tmp_path / "nowhere.jsonl")], ["no data file at", "nowhere.jsonl"]),
    ]
    bad = {
        "fields.jsonl": write_jsonl(tmp_path / "fields.jsonl", [{"context": "x", "endings": ["a"] * 4}]),
        "label.jsonl": write_jsonl(tmp_path / "label.jsonl", label=""),
        "three.jsonl": write_jsonl(tmp_path / "three.jsonl", endings=["a", "b", "c"]),
        "notjson.jsonl": tmp_path / "notjson.jsonl",
        "empty.jsonl": tmp_path / "empty.jsonl",
        "cols.parquet": tmp_path / "cols.parquet",
        "broken.parquet": tmp_path / "broken.parquet",
    }
    bad["notjson.jsonl"].write_text('{"ctx": "a"}\nnot json\n')
    bad["empty.jsonl"].write_text("\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ctx": ["a"], "endings": [["a", "b", "c", "d"]]}), bad["cols.parquet"])
    bad["broken.parquet"].write_bytes(b"PAR1 and then nothing")
    words = {
        "fields.jsonl": ["line 1", "lacks the field(s) ctx, label"],
        "label.jsonl": ["line 1", "label ''", "validation split"],
        "three.jsonl": ["line 1", "4 texts"],
        "notjson.jsonl": ["line 2", "not JSON"],
        "empty.jsonl": ["no examples"],
        "cols.parquet": ["lacks the field(s) label"],
        "broken.parquet": ["not a readable parquet"],
    }
    cases += [([path, "--data", str(bad[name])], [name, *w]) for name, w in words.items()]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            hellaswag.main(argv)
        message = one_line(e)
        for w in expected:
            assert w in message, (w, message)
    assert not Path(f"{path}.hellaswag.json").exists()

    for limit in ("0", "-2", "x", "1.5"):
        with pytest.raises(SystemExit) as e:
            hellaswag.main([path, "--data", data, "--limit", limit])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--limit" in err and limit in err


# --- the download, against a local server that answers like the hub ----------------------------


def cli(argv, tmp_path, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1", **env)
    r = subprocess.run(
        [sys.executable, str(ROOT / "hellaswag.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        env=e,
        timeout=120,
        cwd=tmp_path,
    )
    return r.returncode, r.stdout, r.stderr


def test_download_once_from_the_hub_then_offline(trained, hub, tmp_path):
    parquet = write_parquet(tmp_path / "served.parquet").read_bytes()
    hub.repos["Rowan/hellaswag"] = {"default/validation/0000.parquet": parquet}
    hub.revisions["Rowan/hellaswag"] = "refs/convert/parquet"  # the parquet conversion only
    checkpoint, data_dir = str(trained[0]), tmp_path / "hs"
    rc, out, err = cli([checkpoint, "--data_dir", data_dir], tmp_path, HF_ENDPOINT=hub.url)
    assert rc == 0, err
    assert (data_dir / "default" / "validation" / "0000.parquet").read_bytes() == parquet
    result = json.loads(Path(f"{checkpoint}.hellaswag.json").read_text())
    assert (result["n"], result["acc"], result["acc_norm"]) == (6, 1.0, 1.0)
    assert result["data"] == str(data_dir / "default" / "validation" / "0000.parquet")
    assert any("refs%2Fconvert%2Fparquet" in p for _, p in hub.log)

    hub.log.clear()  # a second run reads the file already there: no request, even offline
    rc, out2, err = cli([checkpoint, "--data_dir", data_dir, "--limit=3"], tmp_path, HF_HUB_OFFLINE="1")
    assert rc == 0, err
    assert hub.log == [] and "the first 3 of 6" in out2

    # the file gone from the hub: one line (after "downloading"), and the folder made for it removed
    hub.repos["Rowan/hellaswag"] = {}
    rc, _, err = cli([checkpoint, "--data_dir", tmp_path / "gone" / "hs"], tmp_path, HF_ENDPOINT=hub.url)
    assert_one_line_error((rc, err), "not on the hub", "--data FILE", lines=2)
    assert not (tmp_path / "gone").exists()
    rc, _, err = cli([checkpoint, "--data_dir", tmp_path], tmp_path, HF_ENDPOINT=hub.url)  # a folder in use
    assert_one_line_error((rc, err), "not on the hub", lines=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hs", "served.parquet"]  # no .cache, no default/


def test_offline_or_unreachable_with_nothing_cached_is_one_line_and_creates_nothing(trained, tmp_path):
    checkpoint = str(trained[0])
    rc, out, err = cli([checkpoint, "--data_dir", tmp_path / "a" / "hs"], tmp_path, HF_HUB_OFFLINE="1")
    assert_one_line_error((rc, err), "HF_HUB_OFFLINE", "--data")
    assert out == "" and list(tmp_path.iterdir()) == []  # no data folder, no HF_HOME

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed
    rc, out, err = cli([checkpoint, "--data_dir", tmp_path / "hs"], tmp_path, HF_ENDPOINT=closed)
    assert_one_line_error((rc, err), closed)
    assert out == "" and list(tmp_path.iterdir()) == []
