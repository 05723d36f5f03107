"""Evaluate a train_gpt2.py checkpoint on HellaSwag (the 10,042 validation examples), scored as llm.c does.

    python hellaswag.py CHECKPOINT                  # fetches the validation split once, into data/hellaswag/
    python hellaswag.py CHECKPOINT --limit 500      # a quick look at the first 500 examples
    python hellaswag.py CHECKPOINT --data hellaswag_val.jsonl   # a local copy: parquet or the original jsonl

Each example is a context and four endings, one of them right. The model reads the context followed by
" " + ending, and its cross-entropy over the ending's tokens only is the candidate's loss: acc picks the
ending with the lowest summed loss, acc_norm the lowest mean loss per ending token (the number usually
quoted). Prints both with a 95% Wilson interval beside OpenAI's GPT-2 124M in the same scoring, and
writes them as JSON next to the checkpoint (CHECKPOINT.hellaswag.json).
"""

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.flags import FlagParser, at_least, run_tool
from harness import CheckpointError, load_trained_model
from train_gpt2 import GPT, Hyperparameters, cast_model, compute_dtype

ROOT = Path(__file__).resolve().parent
REPO = "Rowan/hellaswag"
REVISION = "refs/convert/parquet"  # the hub's parquet conversion of the dataset
FILENAME = "default/validation/0000.parquet"
FIELDS = ("ctx", "endings", "label")
NUM_ENDINGS = 4
FULL_SIZE = 10042  # examples in the validation split
GPT2_124M = {"acc_norm": 0.2955, "acc": 0.2859}  # OpenAI's GPT-2 124M, this scoring, all 10,042 examples
CHANCE = 1 / NUM_ENDINGS
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def fail(message):
    raise SystemExit(f"hellaswag.py: {' '.join(str(message).split())}")  # always one line


# --- the data ------------------------------------------------------------------------------------


