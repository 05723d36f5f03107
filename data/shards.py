"""Write token shards in the llm.c / FineWeb format that train_gpt2.py reads.

Header: 256 int32 (1024 bytes): [0] magic 20240520, [1] version 1, [2] token count;
then that many uint16 token ids. tests/test_loader.py round-trips this writer through
the trainer's reader, so the two cannot drift apart.
"""

import contextlib
import os

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path, tokens):
    """Write `tokens` (any int sequence, each < 2**16) to `path` atomically (temp file, then rename).

    A failure (full disk, Ctrl-C) removes the temp file; only a killed process leaves `<path>.tmp`."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16)), (
        "token ids must fit uint16"
    )
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_shard(path, error=ValueError):
    """The token count of the shard at `path`, after checking its header against its size; anything else is
    `error` (the trainer's own ShardError, or ValueError), one line naming the file and what to do."""
    try:
        header, size = np.fromfile(path, dtype=np.int32, count=HEADER_INTS), os.path.getsize(path)
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    if header.size < HEADER_INTS:
        raise error(f"{path}: {size} bytes is too short for the {HEADER_BYTES}-byte shard header")
    if header[0] != SHARD_MAGIC:
        raise error(
            f"{path}: magic number {header[0]} is not {SHARD_MAGIC}: not an llm.c/FineWeb token shard"
        )
    if header[1] != SHARD_VERSION:
        raise error(
            f"{path}: shard version {header[1]} is not {SHARD_VERSION}: re-tokenize with data/fineweb.py"
        )
    num_tokens = int(header[2])
    if num_tokens < 0 or size != HEADER_BYTES + 2 * num_tokens:
        raise error(
            f"{path}: header says {num_tokens} tokens ({HEADER_BYTES + 2 * num_tokens} bytes) but the file "
            f"has {size} bytes: truncated or corrupt, download or tokenize it again"
        )
    return num_tokens
