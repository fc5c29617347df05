"""
Tests of nanosteer.py: every adapter starts as an exact no-op, LoRA is an exact activation shift
(THEORY §3) and merges into the weights, ReFT keeps R orthonormal, the joint constraint of
THEORY §7, each slot acts only downstream of its site, one-line errors, the parameter report,
steered generation, tiny adapter files that reload exactly, and misuse refused in one line before
anything changes (wrong types, typos, a layer already adapted, damaged files, other base weights).

Run:  python -m pytest tests/test_nanosteer.py -q
"""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from formats import adapters  # noqa: E402
import nanosteer  # noqa: E402
from model import GPT, SITES, GPTConfig  # noqa: E402
from nanosteer import LoRALinear, capture, freeze, lora, merge, orthogonalize, report, steer  # noqa: E402

KINDS = ("vector", "linear", "nonlinear", "reft")

torch.set_num_threads(1)  # tensors this small run faster on one thread than on a busy pool

def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32), **kw})


def random_model(config, seed=0):
    """A model with every parameter random (biases and LayerNorms too), in eval mode."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tokens(config, B=2, T=12, seed=1):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, idx):
    return model(idx)[0]


@torch.no_grad()
def randomize(params, scale=0.5, seed=3):
    """Give adapter tensors (U, v, lora_B, ...) nonzero values so the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# every adapter starts as an exact no-op (DESIGN: "a test proves the output equals the base model's")


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("site", SITES)
def test_fresh_shift_leaves_logits_unchanged(site, kind, mlp):
    config = tiny_config(mlp=mlp)
    model = random_model(config)
    idx = tokens(config)
    before = logits_of(model, idx)
    shifts = steer(model, site, kind, rank=3)  # every layer
    assert len(shifts) == config.n_layer
    after = logits_of(model, idx)
    if kind == "reft":  # Rᵀ(W s + b − R s) with W = R: zero up to rounding
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_fresh_lora_leaves_logits_unchanged(mlp):
    config = tiny_config(mlp=mlp)
    model = random_model(config)
    idx = tokens(config)
    before = logits_of(model, idx)
    added = lora(model, rank=4, alpha=8)
    assert len(added) == config.n_layer * (5 if mlp == "glu" else 4)  # c_attn, c_proj x2, c_fc (, c_gate)
    assert all(torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in added)
    assert torch.equal(logits_of(model, idx), before)


# ---------------------------------------------------------------------------------------------
# THEORY §3, the exact bridge: a LoRA update is an activation shift of the layer's output


def test_lora_is_a_shift_of_the_layer_output_by_scaled_BAx():
    config = tiny_config()
    model = random_model(config)
    base = copy.deepcopy(model.transformer.h[0].mlp.c_fc)  # the untouched nn.Linear
    rank, alpha = 4, 12.0
    (layer,) = lora(model, rank, alpha, targets=("mlp.c_fc",), layers=[0])
    randomize([layer.lora_B], scale=0.1)
    x = torch.randn(2, 12, config.n_embd)
    with torch.no_grad():  # the reference in float64, the product B·A formed first
        delta = (alpha / rank) * torch.einsum("oi,bti->bto", layer.lora_B.double() @ layer.lora_A.double(), x.double())
        reference = base.double()(x.double()) + delta
        torch.testing.assert_close(layer(x).double(), reference, rtol=0, atol=1e-6)
        assert delta.abs().max() > 0.1


class Stash(nn.Module):
    """A test-only shift for the mlp_hidden slot: adds nothing, keeps m for the next slot."""
    def forward(self, m):
        self.m = m
        return torch.zeros_like(m)


class ShiftByLoRA(nn.Module):
    """A test-only shift for the mlp_out slot: Δ(y) = (alpha/r)·B·A·m, m read from the Stash."""
    def __init__(self, stash, A, B, scale):
        super().__init__()
        self.stash, self.A, self.B, self.scale = stash, A, B, scale

    def forward(self, y):
        return self.scale * (self.stash.m @ self.A.T @ self.B.T)


