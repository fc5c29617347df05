"""
experiments/compare.py: the paper's comparison (Adila et al., 2026; THEORY §9) on the miniature or a
real LM: every method with the same data, batch, steps and rank, and the paper's claims, each with
a paired 95% interval and a verdict (experiments/stats.py).

    python experiments/compare.py                       # miniature: 10 methods x 3 tasks x 3 seeds
    python experiments/compare.py --init smollm2-135m   # SmolLM2-135M, budget lm-verdict (2 CPU cores)

Rates, per task on seed 0's validation split: every method sweeps its own grid (joint steps its two
together); the best validation accuracy wins (a tie: the lowest loss of the last 20 steps); a
winner at an edge adds a rate beyond (at most MAX_GROWTH). Resumable: a finished run
(runs/<task>-<method>-lr<rates>-seed<s>/: results.json, outcomes.json, argv.json) is read back,
not redone. Another config in --out-dir needs --force. Writes results.md, compare.png,
results.json, outcomes.json, config.json; appends the logs. --quick: for tests. --methods: some
rows only (their table replaces the folder's; a later whole table reads them back).
"""
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from machinery.interrupt import one_line_on_ctrl_c  # noqa: E402 (first: Ctrl-C while torch loads)
if __name__ == "__main__":
    one_line_on_ctrl_c("compare.py", ": run the same command to go on")
import torch  # noqa: E402
from formats import checkpoints  # noqa: E402
from machinery import runtime  # noqa: E402
import train  # noqa: E402
from machinery.checks import OneLineParser, check_bounds, check_out_dir as check_folder  # noqa: E402
from machinery.files import read_json, write_atomically, write_files, write_text  # noqa: E402
from tasks import make_splits  # noqa: E402
from experiments import stats  # noqa: E402

SHIFT = "--mode activation --rank {r} --adapter "                      # a vector ignores --rank
JOINT = "--mode joint --lora-rank {r} --rank {r} --ortho-every "
METHODS = {  # name: (rate family, row label, train.py arguments; {r}: the budget's rank)
    "full": ("full", "full fine-tuning", "--mode weight --lora-rank 0"),
    "lora": ("lora", "LoRA, every linear layer", "--mode weight --lora-rank {r}"),
    "reft_mlp_out": ("shift", "ReFT @ mlp_out (post-MLP)", SHIFT + "reft --site mlp_out"),
    "linear_attn_out": ("shift", "linear @ attn_out (pre-MLP)", SHIFT + "linear --site attn_out"),
    "linear_mlp_out": ("shift", "linear @ mlp_out (post-MLP)", SHIFT + "linear --site mlp_out"),
    "linear_block_out": ("shift", "linear @ block_out (post-block)",
                         SHIFT + "linear --site block_out"),
    "nonlinear_block_out": ("shift", "nonlinear @ block_out", SHIFT + "nonlinear --site block_out"),
    "vector_block_out": ("shift", "vector @ block_out", SHIFT + "vector --site block_out"),
    "joint": ("joint", "joint: LoRA + block_out, orthogonal", JOINT + "1"),
    "joint_no_ortho": ("joint", "joint, --ortho-every 0", JOINT + "0"),
    # steerling's recipe for its post-block adapter: U silu(D z), D at 1e-3 of nn.Linear's init, a
    # linear decay after 3% warmup ({w} steps), its default rate 9e-4 (THEORY §2, §9)
    "recipe_block_out": ("recipe", "steerling's recipe @ block_out", SHIFT + "nonlinear --site block_out "
                         "--shift-init steerling --schedule linear --warmup {w}"),
}
RATE_FLAGS = {"full": {"--lr": "full"}, "lora": {"--lora-lr": "lora"}, "shift": {"--lr": "shift"},
              "joint": {"--lr": "shift", "--lora-lr": "lora"},     # {flag swept: grid of its rates}
              "recipe": {"--lr": "recipe"}}
