"""
experiments/real_finetune.py: the miniature's real fine-tune, measured site by site (what it prints is
committed as results/real_finetune.log; docs/THEORY.md §4–§6 quote it).

Every weight of the committed base (results/base/model.pt) is fine-tuned on boolq: 150 steps of batch 64,
5,000 training rows, seed 0 (notebook 2's full version). On 16 boolq test prompts it prints, block
by block: the share of the block's change a rank-4 linear steer recovers at each site, the skip
share (within the block, and over the whole model; per token, its range and how many tokens lie
outside [0, 1]), the MLP's share of the write on these prompts; then the W_proj = 0 case
(equivalence.py's random update, not the fine-tune), and the oracle shift's rank. Then, fitted on 64
boolq training rows: the oracle fits at block 2, and each steer's KL(fine-tuned ‖ steered) on the
16 test prompts. About 1.5 minutes on one core, from the repository root; the same seed gives the
same numbers on the same CPU.

    python experiments/real_finetune.py > results/real_finetune.log
"""
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]          # run as a script: the repo root
import course  # noqa: E402
import equivalence as eq  # noqa: E402
import nanosteer as ns  # noqa: E402
import tasks  # noqa: E402
from model import GPT  # noqa: E402

from machinery.checks import OneLineParser  # noqa: E402
from train import BASE_CHECKPOINT as BASE  # noqa: E402


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = tempfile.mkdtemp()
    base = ns.freeze(GPT.load(BASE).double().eval())
    idx, _ = tasks.pack(tasks.make_splits("boolq", seed=0, n_train=0)["test"][:16],
                        tasks.get_tokenizer("bytes"), base.config.block_size)
    course.train_quietly(["--mode", "weight", "--lora-rank", "0", "--task", "boolq", "--init", BASE,
                          "--steps", "150", "--batch-size", "64", "--n-train", "5000",
                          "--out-dir", work])
    tuned = ns.freeze(GPT.load(work + "/model.pt").double().eval())
    with torch.no_grad(), ns.capture(base) as a_base, ns.capture(tuned) as a_tuned:
        base(idx), tuned(idx)
    blocks = list(base.transformer.h)
    streams = [base.embed(idx)] + a_base["block_out"][:-1]          # what enters each block
    for layer, (block, block_tuned) in enumerate(zip(blocks, tuned.transformer.h)):
        tuned_params = dict(block_tuned.named_parameters())
        update = {name: tuned_params[name] - p for name, p in block.named_parameters()}
        table, _ = eq.where_to_steer(block, streams[layer], update)
        shares = " ".join(f"{site} {table[site]['linear']:.3f}" for site in eq.SITES)
        # skip share ⟨δp, δz⟩/‖δz‖² (THEORY §5): within the block (the base block's input, only its
        # own update), then over the whole model (every earlier update arrives in x too)
        within, per_token = eq.skip_share(block, streams[layer], update)
        dp = (a_tuned["resid_mid"][layer] - a_base["resid_mid"][layer]).flatten(0, -2)
        dz = (a_tuned["block_out"][layer] - a_base["block_out"][layer]).flatten(0, -2)
        whole = (dp * dz).sum(-1) / (dz * dz).sum(-1)                      # one per token
        y, a = a_base["mlp_out"][layer], a_base["attn_out"][layer]     # MLP share: ‖y‖/(‖y‖ + ‖a‖)
        mlp_share = (y.norm(dim=-1) / (y.norm(dim=-1) + a.norm(dim=-1))).mean().item()
        outside = round(per_token["outside"] * len(whole)), ((whole < 0) | (whole > 1)).sum().item()
        print(f"block {layer}: linear shares {shares} | skip share within {within:.2f} (per token "
              f"{per_token['min']:.2f} to {per_token['max']:.2f}, {outside[0]} outside [0, 1]), "
              f"whole model {((dp * dz).sum() / (dz * dz).sum()).item():.2f} (per token "
              f"{whole.min().item():.2f} to {whole.max().item():.2f}, {outside[1]} outside) of "
              f"{len(whole)} tokens | MLP share {mlp_share:.2f}")
    mid = len(blocks) // 2
    zero = eq.wproj_zero(blocks[mid], streams[mid])
    print(f"W_proj = 0, block {mid}, a random update (not the fine-tune) on these prompts: "
          f"best post-MLP {zero['mlp_out']:.3f}, linear post-block {zero['block_out']:.3f}")
    deltas = ns.oracle(base, tuned, idx)
    print("rank90 oracle / base output per block:",
          [(eq.rank90(d.flatten(0, 1)), eq.rank90(z.flatten(0, 1)))
           for d, z in zip(deltas, a_base["block_out"])],
          "noise", eq.rank90(torch.randn_like(deltas[0].flatten(0, 1))))
    fit = tasks.make_splits("boolq", seed=0, n_train=64)["train"]
    idx_fit, _ = tasks.pack(fit, tasks.get_tokenizer("bytes"), base.config.block_size)
    s, delta = course.oracle_inputs(base, tuned, idx_fit, "block_out")[mid]
    linear = course.share_recovered(course.fit_oracle(s, delta, "linear", 4)[0], s, delta)
    nonlinear = course.share_recovered(course.fit_oracle(s, delta, "nonlinear", 4)[0], s, delta)
    from_random = course.fit_oracle(s, delta, "nonlinear random", 4, (0, 1, 2))[1]
    print(f"oracle fits on 64 training rows, block {mid}, rank 4: linear {linear:.3f}, nonlinear "
          f"from the linear start {nonlinear:.3f}, from random starts "
          f"{'/'.join(f'{v:.3f}' for v in from_random)}")
    table = course.oracle_table(base, tuned, idx_fit, idx, rank=4, seeds=(0, 1, 2))
    print("KL(fine-tuned ‖ steered) on the 16 test prompts, each steer fitted at every layer on "
          "the 64 training rows (its share recovered there, per layer):")
    for name, (shares, kl) in table.items():
        print(f"KL {name}: {kl:.3g} (shares " + " ".join(f"{v:.3f}" for v in shares) + ")")


if __name__ == "__main__":
    OneLineParser(description="THEORY's real fine-tune, measured site by site (prints to stdout).").parse_args()
    main()
