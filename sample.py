"""
sample.py: continue a prompt with a model, and with the adapters train.py trained for it.

    python sample.py --prompt "[MAX 2 [MIN 7 4] 1]=" --temperature 0        # the built-in base model
    python sample.py --adapters out/joint-boolq/adapters.pt --prompt "[MIN 8 5 9]>4?" --temperature 0
    python sample.py --init smollm2-135m --prompt "The capital of France is" --top-k 50

--init takes whatever train.py --init takes (checkpoints.load). The prompt is encoded the way
train.py packs an example, <|endoftext|> first, and the continuation ends at the next
<|endoftext|>. --temperature 0 is greedy decoding; otherwise a token is drawn from
softmax(logits / temperature), among the --top-k most likely ones only when given.
"""
import argparse
import sys

import torch

import checkpoints
import nanosteer
from train import BASE_CHECKPOINT, pick_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Continue a prompt with a model, optionally with adapters.")
    p.add_argument("--init", default=BASE_CHECKPOINT, help="the model: anything train.py --init takes")
    p.add_argument("--adapters", default=None, help="an adapters.pt that train.py wrote for this model")
    p.add_argument("--prompt", default="", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy; below 1 sharper, above 1 flatter")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the same prompt")
    p.add_argument("--seed", type=int, default=0, help="same seed, same device: same text")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.num_samples <= 0:
        raise ValueError("--max-new-tokens and --temperature must be ≥ 0, --num-samples positive")
    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be positive (or left out: all tokens), got {args.top_k}")
    return args


@torch.no_grad()
def sample(args):
    """The continuations (text after the prompt, up to <|endoftext|>), one per sample."""
    device = pick_device(args.device)
    model, enc = checkpoints.load(args.init)
    if args.adapters is not None:
        nanosteer.load(model, args.adapters)        # into the slots and onto the weights it names
    model.to(device).eval()
    prompt = [enc.eot_token] + enc.encode_ordinary(args.prompt)
    idx = torch.tensor([prompt] * args.num_samples, device=device)           # (num_samples, T)
    torch.manual_seed(args.seed)                                             # what multinomial draws
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k)[:, len(prompt):]
    texts = []
    for row in out.tolist():
        end = row.index(enc.eot_token) if enc.eot_token in row else len(row)
        texts.append(enc.decode(row[:end]))
    return texts


def main(argv=None):
    try:
        args = parse_args(argv)
        texts = sample(args)
    except ValueError as e:  # every user error is raised as a ValueError with a one-line message
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    for i, text in enumerate(texts):
        print(("\n---\n" if i else "") + args.prompt + text)
    return texts


if __name__ == "__main__":
    main()
