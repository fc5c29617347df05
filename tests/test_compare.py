"""
Tests of compare.py: the --quick comparison, run as a user runs it on a tiny throwaway base model,
writes a table with one row per method and sane numbers (parameter counts worked out by hand), a
chart and results.json; the table's mean ± std agrees with an independent computation; bad
arguments are a one-line error.

Run:  python -m pytest tests/test_compare.py -q
"""
import hashlib
import json
import os
import re
import time

import pytest
import torch

import compare
from conftest import ROOT, run_script
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
    proc = python("compare.py", "--quick", "--init", base, "--out-dir", tmp / "cmp")
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
    assert sorted(rows) == sorted(label for _, label, _ in compare.METHODS.values())
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
        assert r["steps"] == compare.QUICK["steps"]                         # one budget for every method
        assert r["argv"][r["argv"].index("--batch-size") + 1] == str(compare.QUICK["batch_size"])
        assert r["trainable_pct"] == pytest.approx(100.0 * r["trainable_params"] / r["total_params"])
    lrs = {r["method"]: r["lrs"] for r in runs}                             # --quick: train.py's default lrs
    assert lrs["full"] == {"--lr": 1e-3} and lrs["lora"] == {"--lora-lr": 3e-3}
    assert lrs["linear_block_out"] == {"--lr": 1e-2} and lrs["joint"] == {"--lr": 1e-2, "--lora-lr": 3e-3}
    assert (quick["out"] / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (quick["out"] / "train.log").stat().st_size > 0
    progress = re.findall(r"^run +\d+/10 \|.*\| eta +\S+ min$", quick["stdout"], flags=re.M)
    assert len(progress) == 10


def test_table_mean_and_std_match_an_independent_computation():
    tasks, seeds = ["listops", "boolq"], [0, 1, 2]
    acc = torch.rand(len(compare.METHODS), len(tasks), len(seeds), generator=torch.Generator().manual_seed(0))
    finals = [dict(method=name, task=t, seed=s, accuracy=acc[m, i, s].item(), trainable_params=10 * m + 1,
                   trainable_pct=float(m), train_seconds=1.0 + s)
              for m, name in enumerate(compare.METHODS) for i, t in enumerate(tasks) for s in seeds]
    rows = compare.summarize(finals, tasks, seeds)
    for m, name in enumerate(compare.METHODS):
        for i, t in enumerate(tasks):
            assert rows[name][t] == pytest.approx((acc[m, i].mean().item(), acc[m, i].std().item()), abs=1e-6)
        per_seed = acc[m].mean(dim=0)                       # the average over tasks, seed by seed
        assert rows[name]["average"] == pytest.approx((per_seed.mean().item(), per_seed.std().item()), abs=1e-6)
        assert (rows[name]["params"], rows[name]["seconds"]) == (10 * m + 1, 2.0)


def test_bad_arguments_are_a_one_line_error():
    proc = python("compare.py", "--quick", "--tasks", "sudoku")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["compare.py: error: --tasks takes listops, arith, boolq; --seeds, "
                                                "--steps, --batch-size must be positive"]
