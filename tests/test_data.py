"""data/: the shard validator, the hub downloader (against a local fake hub), the tokenizer, the GPT-2 vocab.

No network is used except PyPI, once, when the GPT-2 vocabulary is not cached yet (data/gpt2_vocab.py):
the tests cache it outside the checkout, in tiktoken's own default folder (see vocab_cache).
"""

import errno
import glob
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.shards import HEADER_INTS, SHARD_MAGIC, check_shard, write_shard  # noqa: E402

EOT = "<|endoftext|>"


def vocab_cache():
    """The tests' tiktoken cache: $TIKTOKEN_CACHE_DIR or tiktoken's own default, never inside the checkout."""
    d = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    if not d or Path(d).resolve().is_relative_to(ROOT):
        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return d


def shard_bytes(tokens):
    buf = io.BytesIO()
    header = np.zeros(HEADER_INTS, np.int32)
    header[:3] = SHARD_MAGIC, 1, len(tokens)
    buf.write(header.tobytes())
    buf.write(np.asarray(tokens, np.uint16).tobytes())
    return buf.getvalue()


# --- a fake Hugging Face hub ---------------------------------------------------------------------


def run(script, args, tmp_path, hub=None, **env):
    """Run a data/ script as a user would, from tmp_path; returns (returncode, stdout, stderr)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    e.update(TIKTOKEN_CACHE_DIR=vocab_cache(), **env)
    if hub is not None:
        e["HF_ENDPOINT"] = hub.url
    r = subprocess.run(
        [sys.executable, str(ROOT / "data" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=e,
        timeout=120,
        cwd=tmp_path,
    )
    return r.returncode, r.stdout, r.stderr


# --- check_shard ---------------------------------------------------------------------------------


def test_write_shard_leaves_no_temp_file_when_it_fails(tmp_path):
    (tmp_path / "taken.bin").mkdir()  # the rename onto a folder fails after the data is written
    with pytest.raises(OSError):
        write_shard(tmp_path / "taken.bin", [1, 2, 3])
    assert [p.name for p in tmp_path.iterdir()] == ["taken.bin"]


def test_check_shard_accepts_a_good_shard_and_names_each_problem(tmp_path):
    good = tmp_path / "good.bin"
    write_shard(good, [1, 2, 3])
    assert check_shard(good) == 3
    assert not list(tmp_path.glob("*.tmp"))

    cases = {
        "short": (b"\0" * 100, "too short"),
        "magic": (b"\1" * 4 + shard_bytes([1])[4:], "magic number"),
        "version": (shard_bytes([1])[:4] + np.int32(2).tobytes() + shard_bytes([1])[8:], "version 2"),
        "truncated": (shard_bytes([1, 2, 3])[:-2], "truncated"),
        "extra": (shard_bytes([1, 2, 3]) + b"xx", "1030 bytes"),
    }
    for name, (data, words) in cases.items():
        bad = tmp_path / f"{name}.bin"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=words) as e:
            check_shard(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


# --- the downloader ------------------------------------------------------------------------------


def fake_fineweb(hub, n=3):
    files = {"fineweb_val_000000.bin": shard_bytes(range(50))}
    files.update({f"fineweb_train_{i:06d}.bin": shard_bytes(range(i, i + 40 + i)) for i in range(1, n + 1)})
    hub.repos["kjj0/fineweb10B-gpt2"] = files
    return files


def test_download_fetches_skips_and_refetches(hub, tmp_path):
    files = fake_fineweb(hub)
    out = tmp_path / "fineweb10B"
    rc, stdout, err = run("cached_fineweb10B.py", [2, "--dir", out], tmp_path, hub)
    assert rc == 0, err
    names = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == files[name]
    assert not (tmp_path / ".cache").exists()  # the working folder stays clean
    assert {p for m, p in hub.log if m == "GET"} == {
        f"/datasets/kjj0/fineweb10B-gpt2/resolve/main/{n}" for n in names
    }

    hub.log.clear()  # second run: everything present and valid, so not a single request
    rc, stdout, err = run("cached_fineweb10B.py", [2, "--dir", out], tmp_path, hub)
    assert rc == 0, err
    assert hub.log == []
    assert "present and valid" in stdout

    bad = out / "fineweb_train_000002.bin"  # a truncated shard is named, removed and fetched again
    bad.write_bytes(files[bad.name][:-10])
    rc, stdout, err = run("cached_fineweb10B.py", [2, "--dir", out], tmp_path, hub)
    assert rc == 0, err
    assert f"{bad}: header says" in err and "fetch it again" in err
    assert bad.read_bytes() == files[bad.name]
    assert {p.rsplit("/", 1)[1] for _, p in hub.log} == {bad.name}


def test_download_reports_a_missing_file_repo_and_bad_n(hub, tmp_path):
    fake_fineweb(hub, n=3)
    out = tmp_path / "d"
    rc, _, err = run("cached_fineweb10B.py", [4, "--dir", out], tmp_path, hub)
    assert_one_line_error((rc, err), "fineweb_train_000004.bin", "not in dataset repo kjj0/fineweb10B-gpt2")
    assert len(list(out.glob("*.bin"))) == 4  # what did arrive is kept, and checked

    rc, _, err = run(
        "cached_fineweb10B.py", [1, "--set", "fineweb100B", "--dir", tmp_path / "d100"], tmp_path, hub
    )
    assert_one_line_error((rc, err), "kjj0/fineweb100B-gpt2", "not found")

    for n in (104, -1):
        rc, _, err = run("cached_fineweb10B.py", [n, "--dir", out], tmp_path, hub)
        assert_one_line_error((rc, err), f"N={n} is out of range", "103")


def test_download_removes_a_bad_file_from_the_hub(hub, tmp_path):
    fake_fineweb(hub)["fineweb_train_000001.bin"] = b"<html>not a shard</html>"
    out = tmp_path / "d"
    rc, _, err = run("cached_fineweb10B.py", [1, "--dir", out], tmp_path, hub)
    assert_one_line_error(
        (rc, err), "fineweb_train_000001.bin", "not a valid shard", "run again", lines=2
    )  # the removal, then the error
    assert "too short" in err
    assert not (out / "fineweb_train_000001.bin").exists()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_no_network_fails_fast_in_one_line_and_changes_nothing(gpt2, tmp_path):
    """Both hub clients, the hub unreachable: one line within seconds, no files left, old shards kept."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    rc, stdout, err = run(
        "cached_fineweb10B.py", [1, "--dir", tmp_path / "d"], tmp_path, HF_ENDPOINT=endpoint
    )
    assert time.monotonic() - start < 10  # huggingface_hub alone retried for 24 s
    assert_one_line_error((rc, err), endpoint, "fineweb_val_000000.bin", "data/fineweb.py --input")
    assert err.count("\n") == 1 and stdout == ""
    assert list(tmp_path.iterdir()) == []  # no data folder, no .cache, no HF_HOME

    out = tmp_path / "fineweb10B"
    out.mkdir()
    write_shard(out / "fineweb_val_000000.bin", [1, 2, 3])
    rc, _, err = run("fineweb.py", ["--out_dir", out, "--overwrite"], tmp_path, HF_ENDPOINT=endpoint)
    assert_one_line_error((rc, err), endpoint)
    assert [p.name for p in tmp_path.rglob("*")] == ["fineweb10B", "fineweb_val_000000.bin"]
    assert check_shard(out / "fineweb_val_000000.bin") == 3


