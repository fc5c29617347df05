"""
tools/compare.py: the paper's comparison (Adila et al., 2026; THEORY §9) on our small base model (the
miniature) or on a real pretrained LM. Every method of a table: the same data, batch, steps, rank.

    python tools/compare.py                        # miniature: 10 methods x 3 tasks x 3 seeds, rank 4
    python tools/compare.py --init smollm2-135m    # SmolLM2-135M, rank 8: listops, 1 seed (2 CPU cores)
    python tools/compare.py --init smollm2-135m --budget lm-gpu --device cuda    # 3 tasks x 3 seeds
    python tools/compare.py --quick [--init ...]   # for the tests: boolq, 1 seed, train.py's lrs

Learning rates, chosen per task on seed 0's validation split: a swept method runs its family's
grid and keeps the best validation accuracy (a tie, e.g. all 0, goes to the lowest training loss
of the last 20 steps); while the best is the smallest or largest lr tried, one more lr beyond it
(at most EXTEND). The winning run is the seed-0 result; seeds 1.. run at the chosen lr. Sweep
"family" (the 2-core budget on a real LM) sweeps only full FT, LoRA and linear block_out; the
other shifts take block_out's lr (a third of the runs, a rate tuned for post-block). Joint takes
the lrs chosen for block_out and LoRA. Each run is `python train.py ...` run in this process,
its prints sent to train.log. Into --out-dir: results.md (the table), compare.png, results.json
(every run, sweep included), train.log, runs/ (each run's files; git ignores them).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import checkpoints  # noqa: E402
import train  # noqa: E402
from tasks import make_splits  # noqa: E402

SHIFT = ["--mode", "activation", "--rank", "{r}", "--adapter"]                  # a vector ignores --rank
JOINT = ["--mode", "joint", "--lora-rank", "{r}", "--rank", "{r}", "--ortho-every"]
METHODS = {  # name: (learning-rate family, row label, train.py arguments; {r}: the budget's rank)
    "full": ("full", "full fine-tuning", ["--mode", "weight", "--lora-rank", "0"]),
    "lora": ("lora", "LoRA, every linear layer", ["--mode", "weight", "--lora-rank", "{r}"]),
    "reft_mlp_out": ("shift", "ReFT @ mlp_out (post-MLP)", SHIFT + ["reft", "--site", "mlp_out"]),
    "linear_attn_out": ("shift", "linear @ attn_out (pre-MLP)", SHIFT + ["linear", "--site", "attn_out"]),
    "linear_mlp_out": ("shift", "linear @ mlp_out (post-MLP)", SHIFT + ["linear", "--site", "mlp_out"]),
    "linear_block_out": ("shift", "linear @ block_out (post-block)", SHIFT + ["linear", "--site", "block_out"]),
    "nonlinear_block_out": ("shift", "nonlinear @ block_out", SHIFT + ["nonlinear", "--site", "block_out"]),
    "vector_block_out": ("shift", "vector @ block_out", SHIFT + ["vector", "--site", "block_out"]),
    "joint": ("joint", "joint: LoRA + block_out, orthogonal", JOINT + ["1"]),
    "joint_no_ortho": ("joint", "joint, --ortho-every 0", JOINT + ["0"]),
}
LEAD = {"full": "full", "lora": "lora", "shift": "linear_block_out"}   # swept under sweep "family"
FLAG = {"full": "--lr", "lora": "--lora-lr", "shift": "--lr"}       # the train.py flag each family sweeps
EXTEND = 2
NANO_GRID = {"full": [3e-4, 1e-3, 3e-3], "lora": [3e-3, 1e-2, 3e-2], "shift": [3e-3, 1e-2, 3e-2]}
# a real LM: inside the paper's ranges (THEORY §9). First centred on issue 11's calibration (train.LM_DEFAULTS);
# on SmolLM2 listops, 120 steps, full FT and LoRA won at the top (1e-4, 1.5e-3) and their grids grew
# (results/smollm2/compare): they now start around the winners, so the same command needs no growth.
LM_GRID = {"full": [3e-5, 1e-4, 3e-4], "lora": [5e-4, 1.5e-3, 5e-3], "shift": [3e-4, 1e-3, 3e-3]}
BUDGETS = {  # one budget for every method of a table (times: README)
    "nano": dict(tasks="listops,arith,boolq", seeds=3, steps=250, batch_size=64, n_train=20000, n_eval=500, rank=4,
                 sweep="every"),
    "nano-quick": dict(tasks="boolq", seeds=1, steps=10, batch_size=16, n_train=200, n_eval=100, rank=4,
                       sweep="family"),
    "lm-cpu": dict(tasks="listops", seeds=1, steps=120, batch_size=16, n_train=20000, n_eval=500, rank=8,
                   sweep="family"),
    "lm-gpu": dict(tasks="listops,arith,boolq", seeds=3, steps=300, batch_size=16, n_train=20000, n_eval=1000, rank=8,
                   sweep="every"),
    "lm-quick": dict(tasks="boolq", seeds=1, steps=2, batch_size=4, n_train=200, n_eval=8, rank=8, sweep="family"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Every method on every task with one budget: a table and a chart.")
    p.add_argument("--init", default=train.BASE_CHECKPOINT, help="the base model every method adapts (train.py --init)")
    p.add_argument("--budget", choices=BUDGETS, help="default: nano, or lm-cpu for a pretrained LM; "
                   "--quick: nano-quick / lm-quick. The flags below override its values")
    p.add_argument("--quick", action="store_true", help="a reduced run for tests: train.py's lrs, no sweep")
    p.add_argument("--tasks", help="comma-separated built-in tasks")
    p.add_argument("--seeds", type=int, help="run seeds 0..n-1")
    p.add_argument("--steps", type=int, help="training steps of every run")
    p.add_argument("--batch-size", type=int, help="examples per step")
    p.add_argument("--n-eval", type=int, help="validation and test examples per task (each)")
    p.add_argument("--sweep", choices=["every", "family"], help="which methods sweep their lr (see above)")
    p.add_argument("--device", default="auto", help="train.py --device")
    p.add_argument("--out-dir", help="where tables, chart and runs go (default out/compare[-INIT])")
    args = p.parse_args(argv)
    lm = checkpoints.is_pretrained_lm(args.init)
    args.budget = args.budget or ("lm" if lm else "nano") + ("-quick" if args.quick else "-cpu" if lm else "")
    for key, value in BUDGETS[args.budget].items():
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    args.tasks = args.tasks.split(",")
    sizes = (args.seeds, args.steps, args.batch_size, args.n_eval)
    if not set(args.tasks) <= {"listops", "arith", "boolq"} or min(sizes) <= 0:
        raise ValueError("--tasks takes listops, arith, boolq; --seeds, --steps, --batch-size, --n-eval must be "
                         "positive")
    defaults = train.LM_DEFAULTS["lr"] if lm else train.DEFAULT_LR
    args.grid = {f: [defaults[f]] for f in FLAG} if args.quick else LM_GRID if lm else NANO_GRID
    name = os.path.splitext(os.path.basename(args.init))[0]
    args.out_dir = args.out_dir or os.path.join("out", "compare" if args.init == train.BASE_CHECKPOINT else
                                                f"compare-{name}")
    return args


def lr_text(lrs, sep="/"):
    return sep.join(f"{v:.1e}".replace(".0e", "e") for v in lrs.values())


def run(args, name, task, seed, lrs, log):
    """One train.py run with the learning rates lrs ({flag: value}); returns its results."""
    argv = [a.format(r=args.rank) for a in METHODS[name][2]] + [str(a) for kv in lrs.items() for a in kv] + [
        "--task", task, "--seed", f"{seed}", "--steps", f"{args.steps}", "--batch-size", f"{args.batch_size}",
        "--n-train", f"{args.n_train}", "--n-eval", f"{args.n_eval}", "--init", args.init, "--device", args.device,
        "--out-dir", os.path.join(args.out_dir, "runs", f"{task}-{name}-lr{lr_text(lrs, '-')}-seed{seed}")]
    with contextlib.redirect_stdout(log):
        print(f"\n$ python train.py {' '.join(argv)}", flush=True)
        res = train.train(train.resolve_args(train.parse_args(argv)))
    losses = res.pop("losses")                # all of them stay in the run's own results.json
    return dict(method=name, lrs=lrs, argv=argv, final_loss=statistics.mean(losses[-20:]), **res)


def best(tried):
    """The run with the best validation accuracy; a tie goes to the lowest final training loss."""
    return max(tried, key=lambda r: (r["val_accuracy"], -r["final_loss"]))


def sweep(do, flag, grid):
    """do({flag: lr}) at every lr of grid; while the best is the smallest or largest lr tried, one
    more lr a grid step beyond it (at most EXTEND). Returns the best run and whether it is still
    at an edge of the lrs tried."""
    tried = {lr: do({flag: lr}) for lr in grid}
    for _ in range(EXTEND if len(grid) >= 3 else 0):
        lrs, lr = sorted(tried), best(tried.values())["lrs"][flag]
        if lrs[0] < lr < lrs[-1]:
            break
        # a grid step beyond, in the grid's own pattern (3e-3, 1e-2, 3e-2 -> 1e-1, 3e-1 or 1e-3, 3e-4)
        beyond = float(f"{lr * lrs[-2] / lrs[-3] if lr == lrs[-1] else lr * lrs[1] / lrs[2]:.3g}")
        tried[beyond] = do({flag: beyond}, extension=True)
    winner = best(tried.values())
    return winner, len(tried) >= 3 and winner["lrs"][flag] in (min(tried), max(tried))


def mean_std(values):                         # the sample standard deviation; 0 for one value
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def majority_baseline(splits):
    """Answer every test prompt with train's commonest completion -> (it, its test accuracy)."""
    answer = Counter(c for _, c in splits["train"]).most_common(1)[0][0]
    return answer, statistics.mean(c == answer for _, c in splits["test"])


