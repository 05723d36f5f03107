"""Tokenize text into GPT-2 token shards for train_gpt2.py.

    python data/fineweb.py                              # FineWeb sample-10BT from the hub -> data/fineweb10B/
    python data/fineweb.py --version 100B               # FineWeb sample-100BT -> data/fineweb100B/
    python data/fineweb.py --input my_texts/ --name mine    # your own text -> data/mine/

Local inputs: folders (searched recursively), files or quoted globs of .txt (one document per
file), .jsonl (one JSON object with a "text" field per line) or .parquet (a "text" column).
Each input file is read once, however often it is named. Documents that are empty or
whitespace only are skipped (an input without any text is refused); documents that repeat
word for word are kept, and counted in a warning.

Each document becomes <|endoftext|> followed by its tokens (tiktoken gpt2, encode_ordinary),
tokenized on all CPU cores. The token stream is cut every --shard_size tokens into
<name>_val_000000.bin (the validation shard), then <name>_train_000001.bin, ...; the last
shard holds the remainder. --name is a plain name (letters, digits, '.', '_', '-'); --out_dir
picks the folder. Shards are written into <out_dir>/<name>.tmp/ and move into <out_dir> only
once all are complete, so a failed or interrupted run changes no shard there (with
--overwrite, the old shards stay until the new ones replace them). The next run removes what
a killed run left behind.
"""

import argparse
import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.flags import FlagParser, at_least  # noqa: E402
from data.shards import write_shard  # noqa: E402

HERE = Path(__file__).resolve().parent
FINEWEB = "HuggingFaceFW/fineweb"
EOT = 50256
SUFFIXES = (".txt", ".jsonl", ".parquet")

_enc = None


def _init_worker():
    global _enc
    import tiktoken

    # Ctrl-C reaches the whole group: the parent alone stops the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _enc = tiktoken.get_encoding("gpt2")  # the parent seeded the cache (data/gpt2_vocab.py)


def tokenize(text):
    """<|endoftext|> then the GPT-2 tokens of `text`, as uint16."""
    tokens = np.array([EOT] + _enc.encode_ordinary(text), dtype=np.int64)
    assert tokens.max() < 2**16, "token ids must fit uint16"
    return tokens.astype(np.uint16)


def tokenize_and_hash(text):
    """(tokenize(text), a 64-bit hash of the text): equal hashes mark documents that repeat word for word."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return tokenize(text), int.from_bytes(digest, "little")


# --- document sources ------------------------------------------------------------------------


def _parquet_texts(path):
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several kinds for a bad file
        raise SystemExit(f"{path}: not a readable parquet file ({e})") from None
    if "text" not in f.schema_arrow.names:
        raise SystemExit(f"{path}: no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
    for batch in f.iter_batches(columns=["text"], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _file_texts(path):
    if path.suffix == ".parquet":
        yield from _parquet_texts(path)
        return
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".txt":
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        doc = json.loads(line)
                        assert isinstance(doc["text"], str)
                    except (ValueError, TypeError, KeyError, AssertionError):
                        raise SystemExit(f"{path}:{lineno}: not a JSON object with a 'text' string") from None
                    yield doc["text"]
    except UnicodeDecodeError:
        raise SystemExit(f"{path}: not UTF-8 text") from None


def local_files(inputs):
    """The files named by `inputs` (files, folders, globs), in a stable order, each once.

    A file reached twice (a folder and a glob into it, a file named twice, a link) is read once, the first
    time.
    """
    files, seen, repeats = [], set(), 0
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
        elif p.is_file():
            found = [p]
        else:
            found = [Path(f) for f in sorted(glob.glob(inp, recursive=True)) if Path(f).is_file()]
        if not found:
            raise SystemExit(f"no {'/'.join(SUFFIXES)} files found at {inp}")
        bad = [f for f in found if f.suffix not in SUFFIXES]
        if bad:
            raise SystemExit(f"{bad[0]}: unsupported file type; use .txt, .jsonl or .parquet")
        for f in found:
            real = os.path.realpath(f)
            repeats += real in seen
            if real not in seen:
                seen.add(real)
                files.append(f)
    if repeats:
        print(
            f"note: {repeats} input file{'s were' if repeats > 1 else ' was'} named more than once "
            "(or through a link); each file is read once",
            file=sys.stderr,
        )
    return files


def local_texts(files):
    for f in files:
        yield from _file_texts(f)


def fineweb_texts(version, endpoint=None):
    """Documents of FineWeb's sample-<version>T config, file by file (files are kept in the HF cache)."""
    from huggingface_hub import HfApi, hf_hub_download

    from data.cached_fineweb10B import hub_error, reach_hub

    folder = f"sample/{version}T"
    reach_hub(f"the file list of {folder}", endpoint)
    try:
        files = sorted(
            f.path
            for f in HfApi(endpoint=endpoint).list_repo_tree(FINEWEB, folder, repo_type="dataset")
            if f.path.endswith(".parquet")
        )
    except Exception as e:  # noqa: BLE001
        raise SystemExit(hub_error(e, f"the file list of {folder}", FINEWEB)) from None
    if not files:
        raise SystemExit(f"no parquet files under {folder} in {FINEWEB}: check --version")
    for k, name in enumerate(files, 1):
        print(f"[{k}/{len(files)}] {FINEWEB}/{name}", file=sys.stderr, flush=True)
        try:
            path = hf_hub_download(FINEWEB, name, repo_type="dataset", endpoint=endpoint)
        except Exception as e:  # noqa: BLE001
            raise SystemExit(hub_error(e, name, FINEWEB)) from None
        yield from _parquet_texts(path)


