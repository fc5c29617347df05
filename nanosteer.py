"""
nanosteer.py: what you can put into a slot (an activation shift) or onto a weight (LoRA).

Adila et al., 2026, "Weight Updates as Activation Shifts: A Principled Framework for Steering":
the shifts of THEORY §2, LoRA as the exact bridge of §3, the joint constraint of §7, and the
tools to look inside (capture, oracle shifts, a parameter report, tiny adapter files).
Every adapter starts as an exact no-op: U = 0, v = 0, LoRA's B = 0, ReFT's W = R.
Imports only model.py.
"""
import math
import os
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import SITES, Slot

ALIASES = {"pre_mlp": "attn_out", "post_mlp": "mlp_out", "post_block": "block_out"}  # the paper's names
ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}

# ---------------------------------------------------------------------------------------------
# activation shifts Δ(s) for an activation s of width n (THEORY §2); a Slot adds them: s + Δ(s)


class VectorShift(nn.Module):
    """Δ(s) = v, the same vector for every token. n parameters."""
    kind = "vector"

    def __init__(self, n, rank, act):
        super().__init__()
        self.rank, self.act = 0, None
        self.v = nn.Parameter(torch.zeros(n))

    def forward(self, s):
        return self.v  # broadcasts over (B, T)


class LinearShift(nn.Module):
    """Δ(s) = U D s with D (r×n) reading and U (n×r) writing. 2nr parameters. U = 0 at init, so
    Δ = 0, while D is random so that U gets a gradient from the first step (as LoRA's A and B)."""
    kind = "linear"

    def __init__(self, n, rank, act):
        super().__init__()
        self.rank, self.act = rank, None
        self.D = nn.Parameter(torch.randn(rank, n) / math.sqrt(n))
        self.U = nn.Parameter(torch.zeros(n, rank))

    def forward(self, s):
        return s @ self.D.T @ self.U.T          # (B, T, n) -> (B, T, r) -> (B, T, n)


class NonlinearShift(LinearShift):
    """Δ(s) = U σ(D s), σ = silu by default. 2nr parameters, the same as the linear shift."""
    kind = "nonlinear"

    def __init__(self, n, rank, act):
        super().__init__(n, rank, None)
        self.act = act

    def forward(self, s):
        return ACTIVATIONS[self.act](s @ self.D.T) @ self.U.T


class ReFTShift(nn.Module):
    """LoReFT (Wu et al., 2024): Δ(s) = Rᵀ(W s + b − R s), R with r orthonormal rows. R is the
    Q factor of a free matrix, recomputed every call, so it is orthonormal after any optimizer
    step. W starts equal to R and b at 0, so Δ = 0 at init. 2nr + r parameters."""
    kind = "reft"

    def __init__(self, n, rank, act):
        super().__init__()
        self.rank, self.act = rank, None
        self.R_free = nn.Parameter(torch.randn(n, rank) / math.sqrt(n))
        self.W = nn.Parameter(self.R().detach().clone())
        self.b = nn.Parameter(torch.zeros(rank))

    def R(self):
        return torch.linalg.qr(self.R_free).Q.T     # (r, n), R Rᵀ = I

    def forward(self, s):
        R = self.R()
        return (s @ self.W.T + self.b - s @ R.T) @ R


SHIFTS = {cls.kind: cls for cls in (VectorShift, LinearShift, NonlinearShift, ReFTShift)}


def site_width(config, site):
    return 4 * config.n_embd if site == "mlp_hidden" else config.n_embd


def resolve_site(site):
    site = ALIASES.get(site, site)
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}: choose one of {', '.join(SITES)} "
                         f"(or the paper's names {', '.join(ALIASES)})")
    return site


def check_layers(model, layers):
    n_layer = model.config.n_layer
    layers = list(range(n_layer)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layer]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} do not exist: this model has layers 0..{n_layer - 1}")
    return layers


