"""Write token shards in the llm.c / FineWeb format that train_gpt2.py reads.

Header: 256 int32 (1024 bytes): [0] magic 20240520, [1] version 1, [2] token count;
then that many uint16 token ids. tests/test_loader.py round-trips this writer through
the trainer's reader, so the two cannot drift apart.
"""

import contextlib
import os

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


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


def check_shard(path):
    """Return the token count of the shard at `path`.

    Raises ValueError (one line, naming the file) if it is malformed."""
    size = os.path.getsize(path)
    if size < 4 * HEADER_INTS:
        raise ValueError(f"{path}: too short for a shard header ({size} bytes < {4 * HEADER_INTS})")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: wrong magic {header[0]} (expected {SHARD_MAGIC}): not a token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    n = int(header[2])
    if n < 0 or size != 4 * HEADER_INTS + 2 * n:
        raise ValueError(
            f"{path}: header says {n} tokens ({4 * HEADER_INTS + 2 * n} bytes) "
            f"but the file has {size} bytes: truncated or corrupt"
        )
    return n