def test_lora_on_mlp_c_proj_equals_steering_at_mlp_out():
    # The same bridge inside the model: LoRA on mlp.c_proj of layer 1 gives the logits of the base
    # model steered at mlp_out of layer 1 by a shift that reads the MLP's hidden activation m.
    config = tiny_config()
    model = random_model(config)
    steered = copy.deepcopy(model)
    idx = tokens(config)
    (layer,) = lora(model, rank=3, alpha=5.0, targets=("mlp.c_proj",), layers=[1])
    randomize([layer.lora_B])
    slots = steered.transformer.h[1].slots
    slots["mlp_hidden"].shift = Stash()
    slots["mlp_out"].shift = ShiftByLoRA(slots["mlp_hidden"].shift, layer.lora_A.detach(), layer.lora_B.detach(), 5.0 / 3)
    torch.testing.assert_close(logits_of(steered, idx), logits_of(model, idx), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_merge_gives_the_logits_of_unmerged_lora(mlp):
    config = tiny_config(mlp=mlp)
    model = random_model(config)
    keys = set(model.state_dict())
    idx = tokens(config)
    added = lora(model, rank=4, alpha=6.0)  # alpha / r = 1.5
    randomize([m.lora_B for m in added], scale=0.2)
    c_fc = model.transformer.h[0].mlp.c_fc
    expected_weight = c_fc.weight + 1.5 * c_fc.lora_B @ c_fc.lora_A
    model.train().eval()  # switching modes must not merge anything
    assert isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)
    unmerged = logits_of(model, idx)
    merge(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == keys  # plain Linear layers again, under the same names
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight, expected_weight, rtol=0, atol=1e-7)
    merged = logits_of(model, idx)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert (merged - logits_of(random_model(config), idx)).abs().max() > 1e-3  # and LoRA did change them


# ---------------------------------------------------------------------------------------------
# ReFT and the joint constraint


def test_reft_R_stays_orthonormal_under_adam():
    config = tiny_config()
    model = freeze(random_model(config))
    shifts = steer(model, "mlp_out", "reft", rank=4)
    R0 = [s.R().detach().clone() for s in shifts]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    idx, targets = tokens(config), tokens(config, seed=2)
    for _ in range(6):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for s, r0 in zip(shifts, R0):
            R = s.R()
            torch.testing.assert_close(R @ R.T, torch.eye(4), rtol=0, atol=1e-5)
            assert (R - r0).abs().max() > 1e-3  # R did move
            # LoReFT's defining property: the edited s has R-coordinates W s + b, and the edit
            # lies in R's row space
            x = torch.randn(5, config.n_embd)
            delta = s(x)
            torch.testing.assert_close(R @ (x + delta).T, (x @ s.W.T + s.b).T, rtol=0, atol=1e-5)
            torch.testing.assert_close(delta @ R.T @ R, delta, rtol=0, atol=1e-5)


def joint_model(kind):
    config = tiny_config()
    model = freeze(random_model(config))
    loras = lora(model, rank=3, alpha=6.0, targets=("mlp.c_proj",))
    shifts = steer(model, "block_out", kind, rank=4)
    return model, loras, shifts


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_orthogonalize_changes_nothing_while_B_is_zero(kind):
    model, _, shifts = joint_model(kind)
    before = [s.D.detach().clone() for s in shifts]
    orthogonalize(model)
    assert all(torch.equal(s.D, d) for s, d in zip(shifts, before))


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_orthogonalize_makes_D_blind_to_col_B(kind):
    model, loras, shifts = joint_model(kind)
    randomize([m.lora_B for m in loras])
    before = [s.D.detach().clone() for s in shifts]
    orthogonalize(model)
    for m, s, d in zip(loras, shifts, before):
        V = torch.linalg.qr(m.lora_B.detach()).Q  # (d, 3), an orthonormal basis of col(B), found another way
        assert (s.D @ V).abs().max() < 1e-5
        torch.testing.assert_close(s.D, d - d @ V @ V.T, rtol=0, atol=1e-6)  # and nothing else moved
        with torch.no_grad():  # so the adapter cannot read what LoRA writes: Δ(z + B c) = Δ(z)
            z, c = torch.randn(5, 32), torch.randn(5, 3)
            torch.testing.assert_close(s(z + c @ m.lora_B.T), s(z), rtol=0, atol=1e-5)


