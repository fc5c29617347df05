"""
Tests of compare.py: the --quick comparison, run as a user runs it on a tiny throwaway base model
(and on SmolLM2-135M when it is installed), writes a table with one row per method and sane numbers
(parameter counts worked out by hand), a chart, results.json and the claims; Ctrl-C stops it with
one line and the next start goes on. With train.py's training replaced by a stub whose numbers the
test chooses (and which counts its calls): every method sweeps its own rate and the selection picks
what it should; a finished run is never redone; train.log is kept; another configuration is
refused unless --force; bad arguments are one line that changes nothing; default folders differ
per checkpoint; a diverged run loses its sweep and stops nothing else. (The table's statistics:
tests/test_stats.py.)

Run:  python -m pytest tests/test_compare.py -q          (add -m "not slow" for the fast ones)
"""
import hashlib
import json
from collections import Counter
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from experiments import compare, stats
from conftest import ENV, ROOT, ctrl_c_as_in_a_terminal, run_script
from test_checkpoints import needs_smollm2
from machinery.files import write_files
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
    proc = python("experiments/compare.py", "--quick", "--init", base, "--out-dir", tmp / "cmp")
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sha256(base), os.path.exists(real_base) and os.path.getmtime(real_base)) == before
    return dict(out=tmp / "cmp", stdout=proc.stdout, seconds=seconds, base=base)


