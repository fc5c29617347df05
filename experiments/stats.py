"""
experiments/stats.py: how sure a difference in accuracy between two methods is, from which prompts each
one got right. Two runs scored on the SAME prompts are compared prompt by prompt (paired): a
prompt both got right or both got wrong says nothing about which method is better; only the
discordant prompts, right for one and wrong for the other, do. That resolves much smaller
differences than two accuracies with independent intervals.

A run's outcomes are a string, character i "1" iff prompt i was answered exactly (train.py's
outcomes.json). Differences and intervals are in accuracy points (percent).

    paired_difference(a, b)     mean accuracy of a minus b, points
    mcnemar_p(a, b)             exact two-sided McNemar p of one pair of runs
    paired_interval(pairs)      95% bootstrap interval; a pair per seed (each its own prompts)
    accuracy_interval(runs)     one method's accuracy and its 95% interval, the same bootstrap
    verdict(claim, lo, hi)      "holds" / "does not hold" / "cannot tell at ±x points"
    claims_table(...)           the paper's three claims, each comparison with its interval
and compare.py's report of them: Progress (a line a run, with an ETA), summarize (mean ± std over
seeds per method), results_markdown (results.md: the table, then the claims), chart (compare.png).
"""
import math
import statistics
from collections import Counter

import numpy as np

RESAMPLES = 10_000
LEVEL = 95                  # the intervals are 95% (percentile bootstrap)


def outcomes(text):
    """'0110...' -> an array of 0/1 (1: answered exactly)."""
    if not text or set(text) - {"0", "1"}:
        raise ValueError(f"outcomes must be a non-empty string of 0 and 1, got {text[:20]!r}")
    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def discordant(a, b):
    """(n10, n01): prompts only a got right, prompts only b got right."""
    a, b = outcomes(a), outcomes(b)
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same prompts: {len(a)} against {len(b)}")
    return int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))


def paired_difference(a, b):
    """accuracy(a) - accuracy(b) in points = 100 · (n10 - n01) / n: concordant prompts cancel."""
    n10, n01 = discordant(a, b)
    return 100 * (n10 - n01) / len(a)


def mcnemar_p(a, b):
    """Exact two-sided McNemar test. If a and b were equally good, each of the n = n10 + n01
    discordant prompts would go either way with probability 1/2, so n10 ~ Binomial(n, 1/2):
        p = min(1, 2 · Σ_{i=0..k} C(n, i) / 2^n),  k = min(n10, n01)
    (exact integers, so no normal approximation; no discordant prompt: p = 1)."""
    n10, n01 = discordant(a, b)
    n, k = n10 + n01, min(n10, n01)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def prompt_resamples(a, b, resamples, rng):
    """The paired difference (points) of `resamples` bootstrap samples: n prompts drawn with
    replacement. A draw only matters through its kind (only a right: +1, only b right: -1,
    concordant: 0), so drawing n prompts is drawing the three counts from a multinomial with the
    observed shares: difference = 100 · (count(+1) - count(-1)) / n."""
    n10, n01 = discordant(a, b)
    n = len(a)
    counts = rng.multinomial(n, [n10 / n, n01 / n, (n - n10 - n01) / n], size=resamples)
    return 100 * (counts[:, 0] - counts[:, 1]) / n


def paired_interval(pairs, resamples=RESAMPLES, seed=0):
    """pairs: [(outcomes of a, outcomes of b)], one pair per training seed, each seed scored on
    its own prompts. -> (difference, low, high) in points: the mean over seeds of each seed's
    paired difference, and its 95% percentile interval from a hierarchical bootstrap that
    resamples both sources of noise: S seeds drawn with replacement, then within each drawn seed
    its prompts with replacement (a fresh draw each time the seed is drawn). With one seed this
    is the plain paired bootstrap over prompts. With few seeds (3) the seed level has few
    distinct draws, so the interval is rough, but it is no longer blind to training variance."""
    if not pairs:
        raise ValueError("paired_interval needs at least one pair of runs")
    rng = np.random.default_rng(seed)
    S = len(pairs)
    picks = rng.integers(0, S, size=(resamples, S))      # the seeds of each bootstrap sample
    total = np.zeros(resamples)
    for slot in range(S):
        for s, (a, b) in enumerate(pairs):
            draws = prompt_resamples(a, b, resamples, rng)
            total += np.where(picks[:, slot] == s, draws, 0.0)
    low, high = np.percentile(total / S, [(100 - LEVEL) / 2, (100 + LEVEL) / 2])
    difference = sum(paired_difference(a, b) for a, b in pairs) / S
    return difference, float(low), float(high)