def test_orthogonalize_skips_zero_singular_directions():
    model, loras, shifts = joint_model("linear")
    randomize([m.lora_B for m in loras])
    with torch.no_grad():
        for m in loras:
            m.lora_B[:, 2] = 0  # B has rank 2: only two directions are written into
    before = [s.D.detach().clone() for s in shifts]
    orthogonalize(model)
    for m, s, d in zip(loras, shifts, before):
        V = torch.linalg.qr(m.lora_B.detach()[:, :2]).Q
        torch.testing.assert_close(s.D, d - d @ V @ V.T, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# capture, and each slot acting only downstream of its site


def test_capture_records_what_the_network_saw():
    config = tiny_config()
    model = random_model(config)
    idx = tokens(config)
    with torch.no_grad(), capture(model, SITES) as acts:
        logits, _ = model(idx)
    assert set(acts) == set(SITES) and all(len(v) == config.n_layer for v in acts.values())
    assert acts["mlp_hidden"][0].shape == (2, 12, 4 * config.n_embd)
    block = model.transformer.h[1]
    with torch.no_grad():  # each recorded value, recomputed from the one before it
        torch.testing.assert_close(acts["mlp_out"][1], block.mlp.c_proj(acts["mlp_hidden"][1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(acts["block_out"][1], acts["resid_mid"][1] + acts["mlp_out"][1], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.lm_head(model.transformer.ln_f(acts["block_out"][-1])), logits, rtol=0, atol=1e-6)
    assert all(not slot.recording and slot.activation is None for b in model.transformer.h for slot in b.slots.values())


@pytest.mark.parametrize("site", SITES)
def test_a_filled_slot_changes_only_what_is_downstream(site):
    config = tiny_config(n_layer=3)
    model = random_model(config)
    idx = tokens(config)
    with torch.no_grad(), capture(model) as base:
        base_logits, _ = model(idx)
    (shift,) = steer(model, site, "linear", rank=2, layers=[1])
    randomize([shift.U])
    with torch.no_grad(), capture(model) as steered:
        steered_logits, _ = model(idx)
    for layer in range(config.n_layer):
        for other in SITES:
            upstream = layer < 1 or (layer == 1 and SITES.index(other) < SITES.index(site))
            a, b = base[other][layer], steered[other][layer]
            if upstream:
                assert torch.equal(a, b), f"layer {layer} {other} changed by a shift at layer 1 {site}"
            else:
                assert (a - b).abs().max() > 1e-3, f"layer {layer} {other} not reached from layer 1 {site}"
    assert (steered_logits - base_logits).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# errors are one line; the paper's site names work


def one_line_error(match, fn, *args, **kw):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors():
    model = random_model(tiny_config())
    one_line_error("unknown site 'post_attn'", steer, model, "post_attn", "linear")
    one_line_error("unknown adapter kind 'bogus'", steer, model, "block_out", "bogus")
    one_line_error("unknown activation 'softplus'", steer, model, "block_out", "nonlinear", act="softplus")
    one_line_error("rank 0 is out of range", steer, model, "block_out", "linear", rank=0)
    one_line_error("rank 33 is out of range", steer, model, "block_out", "linear", rank=33)  # width d = 32
    one_line_error("rank 129 is out of range", steer, model, "mlp_hidden", "reft", rank=129)  # width 4d = 128
    one_line_error(r"layers \[2\] do not exist", steer, model, "block_out", "linear", layers=[2])
    one_line_error(r"layers \[-1\] do not exist", steer, model, "block_out", "linear", layers=[-1])
    one_line_error("LoRA rank 0 is out of range", lora, model, rank=0)
    one_line_error("unknown site", capture(model, ["nowhere"]).__enter__)
    assert all(s.shift is None for b in model.transformer.h for s in b.slots.values())  # nothing half-attached
    steer(model, "block_out", "linear", layers=[0])
    one_line_error("already holds a linear shift", steer, model, "block_out", "vector", layers=[0])


@pytest.mark.parametrize("alias,site", [("pre_mlp", "attn_out"), ("post_mlp", "mlp_out"), ("post_block", "block_out")])
def test_paper_site_names_are_aliases(alias, site):
    model = random_model(tiny_config())
    shifts = steer(model, alias, "vector")
    assert [b.slots[site].shift for b in model.transformer.h] == shifts
    with torch.no_grad(), capture(model, [alias]) as acts:
        model(tokens(model.config))
    assert list(acts) == [site]


# ---------------------------------------------------------------------------------------------
# report


def base_param_count(c):
    """GPT-2's parameters, counted by hand (lm_head is tied to wte)."""
    d = c.n_embd
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return c.vocab_size * d + c.block_size * d + c.n_layer * per_block + 2 * d


def test_report_counts_match_hand_computed_numbers():
    config = tiny_config()
    d, L = config.n_embd, config.n_layer
    model = random_model(config)
    base = base_param_count(config)
    assert report(model) == dict(trainable=base, lora=0, shifts=0, weights=base, base_params=base, pct=100.0)
    freeze(model)
    steer(model, "block_out", "linear", rank=4)
    r = report(model)
    assert r["trainable"] == r["shifts"] == 2 * d * 4 * L == 512
    assert r["base_params"] == base and r["lora"] == 0 and r["weights"] == 0
    assert r["pct"] == pytest.approx(100.0 * 512 / base)
    steer(model, "mlp_hidden", "reft", rank=3)     # width 4d: 2·(4d)·r + r per layer
    steer(model, "attn_out", "vector")             # d per layer
    lora(model, rank=2)                            # r·(in + out) per Linear: c_attn 4d, c_proj 2d, c_fc 5d, c_proj 5d
    r = report(model)
    shifts = 512 + L * (2 * 4 * d * 3 + 3) + L * d
    assert r["shifts"] == shifts and r["lora"] == L * 2 * 16 * d
    assert r["trainable"] == shifts + L * 2 * 16 * d and r["base_params"] == base and r["weights"] == 0


# ---------------------------------------------------------------------------------------------
# generation with a filled slot


def test_a_shift_acts_at_every_position_during_generate():
    config = tiny_config()
    model = random_model(config)
    prompt = tokens(config, B=2, T=6)
    plain = model.generate(prompt, max_new_tokens=8, temperature=0)
    (shift,) = steer(model, "block_out", "vector", layers=[0])
    randomize([shift.v], scale=0.5)
    steered = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert not torch.equal(steered, plain)

    @torch.no_grad()
    def logits_by_hand(idx, positions):
        # the base model, run block by block, with v added to layer 0's output at `positions`
        T = idx.size(1)
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))
        x = model.transformer.h[0](x) - shift.v  # h[0] holds the shift: take it out again
        x[:, positions(T)] += shift.v
        x = model.transformer.h[1](x)
        return model.lm_head(model.transformer.ln_f(x))

    idx = prompt
    for _ in range(8):  # greedy decoding with the shift at every position, prompt and generated alike
        idx = torch.cat([idx, logits_by_hand(idx, lambda T: slice(0, T))[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(steered, idx)
    # the steered model's next-token logits are not those of a shift at the newest token only
    last_only = logits_by_hand(steered, lambda T: slice(T - 1, T))[:, -1]
    assert (logits_of(model, steered)[:, -1] - last_only).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# adapter files


def test_save_load_round_trip_reproduces_logits(tmp_path):
    config = tiny_config()
    model = freeze(random_model(config))
    fresh = copy.deepcopy(model)  # the same base weights, no adapters
    steer(model, "block_out", "linear", rank=4)
    steer(model, "mlp_hidden", "nonlinear", rank=3, act="tanh")
    steer(model, "attn_out", "vector", layers=[1])
    steer(model, "mlp_out", "reft", rank=2, layers=[0])
    lora(model, rank=2, alpha=3.0, targets=("c_attn", "mlp.c_proj"))
    held = nanosteer.adapter_parameters(model)
    randomize(p for name, p in held.items() if not name.endswith(("D", "lora_A", "R_free")))
    path = str(tmp_path / "adapters.pt")
    adapters.save(model, path)
    adapters.load(fresh, path)
    idx = tokens(config)
    assert torch.equal(logits_of(fresh, idx), logits_of(model, idx))
    assert fresh.transformer.h[0].slots["mlp_hidden"].shift.act == "tanh"  # recorded, not defaulted
    assert report(fresh) == report(model)
    with torch.no_grad():  # silu in place of tanh would have given other logits
        fresh.transformer.h[0].slots["mlp_hidden"].shift.act = "silu"
        assert (logits_of(fresh, idx) - logits_of(model, idx)).abs().max() > 1e-4


@pytest.mark.parametrize("field,value", [("n_embd", 48), ("n_layer", 3), ("vocab_size", 67)])
def test_load_onto_a_mismatched_model_names_the_field(tmp_path, field, value):
    model = random_model(tiny_config())
    steer(model, "block_out", "linear", rank=4)
    path = str(tmp_path / "adapters.pt")
    adapters.save(model, path)
    other = random_model(tiny_config(**{field: value}))
    one_line_error(f"{field}", adapters.load, other, path)


def test_adapter_file_is_tiny_and_holds_only_adapter_tensors(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # the default 4-layer, d = 128 model
    full = str(tmp_path / "full.pt")
    model.save(full)
    base_keys = set(model.state_dict())
    freeze(model)
    steer(model, "post_block", "linear", rank=4)
    small = str(tmp_path / "adapters.pt")
    adapters.save(model, small)
    ratio = os.path.getsize(small) / os.path.getsize(full)
    assert ratio < 0.01, f"adapter file is {100 * ratio:.2f}% of the full checkpoint"
    payload = torch.load(small, map_location="cpu", weights_only=True)
    tensors = payload["tensors"]
    assert not base_keys & set(tensors)
    assert all(".shift." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == 2 * 128 * 4 * 4 == report(model)["trainable"]
    assert payload["adapters"][0] == dict(layer=0, site="block_out", kind="linear", rank=4, act=None)


# ---------------------------------------------------------------------------------------------
# oracle shifts (THEORY §6), other dtypes, loading across dropout


class Constant(nn.Module):
    """A slot content that adds a fixed tensor: used to replay oracle shifts."""

    def __init__(self, delta):
        super().__init__()
        self.delta = delta

    def forward(self, s):
        return self.delta


def test_adding_the_oracle_at_every_layer_reproduces_the_tuned_model():
    config = tiny_config(n_layer=3)
    base, tuned = random_model(config), random_model(config)
    with torch.no_grad():                        # fine-tune every block weight (embeddings stay)
        for p in tuned.transformer.h.parameters():
            p.add_(0.1 * torch.randn_like(p))
    idx = tokens(config)
    deltas = nanosteer.oracle(base, tuned, idx)
    assert [d.shape for d in deltas] == [(2, 12, config.n_embd)] * 3
    for block, delta in zip(base.transformer.h, deltas):
        block.slots["block_out"].shift = Constant(delta)
    gap = (logits_of(base, idx) - logits_of(tuned, idx)).abs().max()
    assert gap < 1e-5
    # the naive difference of the two runs' block outputs does NOT replay beyond layer 0
    with capture(tuned, ["block_out"]) as t:
        tuned(idx)
    for block in base.transformer.h:
        block.slots["block_out"].shift = None
    with capture(base, ["block_out"]) as b:
        base(idx)
    naive = [zt - zb for zt, zb in zip(t["block_out"], b["block_out"])]
    torch.testing.assert_close(naive[0], deltas[0])
    assert (naive[2] - deltas[2]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_take_the_model_dtype_and_merge_keeps_it(kind):
    config = tiny_config()
    model = random_model(config).double()
    idx = tokens(config)
    before = logits_of(model, idx)
    shifts = steer(model, "block_out", kind, rank=3)
    loras = lora(model, 2, alpha=3.0)
    assert all(p.dtype == torch.float64 for s in shifts for p in s.parameters())
    assert all(l.lora_A.dtype == l.lora_B.dtype == torch.float64 for l in loras)
    torch.testing.assert_close(logits_of(model, idx), before, rtol=0, atol=1e-12)
    randomize([l.lora_B for l in loras])
    unmerged = logits_of(model, idx)
    merge(model)
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.float64
    torch.testing.assert_close(logits_of(model, idx), unmerged, rtol=0, atol=1e-10)


def test_orthogonalize_in_float64_reaches_float64_precision():
    model = random_model(tiny_config()).double()
    shifts, loras = steer(model, "block_out", "linear", 3), lora(model, 3, targets=("mlp.c_proj",))
    randomize([l.lora_B for l in loras])
    orthogonalize(model)
    for s, l in zip(shifts, loras):
        V = torch.linalg.qr(l.lora_B).Q
        assert (s.D @ V).abs().max() < 1e-12


def test_layers_may_be_one_int_and_load_ignores_dropout(tmp_path):
    model = random_model(tiny_config())
    (shift,) = steer(model, "mlp_out", "linear", 2, layers=1)
    randomize([shift.U])
    adapters.save(model, str(tmp_path / "a.pt"))
    other = random_model(tiny_config(dropout=0.1))
    other.load_state_dict(model.state_dict(), strict=False)
    adapters.load(other.eval(), str(tmp_path / "a.pt"))
    idx = tokens(tiny_config())
    torch.testing.assert_close(logits_of(other, idx), logits_of(model, idx))


@pytest.mark.parametrize("content", [b"not a torch file", b""])
def test_loading_a_file_that_is_not_an_adapter_file_is_a_one_line_error(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(ValueError, match="is not a nanosteer adapter file") as e:
        adapters.load(random_model(tiny_config()), str(tmp_path / "bad.pt"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# hazards found by a careful reader


@pytest.mark.parametrize("with_shift", [False, True])
def test_save_after_merge_is_refused_rather_than_losing_the_update(tmp_path, with_shift):
    """merge() moves LoRA into the weights; an adapter file written then would hold nothing of it
    (or only the shifts), and loading it onto the base would give other logits without a word."""
    config = tiny_config()
    model = random_model(config)
    randomize([m.lora_B for m in lora(model, rank=2)], scale=0.2)
    if with_shift:                                  # joint: the shifts alone would be saved
        randomize([s.U for s in steer(model, "block_out", "linear", rank=2)])
    path = tmp_path / "adapters.pt"
    adapters.save(model, str(path))                # before merge: fine, and it reloads exactly
    idx = tokens(config)
    expected = logits_of(model, idx)
    torch.testing.assert_close(logits_of(adapters.load(random_model(config), str(path)), idx), expected)
    path.unlink()
    merge(model)
    with pytest.raises(ValueError, match="LoRA is merged into this model's weights") as e:
        adapters.save(model, str(path))
    assert "\n" not in str(e.value) and not path.exists() and not (tmp_path / "adapters.pt.tmp").exists()


def test_capture_keeps_the_last_forward_as_its_docstring_says():
    config = tiny_config()
    model = random_model(config)
    first, second = tokens(config, seed=1), tokens(config, seed=2)
    with torch.no_grad(), capture(model, ["block_out"]) as both:
        model(first)
        model(second)
    with torch.no_grad(), capture(model, ["block_out"]) as only_first:
        model(first)
    with torch.no_grad(), capture(model, ["block_out"]) as only_second:
        model(second)
    assert torch.equal(both["block_out"][1], only_second["block_out"][1])
    assert not torch.equal(both["block_out"][1], only_first["block_out"][1])
    assert "LAST forward" in capture.__doc__ and "during the forwards" not in capture.__doc__


# ---------------------------------------------------------------------------------------------
# misuse, as a student in a notebook: every argument checked before anything changes


def snapshot(model):
    """Everything a refused call must leave as it was: tensor names and values, adapters."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_steer_and_lora_check_every_layer_before_changing_any():
    model = random_model(tiny_config())
    steer(model, "block_out", "linear", layers=[1])
    lora(model, 2, layers=[1])
    before = snapshot(model)
    one_line_error("layer 1 block_out already holds", steer, model, "block_out", "vector")
    one_line_error("layer 1 attn.c_attn already has LoRA", lora, model, 2)
    assert model.transformer.h[0].slots["block_out"].shift is None
    assert not isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)
    assert unchanged(model, before)


def test_a_typo_in_lora_targets_is_an_error_naming_the_valid_targets():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="unknown LoRA target 'c_atn'.*attn.c_attn.*mlp.c_fc") as e:
        lora(model, 2, targets=("c_atn",))
    assert "\n" not in str(e.value) and nanosteer.adapter_parameters(model) == {}
    one_line_error("unknown LoRA target 'c_gate'", lora, model, 2, targets=("c_gate",))  # GPT-2: no gate
    assert len(lora(model, 2, targets="mlp.c_fc")) == 2                 # one name, as a string
    assert len(lora(random_model(tiny_config(mlp="glu")), 2)) == 2 * 5  # default: every Linear


WRONG = [
    (lambda m: lora(m, 2, alpha=0), "LoRA alpha 0 must be a positive number"),
    (lambda m: lora(m, 2, alpha=-1.0), "LoRA alpha -1.0 must be a positive number"),
    (lambda m: lora(m, 2, alpha=float("nan")), "LoRA alpha nan"),
    (lambda m: lora(m, 2, alpha=True), "LoRA alpha True"),
    (lambda m: lora(m, 2.5), "LoRA rank 2.5 is out of range"),
    (lambda m: lora(m, True), "LoRA rank True is out of range"),
    (lambda m: lora(m, "2"), "LoRA rank '2' is out of range"),
    (lambda m: lora(m, 2, targets=3), "LoRA targets must be a list"),
    (lambda m: steer(m, "block_out", "linear", rank=2.5), "rank 2.5 is out of range"),
    (lambda m: steer(m, "block_out", "linear", rank=True), "rank True is out of range"),
    (lambda m: steer(m, "block_out", "linear", layers="0,1"), "layers must be an int or a list of ints"),
    (lambda m: steer(m, "block_out", "linear", layers=[0, 0]), "name a layer twice"),
    (lambda m: steer(m, "block_out", "linear", layers=[0.0]), "layers must be an int or a list"),
    (lambda m: steer(m, ["block_out"], "linear"), "unknown site"),
    (lambda m: lora(m, 2, layers="1"), "layers must be an int or a list of ints"),
]


@pytest.mark.parametrize("call,match", WRONG, ids=[f"{i}:{match}" for i, (_, match) in enumerate(WRONG)])
def test_wrong_values_and_types_are_one_line_value_errors_that_change_nothing(call, match):
    model = random_model(tiny_config())
    before = snapshot(model)
    one_line_error(match, call, model)
    assert unchanged(model, before)


def test_save_makes_missing_folders_and_refuses_a_folder_or_a_file_in_the_way(tmp_path):
    model = random_model(tiny_config())
    steer(model, "block_out", "vector")
    path = tmp_path / "new" / "deeper" / "adapters.pt"
    adapters.save(model, str(path))
    assert nanosteer.adapter_parameters(adapters.load(random_model(tiny_config()), str(path)))
    assert os.listdir(path.parent) == ["adapters.pt"]                    # no temporary file left
    one_line_error(r"cannot write .*new \(Is a directory", adapters.save, model, str(tmp_path / "new"))
    one_line_error(r"cannot write .*x.pt \(File exists: .*adapters.pt\)", adapters.save, model,
                   str(path / "x.pt"))                                   # a file where a folder is wanted
    assert os.listdir(path.parent) == ["adapters.pt"]                    # nothing left behind


# ---------------------------------------------------------------------------------------------
# adapter files checked as a whole before anything changes


def saved_adapters(tmp_path, edit=None):
    """A model with two kinds of adapters saved to a file; edit(payload) damages it first.
    -> (path, a fresh model of the same base)."""
    config = tiny_config()
    model = random_model(config)
    steer(model, "block_out", "linear", rank=2)
    lora(model, 2, targets=("c_attn",), layers=[1])
    path = str(tmp_path / "adapters.pt")
    adapters.save(model, path)
    if edit is not None:
        payload = torch.load(path, weights_only=True)
        edit(payload)
        torch.save(payload, path)
    return path, random_model(config)


def drop(key):
    return lambda payload: payload.pop(key)


def set_tensor(key, value):
    return lambda payload: payload["tensors"].__setitem__(key, value)


U0 = "transformer.h.0.slots.block_out.shift.U"
BROKEN = {
    "no base_config": (drop("base_config"), "base_config is missing or malformed"),
    "no tensors": (drop("tensors"), "tensors is missing or malformed"),
    "no format": (drop("format"), "is not a nanosteer adapter file"),
    "missing tensor": (lambda p: p["tensors"].pop(U0), f"{U0} is missing"),
    "extra tensor": (set_tensor("transformer.h.0.evil", torch.zeros(2)), "transformer.h.0.evil is not expected"),
    "wrong shape": (set_tensor(U0, torch.zeros(32, 3)), r"must be a finite float tensor of shape \(32, 2\)"),
    "integer tensor": (set_tensor(U0, torch.zeros(32, 2, dtype=torch.long)), "must be a finite float"),
    "not a tensor": (set_tensor(U0, [[0.0] * 2] * 32), "must be a finite float tensor"),
    "NaN tensor": (set_tensor(U0, torch.full((32, 2), float("nan"))), "must be a finite float tensor"),
    "unknown kind": (lambda p: p["adapters"][0].update(kind="bogus"), "unknown adapter kind 'bogus'"),
    "entry without rank": (lambda p: p["adapters"][0].pop("rank"), "adapter 0 cannot be rebuilt"),
    "entry not a dict": (lambda p: p["adapters"].__setitem__(0, "x"), "adapter 0 cannot be rebuilt"),
    "layer out of range": (lambda p: p["adapters"][0].update(layer=7), r"layers \[7\] do not exist"),
    "twice the same place": (lambda p: p["adapters"].append(dict(p["adapters"][0])), "two adapters for one place"),
    "other config": (lambda p: p["base_config"].update(n_head=4), "n_head=4, this model has n_head=2"),
    "config field lost": (lambda p: p["base_config"].pop("rope_theta"), "rope_theta=None"),
    "older format": (lambda p: (p.update(format="nanosteer-adapters-1"), p.pop("base_sha256")),
                     "other base weights"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_damaged_adapter_file_is_refused_in_one_line_and_the_model_is_untouched(tmp_path, name):
    edit, match = BROKEN[name]
    path, model = saved_adapters(tmp_path, edit)
    before = snapshot(model)
    one_line_error(match, adapters.load, model, path)
    assert unchanged(model, before) and nanosteer.adapter_parameters(model) == {}


def test_adapters_made_on_other_base_weights_are_refused_unless_asked(tmp_path):
    path, same_base = saved_adapters(tmp_path)
    other_base = random_model(tiny_config(), seed=5)             # same config, other weights
    before = snapshot(other_base)
    one_line_error("made on other base weights .* any_base=True", adapters.load, other_base, path)
    assert unchanged(other_base, before)
    adapters.load(other_base, path, any_base=True)             # asked for: loaded
    assert len(nanosteer.adapter_parameters(other_base)) == 2 * 2 + 2   # D, U per layer; A, B
    adapters.load(same_base.double(), path)                    # the same base in float64: the same
    adapters.load(random_model(tiny_config()).to(torch.bfloat16), path)  # and in bfloat16


def test_the_base_check_covers_every_weight_not_a_sample_of_them(tmp_path):
    path, base = saved_adapters(tmp_path)
    for name, tensor in base.state_dict().items():               # every entry, of every tensor
        for i in (1, tensor.numel() // 3):                         # (the old check read 8 of each)
            other = copy.deepcopy(base)
            with torch.no_grad():
                other.state_dict()[name].view(-1)[i] += 0.5
            one_line_error("made on other base weights", adapters.load, other, path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.transformer.ln_f.weight[1] += 1e-6                   # below bfloat16's precision, not float32's
    one_line_error("made on other base weights", adapters.load, other, path)
    one_line_error("made on other base weights", adapters.load, other.to(torch.bfloat16).float(), path)
    adapters.load(other.to(torch.bfloat16), path)                  # held in bfloat16: the base, rounded


def test_a_format_2_file_still_loads_onto_its_base_with_the_check_it_was_saved_with(tmp_path):
    def as_format_2(payload):
        payload.update(format="nanosteer-adapters-2", base_fingerprint=adapters.sampled_fingerprint(base))
        del payload["base_sha256"], payload["base_sha256_bf16"]
    base = random_model(tiny_config())
    path, _ = saved_adapters(tmp_path, as_format_2)
    adapters.load(random_model(tiny_config()), path)
    one_line_error(r"other base weights \(nanosteer-adapters-2: a fingerprint of 8 entries",
                   adapters.load, random_model(tiny_config(), seed=5), path)


def test_load_onto_a_model_that_already_holds_an_adapter_changes_nothing(tmp_path):
    path, model = saved_adapters(tmp_path)
    steer(model, "mlp_out", "vector", layers=[1])               # an adapter elsewhere
    before = snapshot(model)
    one_line_error("already holds adapters .*mlp_out", adapters.load, model, path)
    assert unchanged(model, before)
    assert model.transformer.h[0].slots["block_out"].shift is None


class Hostile:
    """Unpickling this would create the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "adapters.pt"
    torch.save({"format": adapters.FORMAT, "tensors": Hostile(str(marker))}, str(path))
    one_line_error("is not a nanosteer adapter file", adapters.load, random_model(tiny_config()), str(path))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# bfloat16 models


def test_reft_works_on_a_bfloat16_model_and_starts_as_a_no_op():
    config = tiny_config()
    model = random_model(config).to(torch.bfloat16)
    idx = tokens(config)
    before = logits_of(model, idx)
    (shift,) = steer(model, "mlp_out", "reft", rank=3, layers=[0])
    assert shift.R().dtype == torch.bfloat16 and shift.W.dtype == torch.bfloat16
    assert torch.equal(logits_of(model, idx), before)                   # W = R: an exact no-op
    R = shift.R().float()
    assert (R @ R.T - torch.eye(3)).abs().max() < 1e-2                  # orthonormal to bf16 precision
    loss = model(idx, idx)[1]
    loss.backward()                                                     # the QR's gradient flows too
    assert shift.R_free.grad is not None and shift.R_free.grad.dtype == torch.bfloat16