def test_download_offline_and_disk_full_messages(hub, tmp_path, monkeypatch):
    rc, _, err = run("cached_fineweb10B.py", [1, "--dir", tmp_path / "d"], tmp_path, HF_HUB_OFFLINE="1")
    assert_one_line_error((rc, err), "fineweb_val_000000.bin", "HF_HUB_OFFLINE")

    from data import cached_fineweb10B

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", disk_full)
    with pytest.raises(SystemExit, match="disk full while downloading fineweb_val_000000.bin: free"):
        cached_fineweb10B.fetch(1, local_dir=tmp_path / "d", endpoint=hub.url)


# --- the GPT-2 vocabulary and the tokenizer ------------------------------------------------------


@pytest.fixture(scope="session")
def gpt2():
    """tiktoken's gpt2 encoding; fetches the vocabulary from PyPI (openai-whisper sdist) if not cached yet."""
    from data.gpt2_vocab import ensure_gpt2

    os.environ["TIKTOKEN_CACHE_DIR"] = vocab_cache()  # never the checkout
    return ensure_gpt2()


def test_gpt2_vocab_offline(gpt2):
    import tiktoken

    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_token == 50256 and gpt2.n_vocab == 50257
    assert tiktoken.get_encoding("r50k_base").encode(" ünïcode 🚀") == gpt2.encode(" ünïcode 🚀")


