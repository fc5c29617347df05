"""
compare.py: the paper's comparison table in miniature (Adila et al., 2026, THEORY §8).

    python compare.py            # 10 methods x 3 tasks x 3 seeds, after a learning-rate sweep
    python compare.py --quick    # a reduced run for tests: boolq, 1 seed, 10 steps, no sweep

Each run is a `python train.py ...` command line, run in this process with its prints sent to
train.log. Every method gets the same data, batch size and steps, and rank r = 4 (LoRA too).

Learning rates: on seed 0, per task, each method runs at the three values of its family's GRID
(a factor 3 apart around train.py's defaults; the paper sweeps five per family) and keeps the
best validation accuracy (a tie, e.g. all 0, goes to the lowest training loss of the last 20
steps). That run is also the seed-0 result (same arguments, same numbers); seeds 1, 2 run at
the chosen lr. Joint is not swept: it takes the lrs chosen for linear block_out and for LoRA.

Writes into --out-dir (default out/compare): results.md (the table: test accuracy), compare.png,
results.json (every run, sweep included), train.log (train.py's prints), runs/ (each run's files).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import train

R = 4
SHIFT = ["--mode", "activation", "--rank", f"{R}", "--adapter"]           # a vector ignores --rank
JOINT = ["--mode", "joint", "--lora-rank", f"{R}", "--rank", f"{R}", "--ortho-every"]
METHODS = {  # name: (learning-rate family, row label, train.py arguments)
    "full": ("full", "full fine-tuning", ["--mode", "weight", "--lora-rank", "0"]),
    "lora": ("lora", "LoRA, every linear layer", ["--mode", "weight", "--lora-rank", f"{R}"]),
    "reft_mlp_out": ("shift", "ReFT @ mlp_out (post-MLP)", SHIFT + ["reft", "--site", "mlp_out"]),
    "linear_attn_out": ("shift", "linear @ attn_out (pre-MLP)", SHIFT + ["linear", "--site", "attn_out"]),
    "linear_mlp_out": ("shift", "linear @ mlp_out (post-MLP)", SHIFT + ["linear", "--site", "mlp_out"]),
    "linear_block_out": ("shift", "linear @ block_out (post-block)", SHIFT + ["linear", "--site", "block_out"]),
    "nonlinear_block_out": ("shift", "nonlinear @ block_out", SHIFT + ["nonlinear", "--site", "block_out"]),
    "vector_block_out": ("shift", "vector @ block_out", SHIFT + ["vector", "--site", "block_out"]),
    "joint": ("joint", "joint: LoRA + block_out, orthogonal", JOINT + ["1"]),
    "joint_no_ortho": ("joint", "joint, --ortho-every 0", JOINT + ["0"]),
}
FLAG = {"full": "--lr", "lora": "--lora-lr", "shift": "--lr"}   # the train.py flag each family sweeps
GRID = {"full": [3e-4, 1e-3, 3e-3], "lora": [1e-3, 3e-3, 1e-2], "shift": [3e-3, 1e-2, 3e-2]}
# one budget for every method; the full one was measured to fit in 45 minutes on 2 CPU cores
FULL = dict(tasks="listops,arith,boolq", seeds=3, steps=250, batch_size=64, n_train=20000)
QUICK = dict(tasks="boolq", seeds=1, steps=10, batch_size=16, n_train=200)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Every method on every task with one budget: a table and a chart.")
    p.add_argument("--quick", action="store_true", help=f"a reduced run for tests, {QUICK}, no sweep (train.py's lrs)")
    p.add_argument("--tasks", help=f"comma-separated built-in tasks (default {FULL['tasks']})")
    p.add_argument("--seeds", type=int, help=f"run seeds 0..n-1 (default {FULL['seeds']})")
    p.add_argument("--steps", type=int, help=f"training steps of every run (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"examples per step (default {FULL['batch_size']})")
    p.add_argument("--init", default=train.BASE_CHECKPOINT, help="the base model that every method adapts")
    p.add_argument("--out-dir", default=os.path.join("out", "compare"), help="where tables, chart and runs go")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    args.tasks = args.tasks.split(",")
    if not set(args.tasks) <= {"listops", "arith", "boolq"} or min(args.seeds, args.steps, args.batch_size) <= 0:
        raise ValueError("--tasks takes listops, arith, boolq; --seeds, --steps, --batch-size must be positive")
    args.grid = {f: [train.DEFAULT_LR[f]] for f in GRID} if args.quick else GRID
    return args


def lr_text(lrs, sep="/"):
    return sep.join(f"{v:.0e}" for v in lrs.values())


def run(args, name, task, seed, lrs, log):
    """One train.py run with the learning rates lrs ({flag: value}); returns its results."""
    argv = METHODS[name][2] + [str(a) for kv in lrs.items() for a in kv] + [
        "--task", task, "--seed", f"{seed}", "--steps", f"{args.steps}", "--batch-size", f"{args.batch_size}",
        "--n-train", f"{args.n_train}", "--init", args.init,
        "--out-dir", os.path.join(args.out_dir, "runs", f"{task}-{name}-lr{lr_text(lrs, '-')}-seed{seed}")]
    with contextlib.redirect_stdout(log):
        print(f"\n$ python train.py {' '.join(argv)}", flush=True)
        res = train.train(train.resolve_args(train.parse_args(argv)))
    losses = res.pop("losses")                # all of them stay in the run's own results.json
    return dict(method=name, lrs=lrs, argv=argv, final_loss=statistics.mean(losses[-20:]), **res)


def mean_std(values):                         # the sample standard deviation; 0 for one value
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(finals, tasks, seeds):
    """Per method: test accuracy (mean, std) over seeds per task and for the average over tasks
    (averaged per seed first); trainable params and %; mean training seconds per run."""
    rows = {}
    for name in METHODS:
        mine = [r for r in finals if r["method"] == name]
        acc = {(r["task"], r["seed"]): r["accuracy"] for r in mine}
        rows[name] = dict(**{t: mean_std([acc[t, s] for s in seeds]) for t in tasks},
                          average=mean_std([statistics.mean(acc[t, s] for t in tasks) for s in seeds]),
                          params=mine[0]["trainable_params"], pct=mine[0]["trainable_pct"],
                          seconds=statistics.mean(r["train_seconds"] for r in mine))
    return rows


def markdown(rows, tasks, chosen, args):
    cols = tasks + ["average"]
    lines = [f"| method | {' | '.join(cols)} | trainable params | % of model | s / run | lr: {', '.join(tasks)} |",
             "|---|" + "---:|" * (len(cols) + 3) + "---|"]
    for name, row in rows.items():
        cells = " | ".join(f"{100 * row[c][0]:.1f} ± {100 * row[c][1]:.1f}" for c in cols)
        lrs = ", ".join(lr_text(chosen[name][t]) for t in tasks)
        lines.append(f"| {METHODS[name][1]} | {cells} | {row['params']:,} | {row['pct']:.3f} | "
                     f"{row['seconds']:.1f} | {lrs} |")
    return "\n".join(lines) + (f"\n\nTest accuracy (%), mean ± std over {args.seeds} seed(s); every method "
                               f"{args.steps} steps of batch {args.batch_size}, rank {R}. lr: chosen on the "
                               "validation split (seed 0); joint: shift lr/LoRA lr.\n")


def chart(rows, tasks, path):
    from matplotlib.figure import Figure      # draws to a file, leaves pyplot's backend alone
    cols, names = tasks + ["average"], list(rows)
    fig, width = Figure(figsize=(13, 5)), 0.8 / len(cols)
    ax = fig.subplots()
    for i, col in enumerate(cols):
        xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100 * rows[n][col][0] for n in names], width, yerr=[100 * rows[n][col][1] for n in names],
               capsize=2, label=col, color="black" if col == "average" else None)
    labels = [METHODS[n][1].replace(" (", "\n(").replace(": ", ":\n").replace(", ", ",\n") +
              f"\n{rows[n]['pct']:.2f}% params" for n in names]
    ax.set_xticks(range(len(names)), labels, fontsize=7)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 115), yticks=range(0, 101, 20),
           title=f"same data and steps for every method, rank {R}: test accuracy, mean ± std over seeds")
    ax.legend(ncol=len(cols), fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def write(path, text):
    """Write to a temporary name, then rename: a crash never leaves a half-written file behind."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(args):
    os.makedirs(args.out_dir, exist_ok=True)
    log, seeds, start = open(os.path.join(args.out_dir, "train.log"), "w"), list(range(args.seeds)), time.time()
    if args.init == train.BASE_CHECKPOINT and not os.path.exists(args.init):
        print(f"no base model at {args.init} yet: pretraining it first (train.py --mode pretrain)", flush=True)
        with contextlib.redirect_stdout(log):
            train.train(train.resolve_args(train.parse_args(["--mode", "pretrain"])))
    swept = [n for n in METHODS if METHODS[n][0] != "joint"]
    joint = [n for n in METHODS if n not in swept]
    per_task = sum(len(args.grid[METHODS[n][0]]) + len(seeds) - 1 for n in swept) + len(joint) * len(seeds)
    total, runs, t0 = len(args.tasks) * per_task, [], time.time()
    print(f"{len(METHODS)} methods x {len(args.tasks)} tasks x {len(seeds)} seeds, {args.steps} steps of batch "
          f"{args.batch_size}, lr grids {args.grid}: {total} runs (train.py's prints: {log.name})", flush=True)

    def do(phase, name, task, seed, lrs):
        r = dict(phase=phase, **run(args, name, task, seed, lrs, log))
        runs.append(r)
        eta = (time.time() - t0) / len(runs) * (total - len(runs))
        print(f"run {len(runs):3d}/{total} | {phase:5s} | {task:7s} | {name:19s} | seed {seed} | lr {lr_text(lrs):11s} "
              f"| val {r['val_accuracy']:.3f} | test {r['accuracy']:.3f} | {r['train_seconds']:5.1f} s | "
              f"eta {eta / 60:5.1f} min", flush=True)
        return r

    chosen = {name: {} for name in METHODS}
    for task in args.tasks:                   # the sweep, on seed 0: the best validation accuracy wins
        for name in swept:
            family = METHODS[name][0]
            tried = [do("sweep", name, task, seeds[0], {FLAG[family]: v}) for v in args.grid[family]]
            best = max(tried, key=lambda r: (r["val_accuracy"], -r["final_loss"]))
            best["phase"], chosen[name][task] = "final", best["lrs"]
        for name in joint:
            chosen[name][task] = {**chosen["linear_block_out"][task], **chosen["lora"][task]}
    for task in args.tasks:                   # the other seeds, at the chosen learning rates
        for name in METHODS:
            for seed in seeds[1:] if name in swept else seeds:
                do("final", name, task, seed, chosen[name][task])
    log.close()

    rows = summarize([r for r in runs if r["phase"] == "final"], args.tasks, seeds)
    table, wall = markdown(rows, args.tasks, chosen, args), time.time() - start
    write(os.path.join(args.out_dir, "results.md"), table)
    chart(rows, args.tasks, os.path.join(args.out_dir, "compare.png"))
    everything = dict(budget={k: getattr(args, k) for k in FULL}, rank=R, grid=args.grid, quick=args.quick,
                      chosen_lrs=chosen, wall_seconds=wall, summary=rows, runs=runs)
    write(os.path.join(args.out_dir, "results.json"), json.dumps(everything, indent=1))
    print(f"\n{table}\n{total} runs, {wall / 60:.1f} min in all; wrote {args.out_dir}/results.md, compare.png, "
          "results.json, train.log")
    return rows


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:  # train.py raises every user error as a ValueError with a one-line message
        print(f"compare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
