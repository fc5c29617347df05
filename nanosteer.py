"""
nanosteer.py: what you can put into a slot (an activation shift) or onto a weight (LoRA).
Adila et al., 2026, "Weight Updates as Activation Shifts": the shifts of THEORY §2, LoRA (the
bridge of §3), the joint constraint of §7, capture, oracle shifts, a report (files: formats/adapters.py).
"""
import math
import numbers
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.checks import check_layers, whole_number
from model import SITES, Slot, resolve_site

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}

# ---------------------------------------------------------------------------------------------
# activation shifts Δ(s) for an activation s of width n (THEORY §2); a Slot adds them: s + Δ(s)

class VectorShift(nn.Module):
    """Δ(s) = v, the same vector for every token. n parameters, v = 0 at init."""
    kind, rank, act = "vector", 0, None

    def __init__(self, n, rank, act, dtype=None):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(n, dtype=dtype))

    def forward(self, s):
        return self.v                           # broadcasts over (B, T)

class LinearShift(nn.Module):
    """Δ(s) = U D s: D (r×n) reads, U (n×r) writes; 2nr parameters. U = 0 at init, so Δ = 0, and
    D is random so that U gets a gradient from the first step (as LoRA's A and B)."""
    kind = "linear"

    def __init__(self, n, rank, act, dtype=None):
        super().__init__()
        self.rank, self.act = rank, None
        self.D = nn.Parameter(torch.randn(rank, n, dtype=dtype) / math.sqrt(n))
        self.U = nn.Parameter(torch.zeros(n, rank, dtype=dtype))

    def forward(self, s):
        return s @ self.D.T @ self.U.T          # (B, T, n) -> (B, T, r) -> (B, T, n)

class NonlinearShift(LinearShift):
    """Δ(s) = U σ(D s), σ = silu by default; the same 2nr parameters as the linear shift."""
    kind = "nonlinear"

    def __init__(self, n, rank, act, dtype=None):
        super().__init__(n, rank, None, dtype)
        self.act = act

    def forward(self, s):
        return ACTIVATIONS[self.act](s @ self.D.T) @ self.U.T

class ReFTShift(nn.Module):
    """LoReFT (Wu et al., 2024): Δ(s) = Rᵀ(W s + b − R s), THEORY's Rᵀ(E s + e − R s) (W, b here
    are ReFT's own map, not a Linear's). R (r orthonormal rows) is the Q factor of a free matrix,
    recomputed each call: orthonormal after any optimizer step. W = R, b = 0 at init: Δ = 0."""
    kind = "reft"

    def __init__(self, n, rank, act, dtype=None):
        super().__init__()
        self.rank, self.act = rank, None
        self.R_free = nn.Parameter(torch.randn(n, rank, dtype=dtype) / math.sqrt(n))
        self.W = nn.Parameter(self.R().detach().clone())     # made in dtype: W = R to the last bit
        self.b = nn.Parameter(torch.zeros(rank, dtype=dtype))

    def R(self):                                # (r, n), R Rᵀ = I
        work = torch.promote_types(self.R_free.dtype, torch.float32)  # no bfloat16 QR kernel on CPU
        return torch.linalg.qr(self.R_free.to(work)).Q.T.to(self.R_free.dtype)

    def forward(self, s):
        R = self.R()
        return (s @ self.W.T + self.b - s @ R.T) @ R

SHIFTS = {cls.kind: cls for cls in (VectorShift, LinearShift, NonlinearShift, ReFTShift)}

def attach(plan):
    """Put each planned adapter in place: plan = [(name, parent, attribute, module)]. Only called
    once every check has passed, so a refused call leaves the model as it was."""
    for _, parent, attribute, module in plan:
        setattr(parent, attribute, module)
    return [module for *_, module in plan]