def decode_shards(gpt2, out, name):
    paths = sorted(out.glob(f"{name}_*.bin"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return paths, [np.fromfile(p, np.uint16, offset=4 * HEADER_INTS) for p in paths]


def check_stream(gpt2, out, name, docs, shard_size):
    """The shards, in order, are exactly <|endoftext|>doc1<|endoftext|>doc2..., cut each shard_size tokens."""
    paths, tokens = decode_shards(gpt2, out, name)
    assert paths[0].name == f"{name}_val_000000.bin"
    assert [p.name for p in paths[1:]] == [f"{name}_train_{i:06d}.bin" for i in range(1, len(paths))]
    assert all(len(t) == shard_size for t in tokens[:-1]) and 0 < len(tokens[-1]) <= shard_size
    stream = np.concatenate(tokens)
    assert stream[0] == 50256
    assert gpt2.decode(stream.tolist()) == "".join(EOT + d for d in docs)
    expected = np.concatenate([[50256] + gpt2.encode_ordinary(d) for d in docs])
    assert np.array_equal(stream, expected)
    return paths


def test_tokenize_local_txt_jsonl_parquet(gpt2, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "my text"
    (src / "sub").mkdir(parents=True)
    docs = [
        "Hello world",
        "Line one.\n\nLine two, ünïcode 🚀 and   spaces.",
        "A jsonl document.",
        "Another one <|endoftext|> with the special text inside.",
        "Parquet row one.",
        "Parquet row two.",
    ]
    (src / "a.txt").write_text(docs[0])
    (src / "b.txt").write_text(docs[1])
    (src / "sub" / "c.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[2:4]))
    )
    pq.write_table(pa.table({"id": [1, 2], "text": docs[4:]}), src / "sub" / "d.parquet")
    (src / "notes.md").write_text("not picked up from a folder")

    out = tmp_path / "shards"
    rc, stdout, err = run(
        "fineweb.py",
        ["--input", src, "--name", "mine", "--out_dir", out, "--shard_size", 16, "--workers", 2],
        tmp_path,
    )
    assert rc == 0, err
    paths = check_stream(gpt2, out, "mine", docs, 16)
    assert len(paths) >= 4
    assert printed_globs(stdout) == {
        "input_bin": f"{out}/mine_train_*.bin",
        "input_val_bin": f"{out}/mine_val_*.bin",
    }

    import train_gpt2  # the trainer's reader and loader agree with the writer

    for p in paths:
        assert np.array_equal(train_gpt2.read_shard(p), np.fromfile(p, np.uint16, offset=4 * HEADER_INTS))
        assert check_shard(p) == len(train_gpt2.read_shard(p))
    import torch

    loader = train_gpt2.ShardLoader(str(out / "mine_train_*.bin"), 1, 4, 0, 1, torch.device("cpu"))
    x, y = loader.next_batch()
    assert x[0].tolist() == train_gpt2.read_shard(paths[1])[:4].tolist()

    # a glob and single files work too; existing shards are kept unless --overwrite
    rc, _, err = run("fineweb.py", ["--input", src / "*.txt", "--name", "mine", "--out_dir", out], tmp_path)
    assert_one_line_error((rc, err), "already has", "--overwrite")
    rc, stdout, err = run(
        "fineweb.py",
        [
            "--input",
            src / "*.txt",
            src / "sub" / "c.jsonl",
            "--name",
            "mine",
            "--out_dir",
            out,
            "--shard_size",
            1000,
            "--overwrite",
        ],
        tmp_path,
    )
    assert rc == 0, err
    assert "only a val shard" in err and "more text" in err
    assert "--input_bin" not in stdout  # no command for train shards that do not exist
    check_stream(gpt2, out, "mine", docs[:4], 1000)


def test_tokenize_rejects_bad_input_in_one_line(gpt2, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    (tmp_path / "doc.csv").write_text("a,b")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for inp, words in [
        ("bad.jsonl", ["bad.jsonl:2", "'text'"]),
        ("bad.parquet", ["no 'text' column", "body"]),
        ("doc.csv", ["doc.csv", "unsupported"]),
        ("missing/", ["no .txt/.jsonl/.parquet files"]),
        ("latin1.txt", ["latin1.txt", "UTF-8"]),
    ]:
        rc, _, err = run(
            "fineweb.py", ["--input", tmp_path / inp, "--out_dir", tmp_path / "o", "--overwrite"], tmp_path
        )
        assert_one_line_error((rc, err), *words)


def test_tokenize_fineweb_config_from_the_hub(gpt2, hub, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"FineWeb document number {i}: some text." for i in range(7)]
    files = {}
    for k, part in enumerate([docs[:4], docs[4:]]):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": part, "id": [str(i) for i in range(len(part))]}), buf)
        files[f"sample/10BT/{k:03d}_00000.parquet"] = buf.getvalue()
    files["sample/100BT/000_00000.parquet"] = b"not used"
    hub.repos["HuggingFaceFW/fineweb"] = files

    out = tmp_path / "fw"
    rc, stdout, err = run("fineweb.py", ["--out_dir", out, "--shard_size", 20], tmp_path, hub)
    assert rc == 0, err
    check_stream(gpt2, out, "fineweb", docs, 20)
    assert not any("100BT" in p for _, p in hub.log)

    rc, _, err = run("fineweb.py", ["--out_dir", tmp_path / "o"], tmp_path, HF_HUB_OFFLINE="1")
    assert_one_line_error((rc, err), "HF_HUB_OFFLINE")


def test_overwrite_keeps_the_old_shards_until_the_new_ones_are_complete(gpt2, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    docs = [f"Document {i} of the first corpus." for i in range(40)]
    (src / "old.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    rc, _, err = run(
        "fineweb.py",
        [
            "--input",
            src / "old.jsonl",
            "--name",
            "mine",
            "--out_dir",
            out,
            "--shard_size",
            64,
            "--workers",
            1,
        ],
        tmp_path,
    )
    assert rc == 0, err
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(old) > 3

    # what a killed run leaves: its staging folder and a half-written shard
    (out / "mine.tmp").mkdir()
    (out / "mine.tmp" / "mine_train_000002.bin.tmp").write_bytes(b"\0" * 4096)
    (out / "mine_train_000007.bin.tmp").write_bytes(b"\0" * 4096)
    # an input that fails after 300 documents: far enough for several new shards to be written first
    lines = [json.dumps({"text": f"New document {i}."}) for i in range(300)] + ["not json"]
    (src / "bad.jsonl").write_text("\n".join(lines))
    rc, _, err = run(
        "fineweb.py",
        [
            "--input",
            src / "bad.jsonl",
            "--name",
            "mine",
            "--out_dir",
            out,
            "--shard_size",
            64,
            "--workers",
            1,
            "--overwrite",
        ],
        tmp_path,
    )
    assert_one_line_error((rc, err), "bad.jsonl:301", lines=None)  # after the progress lines
    assert "mine_train_000002.bin" in err  # new shards were complete before the input failed...
    assert "mine.tmp" in err and "mine_train_000007.bin.tmp" in err  # ...and the leftovers were named
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # yet the folder holds the old shards, only

    again = [
        "--input",
        src / "bad.jsonl",
        "--name",
        "mine",
        "--out_dir",
        out,
        "--shard_size",
        10**4,
        "--overwrite",
    ]
    rc, _, err = run("fineweb.py", again, tmp_path)
    assert_one_line_error((rc, err), "bad.jsonl:301")
    (src / "bad.jsonl").write_text("\n".join(lines[:3]))
    rc, _, err = run("fineweb.py", again, tmp_path)
    assert rc == 0, err
    check_stream(gpt2, out, "mine", [f"New document {i}." for i in range(3)], 10**4)
    assert [p.name for p in out.iterdir()] == [
        "mine_val_000000.bin"
    ]  # the old train shards went with the old val


def printed_command(stdout):
    """The training command fineweb.py prints, as the shell would pass it."""
    line = next(line for line in stdout.splitlines() if line.startswith("train on them with: "))
    return shlex.split(line.split(": ", 1)[1])


def printed_globs(stdout):
    """The --input_bin and --input_val_bin values of the printed command."""
    return dict(word[2:].split("=", 1) for word in printed_command(stdout) if word.startswith("--"))


def test_the_printed_training_command_runs_from_another_folder(gpt2, tmp_path):
    (tmp_path / "docs.jsonl").write_text(
        "\n".join(json.dumps({"text": f"Document {i}. " * 40}) for i in range(30))
    )
    args = [
        "--input",
        "docs.jsonl",
        "--name",
        "t",
        "--out_dir",
        "shards",
        "--shard_size",
        2000,
        "--workers",
        1,
    ]
    rc, stdout, err = run("fineweb.py", args, tmp_path)  # a relative --out_dir
    assert rc == 0, err
    command = printed_command(stdout)
    assert command[:2] == [sys.executable, str(ROOT / "train_gpt2.py")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny = ["--num_layers=2", "--model_dim=64", "--num_heads=2", "--seq_len=32", "--batch_size=8"]
    tiny += [
        "--val_tokens=256",
        "--num_iterations=2",
        "--warmdown_iters=1",
        "--device=cpu",
        "--save_every_minutes=0",
    ]
    r = subprocess.run(command + tiny, cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"^step:2/2 val_loss:", r.stdout, re.M)


def test_folders_with_glob_characters_are_paths(gpt2, tmp_path):
    src, out = tmp_path / "in[x]", tmp_path / "out[1]*"
    src.mkdir()
    docs = [f"Document {i} in a folder named like a glob." for i in range(12)]
    (src / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    args = ["--input", src, "--name", "g", "--out_dir", out, "--shard_size", 32, "--workers", 1]
    rc, stdout, err = run("fineweb.py", args, tmp_path)
    assert rc == 0, err
    paths = check_stream(gpt2, out, "g", docs, 32)
    flags = printed_globs(stdout)  # the globs the trainer gets match exactly these shards
    assert sorted(glob.glob(flags["input_bin"])) == [str(p) for p in paths[1:]]
    assert glob.glob(flags["input_val_bin"]) == [str(paths[0])]
    rc, _, err = run("fineweb.py", args, tmp_path)  # the shards in out[1]* are seen as existing
    assert_one_line_error((rc, err), "already has", str(len(paths)), "--overwrite")
    rc, _, err = run("fineweb.py", args[:-4] + ["--shard_size", 10**4, "--overwrite"], tmp_path)
    assert rc == 0, err
    assert [p.name for p in out.iterdir()] == ["g_val_000000.bin"]  # and replaced, old train shards too


def test_inputs_are_a_set_of_files_and_repeated_documents_are_counted(gpt2, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("The first document.")
    lines = ["The first document.", "Another document.", "Another document.", "A third one."]
    (src / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in lines))
    (tmp_path / "link.txt").symlink_to(src / "a.txt")
    inputs = [src, src / "*.txt", src / "a.txt", tmp_path / "link.txt", src / "b.jsonl"]
    out = tmp_path / "out"
    rc, _, err = run("fineweb.py", ["--input", *inputs, "--out_dir", out, "--workers", 1], tmp_path)
    assert rc == 0, err
    check_stream(gpt2, out, "fineweb", ["The first document.", *lines], 10**8)  # each file once, in order
    note = next(line for line in err.splitlines() if "read once" in line)
    assert re.search(r"\b4 input files\b", note)  # the glob, the file, the link and b.jsonl again
    repeats = next(line for line in err.splitlines() if line.startswith("warning:") and "repeat" in line)
    assert re.search(r"\b2 of 5 documents\b", repeats)  # kept: FineWeb itself repeats documents across dumps


def test_input_without_text_is_refused_and_empty_documents_are_skipped(gpt2, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " \n "}))
    (tmp_path / "nothing.jsonl").write_bytes(b"")
    out = tmp_path / "out"
    for inputs, words in [
        (["empty.txt"], ["no text", "1 of"]),
        (["empty.txt", "blank.txt", "blank.jsonl"], ["no text", "all 4"]),
        (["nothing.jsonl"], ["no documents"]),
    ]:
        rc, stdout, err = run("fineweb.py", ["--input", *inputs, "--out_dir", out, "--workers", 1], tmp_path)
        assert_one_line_error((rc, err), *words, "--input")
        assert stdout == "" and not out.exists()  # no empty folder left behind
    (tmp_path / "text.txt").write_text("Some text at last.")
    inputs = ["empty.txt", "blank.jsonl", "text.txt"]
    rc, _, err = run("fineweb.py", ["--input", *inputs, "--out_dir", out, "--workers", 1], tmp_path)
    assert rc == 0, err
    check_stream(gpt2, out, "fineweb", ["Some text at last."], 10**8)
    assert re.search(r"skipped 3 empty or whitespace-only documents of 4\b", err)


@pytest.mark.parametrize("name", ["../escaped", "a/b", "x*", ".hidden", ""])
def test_name_must_be_a_plain_name(tmp_path, name):
    (tmp_path / "a.txt").write_text("text")
    rc, stdout, err = run("fineweb.py", ["--input", "a.txt", "--name", name], tmp_path)
    assert_one_line_error((rc, err), "--name", "--out_dir")
    assert stdout == "" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert not (ROOT / "escaped").exists()


def test_the_vocabulary_is_cached_in_the_users_cache_folder_never_the_checkout(gpt2, tmp_path):
    """The tools cache the GPT-2 vocabulary where it survives a reboot: $XDG_CACHE_HOME or ~/.cache."""
    assert not Path(os.environ["TIKTOKEN_CACHE_DIR"]).resolve().is_relative_to(ROOT)  # the suite's own
    code = "from data.gpt2_vocab import cache_dir; print(cache_dir())"
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    for extra, expected in (({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg"), ({}, tmp_path)):
        env = {k: v for k, v in env.items() if k != "XDG_CACHE_HOME"} | extra | {"HOME": str(tmp_path)}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.stdout.strip() == str(expected / ("tiktoken" if extra else ".cache/tiktoken")), out.stderr