def baselines(args, finals, seeds):
    """Test accuracy per (task, seed) of two rows without training: the majority class, and the
    base model (train.py measures it before every run)."""
    rows = {"majority": {}, "base": {}}
    for task in args.tasks:
        for seed in seeds:
            splits = make_splits(task, seed, args.n_train, args.n_eval)
            rows["majority"][task, seed] = majority_baseline(splits)[1]
            rows["base"][task, seed] = next(r["base_accuracy"] for r in finals
                                            if r["task"] == task and r["seed"] == seed)
    return rows


def summarize(finals, tasks, seeds, extra_rows):
    """Per method (and per row of extra_rows, {name: {(task, seed): accuracy}}): test accuracy
    (mean, std) over seeds per task and for the average over tasks (averaged per seed first);
    trainable params and %; mean training seconds per run."""
    accuracies = {**extra_rows, **{name: {(r["task"], r["seed"]): r["accuracy"] for r in finals
                                          if r["method"] == name} for name in METHODS}}
    rows = {}
    for name, acc in accuracies.items():
        mine = [r for r in finals if r["method"] == name] or [dict(trainable_params=0, trainable_pct=0.0,
                                                                   train_seconds=0.0)]
        rows[name] = dict(**{t: mean_std([acc[t, s] for s in seeds]) for t in tasks},
                          average=mean_std([statistics.mean(acc[t, s] for t in tasks) for s in seeds]),
                          params=mine[0]["trainable_params"], pct=mine[0]["trainable_pct"],
                          seconds=statistics.mean(r["train_seconds"] for r in mine))
    return rows


