"""
Tests of experiments/stats.py on stubbed per-prompt outcomes: the paired difference, McNemar's exact p
worked out by hand from binomial terms, bootstrap intervals on cases whose answer is known (and
against the normal approximation), the seed-and-prompt interval, and the verdict words; the
comparison table's mean ± std against an independent computation.

Run:  python -m pytest tests/test_stats.py -q
"""
import math

import pytest
import torch

from experiments import stats


def pair(n10, n01, n11, n00):
    """Outcome strings of a and b with n10 prompts only a right, n01 only b right, n11 both, n00
    neither (in that order)."""
    a = "1" * n10 + "0" * n01 + "1" * n11 + "0" * n00
    b = "0" * n10 + "1" * n01 + "1" * n11 + "0" * n00
    return a, b


def test_paired_difference_counts_only_the_discordant_prompts():
    a, b = pair(n10=30, n01=55, n11=800, n00=115)
    assert stats.discordant(a, b) == (30, 55)
    # accuracies 830/1000 and 855/1000: the difference is -2.5 points
    assert stats.paired_difference(a, b) == pytest.approx(100 * (830 - 855) / 1000)


def test_mcnemar_p_equals_a_hand_computation_from_binomial_terms():
    a, b = pair(n10=2, n01=8, n11=50, n00=40)
    # n = 10 discordant prompts, k = 2: P(X <= 2) for X ~ Binomial(10, 1/2) is
    # (C(10,0) + C(10,1) + C(10,2)) / 2^10 = (1 + 10 + 45) / 1024; two-sided: twice that
    assert stats.mcnemar_p(a, b) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.mcnemar_p(b, a) == stats.mcnemar_p(a, b)                   # symmetric
    assert stats.mcnemar_p(*pair(5, 5, 10, 0)) == 1.0                        # balanced: capped at 1
    assert stats.mcnemar_p(*pair(0, 0, 10, 10)) == 1.0                       # nothing discordant
    assert stats.mcnemar_p(*pair(0, 6, 0, 0)) == pytest.approx(2 / 64)       # all one way: 2 · 2^-6


def test_bootstrap_interval_of_known_cases():
    assert stats.paired_interval([pair(0, 0, 40, 60)]) == (0.0, 0.0, 0.0)    # nothing discordant
    assert stats.paired_interval([pair(50, 0, 0, 0)]) == (100.0, 100.0, 100.0)  # all one way
    # all discordant prompts one way (10 of 100): every resample has difference 100·K/100, K ~
    # Binomial(100, 0.1): 2.5% and 97.5% quantiles 5 and 16 (by hand from the binomial CDF)
    difference, low, high = stats.paired_interval([pair(10, 0, 45, 45)])
    cdf = [sum(math.comb(100, i) * 0.1 ** i * 0.9 ** (100 - i) for i in range(k + 1)) for k in range(101)]
    assert difference == 10.0
    assert low == next(k for k in range(101) if cdf[k] >= 0.025) == 5
    assert high == next(k for k in range(101) if cdf[k] >= 0.975) == 16


def test_bootstrap_interval_agrees_with_the_normal_approximation():
    a, b = pair(n10=100, n01=60, n11=1500, n00=340)
    n, p10, p01 = 2000, 100 / 2000, 60 / 2000
    # the paired difference's standard error: sqrt((p10 + p01 - (p10 - p01)^2) / n)
    half = 100 * 1.96 * math.sqrt((p10 + p01 - (p10 - p01) ** 2) / n)
    difference, low, high = stats.paired_interval([(a, b)])
    assert difference == 2.0
    assert low == pytest.approx(2.0 - half, abs=0.15) and high == pytest.approx(2.0 + half, abs=0.15)
    assert stats.paired_interval([(a, b)], seed=1) != (difference, low, high)   # seeded draws
    assert stats.paired_interval([(a, b)], seed=0) == (difference, low, high)


def test_interval_over_seeds_resamples_seeds_too():
    # seed 0: a right on every prompt, b on none (+100); seed 1: identical (0). Resampling the two
    # seeds gives {0, 0}, {0, 1}, {1, 1} with probability 1/4, 1/2, 1/4: means 0, 50, 100 (the
    # prompts add nothing: each seed's difference is the same in every resample). Both tails hold
    # 1/4 > 2.5%, so the 95% interval is [0, 100]; a prompt-only interval would be a point.
    pairs = [pair(20, 0, 0, 0), pair(0, 0, 10, 10)]
    assert stats.paired_interval(pairs) == (50.0, 0.0, 100.0)