def shift_plan(model, site, kind, rank, layers, act):
    """steer()'s arguments, all checked -> the shifts to attach (nothing attached yet)."""
    site = resolve_site(site)
    if kind not in SHIFTS:
        raise ValueError(f"unknown adapter kind {kind!r}: choose one of {', '.join(SHIFTS)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}: choose one of {', '.join(ACTIVATIONS)}")
    n = model.config.d_mlp if site == "mlp_hidden" else model.config.n_embd
    if kind != "vector":                        # a vector shift has no rank
        rank = whole_number(rank, 1, n, f"rank {rank!r} is out of range: it must be a whole "
                                        f"number between 1 and the width {n} of {site}")
    slots = []
    for layer in check_layers(model, layers):   # every layer checked before any is changed
        slot = model.transformer.h[layer].slots[site]
        if slot.shift is not None:
            raise ValueError(f"layer {layer} {site} already holds a {slot.shift.kind} shift")
        slots.append((f"transformer.h.{layer}.slots.{site}.shift", slot))
    like = model.lm_head.weight                 # new tensors take the model's dtype and device
    return [(name, slot, "shift", SHIFTS[kind](n, rank, act, like.dtype).to(like.device))
            for name, slot in slots]

def steer(model, site, kind="linear", rank=4, layers=None, act="silu"):
    """Put a fresh shift of `kind` into `site` of each chosen layer (default all); return the new
    shifts. Their parameters are trainable; call freeze(model) first to train only them."""
    return attach(shift_plan(model, site, kind, rank, layers, act))

def freeze(model):
    """Make every parameter present now untrainable (adapters attached later stay trainable)."""
    return model.requires_grad_(False)

# ---------------------------------------------------------------------------------------------
# LoRA (Hu et al., 2021): a low-rank update of a weight, THEORY §3

class LoRALinear(nn.Module):
    """y = W x + b + (alpha/r)·B A x, A (r×in) random, B (out×r) zero at init. THEORY §3: exactly a
    shift of the output by (alpha/r)·B·A·x, rank-r linear in the input. W, b: the layer's own."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        out_features, in_features = linear.weight.shape      # .to(): the weight's device and dtype
        A = torch.randn(rank, in_features) / math.sqrt(in_features)
        self.lora_A = nn.Parameter(A.to(linear.weight))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank).to(linear.weight))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.lora_A.T @ self.lora_B.T * self.scale

def linear_layers(model, layers=None):
    """(layer, path 'attn.c_attn', parent, name, module): each Linear/LoRALinear of the blocks."""
    for layer in check_layers(model, layers):
        block = model.transformer.h[layer]
        for parent_name, parent in (("attn", block.attn), ("mlp", block.mlp)):
            for name, child in parent.named_children():
                if isinstance(child, (nn.Linear, LoRALinear)):
                    yield layer, f"{parent_name}.{name}", parent, name, child

def lora_plan(model, rank, alpha, targets, layers):
    """lora()'s arguments, all checked -> the LoRALinear layers to put in place (none yet)."""
    found = list(linear_layers(model, layers))
    names = sorted({name for _, _, _, name, _ in found} | {path for _, path, _, _, _ in found})
    targets = names if targets is None else [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, (list, tuple, set)) or not targets:
        raise ValueError(f"LoRA targets must be a list of names from {', '.join(names)}")
    for target in targets:
        if target not in names:
            raise ValueError(f"unknown LoRA target {target!r}: this model's Linear layers are "
                             f"{', '.join(names)}")
    chosen = [f for f in found if f[3] in targets or f[1] in targets]    # by name or by path
    shapes = {path: tuple(child.weight.shape) for _, path, _, _, child in chosen}
    narrowest = min(shapes, key=lambda path: min(shapes[path]))
    limit = min(shapes[narrowest])
    rank = whole_number(rank, 1, limit, f"LoRA rank {rank!r} is out of range: {narrowest} is "
                        f"{shapes[narrowest]}, so it must be a whole number 1..{limit}")
    alpha = 2 * rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"LoRA alpha {alpha!r} must be a positive number (the scale is alpha/r)")
    for layer, path, _, _, child in chosen:
        if isinstance(child, LoRALinear):
            raise ValueError(f"layer {layer} {path} already has LoRA")
    return [(f"transformer.h.{layer}.{path}", parent, name, LoRALinear(child, rank, alpha))
            for layer, path, parent, name, child in chosen]