def table_rows(path):
    """{row label: [cells]} of the first markdown table in results.md (the claims follow it)."""
    rows = {}
    for line in open(path, encoding="utf-8"):
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] not in ("method", "---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_quick_comparison_has_every_method_with_sane_numbers(quick):
    print(f"compare.py --quick took {quick['seconds']:.1f} s")
    rows = table_rows(quick["out"] / "results.md")
    assert sorted(rows) == sorted(compare.LABEL[name] for name in ("majority", "base", *compare.ALL))
    for baseline in ("majority", "base"):
        assert rows[compare.LABEL[baseline]][2:] == ["1", "0", "0.000", "0.0", "–"]
    assert rows[compare.LABEL["majority"]][0] == "65.0 ± 0.0"         # "no": 65 of boolq's 100 test answers
    config = GPT.load(str(quick["base"])).config
    d, L = config.n_embd, config.n_layer
    expected_params = {  # by hand: LoRA r·(4d + 2d + 5d + 5d) per layer, a rank-r shift 2dr, ReFT 2dr + r
        "full": sum(p.numel() for p in GPT(config).parameters()), "lora": L * 16 * d * 4,
        "reft_mlp_out": L * (2 * d * 4 + 4), "vector_block_out": L * d}
    expected_params["joint"] = expected_params["joint_no_ortho"] = expected_params["lora"] + L * 2 * d * 4
    pct = {}
    for name in compare.ALL:                                         # every row but steerling's recipe
        boolq, average, seeds, params, pct[name], seconds, lr = rows[compare.LABEL[name]]   # quick: boolq only
        for cell in (boolq, average):
            mean, std = map(float, cell.split(" ± "))
            assert 0.0 <= mean <= 100.0 and std == 0.0               # one seed: no spread
        assert boolq == average and seeds == "1"
        params, pct[name] = int(params.replace(",", "")), float(pct[name])
        assert params == expected_params.get(name, L * 2 * d * 4)    # the other shifts: linear, rank 4
        assert 0.0 < pct[name] <= 100.0 and float(seconds) > 0.0
    assert pct["full"] == 100.0
    assert min(pct, key=pct.get) == "vector_block_out"
    assert pct["joint"] == pct["joint_no_ortho"] > pct["lora"]


@pytest.mark.slow
def test_quick_comparison_writes_results_chart_and_progress(quick):
    results = json.load(open(quick["out"] / "results.json"))
    runs, budget = results["runs"], dict(zip(compare.BUDGET_KEYS, compare.BUDGETS["nano-quick"]))
    assert results["config"] == {**results["config"], **budget, "tasks": ["boolq"],
                                 "seeded": list(budget["seeded"])}             # the budget, as run
    assert sorted(r["method"] for r in runs) == sorted(compare.ALL)       # each method once: 1 task, 1 seed
    for r in runs:
        assert r["phase"] == "final" and r["task"] == "boolq" and r["seed"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert r["steps"] == budget["steps"]                                # one budget for every method
        assert r["argv"][r["argv"].index("--batch-size") + 1] == str(budget["batch_size"])
        assert r["trainable_pct"] == pytest.approx(100.0 * r["trainable_params"] / r["total_params"])
    lrs = {r["method"]: r["lrs"] for r in runs}                             # --quick: train.py's default lrs
    assert lrs["full"] == {"--lr": 1e-3} and lrs["lora"] == {"--lora-lr": 3e-3}
    assert lrs["linear_block_out"] == {"--lr": 1e-2} and lrs["joint"] == {"--lr": 1e-2, "--lora-lr": 3e-3}
    assert (quick["out"] / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (quick["out"] / "train.log").stat().st_size > 0
    progress = re.findall(r"^run +\d+/10 \|.*\| eta +\S+ min$", quick["stdout"], flags=re.M)
    assert len(progress) == 10
    assert (quick["out"] / "progress.log").read_text().splitlines() == progress
    outcomes = json.load(open(quick["out"] / "outcomes.json"))     # each final run's, prompt by prompt
    assert sorted(outcomes) == sorted(f"boolq/{name}/seed0" for name in compare.ALL)
    for r in runs:
        test = outcomes[f"boolq/{r['method']}/seed0"]
        assert len(test) == 100 and test.count("1") == round(100 * r["accuracy"])
    claims = (quick["out"] / "results.md").read_text()
    for claim in (stats.BLOCK_VS_FULL, stats.BLOCK_VS_SITES, stats.JOINT_VS_PARTS):
        assert re.search(rf"^- {claim}: \*\*(holds|does not hold|cannot tell)\*\*$", claims, re.M)


@pytest.mark.slow
@needs_smollm2
def test_quick_comparison_on_smollm2_has_the_papers_parameter_counts(tmp_path):
    proc = python("experiments/compare.py", "--quick", "--init", "smollm2-135m", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, rows = json.load(open(tmp_path / "results.json")), table_rows(tmp_path / "results.md")
    assert results["config"]["budget"] == "lm-quick"
    assert sorted(rows) == sorted(compare.LABEL[name] for name in ("majority", "base", *compare.ALL))
    params = {r["method"]: r["trainable_params"] for r in results["runs"]}
    L, d, r = 30, 576, 8                                          # rank 8 at every layer (THEORY §9)
    assert params["linear_block_out"] == params["linear_mlp_out"] == 2 * d * r * L == 276_480
    assert rows[compare.LABEL["linear_block_out"]][4] == "0.206"   # % of 134,515,008
    assert params["vector_block_out"] == d * L and params["full"] == 134_515_008
    # LoRA on c_attn (576 -> 576 + 2 * 192: q, k, v fused), attention's c_proj, c_gate, c_fc, c_proj
    assert params["lora"] == L * r * ((d + 960) + 2 * d + 3 * (d + 1536))
    assert params["joint"] == params["lora"] + 276_480
    lrs = {r["method"]: r["lrs"] for r in results["runs"]}         # --quick: train.py's LM defaults
    assert lrs["full"] == {"--lr": 3e-5} and lrs["joint"] == {"--lr": 1e-3, "--lora-lr": 5e-4}
    assert len(re.findall(r"^run +\d+/10 \|", proc.stdout, flags=re.M)) == 10


@pytest.mark.slow
def test_same_seed_same_table(quick, tmp_path):
    proc = python("experiments/compare.py", "--quick", "--init", quick["base"], "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, again = table_rows(quick["out"] / "results.md"), table_rows(tmp_path / "results.md")
    drop_seconds = {label: cells[:-2] + cells[-1:] for label, cells in first.items()}   # s / run is a time
    assert drop_seconds == {label: cells[:-2] + cells[-1:] for label, cells in again.items()}
    numbers = [[(r["method"], r["accuracy"], r["val_accuracy"], r["final_loss"]) for r in
                json.load(open(out / "results.json"))["runs"]] for out in (quick["out"], tmp_path)]
    assert numbers[0] == numbers[1]                                   # to the last bit, losses included
    assert len({accuracy for _, accuracy, _, _ in numbers[0]}) >= 3      # not all 0: a table worth comparing


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_the_same_command_goes_on(quick, tmp_path):
    cmd = [sys.executable, "experiments/compare.py", "--quick", "--init", str(quick["base"]), "--out-dir",
           str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    for line in proc.stdout:                  # Ctrl-C once two runs have finished
        if line.startswith("run   2/"):
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert stderr.strip().splitlines() == ["compare.py: stopped (Ctrl-C): run the same command to go on"]
    finished = [d for d in (tmp_path / "runs").iterdir() if (d / "argv.json").exists()]
    assert len(finished) >= 2 and not (tmp_path / "results.md").exists()
    again = python(*cmd[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("| done before") == len(finished)       # not trained again
    # every run trained once; only the run Ctrl-C stopped half-way (if any) started twice
    started = Counter(line for line in (tmp_path / "train.log").read_text().splitlines()
                      if line.startswith("$ python train.py"))
    assert len(started) == 10 and sorted(started.values()) in ([1] * 10, [1] * 9 + [2])


def test_majority_baseline_takes_trains_commonest_answer_and_scores_it_on_test():
    splits = dict(train=[("a", "yes"), ("b", "no"), ("c", "no")], test=[("d", "yes"), ("e", "yes"), ("f", "no")])
    assert compare.stats.majority_baseline(splits) == ("no", pytest.approx(1 / 3))   # test's commonest would score 2/3


def folder_bytes(folder):
    """{relative path: bytes} of every file under folder: to prove a refusal changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_arguments_are_one_line_and_change_nothing(tmp_path, tiny_base):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "train.log").write_text("an earlier comparison's log\n" * 300)
    (tmp_path / "a_file").write_text("not a folder")
    before = folder_bytes(out)
    cases = {("--tasks", "sudoku"): "--tasks takes listops, arith, boolq; --seeds, --steps, --batch-size, "
                                    "--n-eval must be positive",
             ("--steps", "0"): "--tasks takes listops",
             ("--init", str(tmp_path / "typo.pt")): "does not exist",
             ("--out-dir", str(tmp_path / "a_file")): "is a file, not a folder: give a folder"}
    for flags, message in cases.items():
        argv = ["--init", str(tiny_base), "--quick", "--out-dir", str(out), *flags]
        proc = python("experiments/compare.py", *argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("compare.py: error: ") and message in lines[0]
        assert folder_bytes(out) == before                            # the old log is untouched


def test_bf16_on_a_cpu_without_it_is_said_at_the_start_and_bf16_is_accepted(tmp_path, monkeypatch, tiny_base, capsys):
    from machinery import runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)

    def no_runs(*args):
        raise ValueError("(the runs would start here)")
    monkeypatch.setattr(compare, "run_all", no_runs)
    args = compare.parse_args(["--init", str(tiny_base), "--quick", "--dtype", "bf16", "--device", "cpu",
                               "--out-dir", str(tmp_path / "out")])
    assert args.dtype == "bfloat16"
    with pytest.raises(ValueError, match="the runs would start here"):
        compare.main(args)
    out = capsys.readouterr().out
    assert "\nwarning: this CPU has no native bf16" in out and "--dtype float32 is faster" in out


def test_default_output_folders_differ_per_checkpoint(tmp_path, tiny_base):
    folders = set()
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "model.pt").write_bytes(tiny_base.read_bytes())
        folders.add(compare.parse_args(["--init", str(tmp_path / sub / "model.pt")]).out_dir)
    assert len(folders) == 2                  # both are model.pt: once the same out/compare-model
    quick = compare.parse_args(["--init", str(tmp_path / "a" / "model.pt"), "--quick"]).out_dir
    assert quick not in folders and quick.endswith("-a-model-nano-quick")


# ---------------------------------------------------------------------------------------------
# the selection and the bookkeeping, with train.py's training replaced by a stub whose numbers
# the test chooses: validation accuracy falls with the distance (in log10 lr) from the method's
# PEAK (block_out: 0.5 at every lr, a tie, the lowest loss at 1e-2; unlisted methods: 1e-2)

PEAK = {"full": 1e-3, "lora": 0.1, "linear_block_out": None, "vector_block_out": 1.0,
        "linear_attn_out": 0.03, "joint": 3e-3}


class StubTrain:
    """Stands in for train.train: writes what train.py writes (results.json, outcomes.json) from
    chosen numbers, counts its calls, and can stop as Ctrl-C would on a given call."""

    def __init__(self, interrupt_at=None, diverge_above=None):
        self.calls, self.interrupt_at, self.diverge_above = [], interrupt_at, diverge_above

    def __call__(self, config):
        self.calls.append(os.path.basename(config.out_dir))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        name = os.path.basename(config.out_dir).split("-")[1]     # <task>-<method>-lr...-seed<s>
        lr = config.lora_lr if config.mode == "weight" and config.lora_rank > 0 else config.lr
        if self.diverge_above is not None and lr > self.diverge_above:
            raise ValueError(f"the loss is not finite at step 3 (lr {lr})")   # as train.py stops
        peak = PEAK.get(name, 1e-2)
        val = 0.5 if peak is None else 0.9 - 0.1 * abs(torch.tensor(lr / peak).log10().item())
        test = val - 0.1 * config.seed                          # each seed's run is told apart
        n = config.n_eval
        outcomes = {split: "1" * round(n * acc) + "0" * (n - round(n * acc))
                    for split, acc in (("val", val), ("test", test))}
        results = dict(mode=config.mode, task=config.task, seed=config.seed, steps=config.steps,
                       accuracy=round(n * test) / n, val_accuracy=round(n * val) / n,
                       base_accuracy=0.0, trainable_params=1, trainable_pct=0.1, train_seconds=1.0,
                       losses=[1.0 + abs(torch.tensor(lr / 1e-2).log10().item())] * 20)
        write_files(config.out_dir, {name: lambda path, text=json.dumps(value): open(path, "w").write(text)
                                     for name, value in (("results.json", results),
                                                         ("outcomes.json", outcomes))})
        return results


def stubbed(tmp_path, monkeypatch, tiny_base, *flags, interrupt_at=None, diverge_above=None):
    """compare.main on tiny_base (its checks are train.py's real ones) with StubTrain.
    -> (rows, results.json, results.md's table, the stub)"""
    stub = StubTrain(interrupt_at, diverge_above)
    monkeypatch.setattr(compare.train, "train", stub)
    args = compare.parse_args(["--init", str(tiny_base), "--tasks", "listops", "--seeds", "2",
                               "--n-eval", "100", "--out-dir", str(tmp_path / "out"), *flags])
    rows = compare.main(args)
    out = tmp_path / "out"
    return rows, json.load(open(out / "results.json")), table_rows(out / "results.md"), stub


def test_every_method_sweeps_its_own_rate_best_validation_wins_and_edges_grow(tmp_path, monkeypatch,
                                                                              tiny_base):
    rows, results, table, stub = stubbed(tmp_path, monkeypatch, tiny_base)
    chosen = {name: lrs["listops"] for name, lrs in results["chosen_lrs"].items()}
    tried = {name: [r["lrs"] for r in results["runs"] if r["method"] == name and r["seed"] == 0]
             for name in compare.ALL}
    assert chosen["full"] == {"--lr": 1e-3}                          # the best validation accuracy
    assert chosen["linear_block_out"] == {"--lr": 1e-2}              # a tie: the lowest final loss
    # every shift kind and site at its own rate: pre-MLP's best is at its grid's top, so its grid
    # grew to 1e-1 (worse): 3e-2, where block_out's 1e-2 would have been borrowed before
    assert [lrs["--lr"] for lrs in tried["linear_attn_out"]] == [3e-3, 1e-2, 3e-2, 0.1]
    assert chosen["linear_attn_out"] == {"--lr": 3e-2} and chosen["reft_mlp_out"] == {"--lr": 1e-2}
    # LoRA's best was its grid's top (3e-2): the grid grew to 1e-1 (best again), then 3e-1 (worse)
    assert [lrs["--lora-lr"] for lrs in tried["lora"]] == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert chosen["lora"] == {"--lora-lr": 0.1}
    # the vector keeps improving: two more values, then it stops, marked as still at the edge
    assert [lrs["--lr"] for lrs in tried["vector_block_out"]] == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert results["edges"] == [["vector_block_out", "listops"]]
    assert table[compare.LABEL["vector_block_out"]][-1] == "3e-01*"
    # joint sweeps its two rates together, and grows downwards from its grid's bottom
    assert tried["joint"] == [{"--lr": r, "--lora-lr": r} for r in (3e-3, 1e-2, 3e-2, 1e-3)]
    assert chosen["joint"] == {"--lr": 3e-3, "--lora-lr": 3e-3}
    assert chosen["joint_no_ortho"] == {"--lr": 1e-2, "--lora-lr": 1e-2}
    assert "recipe_block_out" not in results["chosen_lrs"]           # only the curve's budgets run it
    for name in compare.ALL:
        finals = [r for r in results["runs"] if r["method"] == name and r["phase"] == "final"]
        assert sorted(r["seed"] for r in finals) == [0, 1] and all(r["lrs"] == chosen[name] for r in finals)
        assert rows[name]["listops"][0] == pytest.approx(finals[0]["accuracy"] - 0.05)   # seeds 0, 1
    sweeps = 3 + 5 + 5 + 4 + 4 + 3 * 5              # full, lora, vector, joint, attn_out, the rest
    assert len(results["runs"]) == len(stub.calls) == sweeps + 10    # + seed 1 of every method
    assert rows["base"]["listops"] == (0.0, 0.0) and 0.0 < rows["majority"]["listops"][0] < 0.2


@pytest.mark.parametrize("damage", [lambda r: r.pop("losses"), lambda r: r.update(losses=["x"]),
                                    lambda r: r.update(accuracy="high"), lambda r: r.clear()])
def test_a_rerun_after_a_runs_results_lost_their_fields_is_one_line(tmp_path, monkeypatch, tiny_base, damage):
    stubbed(tmp_path, monkeypatch, tiny_base, "--methods", "full")
    path = next((tmp_path / "out" / "runs").glob("listops-full-*-seed0")) / "results.json"
    results = json.loads(path.read_text())
    damage(results)
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=rf"^{path}: its \S+ (is missing|are not)") as e:
        stubbed(tmp_path, monkeypatch, tiny_base, "--methods", "full")
    assert "\n" not in str(e.value) and "delete or restore it" in str(e.value)


def test_a_subset_of_methods_reuses_its_runs_in_the_whole_table(tmp_path, monkeypatch, tiny_base):
    rows, results, table, stub = stubbed(tmp_path, monkeypatch, tiny_base,
                                         "--methods", "full,linear_block_out")
    assert set(rows) == {"majority", "base", "full", "linear_block_out"}
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("full", 0)] * 3 + [
        ("full", 1)] + [("linear_block_out", 0)] * 3 + [("linear_block_out", 1)]   # method by method
    claims = [line for line in (tmp_path / "out" / "results.md").read_text().splitlines()
              if line.startswith(f"| {compare.LABEL['linear_block_out']} − ")]
    assert claims == [claims[0]] and compare.LABEL["full"] in claims[0]   # the one claim both ran
    # a claim of two comparisons with one of them run gets no verdict; a method named twice runs once
    again = stubbed(tmp_path, monkeypatch, tiny_base, "--methods", "linear_mlp_out,linear_block_out,full,full")
    assert [r["method"] for r in again[1]["runs"]].count("full") == 4                   # 3 rates, seed 1
    claims = (tmp_path / "out" / "results.md").read_text()
    assert "- post-block ahead of post-MLP and of pre-MLP: no verdict, 1 of its 2 comparisons run" in claims
    assert len(again[3].calls) == 4                   # only post-MLP's are new: its sweep and seed 1
    whole = stubbed(tmp_path, monkeypatch, tiny_base)                  # the same folder, every method
    assert len(whole[3].calls) == 46 - len(stub.calls) - 4             # the subsets' 12 read back
    with pytest.raises(ValueError, match="--methods takes full, lora"):
        compare.parse_args(["--init", str(tiny_base), "--methods", "full,fine"])


def test_a_finished_run_is_not_redone_and_the_log_is_appended(tmp_path, monkeypatch, tiny_base):
    first = stubbed(tmp_path, monkeypatch, tiny_base)
    log = (tmp_path / "out" / "train.log").read_text()
    assert log.count("$ python train.py") == len(first[3].calls) == 46
    again = stubbed(tmp_path, monkeypatch, tiny_base)
    assert again[3].calls == []                                       # every run read back
    assert again[0] == first[0] and again[2] == first[2]             # the same table
    assert all(r.pop("reused") for r in again[1]["runs"]) and not any(r.pop("reused") for r in first[1]["runs"])
    assert again[1] == first[1]                                       # and the same runs
    assert (tmp_path / "out" / "train.log").read_text() == log        # kept, nothing to add
    progress = (tmp_path / "out" / "progress.log").read_text().splitlines()
    assert len(progress) == 2 * 46 and all(line.endswith("| done before") for line in progress[46:])
    # a run whose folder lost its argv.json (it never finished) is the only one trained again
    lost = next((tmp_path / "out" / "runs").glob("listops-full-lr1e-03-seed1"))
    (lost / "argv.json").unlink()
    assert stubbed(tmp_path, monkeypatch, tiny_base)[3].calls == [lost.name]


def test_ctrl_c_keeps_the_finished_runs_and_the_next_start_goes_on(tmp_path, monkeypatch, tiny_base,
                                                                    capsys):
    with pytest.raises(KeyboardInterrupt):
        stubbed(tmp_path, monkeypatch, tiny_base, interrupt_at=8)
    assert not (tmp_path / "out" / "results.md").exists()               # no table of half the runs
    capsys.readouterr()                                                 # the first start's lines
    rows, results, table, stub = stubbed(tmp_path, monkeypatch, tiny_base)
    assert len(stub.calls) == 46 - 7                                  # 7 runs had finished
    assert len(results["runs"]) == 46 and sum(r["reused"] for r in results["runs"]) == 7
    assert "40 runs, more if a grid grows, 7 finished before; into " in capsys.readouterr().out


def test_the_eta_counts_the_runs_left_to_train_not_the_runs_read_back(tmp_path):
    progress = stats.Progress(6, tmp_path / "progress.log", 2)      # 6 planned, 2 finished before
    run = dict(phase="sweep", task="listops", method="full", seed=0, lrs={"--lr": 1e-3},
               val_accuracy=0.5, accuracy=0.5, train_seconds=60)
    progress.report({**run, "reused": True}, 0.1)
    progress.report({**run, "reused": False}, 60.0)   # 4 left, 1 of them on disk: 3 × 60 s
    progress.report({**run, "reused": True}, 0.1)
    progress.report({**run, "reused": False}, 120.0)  # 2 left, none on disk: 2 × 90 s
    ends = [line.rsplit(" | ", 1)[1] for line in (tmp_path / "progress.log").read_text().splitlines()]
    assert ends == ["done before", "eta   3.0 min", "done before", "eta   3.0 min"]


def test_another_configuration_is_refused_unless_forced(tmp_path, monkeypatch, tiny_base):
    stubbed(tmp_path, monkeypatch, tiny_base)
    before = folder_bytes(tmp_path / "out")
    with pytest.raises(ValueError, match=r"holds the results of another configuration \(steps 250 "
                                         r"there\): choose another, or --force"):
        stubbed(tmp_path, monkeypatch, tiny_base, "--steps", "7")
    assert folder_bytes(tmp_path / "out") == before
    rows, results, table, stub = stubbed(tmp_path, monkeypatch, tiny_base, "--steps", "7", "--force")
    assert len(stub.calls) == 46 and results["config"]["steps"] == 7   # other arguments: redone


def test_a_diverged_run_loses_its_sweep_and_stops_nothing_else(tmp_path, monkeypatch, tiny_base):
    rows, results, table, stub = stubbed(tmp_path, monkeypatch, tiny_base, diverge_above=0.2)
    vector = [r for r in results["runs"] if r["method"] == "vector_block_out" and r["seed"] == 0]
    assert [r["lrs"]["--lr"] for r in vector] == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert "not finite" in vector[-1]["failed"] and "failed" not in vector[-2]
    assert results["chosen_lrs"]["vector_block_out"]["listops"] == {"--lr": 0.1}   # not the edge now
    assert results["edges"] == [] and len(stub.calls) == 46
    assert "failed: the loss is not finite" in (tmp_path / "out" / "train.log").read_text()


def test_a_method_that_fails_at_every_rate_stops_with_one_message(tmp_path, monkeypatch, tiny_base):
    # full FT fails at its whole grid (3e-4 ..), but growing below its edge finds 1e-4, which trains;
    # LoRA's grid grows down to 3e-4 and fails there too
    with pytest.raises(ValueError, match=r"^lora on listops failed at every rate: the loss is not"):
        stubbed(tmp_path, monkeypatch, tiny_base, diverge_above=1e-4)
    full = [r for r in json.load(open(tmp_path / "out" / "runs" / "listops-full-lr1e-04-seed0" /
                                      "results.json"))["losses"]]
    assert full                                                    # trained, at the grown rate


@needs_smollm2
def test_the_verdict_budget_estimates_its_time_and_seeds_the_claims_methods(tmp_path, monkeypatch,
                                                                           capsys):
    stub = StubTrain()
    monkeypatch.setattr(compare.train, "train", stub)
    monkeypatch.setattr(compare.torch.cuda, "is_available", lambda: False)    # as on this CPU
    args = compare.parse_args(["--init", "smollm2-135m", "--out-dir", str(tmp_path)])
    assert (args.budget, args.steps, args.n_eval, args.seeds) == ("lm-verdict", 300, 2000, 3)
    compare.main(args)
    first_lines = capsys.readouterr().out.splitlines()[:2]
    runs = json.load(open(tmp_path / "results.json"))["runs"]
    plan = int(re.search(r": (\d+) runs", first_lines[0]).group(1))
    assert plan == 10 * 3 + 5 * 2                       # a grid of 3 each; 2 more seeds for 5 methods
    hours = [plan * 300 * compare.STEP_SECONDS[d] / 3600 for d in ("bfloat16", "float32")]
    assert first_lines[1].startswith(f"training alone: about {hours[0]:.1f} h in bfloat16 or "
                                     f"{hours[1]:.1f} h in float32")
    for name in compare.ALL:
        seeds = sorted(r["seed"] for r in runs if r["method"] == name and r["phase"] == "final")
        assert seeds == ([0, 1, 2] if name in compare.IN_CLAIMS else [0])
    claims = {line.split(" | ")[0].strip("| "): line.split(" | ")
              for line in (tmp_path / "results.md").read_text().splitlines() if " − " in line}
    block = compare.LABEL["linear_block_out"]
    assert claims[f"{block} − {compare.LABEL['full']}"][1] == "3"          # 3 seeds: no McNemar p
    assert claims[f"{block} − {compare.LABEL['full']}"][4] == "–"
    mlp_out = claims[f"{block} − {compare.LABEL['linear_mlp_out']}"]
    assert mlp_out[1] == "1" and float(mlp_out[4]) <= 1.0                  # 1 seed: McNemar's p


def test_the_curve_budgets_run_steerlings_recipe_at_its_own_rate_and_warmup(tiny_base, tmp_path):
    """lm-1000's grid holds the recipe's 9e-4; its train.py line asks for the nonlinear shift with
    steerling's init and a linear schedule after 3% warmup. Elsewhere the recipe is refused."""
    args = compare.parse_args(["--init", str(tiny_base), "--budget", "lm-1000", "--steps", "200",
                               "--methods", "full,linear_block_out,recipe_block_out", "--out-dir", str(tmp_path)])
    assert args.grid["recipe"] == [9e-4] and args.grid["shift"] == [3e-4, 1e-3, 3e-3]
    line = " ".join(compare.train_argv(args, "recipe_block_out", "listops", 0, {"--lr": 9e-4}, "x"))
    assert "--adapter nonlinear --site block_out --shift-init steerling --schedule linear --warmup 6" in line
    assert [compare.planned_runs(args, m) for m in args.methods] == [3, 5, 1]     # full: 1 rate, 3 seeds
    with pytest.raises(ValueError, match="recipe_block_out runs only with a budget"):
        compare.parse_args(["--init", str(tiny_base), "--methods", "recipe_block_out", "--out-dir", str(tmp_path / "b")])



def test_the_curve_reads_each_budgets_table_and_pairs_its_seeds(tmp_path, monkeypatch):
    """experiments/curve.py on two made-up tables: each budget's accuracies and paired comparisons
    are stats' own numbers over the seeds both methods ran; a budget not run yet is left out."""
    from experiments import curve
    right = lambda n: "1" * n + "0" * (100 - n)                              # n of 100 prompts right
    tables = {"verdict": (300, {"full": [90, 80], "linear_block_out": [85, 70]}),
              "curve-1000": (1000, {"full": [95], "linear_block_out": [94], "recipe_block_out": [96, 50]})}
    for name, (steps, methods) in tables.items():
        folder = tmp_path / "results" / "smollm2" / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"config": {"steps": steps, "batch_size": 16}}))
        (folder / "outcomes.json").write_text(json.dumps(
            {f"listops/{m}/seed{s}": right(n) for m, ns in methods.items() for s, n in enumerate(ns)}))
    monkeypatch.setattr(curve, "ROOT", tmp_path)
    found = curve.budgets()
    assert [(steps, seen) for steps, seen, _ in found] == [(300, 4800), (1000, 16000)]
    runs = found[1][2]
    assert curve.compare(runs, "linear_block_out", "full", "within")[4] == 1             # seed 0 only
    diff, low, high = stats.paired_interval([(right(85), right(90)), (right(70), right(80))])
    assert curve.compare(found[0][2], "linear_block_out", "full", "within") == (
        diff, low, high, stats.verdict("within", low, high), 2)
    assert diff == -7.5
    text = curve.table(found)
    assert f"| 300 | claim 1: post-block − full fine-tuning | -7.5 | 2 | [{low:+.1f}, {high:+.1f}] |" in text
    assert "| 1000 | steerling's recipe − post-block (ours) | +2.0 | 1 |" in text
    assert "| 300 | steerling's recipe" not in text                                # it did not run there
