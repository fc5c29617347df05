"""
Tests of equivalence.py: each demonstration meets its threshold on a tiny model (2 layers, width 32,
float64), and a deliberately wrong formula fails the same check.

    python -m pytest tests/test_equivalence.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

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
    mlp_only = lambda b, d, xx: eq.jvp_change(b, {k: v for k, v in d.items() if k.startswith("mlp.")}, xx)
    errors = eq.first_order_errors(block, x, direction, predict=mlp_only)  # forgets the attention update
    assert abs(np.polyfit(np.log(eq.EPS), np.log(errors), 1)[0] - 1) <= 0.1


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
    out = eq.oracle_demo(model, idx, x, layer=1)
    assert out["replay_max_abs_err"] <= 1e-10
    assert out["rank90"] < out["rank90_noise"]
    assert 0 < out["linear_fit"] <= 1 and 0 < out["nonlinear_fit"] <= 1


def test_orthogonalize_removes_what_the_adapter_reads_from_col_B():
    model, _, _, _ = tiny()
    out = eq.ortho_demo(model)
    assert out["before"] > 1e-2
    assert out["after"] <= 1e-12                    # float64 model, float64 SVD


def test_main_writes_json_and_figures(tmp_path):
    model, _, _, _ = tiny()
    model.save(str(tmp_path / "model.pt"))
    assert eq.main(["--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "eq"), "--device", "cpu"])
    saved = json.loads((tmp_path / "eq" / "equivalence.json").read_text())
    keys = {"bridge_max_abs_err", "first_order_slope", "formula_vs_jvp_max_rel_err", "site_recovery", "skip_share",
            "wproj_zero", "projection_max_abs_err", "oracle", "ortho_max_abs", "device", "dtype", "seconds", "model"}
    assert keys <= set(saved) and saved["model"] == str(tmp_path / "model.pt")
    assert set(saved["first_order_slope"]) == {"gelu", "glu"} and set(saved["site_recovery"]) == set(eq.SITES)
    assert {"mlp_out", "block_out"} <= set(saved["wproj_zero"])
    assert {"rank90", "rank90_base", "rank90_noise", "linear_fit", "nonlinear_fit"} <= set(saved["oracle"])
    assert {"before", "after"} <= set(saved["ortho_max_abs"])
    assert (tmp_path / "eq" / "first_order.png").exists() and (tmp_path / "eq" / "sites.png").exists()
    for claim, measured, predicted, tol, op, ok in eq.claims(saved, exact=1e-10):
        assert ok, claim


def test_a_checkpoint_that_does_not_exist_is_a_one_line_error_with_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "equivalence.py", "--checkpoint", str(tmp_path / "missing.pt")],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "missing.pt" in proc.stderr
