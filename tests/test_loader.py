"""The shard format and the loader: windows, rollover, and one clear error per bad input."""

import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS, learnable_tokens, read_record

import train_gpt2
from data.shards import HEADER_INTS, SHARD_MAGIC, write_shard
from train_gpt2 import ShardError, ShardLoader, read_shard

CPU = torch.device("cpu")


def test_header_round_trip(tmp_path):
    tokens = np.arange(0, 65536, 7, dtype=np.int64)
    write_shard(tmp_path / "a.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "a.bin"), tokens)
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=HEADER_INTS)
    assert header[:3].tolist() == [20240520, 1, len(tokens)] and not header[3:].any()
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * len(tokens)


def test_writer_refuses_ids_beyond_uint16(tmp_path):
    with pytest.raises(AssertionError, match="uint16"):
        write_shard(tmp_path / "a.bin", [1, 65536])


def stream(tmp_path, sizes):
    offset, all_tokens = 0, []
    for i, size in enumerate(sizes):
        tokens = np.arange(offset, offset + size) % 65536
        write_shard(tmp_path / f"s_{i:06d}.bin", tokens)
        all_tokens.append(tokens)
        offset += size
    return str(tmp_path / "s_*.bin"), all_tokens


def test_rank_windows_are_disjoint_and_cover_the_step(tmp_path):
    pattern, (tokens,) = stream(tmp_path, [10_000])
    world, batch, seq = 4, 8, 16
    loaders = [ShardLoader(pattern, batch, seq, rank, world, CPU) for rank in range(world)]
    for step in range(3):
        parts = [loader.next_batch() for loader in loaders]
        assert all(x.shape == (batch // world, seq) for x, _ in parts)
        inputs = torch.cat([x.flatten() for x, _ in parts]).numpy()
        targets = torch.cat([y.flatten() for _, y in parts]).numpy()
        start = step * batch * seq
        assert np.array_equal(
            inputs, tokens[start : start + batch * seq]
        )  # disjoint, in order, nothing missing
        assert np.array_equal(targets, tokens[start + 1 : start + batch * seq + 1])


@pytest.mark.parametrize("world", [2, 8])
def test_token_stream_is_the_same_for_any_world_size(tmp_path, world):
    """1 device x 8 micro-steps, 2 x 4 and 8 x 1 see the same tokens in every step, across shard boundaries:
    a rank's micro-batches are row chunks of its share, so the micro-batch size cannot change the tokens."""
    pattern, _ = stream(tmp_path, [1000, 700, 900])

    def global_batches(world):
        loaders = [ShardLoader(pattern, 8, 16, rank, world, CPU) for rank in range(world)]
        return [torch.cat([loader.next_batch()[0] for loader in loaders]) for _ in range(10)]

    for one, many in zip(global_batches(1), global_batches(world)):
        assert torch.equal(one, many)


def test_shard_rollover_drops_the_leftover(tmp_path):
    pattern, (first, second) = stream(tmp_path, [300, 400])
    loader = ShardLoader(pattern, 2, 64, 0, 1, CPU)  # 128 tokens per step
    x1, _ = loader.next_batch()
    x2, _ = loader.next_batch()
    x3, y3 = loader.next_batch()  # 256 + 129 > 300: the last 44 tokens of shard 0 are dropped
    assert np.array_equal(x2.flatten().numpy(), first[128:256])
    assert np.array_equal(x3.flatten().numpy(), second[:128]) and np.array_equal(
        y3.flatten().numpy(), second[1:129]
    )
    for _ in range(2):
        loader.next_batch()
    assert np.array_equal(
        loader.next_batch()[0].flatten().numpy(), first[:128]
    )  # after the last shard: the first


def test_reset_restarts_at_the_first_shard(tmp_path):
    pattern, (tokens,) = stream(tmp_path, [1000])
    loader = ShardLoader(pattern, 2, 16, 0, 1, CPU)
    first = loader.next_batch()[0]
    loader.next_batch()
    loader.reset()
    assert torch.equal(loader.next_batch()[0], first)


def write_header(path, magic=SHARD_MAGIC, version=1, count=100, payload=100):
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = magic, version, count
    path.write_bytes(header.tobytes() + np.zeros(payload, dtype=np.uint16).tobytes())
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(magic=12345), "magic number 12345 is not 20240520"),
        (dict(version=2), "shard version 2 is not 1"),
        (dict(count=100, payload=90), "header says 100 tokens .* but the file has 1204 bytes"),
    ],
)
def test_bad_shard_header_is_named(tmp_path, bad, message):
    path = write_header(tmp_path / "bad.bin", **bad)
    with pytest.raises(ShardError, match=f"{path}: {message}"):
        read_shard(path)


