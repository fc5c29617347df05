"""
bench_steering.py: what activation steering costs, measured side by side in one run on CPU.

  1. a training step (forward + backward + AdamW) that trains only a post-block rank-4 linear
     adapter per layer, against a full fine-tuning step on the same batch: time ratio and the
     bytes of optimizer state each one keeps;
  2. the forward pass with that adapter in every layer, against the same model with empty slots.

The two sides of each claim run interleaved (A B B A ...) after a warmup, and each side's median
is compared, so that a neighbour process slowing the machine down hits both sides alike.
Not collected by pytest (the name does not start with test_). Exits 1 if a claim fails.

Run:  python benchmarks/bench_steering.py
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from model import GPT, GPTConfig  # noqa: E402
from nanosteer import freeze, steer  # noqa: E402


def optimizer_state_bytes(opt):
    """Bytes of every tensor the optimizer keeps (AdamW: exp_avg, exp_avg_sq and a step count)."""
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values() if torch.is_tensor(t))


def training_step(model, idx, targets, lr):
    """A closure doing one forward + backward + AdamW step over the model's trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, opt


def forward_pass(model, idx):
    @torch.no_grad()
    def forward():
        model(idx)
    return forward


def side_by_side(a, b, repeats, warmup):
    """Run a and b in turn (a b, b a, a b, ...) and return the median seconds of each and the
    median of the per-round ratios b/a; a ratio taken within one round cancels slow drifts."""
    for _ in range(warmup):
        a(), b()
    times = {a: [], b: []}
    for i in range(repeats):
        for fn in ((a, b) if i % 2 == 0 else (b, a)):
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    ratio = statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))
    return statistics.median(times[a]), statistics.median(times[b]), ratio


def main():
    parser = argparse.ArgumentParser(description="Time steering against full fine-tuning on CPU.")
    parser.add_argument("--repeats", type=int, default=5, help="timed training-step rounds (the median is kept)")
    parser.add_argument("--forward-repeats", type=int, default=15, help="timed forward-pass rounds (cheaper, noisier)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
    parser.add_argument("--rank", type=int, default=4, help="rank of the post-block adapter")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is steadier on a machine other work shares")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    # ---------------------------------------------------------------------------------------------
    # the default model, a random batch, and three copies: full fine-tuning, steering, empty slots
    torch.manual_seed(0)
    config = GPTConfig()
    base = GPT(config)
    n_params = sum(p.numel() for p in base.parameters())
    idx = torch.randint(0, config.vocab_size, (args.batch, config.block_size))
    targets = torch.randint(0, config.vocab_size, (args.batch, config.block_size))

    full = copy.deepcopy(base).train()
    steered = freeze(copy.deepcopy(base)).train()
    shifts = steer(steered, "post_block", "linear", rank=args.rank)
    with torch.no_grad():  # a nonzero U, so that the adapter does real work in the forward pass
        for s in shifts:
            s.U.normal_(std=0.02)
    empty = copy.deepcopy(base).eval()

    print(f"nanosteer bench | torch {torch.__version__}, CPU, {torch.get_num_threads()} threads | "
          f"GPTConfig(): {config.n_layer} layers, d={config.n_embd}, {n_params / 1e6:.2f}M params | "
          f"batch {args.batch}x{config.block_size} | medians of {args.repeats} (steps) and "
          f"{args.forward_repeats} (forwards) rounds after {args.warmup} warmup")
    t_start = time.perf_counter()

    # ---------------------------------------------------------------------------------------------
    # 1. one training step: steering only vs full fine-tuning (same batch, same AdamW)
    full_step, full_opt = training_step(full, idx, targets, lr=1e-4)
    steer_step, steer_opt = training_step(steered, idx, targets, lr=1e-3)
    t_full, t_steer, step_ratio = side_by_side(full_step, steer_step, args.repeats, args.warmup)
    bytes_full, bytes_steer = optimizer_state_bytes(full_opt), optimizer_state_bytes(steer_opt)
    n_steer = sum(p.numel() for p in steered.parameters() if p.requires_grad)
    print(f"train step  full fine-tuning          {1e3 * t_full:8.1f} ms | {n_params:>9,} trainable | "
          f"optimizer state {bytes_full:>10,} B")
    print(f"train step  post-block r{args.rank} steering     {1e3 * t_steer:8.1f} ms | {n_steer:>9,} trainable | "
          f"optimizer state {bytes_steer:>10,} B")

    # ---------------------------------------------------------------------------------------------
    # 2. the forward pass: an adapter in every layer vs empty slots
    steered.eval()
    t_empty, t_adapter, forward_ratio = side_by_side(forward_pass(empty, idx), forward_pass(steered, idx),
                                                     args.forward_repeats, args.warmup)
    print(f"forward     empty slots               {1e3 * t_empty:8.1f} ms")
    print(f"forward     r{args.rank} adapter, every layer   {1e3 * t_adapter:8.1f} ms")

    # ---------------------------------------------------------------------------------------------
    # the claims
    claims = [
        ("train step time: steering / full fine-tuning", step_ratio, 0.75),
        ("forward time: adapter every layer / empty slots", forward_ratio, 1.10),
        ("optimizer state: steering / full fine-tuning", bytes_steer / bytes_full, 0.01),
    ]
    print(f"\n{'claim (median of per-round ratios)':<48} | measured | target | ok")
    for name, measured, target in claims:
        print(f"{name:<48} | {measured:8.4f} | ≤ {target:4.2f} | {'yes' if measured <= target else 'NO'}")
    print(f"({time.perf_counter() - t_start:.0f} s)")
    return 0 if all(measured <= target for _, measured, target in claims) else 1


if __name__ == "__main__":
    sys.exit(main())
