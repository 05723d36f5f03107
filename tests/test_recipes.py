"""The later records as --recipe: U-net skips, document-causal sliding-window attention (FlexAttention and its
CPU form), the window schedule, micro-steps cut at document starts, golden losses of each recipe."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_FLAGS, TINY_VOCAB, TORCHRUN, RunFlags, losses, parse_args, read_record
from torch.nn.attention.flex_attention import flex_attention

import harness
import train_gpt2
from data.shards import write_shard
from train_gpt2 import GPT, ConfigError, chunked_masks, flex_block_mask, micro_batches, window_at

EOT = TINY_VOCAB - 1  # a tiny vocabulary's own end-of-text token
GOLDEN = os.path.join(os.path.dirname(__file__), "golden_recipes.json")
GOLDEN_TOLERANCE = 2e-4  # as tests/test_training.py: 4 printed decimals plus fp32 noise across CPUs
# The 64K recipes' math at a tiny size: 2 sequences of 256 tokens per step, windows within them.
LONG_TINY = ["--batch_size=2", "--seq_len=256", "--device_batch_size=1", f"--eot_token={EOT}"]
RECIPE_FLAGS = {
    "2024-11-08": [],
    "2024-11-10": ["--num_layers=4"],
    "2024-11-19": ["--num_layers=4", *LONG_TINY, "--window_tokens=48"],
    "2024-11-24": ["--num_layers=4", *LONG_TINY, "--window_tokens=96", "--window_warmup_start=16"],
}
RUN_FLAGS = ["--num_iterations=10", "--warmdown_iters=4", "--seed=1234"]


def document_tokens(n, seed):
    """Documents of 5 to 120 tokens, each opened by EOT and then a learnable chain below EOT."""
    rng, tokens = np.random.default_rng(seed), []
    while len(tokens) < n:
        tokens.append(EOT)
        token = int(rng.integers(0, EOT))
        for _ in range(int(rng.integers(5, 120))):
            tokens.append(token)
            token = (7 * token + 3) % EOT if rng.random() < 0.9 else int(rng.integers(0, EOT))
    return np.array(tokens[:n])


@pytest.fixture
def doc_shards(tmp_path):
    """Like conftest's `shards`, with documents: two train shards and a val shard."""
    for i in (1, 2):
        write_shard(tmp_path / f"doc_train_{i:06d}.bin", document_tokens(6000, seed=i))
    write_shard(tmp_path / "doc_val_000000.bin", document_tokens(2000, seed=99))
    return RunFlags(tmp_path, "doc")


def sdpa_in_chunks(q, k, v, masks):  # as CausalSelfAttention runs chunked_masks
    parts = [
        F.scaled_dot_product_attention(q[:, :, a], k[:, :, b], v[:, :, b], attn_mask=m) for a, b, m in masks
    ]
    return torch.cat(parts, 2)


def random_docs(batch, seq, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, seq, generator=generator) < 0.04).cumsum(1)


@pytest.mark.parametrize("seed, window", [(0, 1), (1, 7), (2, 33), (3, 64), (4, 300)])
def test_cpu_attention_equals_flex_attention(seed, window):
    torch.manual_seed(seed)
    batch, heads, seq, dim = 2, 2, 200, 16
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    docs = random_docs(batch, seq, seed)
    window_tensor = torch.tensor(window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on the CPU warns that it is unfused
        flex = flex_attention(q, k, v, block_mask=flex_block_mask(docs, window_tensor))
    for chunk in sorted({max(window - 1, 1), max(window - 1, 50), seq}):  # chunked (at the least) and whole
        masks = chunked_masks(docs, window_tensor, chunk)
        cpu = sdpa_in_chunks(q, k, v, masks)
        assert (cpu - flex).abs().max() < 1e-5, (window, chunk)


def test_the_mask_is_document_causal_and_windowed():
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    [(_, _, mask)] = chunked_masks(docs, torch.tensor(2), 8)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(mask[0, 0], (j <= i) & (i - j < 2) & (docs[0][:, None] == docs[0][None, :]))
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]


def tiny(**parts):
    torch.manual_seed(0)
    return GPT(TINY_VOCAB, 12, 16, 2, 2, 10000.0, 30.0, **parts)