LABEL = {"majority": "majority class (train's commonest answer)", "base": "base model, untrained",
         **{name: METHODS[name][1] for name in METHODS}}


def markdown(rows, chosen, edges, args):
    cols = args.tasks + ["average"]
    header = f"| method | {' | '.join(cols)} | trainable params | % of model | s / run | lr: {', '.join(args.tasks)} |"
    lines = [header, "|---|" + "---:|" * (len(cols) + 3) + "---|"]
    for name, row in rows.items():
        cells = " | ".join(f"{100 * row[c][0]:.1f} ± {100 * row[c][1]:.1f}" for c in cols)
        star = {t: "*" * ((name, t) in edges) for t in args.tasks}     # * = still at an edge of the lrs tried
        lrs = ", ".join(lr_text(chosen[name][t]) + star[t] for t in args.tasks) if name in chosen else "–"
        lines.append(f"| {LABEL[name]} | {cells} | {row['params']:,} | {row['pct']:.3f} | {row['seconds']:.1f} | "
                     f"{lrs} |")
    half = 100 * 1.96 * math.sqrt(0.75 * 0.25 / args.n_eval)
    return "\n".join(lines) + (
        f"\n\nTest accuracy (%), mean ± std over {args.seeds} seed(s) ({args.n_eval} test prompts a task: one "
        f"accuracy near 75% has a 95% binomial interval of ±{half:.1f} points). Every method {args.steps} steps "
        f"of batch {args.batch_size}, rank {args.rank}, on {args.init}. lr: chosen on the validation split "
        f"(seed 0, sweep '{args.sweep}'); joint: shift lr/LoRA lr"
        + (f"; * = at the edge of the lrs tried: {', '.join(f'{n} on {t}' for n, t in edges)}" if edges else "")
        + ".\n")