MAX_GROWTH = 2
NANO_GRID = {"full": [3e-4, 1e-3, 3e-3], "lora": [3e-3, 1e-2, 3e-2], "shift": [3e-3, 1e-2, 3e-2]}
# a real LM: inside the paper's ranges (THEORY §9), centred on SmolLM2's winners at 120 steps
LM_GRID = {"full": [3e-5, 1e-4, 3e-4], "lora": [5e-4, 1.5e-3, 5e-3], "shift": [3e-4, 1e-3, 3e-3]}
# the learning curve starts from the 300-step winners; post-block sweeps the three rates again (a
# longer run often wants a lower peak); full fine-tuning keeps its 3e-4 (another rate could only
# raise it); lm-3000 takes lm-1000's winners; the recipe keeps its own
BUDGET_GRID = {"lm-1000": {"full": [3e-4], "lora": [1.5e-3], "shift": [3e-4, 1e-3, 3e-3], "recipe": [9e-4]},
               "lm-3000": {"full": [3e-4], "lora": [1.5e-3], "shift": [1e-3], "recipe": [9e-4]}}
RESULT_FIELDS = dict(losses=list, accuracy=float, val_accuracy=float, base_accuracy=float, train_seconds=float)
STEP_SECONDS = {"bfloat16": 0.92, "float32": 1.42}  # a SmolLM2 steering step, 2 CPU cores: results/smollm2/dtype.txt
ALL = tuple(name for name in METHODS if name != "recipe_block_out")     # the tables' rows
IN_CLAIMS = ("full", "lora", "linear_block_out", "reft_mlp_out", "joint")
BUDGET_KEYS = ("tasks", "seeds", "steps", "batch_size", "n_train", "n_eval", "rank", "seeded")
DEFAULT_BUDGET = {(False, False): "nano", (False, True): "nano-quick", (True, False): "lm-verdict",
                  (True, True): "lm-quick"}                 # (a pretrained LM?, --quick?): budget
BUDGETS = {  # one budget for every method of a table; seeded: the methods run at every seed
    "nano": ("listops,arith,boolq", 3, 250, 64, 20000, 500, 4, ALL),
    "nano-quick": ("boolq", 1, 10, 16, 200, 100, 4, ALL),
    # the verdict on 2 CPU cores; 2000 test prompts: ±1.25 points if 1 in 12 is discordant
    "lm-verdict": ("listops", 3, 300, 16, 20000, 2000, 8, IN_CLAIMS),
    "lm-gpu": ("listops,arith,boolq", 3, 300, 16, 20000, 1000, 8, ALL),
    "lm-quick": ("boolq", 1, 2, 4, 200, 8, 8, ALL),
    # the learning curve past lm-verdict's 300 steps; at 3000 steps a training row per example seen
    "lm-1000": ("listops", 3, 1000, 16, 20000, 2000, 8, ("full", "linear_block_out")),
    "lm-3000": ("listops", 1, 3000, 16, 48000, 2000, 8, ()),
    # the second task at lm-verdict's budget: 3 seeds of the two methods of claim 1, one of the rest
    "lm-arith": ("arith", 3, 300, 16, 20000, 2000, 8, ("full", "linear_block_out")),
}


