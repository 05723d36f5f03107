"""Shared helpers: synthetic shards in the real format, and tiny in-process training runs."""

import glob
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest_plugins = ["fake_hub"]  # the `hub` fixture: a local server that answers like the Hugging Face hub
sys.path.insert(0, ROOT)

from data.shards import write_shard  # noqa: E402

# The tiny models' ops are too small to split: a second thread only spins against a test's other processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# A suite started in the background by a script (`cmd &`) inherits SIGINT ignored, as would every child; the
# Ctrl-C tests act as a terminal's user, whose shell leaves it at the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TINY_VOCAB = 256
# A tiny model on the recipe's code path: 2 blocks, width 64, 2 heads of 32, sequences of 32 tokens.
TINY_FLAGS = [
    "--num_layers=2",
    "--model_dim=64",
    "--num_heads=2",
    f"--vocab_size={TINY_VOCAB}",
    "--seq_len=32",
    "--batch_size=8",
    "--device_batch_size=4",
    "--val_tokens=512",
    "--untimed_steps=2",
    "--device=cpu",
    "--val_loss_every=5",
]
# torchrun on this machine, as run.sh starts it: loopback for the workers' store; then --nproc_per_node=N
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1"]
STEP_LINE = re.compile(
    r"^step:(\d+)/(\d+) (train_loss|val_loss):(\S+) train_time:(\d+)ms step_avg:(\S+)ms$", re.M
)


def parse_args(argv):
    """The Hyperparameters these flags give, as the trainer parses them."""
    import harness
    import train_gpt2

    return harness.parse_args(train_gpt2.Hyperparameters, argv)


def learnable_tokens(n, vocab=TINY_VOCAB, seed=0):
    """A noisy deterministic chain: the next token is (7*prev + 3) % vocab 90% of the time."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = 0
    noise = rng.integers(0, vocab, n)
    keep = rng.random(n) < 0.9
    for i in range(1, n):
        tokens[i] = (7 * tokens[i - 1] + 3) % vocab if keep[i] else noise[i]
    return tokens


class RunFlags(list):
    """The flags of a tiny run: data, records and checkpoints, in that order. `data` holds the two data flags,
    `records_dir` and `checkpoint_dir` the folders, so a test names what it uses rather than a position."""

    def __init__(self, folder, name="tiny"):
        self.records_dir, self.checkpoint_dir = f"{folder}/records", f"{folder}/checkpoints"
        self.data = [f"--input_bin={folder}/{name}_train_*.bin", f"--input_val_bin={folder}/{name}_val_*.bin"]
        super().__init__(
            self.data + [f"--records_dir={self.records_dir}", f"--checkpoint_dir={self.checkpoint_dir}"]
        )


@pytest.fixture
def shards(tmp_path):
    """Two train shards and a val shard of learnable tokens; returns the flags that point at them."""
    for i in (1, 2):
        write_shard(tmp_path / f"tiny_train_{i:06d}.bin", learnable_tokens(6000, seed=i))
    write_shard(tmp_path / "tiny_val_000000.bin", learnable_tokens(2000, seed=99))
    return RunFlags(tmp_path)


def read_record(records_dir):
    """The text of the one record file written under records_dir."""
    paths = glob.glob(os.path.join(records_dir, "*", "*.txt"))
    assert len(paths) == 1, paths
    with open(paths[0]) as f:
        return f.read()


def losses(record, kind="train_loss"):
    return [float(m[3]) for m in STEP_LINE.findall(record) if m[2] == kind]


def assert_one_line_error(result, *words, lines=1):
    """A refusal as a user meets it: a non-zero exit, no traceback, `lines` lines on stderr (None: any number;
    earlier ones are progress), the last naming each of `words`. `result`: a CompletedProcess or (rc, err)."""
    returncode, stderr = (result.returncode, result.stderr) if hasattr(result, "returncode") else result
    assert returncode != 0 and "Traceback" not in stderr, stderr
    assert lines is None or len(stderr.strip().splitlines()) == lines, stderr
    last = stderr.strip().splitlines()[-1]
    assert all(word in last for word in words), last
    return last