def test_file_too_short_for_a_header(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError, match="short.bin: 100 bytes is too short"):
        read_shard(tmp_path / "short.bin")


def test_no_file_matches_the_pattern(tmp_path):
    with pytest.raises(ShardError, match="no file matches .*nothing_\\*.bin.*cached_fineweb10B.py"):
        ShardLoader(str(tmp_path / "nothing_*.bin"), 8, 16, 0, 1, CPU)


def test_shard_smaller_than_one_global_batch(tmp_path):
    write_shard(tmp_path / "small.bin", np.arange(100))
    with pytest.raises(ShardError, match="small.bin: 100 tokens is fewer than one global batch"):
        ShardLoader(str(tmp_path / "small.bin"), 8, 16, 0, 1, CPU)


def test_val_data_shorter_than_val_tokens_stops_the_run(tmp_path, shards, capsys):
    write_shard(tmp_path / "tiny_val_000000.bin", learnable_tokens(400))
    with pytest.raises(SystemExit, match="tiny_val_000000.bin: 400 tokens is fewer than --val_tokens=512"):
        train_gpt2.main(TINY_FLAGS + shards + ["--num_iterations=2", "--warmdown_iters=1"])


def test_missing_data_is_one_line_at_startup(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(TINY_FLAGS + [f"--input_bin={tmp_path}/none_*.bin", f"--records_dir={tmp_path}"])
    assert "no file matches" in str(stop.value) and "\n" not in str(stop.value)


def test_token_ids_beyond_the_vocab_are_named_when_the_shard_opens(tmp_path):
    write_shard(tmp_path / "wide_000000.bin", np.arange(1000) % 256)
    write_shard(tmp_path / "wide_000001.bin", np.arange(1000) % 300)
    loader = ShardLoader(
        str(tmp_path / "wide_*.bin"), 2, 64, 0, 1, CPU, vocab_size=256
    )  # the first shard is fine
    with pytest.raises(ShardError, match="wide_000001.bin: token 256 is id 256.*--vocab_size=256"):
        for _ in range(8):  # 7 steps in the first shard, then the second opens
            loader.next_batch()


@pytest.mark.parametrize("world", [1, 2])
def test_prefetch_gives_the_same_batches_in_the_same_order(tmp_path, world):
    """The loop prefetches the next batch while the device works: same tokens, shard boundaries included,
    and a checkpoint taken with a batch prefetched resumes at that batch."""
    pattern, _ = stream(tmp_path, [1000, 700, 900])
    plain = [ShardLoader(pattern, 8, 16, rank, world, CPU) for rank in range(world)]
    ahead = [ShardLoader(pattern, 8, 16, rank, world, CPU) for rank in range(world)]
    for step in range(20):  # 7 + 5 + 7 steps per pass: two shard boundaries and the wrap to the first shard
        for reference, loader in zip(plain, ahead):
            state = loader.state_dict()
            x, y = loader.next_batch()
            loader.prefetch()
            assert loader.state_dict() != state or step == 0
            expected = reference.next_batch()
            assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
            assert loader.state_dict() == reference.state_dict()  # the prefetched batch is not consumed yet
    resumed = ShardLoader(pattern, 8, 16, 0, world, CPU)
    resumed.load_state_dict(ahead[0].state_dict())
    assert torch.equal(resumed.next_batch()[0], ahead[0].next_batch()[0])


def test_a_folder_matching_the_pattern_is_named(tmp_path):
    (tmp_path / "shard_000001.bin").mkdir()
    with pytest.raises(ShardError, match="shard_000001.bin: cannot read it"):
        ShardLoader(str(tmp_path / "shard_*.bin"), 8, 16, 0, 1, CPU)


def test_running_past_the_data_is_noted_in_the_record(tmp_path, shards, capsys):
    # two shards of 6000 tokens at 256 tokens per step: 23 steps each, 46 before the stream starts over
    assert (
        train_gpt2.main(
            TINY_FLAGS
            + shards
            + ["--num_iterations=50", "--warmdown_iters=1", "--val_loss_every=0", "--save_every_minutes=0"]
        )
        == 0
    )
    record = read_record(shards.records_dir)
    assert "data: the train shards hold 46 steps; later steps see the same tokens again" in record


@pytest.mark.parametrize("flag", ["records_dir", "checkpoint_dir"])
def test_an_unwritable_output_folder_is_one_line_at_startup(tmp_path, shards, flag):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:
        train_gpt2.main(
            TINY_FLAGS
            + shards
            + [f"--{flag}={tmp_path}/file/sub", "--num_iterations=2", "--warmdown_iters=1"]
        )
    message = str(stop.value)
    assert "\n" not in message and f"{tmp_path}/file" in message and f"--{flag}" in message