def steer(model, site, kind="linear", rank=4, layers=None, act="silu"):
    """Put a fresh shift of `kind` into `site` of each chosen layer (all by default) and return
    the new shift modules. Their parameters are trainable; call freeze(model) first."""
    site = resolve_site(site)
    if kind not in SHIFTS:
        raise ValueError(f"unknown adapter kind {kind!r}: choose one of {', '.join(SHIFTS)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}: choose one of {', '.join(ACTIVATIONS)}")
    n = site_width(model.config, site)
    if kind != "vector" and not 1 <= rank <= n:
        raise ValueError(f"rank {rank} is out of range: it must be between 1 and the width {n} of {site}")
    device = model.transformer.wte.weight.device
    shifts = []
    for layer in check_layers(model, layers):
        slot = model.transformer.h[layer].slots[site]
        if slot.shift is not None:
            raise ValueError(f"layer {layer} {site} already holds a {slot.shift.kind} shift")
        slot.shift = SHIFTS[kind](n, rank, act).to(device)
        shifts.append(slot.shift)
    return shifts


def freeze(model):
    """Make every parameter present now untrainable (adapters attached later stay trainable)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model

# ---------------------------------------------------------------------------------------------
# LoRA (Hu et al., 2021): a low-rank update of a weight, THEORY §3


class LoRALinear(nn.Module):
    """y = W x + b + (alpha/r) · B A x, with A (r×in) random and B (out×r) zero at init.
    THEORY §3: the extra term is exactly an activation shift of this layer's output by
    (alpha/r)·B·A·x, a rank-r linear function of the layer's input. W and b are the original
    layer's own parameters (same tensors, same names), so the base weights are untouched."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        out_features, in_features = linear.weight.shape
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, device=device) / math.sqrt(in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def linear_layers(model, layers=None):
    """Yield (layer, 'attn.c_attn'-style path, parent module, child name, module) for the Linear
    (or LoRALinear) layers inside the chosen blocks."""
    for layer in check_layers(model, layers):
        block = model.transformer.h[layer]
        for parent_name, parent in (("attn", block.attn), ("mlp", block.mlp)):
            for name, child in parent.named_children():
                if isinstance(child, (nn.Linear, LoRALinear)):
                    yield layer, f"{parent_name}.{name}", parent, name, child


def lora(model, rank, alpha=None, targets=("c_attn", "c_proj", "c_fc", "c_gate"), layers=None):
    """Put LoRA (rank r, scale alpha/r; alpha defaults to 2r) on the Linear layers of each chosen
    block named in targets ('c_proj' means both attn.c_proj and mlp.c_proj; 'mlp.c_proj' just
    that one), and return the new LoRALinear modules."""
    alpha = 2 * rank if alpha is None else alpha
    added = []
    for layer, path, parent, name, child in list(linear_layers(model, layers)):
        if name not in targets and path not in targets:
            continue
        if isinstance(child, LoRALinear):
            raise ValueError(f"layer {layer} {path} already has LoRA")
        if not 1 <= rank <= min(child.weight.shape):
            raise ValueError(f"LoRA rank {rank} is out of range: {path} is {tuple(child.weight.shape)}, "
                             f"so the rank must be between 1 and {min(child.weight.shape)}")
        setattr(parent, name, LoRALinear(child, rank, alpha))
        added.append(getattr(parent, name))
    return added


@torch.no_grad()
def merge(model):
    """Fold every LoRA into its weight, W ← W + (alpha/r)·B·A, and put back a plain Linear."""
    for _, _, parent, name, child in list(linear_layers(model)):
        if isinstance(child, LoRALinear):
            out_features, in_features = child.weight.shape
            plain = nn.Linear(in_features, out_features, bias=child.bias is not None, device=child.weight.device)
            plain.weight.copy_(child.weight + child.scale * child.lora_B @ child.lora_A)
            if child.bias is not None:
                plain.bias.copy_(child.bias)
            plain.requires_grad_(child.weight.requires_grad)
            setattr(parent, name, plain)
    return model


@torch.no_grad()
def orthogonalize(model, rtol=1e-4):
    """THEORY §7, joint adaptation: each block's block_out adapter must not READ the directions
    that the LoRA on that block's mlp.c_proj WRITES into. With V an orthonormal basis of col(B):
    D ← D (I − V Vᵀ). Singular directions of B below rtol × its largest are skipped, so an all-zero
    B (step 0) projects nothing. Applies to linear and nonlinear shifts (the ones with a D)."""
    for block in model.transformer.h:
        shift, c_proj = block.slots["block_out"].shift, block.mlp.c_proj
        if not isinstance(c_proj, LoRALinear) or not isinstance(shift, LinearShift):
            continue
        U, S, _ = torch.linalg.svd(c_proj.lora_B.float(), full_matrices=False)
        V = U[:, S > rtol * S[0]].to(shift.D.dtype)                     # (d, k), k ≤ r
        shift.D -= (shift.D @ V) @ V.T

# ---------------------------------------------------------------------------------------------
# looking inside: captured activations, oracle shifts, a parameter report


@contextmanager
def capture(model, sites=SITES):
    """Record each site of each layer during the forward pass run inside the `with`. Afterwards
    acts[site][layer] is the (B, T, n) activation the rest of the network saw there."""
    sites = [resolve_site(s) for s in sites]
    slots = {site: [block.slots[site] for block in model.transformer.h] for site in sites}
    acts = {}
    for slot in sum(slots.values(), []):
        slot.recording = True
    try:
        yield acts
    finally:
        for site, site_slots in slots.items():
            acts[site] = [slot.activation for slot in site_slots]
            for slot in site_slots:
                slot.recording, slot.activation = False, None


@torch.no_grad()
def oracle(base, tuned, idx, site="block_out"):
    """THEORY §6: the oracle shift at `site` of every layer, s_tuned − s_base, on tokens idx."""
    with capture(base, [site]) as before:
        base(idx)
    with capture(tuned, [site]) as after:
        tuned(idx)
    return [t - s for s, t in zip(before[resolve_site(site)], after[resolve_site(site)])]


def adapter_parameters(model):
    """{name: parameter} of every shift and LoRA tensor in the model, found by module type."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Slot) and module.shift is not None:
            found.update({f"{name}.shift.{k}": p for k, p in module.shift.named_parameters()})
        if isinstance(module, LoRALinear):
            found.update({f"{name}.lora_A": module.lora_A, f"{name}.lora_B": module.lora_B})
    return found


def report(model):
    """Trainable parameters split by kind, and their share of the base model's parameters."""
    adapters = adapter_parameters(model)
    lora_n = sum(p.numel() for n, p in adapters.items() if p.requires_grad and ".lora_" in n)
    shift_n = sum(p.numel() for p in adapters.values() if p.requires_grad) - lora_n
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in adapters.values())
    return dict(trainable=trainable, lora=lora_n, shifts=shift_n, weights=trainable - lora_n - shift_n,
                base_params=base, pct=100.0 * trainable / base)