def parse_args(argv=None):
    """The arguments, every one checked before any work (a ValueError: one line)."""
    p = OneLineParser(description="Every method, one budget: a table and verdicts.")
    p.add_argument("--init", default=train.BASE_CHECKPOINT, help="the base model (train.py --init)")
    p.add_argument("--budget", choices=BUDGETS, help="default: nano, lm-verdict (pretrained LM)")
    p.add_argument("--quick", action="store_true", help="a reduced run for tests: no sweep")
    p.add_argument("--tasks", help="comma-separated built-in tasks")
    p.add_argument("--methods", help="comma-separated, a subset of the table (default: every method "
                   "but steerling's recipe, which only the lm-1000 and lm-3000 budgets run)")
    p.add_argument("--seeds", type=int, help="run seeds 0..n-1")
    p.add_argument("--steps", type=int, help="training steps of every run")
    p.add_argument("--batch-size", type=int, help="examples per step")
    p.add_argument("--n-eval", type=int, help="validation and test examples per task (each)")
    p.add_argument("--dtype", default="auto", type=runtime.dtype_name, choices=["auto", "float32", "bfloat16"],
                   help="train.py's --dtype (bf16, fp32 also)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--out-dir", help="where everything goes (default out/compare-<init>-<budget>)")
    p.add_argument("--force", action="store_true", help="into an --out-dir of another config")
    args = p.parse_args(argv)
    args.lm = checkpoints.is_pretrained_lm(args.init)
    args.budget = args.budget or DEFAULT_BUDGET[args.lm, args.quick]
    for key, value in zip(BUDGET_KEYS, BUDGETS[args.budget]):
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    args.tasks = args.tasks.split(",")
    methods = args.methods.split(",") if args.methods else ALL
    args.methods = [name for name in METHODS if name in methods]      # once each, in table order
    if not set(methods) <= set(METHODS):
        raise ValueError(f"--methods takes {', '.join(METHODS)}, comma-separated")
    if not set(args.tasks) <= {"listops", "arith", "boolq"} or min(
            args.seeds, args.steps, args.batch_size, args.n_eval) <= 0:
        raise ValueError("--tasks takes listops, arith, boolq; --seeds, --steps, --batch-size, "
                         "--n-eval must be positive")
    check_bounds(dict(seeds=args.seeds, steps=args.steps, batch_size=args.batch_size, n_eval=args.n_eval))
    defaults = train.LM_DEFAULTS["lr"] if args.lm else train.DEFAULT_LR
    one_each = {family: [defaults[family]] for family in NANO_GRID}   # --quick: train.py's rates
    args.grid = one_each if args.quick else BUDGET_GRID.get(args.budget, LM_GRID if args.lm else NANO_GRID)
    for name in args.methods:
        if not set(RATE_FLAGS[METHODS[name][0]].values()) <= set(args.grid):
            raise ValueError(f"{name} runs only with a budget whose grid has its rate: {', '.join(BUDGET_GRID)}")
    slug = "".join(c if c.isalnum() else "-" for c in os.path.splitext(args.init)[0]).strip("-")
    args.out_dir = args.out_dir or os.path.join("out", f"compare-{slug}-{args.budget}")
    check_out_dir(args)
    for name in args.methods:                 # train.py's own checks of every method's arguments
        rates = {flag: args.grid[g][0] for flag, g in RATE_FLAGS[METHODS[name][0]].items()}
        check = train_argv(args, name, args.tasks[0], 0, rates, os.path.join(args.out_dir, "runs"))
        train.resolve_args(train.parse_args(check))
    return args


def config(args):                            # what makes a table: one config a folder
    keys = ["init", "budget", *BUDGET_KEYS, "grid", "dtype", "device"]
    return json.loads(json.dumps({k: getattr(args, k) for k in keys}))     # as read back from JSON


def check_out_dir(args):
    """--out-dir: a writable folder (or none yet), holding no other configuration's results."""
    out = args.out_dir
    check_folder(out, files=("results.json", "results.md", "train.log", "progress.log", "config.json"))
    saved = os.path.join(out, "config.json")
    old = read_json(saved) if os.path.exists(saved) else {}
    changed = [key for key, value in config(args).items() if old.get(key) != value]
    if (old or os.path.exists(os.path.join(out, "results.json"))) and changed and not args.force:
        raise ValueError(f"--out-dir {out} holds the results of another configuration ("
                         f"{changed[0]} {old.get(changed[0])} there): choose another, or --force")


def train_argv(args, name, task, seed, lrs, folder):
    rates = " ".join(f"{flag} {value}" for flag, value in lrs.items())
    line = (f"{METHODS[name][2]} {rates} --task {task} --seed {seed} --steps {args.steps} "
            f"--batch-size {args.batch_size} --n-train {args.n_train} --n-eval {args.n_eval} "
            f"--device {args.device} --dtype {args.dtype}").format(r=args.rank, w=round(0.03 * args.steps))
    return line.split() + ["--init", args.init, "--out-dir", folder]   # paths may hold spaces