def chart(rows, args, path):
    from matplotlib.figure import Figure      # draws to a file, leaves pyplot's backend alone
    cols, names = args.tasks + ["average"], list(rows)
    fig, width = Figure(figsize=(14, 5)), 0.8 / len(cols)
    ax = fig.subplots()
    for i, col in enumerate(cols):
        xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100 * rows[n][col][0] for n in names], width, yerr=[100 * rows[n][col][1] for n in names],
               capsize=2, label=col, color="black" if col == "average" else None)
    labels = [LABEL[n].replace(" (", "\n(").replace(": ", ":\n").replace(", ", ",\n") +
              f"\n{rows[n]['pct']:.2f}% params" for n in names]
    ax.set_xticks(range(len(names)), labels, fontsize=6)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 115), yticks=range(0, 101, 20),
           title=f"{args.init}: same data and steps for every method, rank {args.rank}: test accuracy, "
                 "mean ± std over seeds")
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
    log = open(os.path.join(args.out_dir, "train.log"), "w", buffering=1)     # line by line: progress shows
    seeds, start = list(range(args.seeds)), time.time()
    if args.init == train.BASE_CHECKPOINT and not os.path.exists(args.init):   # train.py pretrains it then
        print(f"no base model at {args.init} yet: the first run pretrains it (train.py --mode pretrain)", flush=True)
    swept = list(LEAD.values()) if args.sweep == "family" else [n for n in METHODS if METHODS[n][0] != "joint"]
    size = len(next(iter(args.grid.values())))
    per_task = len(swept) * (size + len(seeds) - 1) + (len(METHODS) - len(swept)) * len(seeds)
    plan, runs, t0 = len(args.tasks) * per_task, [], time.time()
    print(f"{len(METHODS)} methods x {len(args.tasks)} tasks x {len(seeds)} seeds, {args.steps} steps of batch "
          f"{args.batch_size}, budget {args.budget}, lr grids {args.grid} (sweep {args.sweep}): {plan} runs, "
          f"more if a grid grows (train.py's prints: {log.name})", flush=True)

    def do(phase, name, task, seed, lrs, extension=False):
        nonlocal plan                         # a grid that grows adds a run to the plan
        plan += extension
        r = dict(phase=phase, **run(args, name, task, seed, lrs, log))
        runs.append(r)
        eta = (time.time() - t0) / len(runs) * (plan - len(runs))
        print(f"run {len(runs):3d}/{plan} | {phase:5s} | {task:7s} | {name:19s} | seed {seed} | lr "
              f"{lr_text(lrs):11s} | val {r['val_accuracy']:.3f} | test {r['accuracy']:.3f} | "
              f"{r['train_seconds']:5.0f} s | eta {eta / 60:5.1f} min", flush=True)
        return r

    chosen, edges = {name: {} for name in METHODS}, []
    for task in args.tasks:                   # the sweep, on seed 0: the best validation accuracy wins
        for name in swept:
            family = METHODS[name][0]
            run_at = functools.partial(do, "sweep", name, task, seeds[0])     # run_at(lrs) -> its results
            winner, edge = sweep(run_at, FLAG[family], args.grid[family])
            winner["phase"], chosen[name][task] = "final", winner["lrs"]
            edges += [(name, task)] * edge
        for name in METHODS:                  # not swept: joint takes block_out's and LoRA's lrs,
            if name not in swept:             # another shift block_out's (sweep "family")
                chosen[name][task] = ({**chosen["linear_block_out"][task], **chosen["lora"][task]}
                                      if METHODS[name][0] == "joint" else chosen[LEAD[METHODS[name][0]]][task])
    for task in args.tasks:                   # the other seeds, at the chosen learning rates
        for name in METHODS:
            for seed in seeds[1:] if name in swept else seeds:
                do("final", name, task, seed, chosen[name][task])
    log.close()

    finals = [r for r in runs if r["phase"] == "final"]
    rows = summarize(finals, args.tasks, seeds, baselines(args, finals, seeds))
    table, wall = markdown(rows, chosen, edges, args), time.time() - start
    write(os.path.join(args.out_dir, "results.md"), table)
    chart(rows, args, os.path.join(args.out_dir, "compare.png"))
    everything = dict(budget={k: getattr(args, k) for k in BUDGETS["nano"]}, name=args.budget, init=args.init,
                      grid=args.grid, chosen_lrs=chosen, edges=edges, wall_seconds=wall, summary=rows, runs=runs)
    write(os.path.join(args.out_dir, "results.json"), json.dumps(everything, indent=1))
    print(f"\n{table}\n{len(runs)} runs, {wall / 60:.1f} min in all; wrote {args.out_dir}/results.md, compare.png, "
          "results.json, train.log")
    return rows


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:  # train.py raises every user error as a ValueError with a one-line message
        print(f"compare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