def accuracy_interval(runs, resamples=RESAMPLES, seed=0):
    """runs: one method's outcome strings, one per training seed. -> (mean accuracy, low, high) in
    points, from the same hierarchical bootstrap as paired_interval: S seeds drawn with
    replacement, then each drawn seed's prompts (the number right ~ Binomial(n, its accuracy))."""
    rng = np.random.default_rng(seed)
    accuracies = [outcomes(r).mean() for r in runs]
    picks = rng.integers(0, len(runs), size=(resamples, len(runs)))
    draws = np.stack([rng.binomial(len(r), acc, size=resamples) / len(r)       # (seeds, resamples)
                      for r, acc in zip(runs, accuracies)])
    total = sum(draws[picks[:, slot], np.arange(resamples)] for slot in range(len(runs)))
    low, high = np.percentile(100 * total / len(runs), [(100 - LEVEL) / 2, (100 + LEVEL) / 2])
    return 100 * float(np.mean(accuracies)), float(low), float(high)


def verdict(claim, low, high, margin=1.0):
    """The claim's word from the 95% interval [low, high] of a - b (points):
    "ahead" (a is better than b): holds if the whole interval is above 0; does not hold if the
        whole interval is at or below 0 (b at least as good); else cannot tell.
    "within" (a is within ±margin of b, an equivalence claim): holds if the whole interval lies
        inside [-margin, +margin]; does not hold if it lies wholly outside (entirely below
        -margin or entirely above +margin); else cannot tell. (The "two one-sided tests" idea,
        with a 95% rather than 90% interval: stricter.)
    "cannot tell" carries the resolution: ±half the interval's width."""
    if claim == "ahead":
        holds, fails = low > 0, high <= 0
    elif claim == "within":
        holds, fails = -margin <= low and high <= margin, high < -margin or low > margin
    else:
        raise ValueError(f"unknown claim kind {claim!r}: use 'ahead' or 'within'")
    if holds:
        return "holds"
    if fails:
        return "does not hold"
    return f"cannot tell at ±{(high - low) / 2:.1f} points"


def combined(words):
    """One claim made of several comparisons (post-block ahead of post-MLP AND of pre-MLP): holds
    if every one holds, does not hold if any one does not, else cannot tell."""
    if all(w == "holds" for w in words):
        return "holds"
    if "does not hold" in words:
        return "does not hold"
    return "cannot tell"


# the paper's three claims (THEORY §9) as comparisons of a - b: (claim, a, b, kind of claim)
BLOCK_VS_FULL = "post-block within 1 point of full fine-tuning"
BLOCK_VS_SITES = "post-block ahead of post-MLP and of pre-MLP"
JOINT_VS_PARTS = "joint ahead of LoRA and of post-block alone"
CLAIMS = [(BLOCK_VS_FULL, "linear_block_out", "full", "within"),
          (BLOCK_VS_SITES, "linear_block_out", "linear_mlp_out", "ahead"),
          (BLOCK_VS_SITES, "linear_block_out", "linear_attn_out", "ahead"),
          (JOINT_VS_PARTS, "joint", "lora", "ahead"),
          (JOINT_VS_PARTS, "joint", "linear_block_out", "ahead")]