def test_decoder_block_6_plus_i_receives_encoder_block_5_minus_i():
    model = tiny(unet_skips=True)
    assert model.skip_weights.tolist() == [1.0] * 6  # init 1.0
    with torch.no_grad():
        for block in model.blocks:  # non-zero out-projections: every block's output differs
            block.attn.out_proj.weight.normal_(std=0.3)
            block.mlp.down.weight.normal_(std=0.3)
        model.skip_weights.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0, 0.25, 1.5]))
    inputs, outputs = {}, {}
    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=index: inputs.__setitem__(i, args[0]))
        block.register_forward_hook(lambda m, args, out, i=index: outputs.__setitem__(i, out[0]))
    model(torch.randint(0, TINY_VOCAB, (2, 16)))
    for i in range(6):
        assert torch.equal(inputs[6 + i], outputs[5 + i] + model.skip_weights[i] * outputs[5 - i])
    for i in range(1, 6):
        assert torch.equal(inputs[i], outputs[i - 1])  # encoder blocks take no skip
    adam = train_gpt2.build_optimizers(model, parse_args(["--recipe=2024-11-10"]), 0, 1, torch.device("cpu"))[
        "adam"
    ]
    assert any(p is model.skip_weights for p in adam.param_groups[2]["params"])  # the scalar group, lr 0.04
    assert adam.param_groups[2]["lr"] == 0.04


