"""
Tests of compare.py: the --quick comparison, run as a user runs it on a tiny throwaway base model
(and on SmolLM2-135M when it is installed), writes a table with one row per method and sane numbers
(parameter counts worked out by hand), a chart and results.json; the learning-rate selection, with
train.py replaced by a stub whose numbers the test chooses, picks what it should; the table's
mean ± std agrees with an independent computation; bad arguments are a one-line error.

Run:  python -m pytest tests/test_compare.py -q
"""
import hashlib
import json
import os
import re
import time

import pytest
import torch

from tools import compare
from conftest import ROOT, run_script
from test_checkpoints import needs_smollm2
from model import GPT


def python(*args):
    return run_script(*args, timeout=600)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A 5-step base model (so the real out/base is never pretrained or touched), then
    `compare.py --quick` on it. Returns the output dir, stdout, wall seconds and the base."""
    tmp = tmp_path_factory.mktemp("compare")
    proc = python("train.py", "--mode", "pretrain", "--steps", "5", "--batch-size", "8", "--n-train", "200",
                  "--device", "cpu", "--out-dir", tmp / "base")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, real_base = tmp / "base" / "model.pt", os.path.join(ROOT, "out", "base", "model.pt")
    before = (sha256(base), os.path.exists(real_base) and os.path.getmtime(real_base))
    t0 = time.time()
    proc = python("tools/compare.py", "--quick", "--init", base, "--out-dir", tmp / "cmp")
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sha256(base), os.path.exists(real_base) and os.path.getmtime(real_base)) == before
    return dict(out=tmp / "cmp", stdout=proc.stdout, seconds=seconds, base=base)


def table_rows(path):
    """{row label: [cells]} of the markdown table in results.md."""
    rows = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("method", "---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_quick_comparison_has_every_method_with_sane_numbers(quick):
    print(f"compare.py --quick took {quick['seconds']:.1f} s")
    rows = table_rows(quick["out"] / "results.md")
    assert sorted(rows) == sorted(compare.LABEL.values())             # every method, and 2 baselines
    for baseline in ("majority", "base"):
        assert rows[compare.LABEL[baseline]][2:] == ["0", "0.000", "0.0", "–"]
    assert rows[compare.LABEL["majority"]][0] == "65.0 ± 0.0"         # "no": 65 of boolq's 100 test answers
    config = GPT.from_pretrained(str(quick["base"])).config
    d, L = config.n_embd, config.n_layer
    expected_params = {  # by hand: LoRA r·(4d + 2d + 5d + 5d) per layer, a rank-r shift 2dr, ReFT 2dr + r
        "full": sum(p.numel() for p in GPT(config).parameters()), "lora": L * 16 * d * 4,
        "reft_mlp_out": L * (2 * d * 4 + 4), "vector_block_out": L * d}
    expected_params["joint"] = expected_params["joint_no_ortho"] = expected_params["lora"] + L * 2 * d * 4
    pct = {}
    for name, (_, label, _) in compare.METHODS.items():
        boolq, average, params, pct[name], seconds, lr = rows[label]   # quick runs boolq only
        for cell in (boolq, average):
            mean, std = map(float, cell.split(" ± "))
            assert 0.0 <= mean <= 100.0 and std == 0.0               # one seed: no spread
        assert boolq == average
        params, pct[name] = int(params.replace(",", "")), float(pct[name])
        assert params == expected_params.get(name, L * 2 * d * 4)    # the other shifts: linear, rank 4
        assert 0.0 < pct[name] <= 100.0 and float(seconds) > 0.0
    assert pct["full"] == 100.0
    assert min(pct, key=pct.get) == "vector_block_out"
    assert pct["joint"] == pct["joint_no_ortho"] > pct["lora"]


@pytest.mark.slow
def test_quick_comparison_writes_results_chart_and_progress(quick):
    results = json.load(open(quick["out"] / "results.json"))
    runs = results["runs"]
    assert sorted(r["method"] for r in runs) == sorted(compare.METHODS)   # each method once: 1 task, 1 seed
    for r in runs:
        assert r["phase"] == "final" and r["task"] == "boolq" and r["seed"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert r["steps"] == compare.BUDGETS["nano-quick"]["steps"]         # one budget for every method
        assert r["argv"][r["argv"].index("--batch-size") + 1] == str(compare.BUDGETS["nano-quick"]["batch_size"])
        assert r["trainable_pct"] == pytest.approx(100.0 * r["trainable_params"] / r["total_params"])
    lrs = {r["method"]: r["lrs"] for r in runs}                             # --quick: train.py's default lrs
    assert lrs["full"] == {"--lr": 1e-3} and lrs["lora"] == {"--lora-lr": 3e-3}
    assert lrs["linear_block_out"] == {"--lr": 1e-2} and lrs["joint"] == {"--lr": 1e-2, "--lora-lr": 3e-3}
    assert (quick["out"] / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (quick["out"] / "train.log").stat().st_size > 0
    progress = re.findall(r"^run +\d+/10 \|.*\| eta +\S+ min$", quick["stdout"], flags=re.M)
    assert len(progress) == 10


@pytest.mark.slow
@needs_smollm2
def test_quick_comparison_on_smollm2_has_the_papers_parameter_counts(tmp_path):
    proc = python("tools/compare.py", "--quick", "--init", "smollm2-135m", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, rows = json.load(open(tmp_path / "results.json")), table_rows(tmp_path / "results.md")
    assert results["name"] == "lm-quick" and sorted(rows) == sorted(compare.LABEL.values())
    params = {r["method"]: r["trainable_params"] for r in results["runs"]}
    L, d, r = 30, 576, 8                                          # rank 8 at every layer (THEORY §9)
    assert params["linear_block_out"] == params["linear_mlp_out"] == 2 * d * r * L == 276_480
    assert rows[compare.LABEL["linear_block_out"]][3] == "0.206"   # % of 134,515,008
    assert params["vector_block_out"] == d * L and params["full"] == 134_515_008
    # LoRA on c_attn (576 -> 576 + 2 * 192: q, k, v fused), attention's c_proj, c_gate, c_fc, c_proj
    assert params["lora"] == L * r * ((d + 960) + 2 * d + 3 * (d + 1536))
    assert params["joint"] == params["lora"] + 276_480
    lrs = {r["method"]: r["lrs"] for r in results["runs"]}         # --quick: train.py's LM defaults
    assert lrs["full"] == {"--lr": 3e-5} and lrs["joint"] == {"--lr": 1e-3, "--lora-lr": 5e-4}
    assert len(re.findall(r"^run +\d+/10 \|", proc.stdout, flags=re.M)) == 10


@pytest.mark.slow
def test_same_seed_same_table(quick, tmp_path):
    proc = python("tools/compare.py", "--quick", "--init", quick["base"], "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, again = table_rows(quick["out"] / "results.md"), table_rows(tmp_path / "results.md")
    drop_seconds = {label: cells[:-2] + cells[-1:] for label, cells in first.items()}   # s / run is a time
    assert drop_seconds == {label: cells[:-2] + cells[-1:] for label, cells in again.items()}
    numbers = [[(r["method"], r["accuracy"], r["val_accuracy"], r["final_loss"]) for r in
                json.load(open(out / "results.json"))["runs"]] for out in (quick["out"], tmp_path)]
    assert numbers[0] == numbers[1]                                   # to the last bit, losses included
    assert len({accuracy for _, accuracy, _, _ in numbers[0]}) >= 3      # not all 0: a table worth comparing


def test_table_mean_and_std_match_an_independent_computation():
    tasks, seeds = ["listops", "boolq"], [0, 1, 2]
    acc = torch.rand(len(compare.METHODS), len(tasks), len(seeds), generator=torch.Generator().manual_seed(0))
    finals = [dict(method=name, task=t, seed=s, accuracy=acc[m, i, s].item(), trainable_params=10 * m + 1,
                   trainable_pct=float(m), train_seconds=1.0 + s)
              for m, name in enumerate(compare.METHODS) for i, t in enumerate(tasks) for s in seeds]
    rows = compare.summarize(finals, tasks, seeds, {})
    for m, name in enumerate(compare.METHODS):
        for i, t in enumerate(tasks):
            assert rows[name][t] == pytest.approx((acc[m, i].mean().item(), acc[m, i].std().item()), abs=1e-6)
        per_seed = acc[m].mean(dim=0)                       # the average over tasks, seed by seed
        assert rows[name]["average"] == pytest.approx((per_seed.mean().item(), per_seed.std().item()), abs=1e-6)
        assert (rows[name]["params"], rows[name]["seconds"]) == (10 * m + 1, 2.0)


def test_majority_baseline_takes_trains_commonest_answer_and_scores_it_on_test():
    splits = dict(train=[("a", "yes"), ("b", "no"), ("c", "no")], test=[("d", "yes"), ("e", "yes"), ("f", "no")])
    assert compare.majority_baseline(splits) == ("no", pytest.approx(1 / 3))   # test's commonest would score 2/3


def test_bad_arguments_are_a_one_line_error():
    proc = python("tools/compare.py", "--quick", "--tasks", "sudoku")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["compare.py: error: --tasks takes listops, arith, boolq; --seeds, "
                                                "--steps, --batch-size, --n-eval must be positive"]


# ---------------------------------------------------------------------------------------------
# the learning-rate selection, with train.py replaced by a stub whose numbers the test chooses

PEAK = {"full": 1e-3, "lora": 0.1, "linear_block_out": None, "vector_block_out": 1.0}  # others: their grid's middle


def stub_run(args, name, task, seed, lrs, log):
    """compare.run without training. Validation accuracy falls with the distance (in log lr) from
    PEAK[name]; block_out scores 0.5 at every lr (a tie) with the lowest loss at 1e-2; the test
    accuracy is the validation one minus 0.1 per seed, so each seed's run is told apart."""
    lr = lrs.get("--lora-lr" if name == "lora" else "--lr")
    peak = PEAK.get(name, compare.NANO_GRID[compare.METHODS[name][0]][1] if name in compare.LEAD.values() or
                    compare.METHODS[name][0] == "shift" else lr)
    val = 0.5 if peak is None else 0.9 - 0.1 * abs(torch.tensor(lr / peak).log10().item())
    return dict(method=name, lrs=lrs, task=task, seed=seed, val_accuracy=val, accuracy=val - 0.1 * seed,
                final_loss=1.0 + abs(torch.tensor(lr / 1e-2).log10().item()), base_accuracy=0.0,
                trainable_params=1, trainable_pct=0.1, train_seconds=1.0)


