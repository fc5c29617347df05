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
import math
import os
import re
import sys

import torch

from formats import adapters
from formats import checkpoints
from machinery import runtime
from machinery.checks import OneLineParser, check_bounds
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
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the same prompt")
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


def chat_prompt(enc, prompt, source):
    """The user's turn in ChatML, as the model's template renders one user message followed by the
    assistant's start (add_generation_prompt). SmolLM2's template adds a default system turn when
    the first message is not one; we take that text from the template itself. Its special tokens
    are added as ids, so a prompt that spells '<|im_end|>' stays text."""
    template = getattr(enc, "chat_template", None)
    if template is None:
        raise ValueError(f"--chat: {source} carries no chat template; leave out --chat")
    if "<|im_start|>" not in template or "<|im_start|>" not in enc.special_tokens_set:
        raise ValueError(f"--chat: {source}'s chat template is not ChatML (<|im_start|>...), which is "
                         "the only one nanosteer renders; leave out --chat")
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")

    def turn(role, text):
        return [start] + enc.encode_ordinary(f"{role}\n{text}") + [end] + enc.encode_ordinary("\n")

    system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.DOTALL)
    ids = turn("system", system.group(1)) if system else []
    return ids + turn("user", prompt) + [start] + enc.encode_ordinary("assistant\n")


def check_fits(args, model, n_prompt, device):
    """The prompt and --max-new-tokens within the model's context, and an estimate of the memory
    the --num-samples rows need (float32: per token the residual stream, q, k, v and the MLP's
    hidden width, plus one layer's attention scores) against what the device has free."""
    c = model.config
    if n_prompt + args.max_new_tokens > c.block_size:
        raise ValueError(f"the prompt ({n_prompt} tokens) and --max-new-tokens {args.max_new_tokens} exceed the "
                         f"model's context of {c.block_size} tokens: use --max-new-tokens ≤ "
                         f"{max(c.block_size - n_prompt, 0)}")
    T = n_prompt + args.max_new_tokens
    per_row = 4 * (T * (4 * c.n_embd + 3 * c.d_mlp + c.n_head * T) + c.vocab_size)      # bytes
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):   # a system that does not say: no bound
            free = math.inf
    if per_row * args.num_samples > free / 2:
        raise ValueError(f"--num-samples {args.num_samples} needs about {per_row * args.num_samples / 1e9:.1f} GB "
                         f"at this length, more than half the {free / 1e9:.1f} GB free: use at most "
                         f"{max(int(free / 2 // per_row), 1)}")


@torch.no_grad()
def sample(args):
    """The continuations (text after the prompt, up to the model's end of text or turn), one per sample."""
    device = runtime.pick_device(args.device)
    model, enc = checkpoints.load(args.init)
    if args.adapters is not None:
        adapters.load(model, args.adapters)        # into the slots and onto the weights it names
    stop = set(getattr(enc, "stop_tokens", [enc.eot_token]))
    if args.chat:
        prompt = chat_prompt(enc, args.prompt, args.init)
        stop.add(enc.encode_single_token("<|im_end|>"))
    else:
        prompt = [enc.eot_token] + enc.encode_ordinary(args.prompt)
    check_fits(args, model, len(prompt), device)
    model.to(device).eval()
    idx = torch.tensor([prompt] * args.num_samples, device=device)           # (num_samples, T)
    torch.manual_seed(args.seed)                                             # what multinomial draws
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, stop)[:, len(prompt):]
    texts = []
    for row in out.tolist():
        ends = [i for i, token in enumerate(row) if token in stop]
        texts.append(enc.decode(row[:ends[0]] if ends else row))
    return texts


def main(argv=None):
    try:
        args = parse_args(argv)
        texts = sample(args)
    except ValueError as e:  # every user error is raised as a ValueError with a one-line message
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    for i, text in enumerate(texts):
        print(("\n---\n" if i else "") + ("" if args.chat else args.prompt) + text)
    return texts


if __name__ == "__main__":
    main()
