"""
sample.py: continue a prompt with a model, and with the adapters train.py trained for it.

    python sample.py --prompt "[MAX 2 [MIN 7 4] 1]=" --temperature 0        # the built-in base model
    python sample.py --adapters out/joint-boolq/adapters.pt --prompt "[MIN 8 5 9]>4?" --temperature 0
    python sample.py --init smollm2-135m --prompt "The capital of France is" --top-k 50
    python sample.py --init smollm2-135m --chat --prompt "What is the capital of France?"

--init takes whatever train.py --init takes (checkpoints.load). The prompt is encoded the way
train.py packs an example, <|endoftext|> first; with --chat it is instead the user's turn in the
model's own chat template (a ChatML template, as SmolLM2-Instruct carries). The continuation ends
at the model's own end of text or end of turn (<|endoftext|>, and e.g. <|im_end|>). --temperature
0 is greedy decoding; otherwise a token is drawn from softmax(logits / temperature), among the
--top-k most likely ones only when given. Prompt and continuation must fit the model's context.
"""
from machinery.interrupt import one_line_on_ctrl_c   # first: Ctrl-C while torch loads is one line too
if __name__ == "__main__":
    one_line_on_ctrl_c("sample.py")
import codecs
import math
import os
import sys
import time

import torch

from formats import adapters, chat, checkpoints
from machinery import runtime
from machinery.checks import OneLineParser, check_bounds, check_generation
from train import BASE_CHECKPOINT


def parse_args(argv=None):
    p = OneLineParser(description="Continue a prompt with a model, optionally with adapters.")
    p.add_argument("--init", default=BASE_CHECKPOINT, help="the model: anything train.py --init takes")
    p.add_argument("--adapters", default=None, help="an adapters.pt that train.py wrote for this model")
    p.add_argument("--prompt", default="", help="the text to continue")
    p.add_argument("--chat", action="store_true", help="the prompt is a user's turn in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy; below 1 sharper, above 1 flatter")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the same prompt "
                   "(one is printed as it comes, several once all are done)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same device: same text")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--max-new-tokens must be ≥ 0 and --temperature a finite number ≥ 0, got "
                         f"{args.max_new_tokens} and {args.temperature}")
    if args.num_samples <= 0:
        raise ValueError(f"--num-samples must be positive, got {args.num_samples}")
    check_bounds(dict(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, seed=args.seed))
    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be positive (or left out: all tokens), got {args.top_k}")
    if args.adapters is not None and not os.path.isfile(args.adapters):
        raise ValueError(f"adapter file {args.adapters} does not exist")
    if args.init not in checkpoints.NAMES and not os.path.exists(args.init):
        raise ValueError(f"--init {args.init} does not exist: give a checkpoint file, a Hugging Face "
                         f"directory, a .gguf file, {checkpoints.SMOLLM2} or a gpt2 name")
    return args


@torch.no_grad()
def sample(args, out=None):
    """The continuations (text after the prompt, up to the model's end of text or turn), one per
    sample; the speed to stderr. out: a file that a single sample is written to as it comes."""
    device = runtime.pick_device(args.device)
    model, enc = checkpoints.load(args.init)
    if args.adapters is not None:
        adapters.load(model, args.adapters)        # into the slots and onto the weights it names
    stop = set(getattr(enc, "stop_tokens", [enc.eot_token]))
    if args.chat:
        prompt = chat.chat_prompt(enc, args.prompt, args.init)
        stop.add(enc.encode_single_token("<|im_end|>"))
    else:
        prompt = [enc.eot_token] + enc.encode_ordinary(args.prompt)
    check_generation(model.config, len(prompt), args.max_new_tokens, args.num_samples, device)
    model.to(device).eval()
    idx = torch.tensor([prompt] * args.num_samples, device=device)           # (num_samples, T)
    torch.manual_seed(args.seed)                                             # what multinomial draws
    if out is not None:
        out.write("" if args.chat else args.prompt)
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")   # holds a character's first bytes back
    steps, start = [], time.perf_counter()
    for next_id in model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, stop):
        steps.append(next_id)                                                # (num_samples, 1)
        if out is not None and next_id.item() not in stop:
            print(utf8.decode(enc.decode_bytes(next_id[0].tolist())), end="", flush=True, file=out)
    if out is not None:
        print(utf8.decode(b"", final=True), flush=True, file=out)   # and the line's end
    n, seconds = len(steps) * args.num_samples, time.perf_counter() - start  # the prompt's pass too
    print(f"sample.py: {n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s (the prompt's pass included)",
          file=sys.stderr)
    texts = []
    for row in torch.cat([idx, *steps], dim=1)[:, len(prompt):].tolist():
        ends = [i for i, token in enumerate(row) if token in stop]
        texts.append(enc.decode(row[:ends[0]] if ends else row))
    return texts


def main(argv=None):
    try:
        args = parse_args(argv)
        texts = sample(args, sys.stdout if args.num_samples == 1 else None)  # printed as it comes
    except ValueError as e:  # every user error is raised as a ValueError with a one-line message
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(texts) > 1:
        print("\n\n---\n".join(("" if args.chat else args.prompt) + text for text in texts))
    return texts


if __name__ == "__main__":
    main()