def claims_table(test_outcomes, label):
    """Markdown rows of every comparison of CLAIMS on one task, and each claim's verdict.
    test_outcomes: {(method, seed): outcome string}; label: {method: row label}. A comparison
    pairs the seeds both methods ran; McNemar's p is given for a single seed only."""
    rows, words = [], {}
    for claim, a, b, kind in CLAIMS:
        seeds = sorted(s for m, s in test_outcomes if m == a and (b, s) in test_outcomes)
        if not seeds:
            continue
        pairs = [(test_outcomes[a, s], test_outcomes[b, s]) for s in seeds]
        difference, low, high = paired_interval(pairs)
        p = f"{mcnemar_p(*pairs[0]):.3g}" if len(seeds) == 1 else "–"
        word = verdict(kind, low, high)
        words.setdefault(claim, []).append(word)
        rows.append(f"| {label[a]} − {label[b]} | {len(seeds)} | {difference:+.1f} | "
                    f"[{low:+.1f}, {high:+.1f}] | {p} | {word} |")
    head = ["| comparison (a − b) | seeds | difference (points) | 95% interval | McNemar p | "
            "verdict |", "|---|---:|---:|---|---:|---|"]
    parts = Counter(claim for claim, *_ in CLAIMS)                # comparisons a claim is made of
    claims = [f"- {claim}: **{combined(w)}**" if len(w) == parts[claim] else
              f"- {claim}: no verdict, {len(w)} of its {parts[claim]} comparisons run" for claim, w in words.items()]
    return head + rows + [""] + claims


# ---------------------------------------------------------------------------------------------
# the table: means and spreads over seeds


def mean_std(values):
    """(mean, sample standard deviation with n - 1); the spread of one value is 0."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_config(results):
    """A comparison's results.json -> its budget (tasks, seeds, steps, n_eval, ...): compare.py
    writes it under "config"; results/compare and results/smollm2/compare hold it under "budget"."""
    return results["config"] if "config" in results else results["budget"]


def majority_baseline(splits):
    """Answer every test prompt with train's commonest completion -> (it, its test accuracy)."""
    answer = Counter(c for _, c in splits["train"]).most_common(1)[0][0]
    return answer, statistics.mean(c == answer for _, c in splits["test"])


def summarize(finals, tasks, methods, majority):
    """Per method, and for two rows without training (majority: the majority class's {(task,
    seed): accuracy}; base: the base model, measured by train.py before each run): test accuracy
    (mean, std) over its seeds per task and of the average over tasks (per seed first); its
    number of seeds; trainable params and %; mean training seconds per run."""
    accuracies = {"majority": majority, "base": {(r["task"], r["seed"]): r["base_accuracy"]
                                                 for r in finals}}
    for name in methods:
        accuracies[name] = {(r["task"], r["seed"]): r["accuracy"] for r in finals
                            if r["method"] == name}
    rows = {}
    for name, acc in accuracies.items():
        seeds = sorted({s for _, s in acc})
        mine = [r for r in finals if r["method"] == name]
        first = mine[0] if mine else dict(trainable_params=0, trainable_pct=0.0)
        rows[name] = {t: mean_std([acc[t, s] for s in seeds]) for t in tasks}
        per_seed = [statistics.mean(acc[t, s] for t in tasks) for s in seeds]
        seconds = statistics.mean(r["train_seconds"] for r in mine) if mine else 0.0
        rows[name].update(average=mean_std(per_seed), seeds=len(seeds), seconds=seconds,
                          params=first["trainable_params"], pct=first["trainable_pct"])
    return rows


# ---------------------------------------------------------------------------------------------
# compare.py's report: results.md and compare.png


def rates_text(lrs, sep="/"):                 # {"--lr": 0.001} -> "1e-03"
    return sep.join(f"{v:.1e}".replace(".0e", "e") for v in lrs.values())