# --- shards ------------------------------------------------------------------------------------


class ShardWriter:
    """Cuts a token stream into shards of exactly `shard_size` tokens: val first, then train."""

    def __init__(self, out_dir, name, shard_size):
        self.out_dir, self.name, self.size = Path(out_dir), name, shard_size
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.n = 0
        self.written = []  # (path, token count)

    def add(self, tokens):
        while len(tokens):
            k = min(len(tokens), self.size - self.n)
            self.buf[self.n : self.n + k] = tokens[:k]
            self.n, tokens = self.n + k, tokens[k:]
            if self.n == self.size:
                self.flush()

    def flush(self):
        if self.n:
            i = len(self.written)
            path = self.out_dir / f"{self.name}_{'val' if i == 0 else 'train'}_{i:06d}.bin"
            write_shard(path, self.buf[: self.n])
            self.written.append((path, self.n))
            print(f"wrote {path.name} ({self.n:,} tokens)", file=sys.stderr, flush=True)
            self.n = 0


def _batches(it, size):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Counts:
    """What the input held: documents, empty ones (skipped), and the 64-bit hashes of the others."""

    def __init__(self):
        self.docs, self.empty, self.hashes = 0, 0, []

    def nonempty(self, texts):
        """The documents of `texts` that hold more than whitespace; the others are only counted."""
        for text in texts:
            self.docs += 1
            if not text or text.isspace():
                self.empty += 1
            else:
                yield text

    def repeats(self):
        """How many documents repeat an earlier one word for word (up to 64-bit hash collisions)."""
        hashes = np.array(self.hashes, dtype=np.uint64)
        return len(hashes) - len(np.unique(hashes))


def tokenize_to_shards(texts, out_dir, name, shard_size, workers, counts):
    writer = ShardWriter(out_dir, name, shard_size)
    with mp.Pool(workers, initializer=_init_worker) as pool:
        # bounded batches: Pool.imap alone would read all input ahead
        for batch in _batches(counts.nonempty(texts), 256 * workers):
            for tokens, digest in pool.imap(tokenize_and_hash, batch, chunksize=16):
                writer.add(tokens)
                counts.hashes.append(digest)
    writer.flush()
    return writer.written


def shard_paths(out_dir, name):
    folder = glob.escape(str(out_dir))  # a folder is a path, never a pattern: data[1]/ is data[1]/
    return sorted(
        glob.glob(os.path.join(folder, f"{glob.escape(name)}_val_*.bin"))
        + glob.glob(os.path.join(folder, f"{glob.escape(name)}_train_*.bin"))
    )


def remove_leftovers(out_dir, name):
    """Delete what a killed run left in out_dir: its staging folder and half-written shards.

    (Gigabytes at full size.)"""
    for path in [out_dir / f"{name}.tmp"] + sorted(out_dir.glob(f"{glob.escape(name)}_*.bin.tmp")):
        if path.exists():
            print(f"removing {path}, left by an interrupted run", file=sys.stderr)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def replace_shards(written, out_dir, name):
    """Move the complete new shards from the staging folder into out_dir.

    Then drop the old shards they did not replace."""
    new = [out_dir / path.name for path, _ in written]
    for (path, _), dest in zip(written, new):
        os.replace(path, dest)
    for path in set(map(Path, shard_paths(out_dir, name))) - set(new):
        path.unlink()