def download(data_dir, endpoint=None):
    """The validation parquet in data_dir, fetched from the hub unless already there (no request then)."""
    data_dir = Path(data_dir)
    path = data_dir / FILENAME
    if path.is_file():
        return path
    from huggingface_hub import constants

    from data.cached_fineweb10B import reach_hub

    what = f"HellaSwag ({REPO}, {FILENAME})"
    if constants.is_offline_mode():
        fail(
            f"cannot download {what}: HF_HUB_OFFLINE is set; unset it, or pass a local copy with --data FILE"
        )
    reach_hub(what, endpoint)  # unreachable: one line within seconds instead of ~24 s of retries
    made = [p for p in (data_dir / "default", data_dir / ".cache") if not p.exists()]
    made += [p for p in (data_dir, *data_dir.parents) if not p.exists()][-1:]  # the top folder mkdir makes
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create {data_dir}: {e.strerror}; pick another folder with --data_dir")
    from huggingface_hub import hf_hub_download

    print(f"hellaswag.py: downloading {what} into {data_dir}", file=sys.stderr)
    try:
        hf_hub_download(
            REPO, FILENAME, repo_type="dataset", revision=REVISION, local_dir=data_dir, endpoint=endpoint
        )
    except BaseException as e:  # every hub failure (and Ctrl-C) leaves no folder behind that we made
        for p in made:
            shutil.rmtree(p, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise
        fail(hub_error(e, what))
    return path


def hub_error(e, what):
    """A one-line message, saying what to do, for an exception raised by huggingface_hub."""
    import errno

    from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError

    from data.cached_fineweb10B import hub_error as shard_hub_error

    if isinstance(e, (RemoteEntryNotFoundError, RevisionNotFoundError)):
        return (
            f"{what} is not on the hub at revision {REVISION} (the dataset moved?): "
            "download the validation split yourself and pass it with --data FILE"
        )
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full while downloading {what} (~10 MB): free some space, or pick another --data_dir"
    return shard_hub_error(e, what, REPO)


def read_examples(path):
    """[(ctx, endings, label)] from a HellaSwag file, parquet (the hub's) or jsonl (the original release)."""
    path = Path(path)
    if not path.is_file():
        fail(f"no data file at {path}: pass HellaSwag's validation split as parquet or jsonl")
    try:
        with open(path, "rb") as f:
            parquet = f.read(4) == b"PAR1"
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    rows = _read_parquet(path) if parquet else _read_jsonl(path)
    if not rows:
        fail(f"{path} holds no examples: pass HellaSwag's validation split as parquet or jsonl")
    return [_check(row, path, where) for where, row in rows]


def _read_parquet(path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: arrow's many error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"{path} is not a readable parquet file ({first}): delete it, or pass another with --data")
    missing = [f for f in FIELDS if f not in table.column_names]
    if missing:
        fail(
            f"{path} lacks the field(s) {', '.join(missing)}: a HellaSwag file has ctx, endings and label "
            f"for each example (it has {', '.join(table.column_names) or 'no columns'})"
        )
    return [(f"row {i}", row) for i, row in enumerate(table.select(list(FIELDS)).to_pylist())]


def _read_jsonl(path):
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((f"line {k}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        fail(f"{path} line {k} is not JSON ({e.msg}): --data takes jsonl or parquet")
    except UnicodeDecodeError:
        fail(f"{path} is neither parquet nor UTF-8 jsonl: --data takes HellaSwag as jsonl or parquet")
    return rows


def _check(row, path, where):
    """(ctx, endings, label) of one example; its faults named in one line."""
    if not isinstance(row, dict):
        fail(f"{path} {where} is not an object with ctx, endings and label")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        fail(
            f"{path} {where} lacks the field(s) {', '.join(missing)}: "
            "a HellaSwag file has ctx, endings and label for each example"
        )
    ctx, endings, label = (row[f] for f in FIELDS)
    if not isinstance(ctx, str):
        fail(f"{path} {where}: ctx is {type(ctx).__name__}, not text")
    if not (
        isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)
    ):
        fail(f"{path} {where}: endings must be a list of {NUM_ENDINGS} texts")
    try:
        label = int(str(label).strip())  # the hub's parquet stores the label as text
    except ValueError:
        label = None
    if label not in range(NUM_ENDINGS):
        fail(
            f"{path} {where}: label {row['label']!r} is not 0 to {NUM_ENDINGS - 1} "
            "(the test split has no labels: use the validation split)"
        )
    return ctx, endings, label


def encode(enc, ctx, endings):
    """(context ids, [ids of " " + ending]) as llm.c renders an example; an empty context is <|endoftext|>."""
    return enc.encode(ctx) or [enc.eot_token], [enc.encode(" " + e) for e in endings]


def fit(context, endings, max_len):
    """Cut the context from the left so that context + the longest ending fits in max_len tokens (one context
    token is always kept); the endings are never cut. Returns (context, whether it was cut)."""
    keep = max(1, max_len - max(map(len, endings)))
    return (context[-keep:], True) if len(context) > keep else (context, False)


# --- scoring -------------------------------------------------------------------------------------


@torch.no_grad()
def score(model, examples, batch_size, progress=None):
    """Losses of every ending after its context: (sum over its tokens, number of its tokens), each (N, 4).

    examples: [(context ids, [ids of each ending])]. batch_size examples (4 rows each) go through the model in
    one forward, right-padded to their longest row; the model is causal, so the padding changes nothing before
    it, and it is left out of the loss. Examples are taken longest first: padding stays small, and a batch too
    big for the device fails at once. progress(examples done, tokens done) is called after each batch.
    """
    device = next(model.parameters()).device
    n = len(examples)
    sums = torch.zeros(n, NUM_ENDINGS, dtype=torch.float64)
    counts = torch.zeros(n, NUM_ENDINGS, dtype=torch.long)
    order = sorted(range(n), key=lambda i: -row_tokens(examples[i]))
    tokens_done = 0
    for start in range(0, n, batch_size):
        chosen = order[start : start + batch_size]
        rows = [(examples[i][0], e) for i in chosen for e in examples[i][1]]
        width = max(len(c) + len(e) for c, e in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)  # padded with id 0, as llm.c does
        in_ending = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (c, e) in enumerate(rows):
            tokens[r, : len(c) + len(e)] = torch.tensor(c + e)
            in_ending[r, len(c) : len(c) + len(e)] = True
        tokens, in_ending = tokens.to(device), in_ending.to(device)
        logits = model(tokens)  # (rows, width, vocab), fp32
        predicted = in_ending[:, 1:]  # position t's logits predict token t + 1
        losses = F.cross_entropy(logits[:, :-1][predicted], tokens[:, 1:][predicted], reduction="none")
        row = torch.arange(len(rows), device=device)[:, None].expand_as(predicted)[predicted]
        row_sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
            0, row, losses.double()
        )
        sums[chosen] = row_sums.view(-1, NUM_ENDINGS).cpu()
        counts[chosen] = predicted.sum(1).view(-1, NUM_ENDINGS).cpu()
        del logits, losses
        tokens_done += sum(row_tokens(examples[i]) for i in chosen)
        if progress:
            progress(min(start + batch_size, n), tokens_done)
    return sums, counts


def row_tokens(example):
    """The tokens of an example's longest row (context + longest ending): its share of the work."""
    return len(example[0]) + max(map(len, example[1]))


def predictions(sums, counts):
    """(acc's choice, acc_norm's choice) per example: lowest summed loss, lowest mean loss per token."""
    return sums.argmin(1), (sums / counts).argmin(1)


def wilson(correct, n, z=Z95):
    """The Wilson score interval of a proportion correct/n."""
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


class Progress:
    """A progress line on stderr at most every `seconds` (0 = never): examples done, rate, ETA.

    The ETA goes by tokens: the longest examples come first."""

    def __init__(self, total, total_tokens, seconds):
        self.total, self.total_tokens, self.seconds = total, total_tokens, seconds
        self.start = self.last = time.monotonic()

    def __call__(self, done, tokens_done):
        now = time.monotonic()
        if not self.seconds or now - self.last < self.seconds or done >= self.total:
            return
        self.last = now
        rate = done / (now - self.start)
        eta = int((self.total_tokens - tokens_done) * (now - self.start) / tokens_done)
        print(
            f"hellaswag.py: {done}/{self.total} examples ({100 * done / self.total:.0f}%), "
            f"{rate:.1f} examples/s, ETA {eta // 60}m{eta % 60:02d}s",
            file=sys.stderr,
            flush=True,
        )


# --- the command ---------------------------------------------------------------------------------


def load_model(path, device):
    """(GPT in eval mode on device, cast as in training: bf16 on CUDA, fp32 on CPU; Hyperparameters; step)."""
    try:
        model, args, step = load_trained_model(path, Hyperparameters, GPT.from_args)
    except CheckpointError as e:
        fail(e)
    return cast_model(model.to(device), compute_dtype(device)).eval(), args, step


def gpt2_encoding():
    from data.gpt2_vocab import ensure_gpt2

    try:
        return ensure_gpt2()
    except Exception as e:  # noqa: BLE001 -- no network, a broken cache: either way the same advice
        fail(
            f"cannot load the GPT-2 tokenizer ({' '.join(str(e).split()) or type(e).__name__}); "
            "run `python data/gpt2_vocab.py` where the network can be reached"
        )


def parse_args(argv):
    p = FlagParser(prog="hellaswag.py", description="Evaluate a train_gpt2.py checkpoint on HellaSwag.")
    p.add_argument("checkpoint", help="file written by train_gpt2.py")
    p.add_argument("--data", default=None, help="a local copy of the validation split, parquet or jsonl")
    p.add_argument(
        "--data_dir",
        default=str(ROOT / "data" / "hellaswag"),
        help="where the split is downloaded to, once (default data/hellaswag/)",
    )
    p.add_argument("--limit", type=at_least(1), default=None, help="only the first N examples: a quick look")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = CUDA if visible")
    p.add_argument(
        "--batch_size",
        type=at_least(1),
        default=None,
        help="examples (4 sequences each) per forward; default 16 on CUDA, 4 on CPU",
    )
    p.add_argument("--out", default=None, help="where the JSON goes (default CHECKPOINT.hellaswag.json)")
    p.add_argument("--progress_seconds", type=float, default=10.0, help="a progress line this often; 0 = off")
    return p.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        fail("--device=cuda but no CUDA device is visible")
    device = torch.device(
        "cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model, args, step = load_model(opts.checkpoint, device)
    data = Path(opts.data) if opts.data else download(opts.data_dir)
    examples = read_examples(data)
    total = len(examples)
    examples = examples[: opts.limit]
    enc = gpt2_encoding()
    encoded, cut = [], 0
    for ctx, endings, _ in examples:
        context, ending_ids = encode(enc, ctx, endings)
        context, was_cut = fit(context, ending_ids, args.seq_len)
        encoded.append((context, ending_ids))
        cut += was_cut
    top = max(max(c + [t for e in es for t in e]) for c, es in encoded)
    if top >= args.vocab_size:
        fail(
            f"the checkpoint's vocab_size={args.vocab_size} is smaller than the GPT-2 tokenizer's "
            f"{enc.n_vocab}: HellaSwag needs a model trained on GPT-2 tokens"
        )
    dtype = str(compute_dtype(device)).removeprefix("torch.")
    print(
        f"hellaswag.py: {opts.checkpoint} (step {step}, {args.num_layers} layers x {args.model_dim}) "
        f"on {device} in {dtype}: {len(examples)} of {total} examples from {data}",
        file=sys.stderr,
    )
    if cut:
        print(
            f"hellaswag.py: {cut} contexts were cut from the left to fit the model's {args.seq_len}-token "
            "training context (rotary positions have no hard limit, but longer ones were never trained)",
            file=sys.stderr,
        )
    batch_size = opts.batch_size or (16 if device.type == "cuda" else 4)
    try:
        sums, counts = score(
            model,
            encoded,
            batch_size,
            Progress(len(encoded), sum(map(row_tokens, encoded)), opts.progress_seconds),
        )
    except torch.OutOfMemoryError:
        fail(f"out of GPU memory at --batch_size={batch_size} examples per forward: pass a smaller one")
    labels = torch.tensor([label for _, _, label in examples])
    n = len(examples)
    result = dict(checkpoint=str(opts.checkpoint), step=step, data=str(data), n=n, examples_in_file=total)
    result.update(limit=opts.limit, limited=n < total)
    for name, pred in zip(("acc", "acc_norm"), predictions(sums, counts)):
        correct = int((pred == labels).sum())
        result[name], result[f"{name}_ci95"] = correct / n, list(wilson(correct, n))
    result.update(
        interval="95% Wilson score interval",
        contexts_cut=cut,
        device=str(device),
        dtype=dtype,
        reference={"gpt2_124m": GPT2_124M, "chance": CHANCE, "examples": FULL_SIZE},
    )
    report(result)
    out = opts.out or f"{opts.checkpoint}.hellaswag.json"
    try:
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(out + ".tmp", out)
    except OSError as e:
        if os.path.exists(out + ".tmp"):
            os.remove(out + ".tmp")
        fail(f"cannot write {out}: {e.strerror}; pick another file with --out")
    print(f"wrote {out}")
    return result


def report(r):
    print(
        f"HellaSwag validation: {r['n']} examples"
        + (f" (the first {r['n']} of {r['examples_in_file']})" if r["limited"] else "")
    )
    print(f"{'':10}{'this checkpoint (95% interval)':34}{'GPT-2 124M':12}chance")
    for name in ("acc_norm", "acc"):
        lo, hi = r[f"{name}_ci95"]
        ours = f"{r[name]:.4f} [{lo:.4f}, {hi:.4f}]"
        print(f"{name:10}{ours:34}{GPT2_124M[name]:<12.4f}{CHANCE:.2f}")
    if r["limited"]:
        print(f"(GPT-2 124M's numbers are over all {FULL_SIZE:,} examples)")


if __name__ == "__main__":
    run_tool(main, "hellaswag.py")
