"""
experiments/claims_figure.py: the paper's three claims (THEORY §9) with their verdicts on both models,
drawn from the committed comparison results into one slide (docs/claims.png). Re-run it whenever
results/compare/results.json or results/smollm2/verdict/results.json change:

    python experiments/claims_figure.py

Each claim is experiments/stats.CLAIMS's comparison of two methods' test accuracy, a − b in points,
averaged over the tasks and seeds of the comparison (experiments/compare.py's "final" runs):
  1. post-block within 1 point of full fine-tuning
  2. post-block ahead of post-MLP and of pre-MLP  (both differences > 0)
  3. joint ahead of LoRA and of post-block alone  (both differences > 0)
Where the comparison saved its per-prompt outcomes (outcomes.json beside results.json), the 95%
interval is experiments/stats.paired_interval's: paired prompt by prompt, bootstrapped over the (task,
seed) pairs and their prompts. Where it did not (results/compare predates them), it is an unpaired
approximation, 1.96 · √(prompt noise² + seed noise²): prompt noise is the binomial standard error
of each accuracy over its N test prompts (tasks × seeds × n_eval), seed noise the standard error of
the per-seed differences (none with one seed); it is wider than the paired one. The words are
experiments/stats.verdict's: "holds" if the whole interval agrees with the claim, "does not hold" if it
contradicts it, else "cannot tell at ±x points".
"""
import json
import sys
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                   # run as a script: model.py is one folder up
    sys.path.insert(0, str(ROOT))
from machinery.checks import OneLineParser  # noqa: E402
from machinery.files import write_atomically  # noqa: E402
from experiments.stats import CLAIMS, combined, paired_interval, table_config, verdict  # noqa: E402

LABEL = {"linear_block_out": "post-block", "full": "full fine-tuning", "linear_mlp_out": "post-MLP",
         "linear_attn_out": "pre-MLP", "joint": "joint", "lora": "LoRA"}


def seed_averages(results, method):
    """{seed: accuracy averaged over the tasks} of one method's final runs."""
    by_seed = {}
    for run in results["runs"]:
        if run["phase"] == "final" and run["method"] == method:
            by_seed.setdefault(run["seed"], []).append(run["accuracy"])
    return {seed: float(np.mean(accs)) for seed, accs in by_seed.items()}


def difference(results, a, b, outcomes=None):
    """(a − b, low, high) in points: the difference over the seeds both methods ran and its ~95%
    interval; paired when outcomes ({"task/method/seedN": "0110..."}) are given."""
    acc_a, acc_b = seed_averages(results, a), seed_averages(results, b)
    seeds = sorted(set(acc_a) & set(acc_b))
    if not seeds:
        raise ValueError(f"no final runs of both {a} and {b} in the results")
    config = table_config(results)
    if outcomes is not None:                  # one pair of runs per (task, seed), same prompts
        return paired_interval([(outcomes[f"{task}/{a}/seed{s}"], outcomes[f"{task}/{b}/seed{s}"])
                                for task in config["tasks"] for s in seeds])
    diffs = np.array([acc_a[s] - acc_b[s] for s in seeds])
    n = config["n_eval"] * len(config["tasks"]) * len(seeds)                     # prompts
    p_a, p_b = np.mean([acc_a[s] for s in seeds]), np.mean([acc_b[s] for s in seeds])
    prompt_se = np.sqrt(p_a * (1 - p_a) / n + p_b * (1 - p_b) / n)
    seed_se = diffs.std(ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
    half = 100 * 1.96 * np.sqrt(prompt_se ** 2 + seed_se ** 2)
    return 100 * diffs.mean(), 100 * diffs.mean() - half, 100 * diffs.mean() + half


def verdicts(results, outcomes=None):
    """-> ([(claim, label, diff, low, high, word)] per comparison of experiments/stats.CLAIMS,
    {claim: word}); the words are experiments/stats.verdict's and experiments/stats.combined's."""
    rows = []
    for claim, a, b, kind in CLAIMS:
        diff, low, high = difference(results, a, b, outcomes)
        rows.append((claim, f"{LABEL[a]} − {LABEL[b]}", diff, low, high, verdict(kind, low, high)))
    claims = list(dict.fromkeys(claim for claim, *_ in CLAIMS))        # the three, in order
    return rows, {claim: combined([r[-1] for r in rows if r[0] == claim]) for claim in claims}


def draw(models):
    """models: {name: (rows, words)} -> the figure: one row per comparison, one marker per model,
    the claim's combined verdict per model in the right-hand column."""
    with plt.rc_context({"font.size": 12}):
        fig, ax = plt.subplots(figsize=(7.4, 5.2))
        labels = [label for _, label, *_ in next(iter(models.values()))[0]]
        y = np.arange(len(labels))[::-1]
        for i, (name, (rows, _)) in enumerate(models.items()):
            diffs = np.array([r[2] for r in rows])
            bars = [diffs - [r[3] for r in rows], [r[4] for r in rows] - diffs]   # to low, to high
            ax.errorbar(diffs, y + 0.15 - 0.3 * i, xerr=bars, fmt="os"[i], capsize=4, label=name)
        ax.axvline(0, color="gray", lw=1)
        ax.axvspan(-1, 1, color="gray", alpha=0.15)                 # "within 1 point"
        ax.set(yticks=y, yticklabels=labels, xlabel="a − b, test accuracy (points), ~95% interval")
        claims = list(next(iter(models.values()))[1])
        lines = [f"{i}. {claim}\n    " + "; ".join(f"{name.split(':')[0]}: {words[claim]}"
                                                 for name, (_, words) in models.items())
                 for i, claim in enumerate(claims, 1)]
        fig.text(0.01, -0.02, "The paper's three claims, verdicts:\n" + "\n".join(lines), va="top")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=1, frameon=False)
    return fig


def main(argv=None):
    parser = OneLineParser(description="Draw the paper's three claims with verdicts.")
    parser.add_argument("--nano", default="results/compare/results.json")
    parser.add_argument("--smollm2", default="results/smollm2/verdict/results.json")
    parser.add_argument("--out", default="docs/claims.png")
    args = parser.parse_args(argv)
    models = {}
    for name, path in (("miniature", args.nano), ("SmolLM2-135M", args.smollm2)):
        saved = (ROOT / path).with_name("outcomes.json")        # per-prompt outcomes, if any
        try:
            results = json.loads((ROOT / path).read_text(encoding="utf-8"))
            outcomes = json.loads(saved.read_text(encoding="utf-8")) if saved.exists() else None
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read it ({e})") from None
        config = table_config(results)
        counts = sorted({len(seed_averages(results, method)) for method in LABEL})  # seeds a method ran
        seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        name = f"{name}: {len(config['tasks'])} task(s) × {seeds} seed(s)"
        models[name] = verdicts(results, outcomes)
        print(f"{name}: {path}, tasks {', '.join(config['tasks'])}, "
              + ("paired on outcomes.json" if outcomes else "unpaired (no outcomes.json)"))
        for claim, label, diff, low, high, word in models[name][0]:
            print(f"  {label:<32} {diff:+6.1f} [{low:+6.1f}, {high:+6.1f}] points: {word}")
    fig = draw(models)
    write_atomically(str(ROOT / args.out), partial(fig.savefig, dpi=150, bbox_inches="tight"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"experiments/claims_figure.py: error: {e}", file=sys.stderr)
        sys.exit(2)