def test_the_window_schedule_gives_the_published_values():
    args = parse_args(["--recipe=2024-11-24"])
    assert window_at(0, args) == 64 and window_at(1749, args) == 1728 and window_at(1750, args) == 1792
    assert [window_at(s, args) for s in range(1751)] == [64 * (1 + 27 * s // 1750) for s in range(1751)]
    assert window_at(64, args) == 64 and window_at(65, args) == 128  # +64 about every 64.8 steps
    assert window_at(5, parse_args(["--recipe=2024-11-19"])) == 1024 and window_at(5, parse_args([])) == 0


def test_recipe_2024_11_24_resolves_to_the_record():
    args = parse_args(["--recipe", "2024-11-24"])
    assert (args.num_iterations, args.warmdown_iters, args.adam_beta1, args.adam_beta2) == (
        1750,
        640,
        0.8,
        0.95,
    )
    assert (args.muon_lr, args.muon_momentum_start, args.muon_momentum, args.muon_momentum_warmup_steps) == (
        0.05,
        0.85,
        0.95,
        300,
    )
    assert (args.embed_lr, args.head_lr, args.scalar_lr) == (0.6, 0.008, 0.04)
    assert (args.batch_size, args.seq_len, args.batch_size * args.seq_len) == (8, 65536, 524288)
    assert args.unet_skips and args.document_mask and args.eot_token == 50256
    assert (args.window_tokens, args.window_warmup_start, args.val_tokens) == (1792, 64, 20 * 8 * 65536)
    ten = parse_args(["--recipe=2024-11-10"])
    assert (ten.num_iterations, ten.warmdown_iters, ten.muon_lr, ten.unet_skips, ten.document_mask) == (
        3000,
        900,
        0.04,
        True,
        False,
    )
    nineteen = parse_args(["--recipe=2024-11-19", "--muon_lr=0.03"])  # a flag beside it overrides it
    assert (nineteen.num_iterations, nineteen.warmdown_iters, nineteen.window_tokens) == (1875, 562, 1024)
    assert nineteen.muon_lr == 0.03 and nineteen.window_warmup_start == 0
    assert parse_args(["--recipe=2024-11-08"]) == parse_args([])
    with pytest.raises(ConfigError, match="--recipe"):
        parse_args(["--recipe=2024-12-01"])


def test_help_shows_each_recipes_published_time_and_tokens(capsys):
    with pytest.raises(SystemExit):
        train_gpt2.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for published in ("7.79 min, 1.70B", "7.23 min, 1.57B", "5.03 min, 0.98B", "4.66 min, 0.92B"):
        assert published in text


def test_rotary_angles_at_an_offset_equal_the_whole_sequences():
    whole = train_gpt2.rotary_cos_sin(65536, 64, 10000.0, torch.float32, "cpu")
    part = train_gpt2.rotary_cos_sin(512, 64, 10000.0, torch.float32, "cpu", torch.tensor(65000))
    assert all(torch.equal(w[:, 65000:65512], p) for w, p in zip(whole, part))


def test_document_pieces_cut_at_document_starts_and_count_lost_context():
    pieces, lost = train_gpt2.document_pieces([3, 10, 11, 30], 40, 8, 100)
    assert pieces == [(0, 3), (3, 11), (11, 19), (19, 27), (27, 30), (30, 38), (38, 40)]
    assert lost == (30 - 19) + (40 - 38)  # the rule: a document longer than a piece is cut after 8 tokens
    assert train_gpt2.document_pieces([0, 20], 40, 16, 5) == ([(0, 16), (16, 20), (20, 36), (36, 40)], 4 + 4)
    assert train_gpt2.document_pieces([5, 9], 16, 16, 4) == ([(0, 16)], 0)  # one piece: the whole sequence


def test_micro_steps_cut_at_document_starts_equal_the_whole_sequence():
    """Same loss and gradients, to 1e-5: rotary offsets, padding out of loss and mask, loss / rank tokens."""
    seq = 128
    flags = [
        "--recipe=2024-11-24",
        f"--seq_len={seq}",
        "--batch_size=2",
        "--num_iterations=100",
        "--warmdown_iters=40",
    ]
    flags += ["--window_tokens=40", "--window_warmup_start=8", f"--eot_token={EOT}"]
    args, args_whole = parse_args(flags + ["--micro_tokens=48"]), parse_args(flags)
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, EOT, (2 * seq + 1,), generator=generator)
    starts = torch.randint(5, 40, (60,), generator=generator).cumsum(0)
    tokens[starts[starts < len(tokens)]] = EOT  # documents of 5 to 39 tokens: none is cut
    x, y = tokens[:-1].view(2, seq), tokens[1:].view(2, seq)
    model = GPT(TINY_VOCAB, 4, 32, 2, 2, 10000.0, 30.0, unet_skips=True, document_mask=True, eot_token=EOT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the zero init: every weight gets a gradient

    def loss_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for xm, ym, kwargs, divisor in batches:
            loss = model(xm, ym, **kwargs) / divisor
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    whole = micro_batches(x, y, args_whole, 2, step=50)  # device_batch_size 1: two whole sequences
    lost = []
    pieces = micro_batches(x, y, args, 2, step=50, lost_context=lost)
    assert len(pieces) > 4 and lost == [0, 0] and all(xm.shape == (1, 48) for xm, *_ in pieces)
    assert {int(kwargs["window"]) for *_, kwargs, _ in pieces} == {window_at(50, args)} == {24}  # 8 x (1 + 2)
    assert sorted(int(kwargs["offset"]) for *_, kwargs, _ in pieces)[:2] == [0, 0]  # each row starts at 0
    loss_whole, grads_whole = loss_and_grads(whole)
    loss_pieces, grads_pieces = loss_and_grads(pieces)
    assert abs(loss_whole - loss_pieces) < 1e-5
    for a, b in zip(grads_whole, grads_pieces):
        assert (a - b).abs().max() < 1e-5


def test_sampling_a_document_masked_model_is_plain_causal_attention():
    """No targets, no window given, no EOT in the prompt: the logits of plain causal attention."""
    args = parse_args(
        [
            "--recipe=2024-11-24",
            "--num_layers=4",
            "--model_dim=32",
            "--num_heads=2",
            f"--vocab_size={TINY_VOCAB}",
            "--window_tokens=64",
            f"--eot_token={EOT}",
        ]
    )
    torch.manual_seed(0)
    masked = GPT.from_args(args)
    plain = GPT(TINY_VOCAB, 4, 32, 2, 4, 10000.0, 30.0, unet_skips=True)
    with torch.no_grad():
        for p in masked.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plain.load_state_dict(masked.state_dict())
    prompt = torch.randint(0, EOT, (1, 40))
    with torch.no_grad():
        assert (masked(prompt) - plain(prompt)).abs().max() < 1e-5


def run_recipe(name, shards, extra=()):
    assert (
        train_gpt2.main(TINY_FLAGS + RECIPE_FLAGS[name] + shards + RUN_FLAGS + [f"--recipe={name}", *extra])
        == 0
    )
    return read_record(shards.records_dir)


@pytest.mark.parametrize("name", list(RECIPE_FLAGS))
def test_golden_losses_of_each_recipe(name, doc_shards, capsys):
    """The first 10 train losses of each recipe at a tiny size; REGENERATE_GOLDEN=1 rewrites them only for an
    intended change of that recipe's math."""
    record = run_recipe(name, doc_shards)
    got = losses(record)
    assert f"--recipe={name}\n" in record
    with open(GOLDEN) as f:
        golden = json.load(f)
    if os.environ.get("REGENERATE_GOLDEN"):
        golden[name] = dict(flags=RECIPE_FLAGS[name] + RUN_FLAGS, train_losses=got)
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1)
    assert golden[name]["flags"] == RECIPE_FLAGS[name] + RUN_FLAGS
    assert len(got) == 10
    assert all(abs(a - b) <= GOLDEN_TOLERANCE for a, b in zip(got, golden[name]["train_losses"])), (
        got,
        golden,
    )


def test_the_record_lists_the_recipe_and_its_flags_from_the_start(doc_shards, capsys):
    record = run_recipe("2024-11-24", doc_shards, ["--micro_tokens=64"])
    head = record.split("Hyperparameters:\n", 1)[1].split("Notes:\n", 1)[0]
    for flag in (
        "--recipe=2024-11-24",
        "--window_warmup_start=16",
        "--window_tokens=96",
        "--document_mask=true",
        "--unet_skips=true",
        "--adam_beta1=0.8",
        "--muon_lr=0.05",
        "--muon_momentum_warmup_steps=300",
        "--micro_tokens=64",
        "--seq_len=256",
        f"--eot_token={EOT}",
    ):
        assert flag + "\n" in head
    assert "context: " in record and "lost context at micro_tokens cuts" in record


def test_a_resume_inherits_the_recipe_and_its_resolved_flags(doc_shards, capsys):
    run_recipe("2024-11-24", doc_shards, ["--muon_lr=0.07", "--save_every=5"])
    checkpoints = sorted(os.listdir(doc_shards.checkpoint_dir + "/run"))
    path = os.path.join(doc_shards.checkpoint_dir, "run", checkpoints[0])
    args, _ = harness.resolve_args(train_gpt2.Hyperparameters, [f"--resume={path}", "--num_iterations=20"])
    assert (args.recipe, args.muon_lr, args.seq_len, args.window_tokens, args.num_iterations) == (
        "2024-11-24",
        0.07,
        256,
        96,
        20,
    )  # the checkpoint's 0.07, not the recipe's 0.05
    args, _ = harness.resolve_args(
        train_gpt2.Hyperparameters, [f"--resume={path}", "--muon_lr=0.03"] + RUN_FLAGS
    )
    assert args.muon_lr == 0.03  # a flag given explicitly does override
    with pytest.raises(harness.CheckpointError, match="recipe"):
        harness.resolve_args(train_gpt2.Hyperparameters, [f"--resume={path}", "--recipe=2024-11-10"])

    import hellaswag  # both build the model from the checkpoint's hyperparameters (GPT.from_args)
    import sample

    model, args, _ = sample.load_model(path, torch.device("cpu"))
    assert args.recipe == "2024-11-24" and model.skip_weights is not None and model.document_mask
    drawn = list(
        sample.generate(model, [1, 2, 3], 5, 1.0, 0, torch.Generator().manual_seed(0), EOT, args.seq_len)
    )
    assert len(drawn) == 5
    model, _, _ = hellaswag.load_model(path, torch.device("cpu"))
    sums, counts = hellaswag.score(model, [([1, 2, 3], [[4], [5, 6], [7], [8, 9, 10]])], batch_size=1)
    assert counts.tolist() == [[1, 2, 1, 3]] and sums.isfinite().all()


def test_two_ranks_equal_one_for_the_64k_style_recipe_with_micro_steps(doc_shards, tmp_path):
    common = (
        TINY_FLAGS
        + RECIPE_FLAGS["2024-11-24"]
        + doc_shards.data
        + [f"--checkpoint_dir={doc_shards.checkpoint_dir}", "--recipe=2024-11-24"]
        + ["--num_iterations=4", "--warmdown_iters=2", "--val_loss_every=2", "--micro_tokens=96"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for folder, launcher in (
        ("one", []),
        (
            "two",
            [*TORCHRUN[1:], "--nproc_per_node=2"],
        ),
    ):
        cmd = [
            sys.executable,
            *launcher,
            os.path.join(ROOT, "train_gpt2.py"),
            *common,
            f"--records_dir={tmp_path}/{folder}",
        ]
        runs.append(subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stdout + runs[-1].stderr
    one, two = read_record(f"{tmp_path}/one"), read_record(f"{tmp_path}/two")
    assert "world_size:2" in two and "world_size:1" in one
    for kind in ("train_loss", "val_loss"):
        a, b = losses(one, kind), losses(two, kind)
        assert len(a) == len(b) > 0
        assert all(abs(x - y) <= GOLDEN_TOLERANCE for x, y in zip(a, b)), (
            kind,
            a,
            b,
        )  # the sums' order differs


def test_recipe_2024_11_08_is_the_default_golden_run(shards, capsys):
    with open(os.path.join(os.path.dirname(__file__), "golden_losses.json")) as f:
        golden = json.load(f)
    assert train_gpt2.main(golden["flags"] + shards + ["--recipe=2024-11-08"]) == 0
    assert losses(read_record(shards.records_dir)) == golden["train_losses"]


def test_micro_tokens_auto_takes_the_largest_that_fits_and_needs_the_document_mask(shards, capsys):
    args = parse_args(["--recipe=2024-11-24"])
    tokens, note = harness.choose_micro_tokens(None, args, 1, torch.device("cpu"), fits=lambda t: t <= 20000)
    assert tokens == 16384 and "micro-steps of 16384" in note
    with pytest.raises(SystemExit, match="--micro_tokens=16 .*--document_mask"):
        train_gpt2.main(TINY_FLAGS + shards + ["--micro_tokens=16"])


def blocks_of(counts, indices, n):
    """The (batch, query block, key block) boolean of FlexAttention's (counts, indices)."""
    dense = torch.zeros(counts.size(0), n, n, dtype=torch.bool)
    for b, i in np.ndindex(counts.size(0), n):
        dense[b, i, indices[b, 0, i, : counts[b, 0, i]].long()] = True
    return dense


@pytest.mark.parametrize("block", [16, 32, 128])
def test_the_block_mask_equals_the_dense_document_causal_window_mask(block):
    """Element (q, k) of the block mask: its block full, or partial and the rule true; no block is both."""
    seq, positions = 200, torch.arange(200)  # not a multiple of the block: the last block is padded
    docs = random_docs(2, seq, 5)
    docs[1] = 0  # one document: full blocks wherever the window holds a whole block pair
    n = -(-seq // block)

    def expand(blocks):
        """Block level to element level, cut to the sequence."""
        return blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq, :seq]

    for window in (1, 7, 33, 64, 130, 300):
        mask = flex_block_mask(docs, torch.tensor(window), block)
        assert mask.kv_indices.shape == (2, 1, n, n)  # block level: (seq/block)^2 entries per sequence
        partial = blocks_of(mask.kv_num_blocks, mask.kv_indices, n)
        full = blocks_of(mask.full_kv_num_blocks, mask.full_kv_indices, n)
        assert not (partial & full).any()
        q, k = positions[:, None], positions[None, :]
        dense = (k <= q) & (q - k < window) & (docs[:, :, None] == docs[:, None, :])
        rule = torch.stack([mask.mask_mod(b, 0, q, k) for b in range(2)])
        assert torch.equal(expand(full) | (expand(partial) & rule), dense), window
        if seq >= 3 * block:  # unpadded query blocks past the first: full where the window allows it
            assert full[1].any() == (window >= 2 * block), window


def test_a_compiled_forward_builds_the_block_mask_outside_its_graph_and_never_recompiles(monkeypatch):
    """FlexAttention forced on the CPU, forward only (it has no CPU backward): micro-steps with other
    documents and other windows reuse one graph, which holds no sort (the mask's, pytorch issue 182060) and
    no document ids; each output equals the eager CPU path (SDPA with chunked masks)."""
    graphs, compile = [], torch.compile

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph, example_inputs)

    monkeypatch.setattr(
        torch, "compile", lambda fn, **options: compile(fn, dynamic=False, backend=counting_backend)
    )
    args = parse_args(TINY_FLAGS + RECIPE_FLAGS["2024-11-24"] + ["--num_layers=1", "--seq_len=256"])
    torch.manual_seed(0)
    model = GPT.from_args(args)
    compiled = train_gpt2.compile_model(GPT.from_args(args), args)
    compiled.load_state_dict(model.state_dict())
    compiled.use_flex_attention = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, step in [(1, 0), (2, 0), (3, 900), (4, 1750)]:
            idx = torch.from_numpy(document_tokens(256, seed))[None]
            window = train_gpt2.forward_kwargs(step, args, idx.device)["window"]
            assert (compiled(idx, window=window) - model(idx, window=window)).abs().max() < 1e-4, seed
    assert len(graphs) == 1
    code = graphs[0].code
    assert "flex_attention" in code and "sort" not in code and "cumsum" not in code


def test_the_eot_token_must_lie_inside_the_vocabulary_under_the_document_mask():
    with pytest.raises(ConfigError, match="--eot_token=50256 is not below --vocab_size=256"):
        parse_args(["--recipe=2024-11-19", "--vocab_size=256"])
    assert parse_args(["--vocab_size=256"]).eot_token == 50256  # no document mask: never read
