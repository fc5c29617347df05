"""
experiments/curve.py: does post-block close on full fine-tuning with more training? SmolLM2's
listops comparisons at 300 (budget lm-verdict), 1000 (lm-1000) and 3000 (lm-3000) steps of batch 16,
read from their committed folders (a budget not run yet is left out), as one learning curve:

    python experiments/curve.py      # writes results/smollm2/curve.md and docs/curve.png

For every budget and method: test accuracy over its seeds with a 95% interval (stats.accuracy_interval,
seeds then prompts); claim 1, post-block within a point of full fine-tuning, with its paired interval
and verdict (stats.paired_interval, stats.verdict); where steerling's recipe ran, the same for it,
and whether it is ahead of ours.
"""
import json
import sys
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                   # run as a script: the core is one folder up
    sys.path.insert(0, str(ROOT))
from experiments.stats import accuracy_interval, paired_interval, table_config, verdict  # noqa: E402
from machinery.checks import OneLineParser  # noqa: E402
from machinery.figures import SLIDE  # noqa: E402
from machinery.files import write_files, write_text  # noqa: E402

TABLES = ["results/smollm2/verdict", "results/smollm2/curve-1000", "results/smollm2/curve-3000"]
METHODS = {"full": "full fine-tuning", "lora": "LoRA", "linear_block_out": "post-block (ours)",
           "recipe_block_out": "post-block, steerling's recipe"}


def budgets(task="listops"):
    """[(steps, examples seen, {method: {seed: test outcomes}})] of the tables that exist."""
    found = []
    for folder in TABLES:
        if not (ROOT / folder / "outcomes.json").is_file():
            continue
        config = table_config(json.loads((ROOT / folder / "results.json").read_text(encoding="utf-8")))
        runs = {}
        for key, text in json.loads((ROOT / folder / "outcomes.json").read_text(encoding="utf-8")).items():
            run_task, method, seed = key.split("/")
            if run_task == task and method in METHODS:
                runs.setdefault(method, {})[int(seed.removeprefix("seed"))] = text
        found.append((config["steps"], config["steps"] * config["batch_size"], runs))
    return found


# (a, b, the claim's kind, its words): claim 1 first; then whether steerling's recipe moves the gap
COMPARISONS = [("linear_block_out", "full", "within", "claim 1: post-block − full fine-tuning"),
               ("recipe_block_out", "full", "within", "steerling's recipe − full fine-tuning"),
               ("recipe_block_out", "linear_block_out", "ahead", "steerling's recipe − post-block (ours)")]


def compare(runs, a, b, kind):
    """a − b over the seeds both ran: (difference, low, high, verdict, seeds), or None."""
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    if not seeds:
        return None
    difference, low, high = paired_interval([(runs[a][s], runs[b][s]) for s in seeds])
    return difference, low, high, verdict(kind, low, high), len(seeds)


def table(found):
    lines = ["| steps | examples seen | method | seeds | test accuracy (%) | 95% interval |",
             "|---:|---:|---|---:|---:|---|"]
    for steps, seen, runs in found:
        for method, by_seed in runs.items():
            mean, low, high = accuracy_interval(list(by_seed.values()))
            lines.append(f"| {steps} | {seen:,} | {METHODS[method]} | {len(by_seed)} | {mean:.1f} | "
                         f"[{low:.1f}, {high:.1f}] |")
    lines += ["", "| steps | comparison (a − b, points) | difference | seeds | 95% interval | verdict |",
              "|---:|---|---:|---:|---|---|"]
    for steps, _, runs in found:
        for a, b, kind, words in COMPARISONS:
            paired = compare(runs, a, b, kind)
            if paired:
                difference, low, high, word, seeds = paired
                lines.append(f"| {steps} | {words} | {difference:+.1f} | {seeds} | [{low:+.1f}, {high:+.1f}] | {word} |")
    return "\n".join(lines) + "\n"


def figure(found, path):
    """Accuracy against examples seen, per method, with 95% intervals; claim 1's word at each budget."""
    with plt.rc_context(SLIDE):
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, (method, label) in enumerate(METHODS.items()):
            shift = 1.04 ** (i - 1.5)                    # side by side, so the intervals do not hide
            points = [(seen * shift, *accuracy_interval(list(runs[method].values())))
                      for _, seen, runs in found if method in runs]
            if points:
                x, y, low, high = zip(*points)
                ax.errorbar(x, y, yerr=[[m - lo for m, lo in zip(y, low)], [hi - m for m, hi in zip(y, high)]],
                            marker="o", capsize=4, label=label, ls="-" if len(x) > 1 else "none")
        for steps, seen, runs in found:
            claim = compare(runs, *COMPARISONS[0][:3])
            if claim:
                word = claim[3].replace("cannot tell at", "cannot tell,")
                ax.annotate(f"{claim[0]:+.1f} ({claim[4]} seed{'s' * (claim[4] > 1)})\n{word}", (seen, 0.03),
                            xycoords=("data", "axes fraction"), ha="center", fontsize=12)
        ax.set(xscale="log", xlabel="training examples seen (steps × 16)", ylabel="test accuracy (%)",
               title="SmolLM2-135M on listops: post-block against full fine-tuning\n"
                     "(claim 1 at each budget: post-block − full, points)")
        ax.set_xticks([seen for _, seen, _ in found], [f"{seen:,}\n({steps} steps)" for steps, seen, _ in found])
        ax.set_xticks([], minor=True)
        ax.set_xlim(found[0][1] / 1.6, found[-1][1] * 1.6)
        ax.set_ylim(ax.get_ylim()[0] - 3, ax.get_ylim()[1])            # room for the verdicts
        ax.legend(loc="upper left")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)


def main():
    found = budgets()
    if not found:
        raise ValueError("none of the curve's comparisons has run yet: see RESULTS.md for their commands")
    text = ("# SmolLM2 listops: the learning curve\n\nWritten by `python experiments/curve.py` from "
            + ", ".join(f"`{t}`" for t in TABLES) + ".\n\n" + table(found))
    write_files(str(ROOT / "results" / "smollm2"), {"curve.md": write_text(text)})
    write_files(str(ROOT / "docs"), {"curve.png": partial(figure, found)})
    print(text + "\nwrote results/smollm2/curve.md and docs/curve.png")


if __name__ == "__main__":
    try:
        OneLineParser(description="The learning curve: results/smollm2/curve.md, docs/curve.png.").parse_args()
        main()
    except ValueError as e:
        print(f"experiments/curve.py: error: {e}", file=sys.stderr)
        sys.exit(2)