def main(argv=None):
    p = FlagParser(
        description=__doc__.split("\n\n")[0] + " Defaults: FineWeb sample-10BT.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="local .txt/.jsonl/.parquet files, folders or globs (default: FineWeb from the hub)",
    )
    p.add_argument(
        "--version",
        choices=["10B", "100B"],
        default="10B",
        help="FineWeb config sample-10BT or sample-100BT (without --input)",
    )
    p.add_argument(
        "--name",
        default="fineweb",
        help="shard file prefix, and the folder under data/ with --input (default fineweb)",
    )
    p.add_argument(
        "--out_dir", help="output folder (default data/fineweb<version>, or data/<name> with --input)"
    )
    p.add_argument("--shard_size", type=at_least(1), default=10**8, help="tokens per shard (default 10^8)")
    p.add_argument(
        "--workers", type=at_least(1), default=os.cpu_count(), help="tokenizer processes (default: all cores)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing <name>_*.bin shards in the folder"
    )
    args = p.parse_args(argv)
    if not re.fullmatch(r"\w[\w.-]*", args.name):
        raise SystemExit(
            f"fineweb.py: --name={args.name!r} is not a plain name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (--out_dir picks the folder)"
        )
    if args.input:
        texts = local_texts(local_files(args.input))
        out_dir = Path(args.out_dir or HERE / args.name)
    else:
        texts = fineweb_texts(args.version)
        out_dir = Path(args.out_dir or HERE / f"fineweb{args.version}")

    out_dir = out_dir.absolute()  # the printed command runs from any folder
    stage = out_dir / f"{args.name}.tmp"
    new_folder = next((p for p in [*reversed(out_dir.parents), out_dir] if not p.exists()), None)
    try:
        remove_leftovers(out_dir, args.name)
        old = shard_paths(out_dir, args.name)
        if old and not args.overwrite:
            raise SystemExit(
                f"{out_dir} already has {len(old)} {args.name}_*.bin shards: "
                "pass --overwrite to replace them, or choose another --name or --out_dir"
            )
        stage.mkdir(parents=True)
    except OSError as e:
        raise SystemExit(f"cannot write to {out_dir}: {e.strerror}") from None

    from data.gpt2_vocab import ensure_gpt2

    counts = Counts()
    try:
        ensure_gpt2()
        written = tokenize_to_shards(texts, stage, args.name, args.shard_size, args.workers, counts)
        if counts.docs == 0:
            raise SystemExit("the input holds no documents: check --input")
        if not written:
            raise SystemExit(
                f"the input holds no text: all {counts.docs:,} of its documents are empty or "
                "whitespace only; check --input"
            )
        # only renames follow: Ctrl-C must not split the set
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        replace_shards(written, out_dir, args.name)
        signal.signal(signal.SIGINT, handler)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    except OSError as e:
        raise SystemExit(f"cannot write shards to {out_dir}: {e.strerror}") from None
    except KeyboardInterrupt:
        print(f"fineweb.py: interrupted; no shard in {out_dir} was changed", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if new_folder and not shard_paths(out_dir, args.name):
            shutil.rmtree(new_folder, ignore_errors=True)  # a failure leaves no empty folder it made
    total = sum(n for _, n in written)
    if counts.empty:
        print(
            f"warning: skipped {counts.empty:,} empty or whitespace-only documents of {counts.docs:,}",
            file=sys.stderr,
        )
    repeats = counts.repeats()
    if repeats:
        print(
            f"warning: {repeats:,} of {len(counts.hashes):,} documents repeat an earlier one word for word; "
            "all are kept (deduplicate the input to drop them)",
            file=sys.stderr,
        )
    print(f"done: {len(written)} shards, {total:,} tokens in {out_dir}")
    if len(written) == 1:
        print(
            f"warning: only a val shard ({total:,} tokens), no train shard to train on: give more text, "
            f"or lower --shard_size (now {args.shard_size:,})",
            file=sys.stderr,
        )
        return
    pattern = os.path.join(glob.escape(str(out_dir)), args.name)  # the trainer globs these: escape the folder
    trainer = [sys.executable, str(HERE.parent / "train_gpt2.py")]
    flags = [f"--input_bin={pattern}_train_*.bin", f"--input_val_bin={pattern}_val_*.bin"]
    print(f"train on them with: {shlex.join(trainer + flags)}")


if __name__ == "__main__":
    main()