def run(args, name, task, seed, lrs, log):
    """One train.py run at the rates lrs ({flag: value}), or, when its folder holds a finished
    run with the same arguments, that run read back. -> its results (and outcomes)."""
    rates = stats.rates_text(lrs, "-")
    folder = os.path.join(args.out_dir, "runs", f"{task}-{name}-lr{rates}-seed{seed}")
    argv = train_argv(args, name, task, seed, lrs, folder)
    files = [os.path.join(folder, f) for f in ("results.json", "outcomes.json", "argv.json")]
    reused = all(map(os.path.exists, files)) and read_json(files[2], list) == argv
    if not reused:
        with contextlib.redirect_stdout(log):
            print(f"\n$ python train.py {' '.join(argv)}", flush=True)
            try:
                train.train(train.resolve_args(train.parse_args(argv)))
            except ValueError as e:           # diverged: a sweep's worst candidate, never a result
                print(f"failed: {e}", flush=True)
                return dict(method=name, task=task, seed=seed, lrs=lrs, reused=False, failed=str(e),
                            val_accuracy=-1, accuracy=0, final_loss=math.inf, train_seconds=0)
        write_atomically(files[2], write_text(json.dumps(argv)))    # last: the run is finished
    res, outcomes = read_json(files[0], fields=RESULT_FIELDS), read_json(files[1], fields=dict(val=str, test=str))
    losses = res.pop("losses")                # all of them stay in the run's own results.json
    if not losses or not all(isinstance(x, (int, float)) for x in losses):
        raise ValueError(f"{files[0]}: its losses are not a list of numbers (damaged or edited): delete or restore it")
    return dict(method=name, lrs=lrs, argv=argv, final_loss=statistics.mean(losses[-20:]),
                reused=reused, outcomes=outcomes, **res)


def best(tried):
    """The run with the best validation accuracy; a tie goes to the lowest final training loss."""
    return max(tried, key=lambda r: (r["val_accuracy"], -r["final_loss"]))


def sweep(do, grid):
    """do(lrs) at every point of grid ({flag: [rates]}, several flags step together); while the
    best is at the smallest or largest rate tried, one more step beyond it in the grid's own
    pattern (at most MAX_GROWTH; 3e-3, 1e-2, 3e-2: up 1e-1, then 3e-1; down 1e-3, then 3e-4).
    -> the best run, and whether it is still at an edge of the rates tried."""
    flags = list(grid)
    tried = [do({f: grid[f][i] for f in flags}) for i in range(len(grid[flags[0]]))]
    for _ in range(MAX_GROWTH if len(tried) >= 3 else 0):
        winner, rates = best(tried), sorted(r["lrs"][flags[0]] for r in tried)
        if rates[0] < winner["lrs"][flags[0]] < rates[-1]:
            break
        up, beyond = winner["lrs"][flags[0]] == rates[-1], {}
        for f in flags:                       # a grid step: the ratio of two neighbouring rates
            ladder = sorted(r["lrs"][f] for r in tried)
            step = ladder[-2] / ladder[-3] if up else ladder[1] / ladder[2]
            beyond[f] = float(f"{winner['lrs'][f] * step:.3g}")
        tried.append(do(beyond, extension=True))
    winner, rates = best(tried), [r["lrs"][flags[0]] for r in tried]
    return winner, len(tried) >= 3 and winner["lrs"][flags[0]] in (min(rates), max(rates))


LABEL = {"majority": "majority class (train's commonest answer)", "base": "base model, untrained",
         **{name: METHODS[name][1] for name in METHODS}}


def planned_runs(args, name):
    """A method's runs on one task: its sweep's rates on seed 0, then its other seeds."""
    first_family = next(iter(RATE_FLAGS[METHODS[name][0]].values()))
    return len(args.grid[first_family]) + (args.seeds if name in args.seeded else 1) - 1