def lora(model, rank, alpha=None, targets=None, layers=None):
    """LoRA of rank r and scale alpha/r (alpha defaults to 2r) on each Linear of the chosen blocks
    named in targets (default: every one; 'c_proj': attn.c_proj and mlp.c_proj; 'mlp.c_proj':
    that one only). Every argument and layer is checked before any layer changes."""
    return attach(lora_plan(model, rank, alpha, targets, layers))

@torch.no_grad()
def merge(model):
    """Fold every LoRA into its weight, W ← W + γ·B·A (γ = alpha/r), and put back a plain Linear.
    The model is marked `merged_lora`: adapters.save refuses it (its file would lose the update)."""
    for _, _, parent, name, child in list(linear_layers(model)):
        if isinstance(child, LoRALinear):
            out_features, in_features = child.weight.shape
            plain = nn.Linear(in_features, out_features, bias=False).to(child.weight)
            plain.weight.copy_(child.weight + child.scale * child.lora_B @ child.lora_A)
            plain.bias = child.bias                 # the same bias tensor (or None)
            model.merged_lora = True
            setattr(parent, name, plain.requires_grad_(child.weight.requires_grad))
    return model

@torch.no_grad()
def orthogonalize(model, rtol=1e-4):
    """THEORY §7: each block's block_out shift must not READ the directions that the LoRA on that
    block's mlp.c_proj WRITES into. With V an orthonormal basis of col(B): D ← D (I − V Vᵀ).
    Singular directions below rtol × the largest are skipped: B = 0 (step 0) projects nothing."""
    for block in model.transformer.h:
        shift, c_proj = block.slots["block_out"].shift, block.mlp.c_proj
        # a linear or nonlinear shift (NonlinearShift is a LinearShift: the same D reads s);
        # vector and ReFT shifts have no D, and joint mode never puts them at block_out
        if not isinstance(c_proj, LoRALinear) or not isinstance(shift, LinearShift):
            continue
        left, S, _ = torch.linalg.svd(c_proj.lora_B.double(), full_matrices=False)  # in float64
        V = left[:, S > rtol * S[0]].to(shift.D.dtype)                  # (d, k), k ≤ r
        shift.D -= (shift.D @ V) @ V.T

# ---------------------------------------------------------------------------------------------
# folding shifts into the weights: the bridge of §3 in reverse, THEORY §8

def affine(shift):
    """The shifts that fold are affine, Δ(s) = M s + c (THEORY §8) -> (M, c), M (n, n), c (n,):
    vector M = 0, c = v;  linear M = U D, c = 0;  ReFT M = Rᵀ(W − R), c = Rᵀ b."""
    if shift.kind == "vector":
        return shift.v.new_zeros(len(shift.v), len(shift.v)), shift.v
    if shift.kind == "linear":
        return shift.U @ shift.D, shift.U.new_zeros(len(shift.U))
    R = shift.R()
    return R.T @ (shift.W - R), R.T @ shift.b