def test_verdict_words_from_the_interval():
    assert stats.verdict("ahead", 0.2, 3.0) == "holds"
    assert stats.verdict("ahead", -3.0, -0.1) == "does not hold"
    assert stats.verdict("ahead", -2.0, 0.0) == "does not hold"               # b at least as good
    assert stats.verdict("ahead", -1.0, 2.0) == "cannot tell at ±1.5 points"
    assert stats.verdict("within", -0.8, 0.9) == "holds"
    assert stats.verdict("within", -4.4, -1.2) == "does not hold"             # wholly below -1
    assert stats.verdict("within", 1.1, 2.0) == "does not hold"               # wholly above +1
    assert stats.verdict("within", -4.4, -0.6) == "cannot tell at ±1.9 points"
    assert stats.verdict("within", -0.5, 2.5, margin=3.0) == "holds"
    assert stats.combined(["holds", "holds"]) == "holds"
    assert stats.combined(["holds", "does not hold"]) == "does not hold"
    assert stats.combined(["holds", "cannot tell at ±1.0 points"]) == "cannot tell"
    with pytest.raises(ValueError, match="unknown claim kind"):
        stats.verdict("better", 0, 1)


def test_bad_outcomes_are_one_line_errors():
    with pytest.raises(ValueError, match="same prompts"):
        stats.discordant("0110", "011")
    with pytest.raises(ValueError, match="string of 0 and 1"):
        stats.discordant("01x0", "0110")


def test_claims_table_pairs_seeds_and_gives_mcnemar_for_one_seed():
    one_way = pair(10, 0, 45, 45)
    outcomes = {("linear_block_out", 0): one_way[0], ("linear_mlp_out", 0): one_way[1],
                ("full", 0): one_way[0], ("full", 1): one_way[0],
                ("linear_block_out", 1): one_way[0]}
    label = {m: m for m in ("linear_block_out", "linear_mlp_out", "full")}
    lines = stats.claims_table(outcomes, label)
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in lines[2:] if line}
    # block_out vs full: two seeds, identical outcomes -> difference 0, no McNemar p, within ±1
    assert [c.strip() for c in rows["linear_block_out − full"][1:]] == ["2", "+0.0", "[+0.0, +0.0]",
                                                                        "–", "holds"]
    # block_out vs mlp_out: one seed, 10 prompts one way: p = 2 / 2^10; interval [5, 16] (above)
    cells = [c.strip() for c in rows["linear_block_out − linear_mlp_out"][1:]]
    assert cells == ["1", "+10.0", "[+5.0, +16.0]", f"{2 / 1024:.3g}", "holds"]
    assert "linear_block_out − linear_attn_out" not in rows                  # attn_out never ran
    assert f"- {stats.BLOCK_VS_FULL}: **holds**" in lines
    # its one comparison holds, but pre-MLP never ran: the claim of both gets no verdict
    assert f"- {stats.BLOCK_VS_SITES}: no verdict, 1 of its 2 comparisons run" in lines


METHODS = ("full", "lora", "linear_block_out")


def test_table_mean_and_std_match_an_independent_computation():
    tasks, seeds = ["listops", "boolq"], [0, 1, 2]
    acc = torch.rand(len(METHODS), len(tasks), len(seeds), generator=torch.Generator().manual_seed(0))
    finals = [dict(method=name, task=t, seed=s, accuracy=acc[m, i, s].item(), trainable_params=10 * m + 1,
                   trainable_pct=float(m), train_seconds=1.0 + s, base_accuracy=0.25 * s)
              for m, name in enumerate(METHODS) for i, t in enumerate(tasks) for s in seeds]
    majority = {(t, s): 0.5 for t in tasks for s in seeds}
    rows = stats.summarize(finals, tasks, METHODS, majority)
    for m, name in enumerate(METHODS):
        for i, t in enumerate(tasks):
            assert rows[name][t] == pytest.approx((acc[m, i].mean().item(), acc[m, i].std().item()), abs=1e-6)
        per_seed = acc[m].mean(dim=0)                       # the average over tasks, seed by seed
        assert rows[name]["average"] == pytest.approx((per_seed.mean().item(), per_seed.std().item()), abs=1e-6)
        assert (rows[name]["params"], rows[name]["seconds"], rows[name]["seeds"]) == (10 * m + 1, 2.0, 3)
    assert rows["base"]["listops"] == pytest.approx((0.25, 0.25))      # 0, 0.25, 0.5: std 0.25
    assert rows["majority"]["average"] == (0.5, 0.0)