# ---------------------------------------------------------------------------------------------
# adapter files: only the adapter tensors plus what is needed to rebuild them


def adapter_spec(model):
    spec = []
    for layer, block in enumerate(model.transformer.h):
        for site, slot in block.slots.items():
            if slot.shift is not None:
                spec.append(dict(layer=layer, site=site, kind=slot.shift.kind, rank=slot.shift.rank, act=slot.shift.act))
    for layer, path, _, _, child in linear_layers(model):
        if isinstance(child, LoRALinear):
            spec.append(dict(layer=layer, site=path, kind="lora", rank=child.rank, alpha=child.alpha))
    return spec


def save(model, path):
    """Write the adapters (spec + tensors + the base model's config) to path, atomically."""
    tensors = {k: p.detach().cpu() for k, p in adapter_parameters(model).items()}
    payload = dict(format="nanosteer-adapters-1", base_config=asdict(model.config),
                   adapters=adapter_spec(model), tensors=tensors)
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def load(model, path):
    """Rebuild the adapters saved in path on a model with empty slots and no LoRA, and load their
    tensors. The file must have been made for a model of the same config."""
    if not os.path.isfile(path):
        raise ValueError(f"adapter file {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    if not isinstance(payload, dict) or payload.get("format") != "nanosteer-adapters-1":
        raise ValueError(f"{path} is not a nanosteer adapter file")
    ours = asdict(model.config)
    for key, value in payload["base_config"].items():
        if ours.get(key) != value:
            raise ValueError(f"{path} was made for a model with {key}={value}, this model has {key}={ours.get(key)}")
    for a in payload["adapters"]:
        if a["kind"] == "lora":
            lora(model, a["rank"], a["alpha"], targets=(a["site"],), layers=[a["layer"]])
        else:
            steer(model, a["site"], a["kind"], max(a["rank"], 1), [a["layer"]], a["act"] or "silu")
    params = adapter_parameters(model)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(payload["tensors"][k])
    return model