def run_all(args, log, progress):
    """Method by method: its sweep on seed 0, then its other seeds at the chosen rate, so that a
    method is finished before the next starts. -> (runs, chosen, edges)"""
    runs, chosen, edges = [], {name: {} for name in args.methods}, []

    def do(phase, name, task, seed, lrs, extension=False):
        progress.plan += extension                           # a grid that grows adds a run
        t0 = time.time()
        runs.append(dict(phase=phase, **run(args, name, task, seed, lrs, log)))
        progress.report(runs[-1], time.time() - t0)
        return runs[-1]

    for task in args.tasks:
        for name in args.methods:             # the sweep on seed 0, then the other seeds
            grid = {flag: args.grid[g] for flag, g in RATE_FLAGS[METHODS[name][0]].items()}
            winner, edge = sweep(functools.partial(do, "sweep", name, task, 0), grid)
            if "failed" in winner:
                raise ValueError(f"{name} on {task} failed at every rate: {winner['failed']}")
            winner["phase"], chosen[name][task] = "final", winner["lrs"]
            edges += [(name, task)] * edge
            for seed in range(1, args.seeds if name in args.seeded else 1):
                if "failed" in do("final", name, task, seed, chosen[name][task]):
                    raise ValueError(f"{name} on {task}, seed {seed}: {runs[-1]['failed']}")
    return runs, chosen, edges


def main(args):
    write_atomically(os.path.join(args.out_dir, "config.json"), write_text(json.dumps(config(args))))
    plan, start = len(args.tasks) * sum(map(functools.partial(planned_runs, args), args.methods)), time.time()
    folders = os.path.join(args.out_dir, "runs")  # finished runs of these rows: run() reads them
    prefixes = tuple(f"{task}-{name}-lr" for task in args.tasks for name in args.methods)
    on_disk = sum(f.startswith(prefixes) and os.path.exists(os.path.join(folders, f, "argv.json"))
                  for f in (os.listdir(folders) if os.path.isdir(folders) else []))
    print(f"{len(args.methods)} methods x {len(args.tasks)} tasks, {args.steps} steps of batch "
          f"{args.batch_size}, budget {args.budget}: {plan} runs, more if a grid grows, "
          f"{on_disk} finished before; into {args.out_dir}", flush=True)
    runtime.warn_if_slow(args)                         # bf16 on a CPU without it: said now, not in hours
    if args.lm and args.device in ("auto", "cpu") and not torch.cuda.is_available():
        to_train = max(0, plan - on_disk)              # a grown grid's runs are not in the plan
        seconds = STEP_SECONDS if runtime.cpu_has_native_bf16() else {"float32": STEP_SECONDS["float32"]}
        hours = {d: to_train * args.steps * seconds[d] / 3600 for d in seconds}      # (bf16's: measured with it)
        print("training alone: about " + " or ".join(f"{h:.1f} h in {d}" for d, h in hours.items())
              + " (a steering step's time; full FT's slower steps and evaluation add)", flush=True)
    progress = stats.Progress(plan, os.path.join(args.out_dir, "progress.log"), on_disk)
    with open(os.path.join(args.out_dir, "train.log"), "a", buffering=1) as log:   # train.py's
        runs, chosen, edges = run_all(args, log, progress)
    finals = [r for r in runs if r["phase"] == "final"]
    majority = {(t, s): stats.majority_baseline(make_splits(t, s, args.n_train, args.n_eval))[1]
                for t, s in {(r["task"], r["seed"]) for r in finals}}    # {(task, seed): test acc.}
    rows = stats.summarize(finals, args.tasks, args.methods, majority)
    table = stats.results_markdown(rows, chosen, edges, finals, args, LABEL)
    outcomes = {f"{r['task']}/{r['method']}/seed{r['seed']}": r["outcomes"]["test"] for r in finals}
    for r in runs:
        r.pop("outcomes", None)               # in each run's folder; the finals' in outcomes.json
    everything = dict(config=config(args), chosen_lrs=chosen, edges=edges, summary=rows, runs=runs)
    write_files(args.out_dir, {"results.md": write_text(table),         # together, or none of them
                               "results.json": write_text(json.dumps(everything, indent=1)),
                               "outcomes.json": write_text(json.dumps(outcomes, indent=0)),
                               "compare.png": functools.partial(stats.chart, rows, args, LABEL)})
    print(f"\n{table}\n{len(runs)} runs, {(time.time() - start) / 60:.1f} min in this sitting; "
          f"wrote {args.out_dir}/results.md, results.json, outcomes.json, compare.png")
    return rows


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:  # train.py raises every user error as a ValueError: one line
        print(f"compare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # train.py stops after its step; finished runs are on disk
        print("compare.py: stopped (Ctrl-C): run the same command to go on", file=sys.stderr)
        sys.exit(130)
