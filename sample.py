"""Sample text from a train_gpt2.py checkpoint with the GPT-2 tokenizer.

    python sample.py CHECKPOINT --prompt "The meaning of life is" --max_new_tokens 100
    python sample.py CHECKPOINT --temperature 0          # greedy: the most likely token each step

Prints the prompt followed by its continuation (stdout); what was loaded goes to stderr.
Exactly --max_new_tokens tokens are generated unless --stop_at_eot is given. The same
--seed gives the same text on the same device. No prompt = start of a new document
(<|endoftext|>), and only the continuation is printed.
"""
import argparse
import dataclasses
import os
import sys

import torch

from train_gpt2 import GPT, CheckpointError, Hyperparameters, load_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(message):
    raise SystemExit(f"sample.py: {' '.join(str(message).split())}")  # always one line


def load_model(path, device):
    """(fp32 GPT in eval mode on device, its Hyperparameters, the step it was saved at)."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as e:
        fail(e)
    fields = {f.name for f in dataclasses.fields(Hyperparameters)}
    args = Hyperparameters(**{k: v for k, v in checkpoint["hyperparameters"].items() if k in fields})
    model = GPT.from_args(args)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        fail(f"{path}: the weights do not fit the model its hyperparameters describe ({str(e).splitlines()[0]})")
    return model.float().to(device).eval(), args, checkpoint["step"]


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature, top_k, generator, max_vocab, context, stop_id=None):
    """Sample max_new_tokens ids after prompt_ids; returns the new ids (a list of ints).

    temperature 0 = greedy (argmax). top_k None or 0 = sample from the whole distribution.
    Only ids < max_vocab are ever produced (the model's vocab is padded past the tokenizer's).
    The model sees at most the last `context` tokens (the sequence length it was trained on).
    generator: a CPU torch.Generator; the draw is made on the CPU so a seed means the same
    thing on every device. stop_id: stop early, without returning it, once this id is drawn.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[0, -1].float().cpu()
        logits[max_vocab:] = float("-inf")
        if temperature == 0:
            token = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, max_vocab)).values[-1]
                logits[logits < kth] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token == stop_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new


def gpt2_tokenizer():
    import tiktoken
    if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(ROOT, ".cache", "tiktoken")):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(ROOT, ".cache", "tiktoken")  # seeded by data/gpt2_vocab.py
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        fail(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); "
             f"without access to openaipublic, run `python data/gpt2_vocab.py` first")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Sample text from a train_gpt2.py checkpoint.")
    p.add_argument("checkpoint", help="file written by train_gpt2.py")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--num_samples", type=int, default=1, help="independent continuations of the prompt")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = CUDA if visible")
    p.add_argument("--stop_at_eot", action="store_true", help="stop a sample early at <|endoftext|>")
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "top_k"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.temperature >= 0:
        fail(f"--temperature must be >= 0, got {args.temperature}")
    if args.num_samples < 1:
        fail(f"--num_samples must be >= 1, got {args.num_samples}")
    return args


def main(argv=None):
    opts = parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        fail("--device=cuda but no CUDA device is visible")
    device = torch.device("cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model, args, step = load_model(opts.checkpoint, device)
    enc = gpt2_tokenizer()
    max_vocab = min(args.vocab_size, enc.n_vocab)
    prompt_ids = enc.encode(opts.prompt, allowed_special="all") if opts.prompt else [enc.eot_token]
    if max(prompt_ids) >= args.vocab_size:
        fail(f"the checkpoint's vocab_size={args.vocab_size} is smaller than the GPT-2 tokenizer's {enc.n_vocab}")
    print(f"sample.py: {opts.checkpoint} (step {step}, {args.num_layers} layers x {args.model_dim}, "
          f"context {args.seq_len}) on {device}", file=sys.stderr)
    generator = torch.Generator().manual_seed(opts.seed)
    for i in range(opts.num_samples):
        new = generate(model, prompt_ids, opts.max_new_tokens, opts.temperature, opts.top_k, generator, max_vocab,
                       args.seq_len, stop_id=enc.eot_token if opts.stop_at_eot else None)
        if i:
            print("\n" + "-" * 40)
        text = enc.decode(prompt_ids + new) if opts.prompt else enc.decode(new)
        print(text, flush=True)


if __name__ == "__main__":
    main()