@torch.no_grad()
def fold(model):
    """Move every vector, linear and ReFT shift into the Linear beside its slot (same logits) and
    empty the slot. All slots are checked first; if one cannot fold (see `why`), nothing changes.
    A vector needs a bias: with bias=False fold refuses rather than add one. LoRA: merge first."""
    plan = []
    for layer, block in enumerate(model.transformer.h):
        for site, shift in [(s, slot.shift) for s, slot in block.slots.items() if slot.shift]:
            part = block.attn if site in ("attn_out", "resid_mid") else block.mlp
            names = ("c_fc", "c_gate") if site == "mlp_in" else ("c_proj",)
            linears = [getattr(part, name) for name in names if hasattr(part, name)]
            kind, on_stream = shift.kind, site in ("resid_mid", "block_out")  # on the skip path
            skip = "x" if site == "resid_mid" else "p"                  # what the skip path carries
            why = {"U σ(D s) is not affine in s": kind == "nonlinear",
                   f"its U D {skip} reads the skip path": kind != "vector" and on_stream,
                   "its Linear has LoRA: nanosteer.merge first": LoRALinear in map(type, linears),
                   "fold adds no bias": kind != "linear" and linears[0].bias is None}
            reasons = [reason for reason, bad in why.items() if bad]
            if reasons:
                raise ValueError(f"layer {layer} {site}: cannot fold a {kind} shift, {reasons[0]}")
            plan.append((site in ("mlp_in", "mlp_hidden"), block.slots[site], linears))
    for inside, slot, linears in plan:            # inside: the shift acts on the Linear's input
        M, c = affine(slot.shift)
        for lin in linears:
            if inside:                            # W (s + M s + c) + b = W (I + M) s + (b + W c)
                if lin.bias is not None:
                    lin.bias += lin.weight @ c
                lin.weight += lin.weight @ M
            else:                                 # (I + M)(W x + b) + c = (I + M) W x + (I+M) b + c
                if lin.bias is not None:
                    lin.bias += M @ lin.bias + c
                lin.weight += M @ lin.weight
        slot.shift = None
    return model

# ---------------------------------------------------------------------------------------------
# looking inside: captured activations, oracle shifts, a parameter report

@contextmanager
def capture(model, sites=SITES):
    """Record sites inside the `with`: acts[site][layer] = the (B, T, n) activation that the site
    passed on in the LAST forward (run one per `with`; a step with KVCaches: its new tokens)."""
    slots = {site: [block.slots[site] for block in model.transformer.h]
             for site in map(resolve_site, sites)}
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
def oracle(base, tuned, idx):
    """THEORY §6: oracle post-block shifts on tokens idx, Δ_ℓ = z_tuned,ℓ − block_ℓ(z_tuned,ℓ−1)
    (base's block ℓ on the tuned stream): added at every block_out, base's block outputs become
    tuned's exactly (and so do its logits when only the blocks were tuned, not wte/wpe/ln_f)."""
    with capture(tuned, ["block_out"]) as acts:
        tuned(idx)
    x, deltas = base.embed(idx), []
    for block, z in zip(base.transformer.h, acts["block_out"]):
        deltas.append(z - block(x))
        x = z
    return deltas

def own_tensors(module):
    """An adapter's own tensors by name: a shift's parameters, a LoRALinear's A and B (not W, b)."""
    if isinstance(module, LoRALinear):
        return {"lora_A": module.lora_A, "lora_B": module.lora_B}
    return dict(module.named_parameters())

def adapter_parameters(model):
    """{name: parameter} of every shift and LoRA tensor in the model, found by module type."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Slot) and module.shift is not None:
            found.update({f"{name}.shift.{k}": p for k, p in own_tensors(module.shift).items()})
        if isinstance(module, LoRALinear):
            found.update({f"{name}.{k}": p for k, p in own_tensors(module).items()})
    return found

def report(model):
    """Trainable parameters split by kind, and their share of the base model's parameters."""
    adapters = adapter_parameters(model)
    lora_n = sum(p.numel() for n, p in adapters.items() if p.requires_grad and ".lora_" in n)
    shift_n = sum(p.numel() for p in adapters.values() if p.requires_grad) - lora_n
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in adapters.values())
    return dict(trainable=trainable, lora=lora_n, shifts=shift_n,
                weights=trainable - lora_n - shift_n, base_params=base,
                pct=100.0 * trainable / base)
