"""
Tests of nanosteer.fold, the bridge in reverse (THEORY §8): vector, linear and ReFT shifts next to
a Linear fold into its weight and bias with the logits unchanged (1e-5 in float32, 1e-10 in
float64), on GELU and GLU models; the rest is refused with a one-line error that names layer and
site, and a refused fold leaves the model untouched.

    python -m pytest tests/test_fold.py
"""
import pytest
import torch

import nanosteer as ns
from model import GPT, GPTConfig

FOLDABLE = {"attn_out": ("vector", "linear", "reft"), "resid_mid": ("vector",),
            "mlp_in": ("vector", "linear", "reft"), "mlp_hidden": ("vector", "linear", "reft"),
            "mlp_out": ("vector", "linear", "reft"), "block_out": ("vector",)}
CASES = [(site, kind) for site, kinds in FOLDABLE.items() for kind in kinds]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def tiny(mlp="gelu", dtype=torch.float64, **config):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, mlp=mlp, **config))
    with torch.no_grad():                           # GPT-2's init sets biases to 0: M b would vanish
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p) if name.endswith("bias") else 0)
    idx = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(1))
    return ns.freeze(model.to(dtype).eval()), idx


@torch.no_grad()
def randomize(shifts, seed=0):
    """Non-zero values for every parameter (a fresh shift is Δ = 0, which folds trivially)."""
    g = torch.Generator().manual_seed(seed)
    for shift in shifts:
        for p in shift.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mlp", ["gelu", "glu"])
@pytest.mark.parametrize("site,kind", CASES)
def test_fold_keeps_the_logits_and_empties_the_slots(site, kind, mlp, dtype):
    model, idx = tiny(mlp, dtype)
    base = logits(model, idx)
    randomize(ns.steer(model, site, kind, rank=3))
    steered = logits(model, idx)
    assert (steered - base).abs().max() > 1e-3    # the shift does something: 100 × the tolerance
    ns.fold(model)
    assert all(slot.shift is None for block in model.transformer.h for slot in block.slots.values())
    assert (logits(model, idx) - steered).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_every_foldable_slot_filled_at_once_folds_in_data_flow_order(mlp):
    model, idx = tiny(mlp)
    for site, kinds in FOLDABLE.items():            # the richest foldable kind at each site, all at once
        randomize(ns.steer(model, site, kinds[-1], rank=3), seed=len(site))
    steered = logits(model, idx)
    ns.fold(model)
    assert (logits(model, idx) - steered).abs().max() <= 1e-10


@pytest.mark.parametrize("site", ["resid_mid", "block_out"])
@pytest.mark.parametrize("kind", ["linear", "reft"])
def test_a_shift_that_reads_the_skip_path_is_refused(site, kind):
    model, _ = tiny()
    ns.steer(model, site, kind, rank=3, layers=1)
    with pytest.raises(ValueError, match=f"^layer 1 {site}: cannot fold a {kind} shift, .*skip path"):
        ns.fold(model)


@pytest.mark.parametrize("site", ["attn_out", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out",
                                  "block_out"])
def test_a_nonlinear_shift_is_refused_in_one_line_naming_the_site(site):
    model, _ = tiny("glu")
    ns.steer(model, site, "nonlinear", rank=3, layers=0)
    with pytest.raises(ValueError, match=f"^layer 0 {site}: cannot fold a nonlinear shift") as err:
        ns.fold(model)
    assert "\n" not in str(err.value) and "not affine" in str(err.value)


def test_a_refused_fold_changes_nothing():
    model, idx = tiny()
    shifts = ns.steer(model, "mlp_out", "linear", rank=3, layers=0)   # foldable, and checked first
    randomize(shifts)
    ns.steer(model, "block_out", "linear", rank=3, layers=1)          # not foldable
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    steered = logits(model, idx)
    with pytest.raises(ValueError, match="layer 1 block_out"):
        ns.fold(model)
    assert model.transformer.h[0].slots["mlp_out"].shift is shifts[0]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, idx), steered)


@pytest.mark.parametrize("site,target", [("mlp_out", "mlp.c_proj"), ("mlp_in", "c_gate"),
                                         ("attn_out", "attn.c_proj"), ("mlp_hidden", "mlp.c_proj")])
def test_lora_on_the_linear_is_refused_and_folds_after_merge(site, target):
    model, idx = tiny("glu")
    randomize(ns.lora(model, 2, targets=(target,)) + ns.steer(model, site, "linear", rank=3))
    steered = logits(model, idx)
    with pytest.raises(ValueError, match=f"layer 0 {site}: .*LoRA: nanosteer.merge first"):
        ns.fold(model)
    ns.fold(ns.merge(model))
    assert (logits(model, idx) - steered).abs().max() <= 1e-10


def test_without_biases_a_linear_shift_folds_and_a_vector_is_refused():
    model, idx = tiny("glu", bias=False)
    randomize(ns.steer(model, "mlp_in", "linear", rank=3) + ns.steer(model, "mlp_out", "linear", rank=3))
    steered = logits(model, idx)
    ns.fold(model)
    assert (logits(model, idx) - steered).abs().max() <= 1e-10
    assert all(block.mlp.c_proj.bias is None for block in model.transformer.h)   # none was added
    for kind in ("vector", "reft"):
        ns.steer(model, "attn_out", kind, rank=3, layers=1)
        with pytest.raises(ValueError, match=f"^layer 1 attn_out: cannot fold a {kind} shift, .*bias"):
            ns.fold(model)
        model.transformer.h[1].slots["attn_out"].shift = None


def test_fold_on_a_llama_style_model():
    model, idx = tiny("glu", norm="rmsnorm", pos="rotary", n_kv_head=1, bias=False, mlp_width=48)
    for site in ("attn_out", "mlp_in", "mlp_hidden", "mlp_out"):
        randomize(ns.steer(model, site, "linear", rank=3), seed=len(site))
    steered = logits(model, idx)
    ns.fold(model)
    assert (logits(model, idx) - steered).abs().max() <= 1e-10