def stubbed(tmp_path, monkeypatch, *flags):
    monkeypatch.setattr(compare, "run", stub_run)
    args = compare.parse_args(["--init", str(tmp_path / "stub.pt"), "--tasks", "listops", "--seeds", "2",
                               "--out-dir", str(tmp_path / "out"), *flags])
    rows = compare.main(args)
    return rows, json.load(open(tmp_path / "out" / "results.json")), table_rows(tmp_path / "out" / "results.md")


def test_selection_best_validation_wins_ties_by_loss_edges_grow_and_joint_combines(tmp_path, monkeypatch):
    rows, results, table = stubbed(tmp_path, monkeypatch)
    chosen = {name: lrs["listops"] for name, lrs in results["chosen_lrs"].items()}
    assert chosen["full"] == {"--lr": 1e-3}                          # the best validation accuracy
    assert chosen["linear_block_out"] == {"--lr": 1e-2}              # a tie: the lowest final loss
    assert chosen["reft_mlp_out"] == {"--lr": 1e-2}
    tried = {name: [r["lrs"] for r in results["runs"] if r["method"] == name and r["seed"] == 0]
             for name in compare.METHODS}
    # LoRA's best was its grid's top (3e-2): the grid grew to 1e-1 (best again), then 3e-1 (worse)
    assert [lrs["--lora-lr"] for lrs in tried["lora"]] == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert chosen["lora"] == {"--lora-lr": 0.1}
    # the vector keeps improving: two more values, then it stops, marked as still at the edge
    assert [lrs["--lr"] for lrs in tried["vector_block_out"]] == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert results["edges"] == [["vector_block_out", "listops"]]
    assert table[compare.LABEL["vector_block_out"]][-1] == "3e-01*"
    assert len(tried["full"]) == 3 and len(tried["linear_block_out"]) == 3   # interior winners: no growth
    # joint is not swept: block_out's shift lr and LoRA's lr, at both seeds
    assert chosen["joint"] == chosen["joint_no_ortho"] == {"--lr": 1e-2, "--lora-lr": 0.1}
    assert tried["joint"] == [chosen["joint"]]
    for name in compare.METHODS:
        finals = [r for r in results["runs"] if r["method"] == name and r["phase"] == "final"]
        assert sorted(r["seed"] for r in finals) == [0, 1] and all(r["lrs"] == chosen[name] for r in finals)
        # the sweep's winning run is the seed-0 result (no second run at seed 0)
        winner = stub_run(None, name, "listops", 0, chosen[name], None)
        assert rows[name]["listops"][0] == pytest.approx(winner["accuracy"] - 0.05)   # mean over seeds 0, 1
    assert len(results["runs"]) == 8 * 3 + 2 + 2 + 8 + 2 * 2             # grids, growth, seed 1, joint
    assert rows["base"]["listops"] == (0.0, 0.0) and 0.0 < rows["majority"]["listops"][0] < 0.2


def test_family_sweep_tunes_the_leads_and_gives_block_outs_lr_to_the_other_shifts(tmp_path, monkeypatch):
    rows, results, table = stubbed(tmp_path, monkeypatch, "--sweep", "family")
    swept = {r["method"] for r in results["runs"] if r["phase"] == "sweep" or r["lrs"] != results["chosen_lrs"]
             [r["method"]]["listops"]}
    assert swept <= {"full", "lora", "linear_block_out"} and {"full", "lora"} <= swept
    for name in compare.METHODS:
        if compare.METHODS[name][0] == "shift":
            assert results["chosen_lrs"][name]["listops"] == {"--lr": 1e-2}
    assert results["chosen_lrs"]["joint"]["listops"] == {"--lr": 1e-2, "--lora-lr": 0.1}
