"""Sample text from a train_gpt2.py checkpoint with the GPT-2 tokenizer.

    python sample.py CHECKPOINT --prompt "The meaning of life is" --max_new_tokens 100
    python sample.py CHECKPOINT --temperature 0          # greedy: the most likely token each step

Prints the prompt followed by its continuation (stdout), token by token as they come; what
was loaded goes to stderr. Exactly --max_new_tokens tokens are generated unless --stop_at_eot
is given; Ctrl-C stops early and keeps what was printed. The same --seed gives the same text
on the same device. No prompt = start of a new document (<|endoftext|>), and only the
continuation is printed.
"""

import argparse
import codecs
import decimal
import itertools
import math
import os
import sys

import torch

from data.flags import FlagParser, at_least
from harness import CheckpointError, load_trained_model
from train_gpt2 import GPT, Hyperparameters


def fail(message):
    raise SystemExit(f"sample.py: {' '.join(str(message).split())}")  # always one line


def load_model(path, device):
    """(fp32 GPT in eval mode on device, its Hyperparameters, the step it was saved at)."""
    try:
        model, args, step = load_trained_model(path, Hyperparameters, GPT.from_args)
    except CheckpointError as e:
        fail(e)
    return model.float().to(device).eval(), args, int(step)


@torch.no_grad()
def generate(
    model, prompt_ids, max_new_tokens, temperature, top_k, generator, max_vocab, context, stop_id=None
):
    """Sample max_new_tokens ids after prompt_ids; yields each new id (an int) as soon as it is drawn.

    temperature 0 = greedy (argmax). top_k None or 0 = sample from the whole distribution.
    Only ids < max_vocab are ever produced (the model's vocab is padded past the tokenizer's).
    The model sees at most the last `context` tokens (the sequence length it was trained on).
    generator: a CPU torch.Generator; the draw is made on the CPU so a seed means the same
    thing on every device. stop_id: stop early, without yielding it, once this id is drawn.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[0, -1].float().cpu()
        logits[max_vocab:] = float("-inf")
        if temperature == 0:
            token = int(torch.argmax(logits))
        else:
            # top logit shifted to 0, in fp64: x/T <= 0 cannot overflow and 0/T stays 0 for any T > 0
            # (fp32 logits / T gave inf below T = 8.8e-38 and 0/0 above 3.4e38: multinomial then failed)
            logits = (logits.double() - logits.max()) / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, max_vocab)).values[-1]
                logits[logits < kth] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token == stop_id:
            return
        yield token
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)


def write_text(enc, ids):
    """Print the text of `ids` as they come; a character split across tokens waits for its last byte."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # what enc.decode does in one go
    for token in ids:
        sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(token)))
        sys.stdout.flush()
    print(decoder.decode(b"", final=True), flush=True)


def gpt2_tokenizer():
    import tiktoken

    from data.gpt2_vocab import cache_dir

    cache_dir()  # where data/gpt2_vocab.py seeds the vocabulary
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        fail(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}); "
            f"without access to openaipublic, run `python data/gpt2_vocab.py` first"
        )


def parse_temperature(text):
    """--temperature: finite and >= 0.

    A positive value so small that it reads as 0.0 is refused: it would silently mean greedy."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0) or (value == 0 and decimal.Decimal(text) != 0):
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or finite and at least 5e-324, got {text!r}")
    return value


parse_temperature.__name__ = "float"  # argparse says "invalid float value: 'x'" for text that is not a number


def parse_args(argv):
    p = FlagParser(prog="sample.py", description="Sample text from a train_gpt2.py checkpoint.")
    p.add_argument("checkpoint", help="file written by train_gpt2.py")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max_new_tokens", type=at_least(0), default=200, help="tokens to generate per sample")
    p.add_argument(
        "--temperature", type=parse_temperature, default=0.8, help="softmax temperature; 0 = greedy"
    )
    p.add_argument(
        "--top_k", type=at_least(0), default=50, help="sample among the k most likely tokens; 0 = all"
    )
    p.add_argument("--seed", type=at_least(0, 2**64 - 1), default=0, help="seed of the sampling")
    p.add_argument(
        "--num_samples", type=at_least(1), default=1, help="independent continuations of the prompt"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = CUDA if visible")
    p.add_argument("--stop_at_eot", action="store_true", help="stop a sample early at <|endoftext|>")
    return p.parse_args(argv)


def printable_stdout():
    """Text that stdout's encoding cannot show (日本 under PYTHONIOENCODING=ascii) prints escaped."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def main(argv=None):
    opts = parse_args(argv)
    printable_stdout()
    if opts.device == "cuda" and not torch.cuda.is_available():
        fail("--device=cuda but no CUDA device is visible")
    device = torch.device(
        "cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model, args, step = load_model(opts.checkpoint, device)
    enc = gpt2_tokenizer()
    max_vocab = min(args.vocab_size, enc.n_vocab)
    prompt_ids = enc.encode(opts.prompt, allowed_special="all") if opts.prompt else [enc.eot_token]
    if max(prompt_ids) >= args.vocab_size:
        fail(f"the checkpoint's vocab_size={args.vocab_size} is below the GPT-2 tokenizer's {enc.n_vocab}")
    print(
        f"sample.py: {opts.checkpoint} (step {step}, {args.num_layers} layers x {args.model_dim}, "
        f"context {args.seq_len}) on {device}",
        file=sys.stderr,
    )
    if len(prompt_ids) > args.seq_len:
        print(
            f"sample.py: the prompt has {len(prompt_ids)} tokens; "
            f"the model sees only the last {args.seq_len}",
            file=sys.stderr,
        )
    generator = torch.Generator().manual_seed(opts.seed)
    for i in range(opts.num_samples):
        if i:
            print("\n" + "-" * 40)
        new = generate(
            model,
            prompt_ids,
            opts.max_new_tokens,
            opts.temperature,
            opts.top_k,
            generator,
            max_vocab,
            args.seq_len,
            stop_id=enc.eot_token if opts.stop_at_eot else None,
        )
        write_text(enc, itertools.chain(prompt_ids if opts.prompt else [], new))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(flush=True)  # what was printed stays; the shell prompt starts on a line of its own
        print("sample.py: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a process that a closed pipe ended