def results_markdown(rows, chosen, edges, finals, args, label):
    """results.md: the table of summarize's rows with each method's chosen rates (* = at an edge
    of the rates tried), its footnote, and the paper's claims task by task."""
    cols = args.tasks + ["average"]
    lines = [f"| method | {' | '.join(cols)} | seeds | trainable params | % of model | s / run | "
             f"lr: {', '.join(args.tasks)} |", "|---|" + "---:|" * (len(cols) + 4) + "---|"]
    for name, row in rows.items():
        cells = " | ".join(f"{100 * row[c][0]:.1f} ± {100 * row[c][1]:.1f}" for c in cols)
        star = {t: "*" * ((name, t) in edges) for t in args.tasks}     # * = at an edge of the grid
        lrs = "–" if name not in chosen else ", ".join(rates_text(chosen[name][t]) + star[t]
                                                       for t in args.tasks)
        lines.append(f"| {label[name]} | {cells} | {row['seeds']} | {row['params']:,} | "
                     f"{row['pct']:.3f} | {row['seconds']:.1f} | {lrs} |")
    at_edge = f"; * = at an edge of the lrs tried: {', '.join(f'{n} on {t}' for n, t in edges)}"
    lines += ["", f"Test accuracy (%), mean ± std over each method's seeds ({args.n_eval} test "
              f"prompts a task and seed). Every method {args.steps} steps of batch "
              f"{args.batch_size}, rank {args.rank}, on {args.init}, --dtype {args.dtype}. lr: "
              "each method's own, chosen on the validation split (seed 0); joint: shift lr/LoRA lr"
              + (at_edge if edges else "") + "."]
    for task in args.tasks:                   # paired prompt by prompt
        mine = [r for r in finals if r["task"] == task]
        outcomes = {(r["method"], r["seed"]): r["outcomes"]["test"] for r in mine}
        lines += ["", f"### The paper's claims on {task}", ""] + claims_table(outcomes, label)
    return "\n".join(lines) + "\n"


def chart(rows, args, label, path):
    """Each row's test accuracy averaged over tasks, with its spread over seeds: one horizontal bar
    a method, its name and parameter share in 12-pt text, for a slide (8 inches at 150 dpi)."""
    from matplotlib.figure import Figure      # draws to a file, leaves pyplot's backend alone
    names = list(rows)[::-1]                  # the table's first row on top
    fig = Figure(figsize=(8, 1.2 + 0.42 * len(names)), layout="tight")
    ax = fig.subplots()
    ax.barh(range(len(names)), [100 * rows[n]["average"][0] for n in names], capsize=3,
            xerr=[100 * rows[n]["average"][1] for n in names], color="grey")
    ax.set_yticks(range(len(names)), [f"{label[n]} ({rows[n]['pct']:.2f}%)" for n in names], fontsize=12)
    ax.tick_params(axis="x", labelsize=12)
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%), mean ± std over seeds\n(in brackets: the share of parameters trained)",
                  fontsize=12)
    fig.suptitle(f"{args.init}, {', '.join(args.tasks)}: {args.steps} steps, rank {args.rank}", fontsize=12)
    fig.savefig(path, dpi=150, format="png")


class Progress:
    """A line a run (console, progress.log); its ETA counts the runs to train, not to read back."""
    def __init__(self, plan, path, unread):
        self.plan, self.path, self.unread = plan, path, unread
        self.done, self.trained, self.seconds = 0, 0, 0.0

    def report(self, r, seconds):
        self.done, self.unread = self.done + 1, max(0, self.unread - r["reused"])
        if not r["reused"]:
            self.trained, self.seconds = self.trained + 1, self.seconds + seconds
        eta = self.seconds / max(1, self.trained) * max(0, self.plan - self.done - self.unread) / 60
        line = (f"run {self.done:3d}/{self.plan} | {r['phase']:5s} | {r['task']:7s} | "
                f"{r['method']:19s} | seed {r['seed']} | lr {rates_text(r['lrs']):15s} | "
                f"val {r['val_accuracy']:.3f} | test {r['accuracy']:.3f} | "
                f"{r['train_seconds']:5.0f} s | " + ("done before" if r["reused"] else
                                                    f"eta {eta:5.1f} min"))
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:      # a log: appended line by line
            print(line, file=f)
