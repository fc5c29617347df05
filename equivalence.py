"""equivalence.py: THEORY.md §3–§7 (Adila et al., 2026, "Weight Updates as Activation Shifts") checked with numbers,
one function per demonstration; main() prints a line per claim, writes equivalence.json and two figures."""
import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import nanosteer as ns
from model import GPT, Block, GPTConfig, gelu_prime

RANK, SCALE = 4, 0.3     # rank of the random updates and of the fitted steers; ‖ΔW‖ / ‖W‖ of a random update
EPS = [10.0 ** (-k / 2) for k in range(2, 9)]           # 1e-1 ... 1e-4: update sizes of the first-order check
SITES, KINDS = ("attn_out", "mlp_in", "mlp_out", "block_out"), ("vector", "linear", "nonlinear")

# ---- helpers: random weight updates (Block.run in model.py runs a block with one slot filled) ----
def random_update(module, seed, rank=RANK):
    """{name: ΔW} for each weight matrix of `module`, like a LoRA's: ΔW = B A of rank r, ‖ΔW‖ = SCALE·‖W‖."""
    g, update = torch.Generator().manual_seed(seed), {}
    for name, p in module.named_parameters():
        if p.dim() == 2:                                     # LayerNorm weights and all biases stay put
            dW = torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g)
            update[name] = (dW * SCALE * p.norm().item() / dW.norm()).to(p)
    return update

@torch.no_grad()
def updated(module, update):                                 # a copy of module with θ ← θ + Δθ
    module = copy.deepcopy(module)
    for name, delta in update.items():
        module.get_parameter(name).add_(delta)
    return module

# ---- THEORY §3: the exact bridge at one linear layer -------------------------------------------------
@torch.no_grad()
def bridge_error(block, x, rank=RANK):
    """Largest gap, over the block's Linears, between W ← W + ΔW and shifting that layer's output by ΔW x."""
    torch.manual_seed(0)
    worst = 0.0
    for path in [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
        part, name = path.split(".")                         # e.g. "mlp", "c_fc"
        shifted = copy.deepcopy(block)                       # a LoRALinear outputs W x + b + s·B A x
        lora = ns.LoRALinear(shifted.get_submodule(path), rank, alpha=rank).to(x)
        lora.lora_B.normal_(std=0.02)                        # (B = 0 at init; a trained one has B ≠ 0)
        setattr(shifted.get_submodule(part), name, lora)
        merged = updated(block, {path + ".weight": lora.scale * lora.lora_B @ lora.lora_A})
        worst = max(worst, (shifted(x) - merged(x)).abs().max().item())   # (W + ΔW) x == W x + ΔW x
    return worst

# ---- THEORY §4: first-order transport through the MLP ------------------------------------------------
def mlp_first_order(mlp, h, d):
    """THEORY §4, closed form of the MLP output's first-order change: δy ≈ ΔW_proj m + W_proj δm (+ Δb_proj)."""
    moved = lambda name: h @ d[name + ".weight"].T + d.get(name + ".bias", 0.0)   # ΔW h + Δb of one Linear
    u = mlp.c_fc(h)
    if hasattr(mlp, "c_gate"):   # GLU: δm = (σ'(a_g) ⊙ a_u) ⊙ ΔW_g h + σ(a_g) ⊙ ΔW_u h, with σ = silu and
        a_g, sig = mlp.c_gate(h), torch.sigmoid(mlp.c_gate(h))          # σ' = sig·(1 + a(1 − sig))
        dm = sig * (1 + a_g * (1 - sig)) * u * moved("c_gate") + a_g * sig * moved("c_fc")
    else:                        # GELU: δm = gelu'(u) ⊙ ΔW_fc h
        dm = gelu_prime(u) * moved("c_fc")
    return mlp.hidden(h) @ d["c_proj.weight"].T + d.get("c_proj.bias", 0.0) + dm @ mlp.c_proj.weight.T

def jvp_change(block, direction, x):                         # d/dε block(x; θ + εΔ) at ε = 0, by autodiff
    params = {k: block.get_parameter(k).detach() for k in direction}
    with sdpa_kernel(SDPBackend.MATH):              # the fused CPU attention kernel has no forward-mode AD
        return jvp(lambda p: functional_call(block, p, (x,)), (params,), (direction,))[1]

@torch.no_grad()
def first_order_errors(block, x, direction, predict=jvp_change, eps=EPS):
    """max |z(θ + εΔ) − z(θ) − ε·predict(Δ)| per ε: ~ε² if predict is the whole first-order term, ~ε if not."""
    z, dz = block(x), predict(block, direction, x)
    moved = lambda e: {k: block.get_parameter(k) + e * d for k, d in direction.items()}   # θ + εΔ
    return [(functional_call(block, moved(e), (x,)) - z - e * dz).abs().max().item() for e in eps]

def first_order(model, x, layer, kind, eps=EPS):
    """One MLP kind: first-order errors, their log-log slope, and max|closed form − jvp| / max|jvp| (MLP update)."""
    torch.manual_seed(0)
    block = model.transformer.h[layer] if model.config.mlp == kind else Block(replace(model.config, mlp=kind)).to(x)
    errors = first_order_errors(block, x, random_update(block, seed=1), eps=eps)
    d_mlp = random_update(block.mlp, seed=2)
    closed = mlp_first_order(block.mlp, block.run(x, "mlp_in")[1], d_mlp)
    auto = jvp_change(block, {"mlp." + k: v for k, v in d_mlp.items()}, x)      # r does not move: δz = δy
    return dict(errors=errors, slope=float(np.polyfit(np.log(eps), np.log(errors), 1)[0]),
                rel_err=((closed - auto).abs().max() / auto.abs().max()).item())

# ---- THEORY §4–§5: where to steer; the W_proj = 0 case; the projection statement ----------------------
def fit_shift(block, site, kind, x, target, rank=RANK):
    """A `kind` shift at `site` fitted (full-batch L-BFGS: no lr to tune) so that block(x) ≈ target, and the share
    recovered, 1 − ‖z_steered − target‖² / ‖z − target‖². A nonlinear one starts from the linear fit."""
    torch.manual_seed(0)
    s, delta = block.run(x, site)[1].flatten(0, -2), (target - block(x)).flatten(0, -2)   # reads s, must add δ
    shift = ns.SHIFTS[kind](s.shape[-1], rank, "silu").to(x)
    if kind == "nonlinear":            # start at the linear fit: silu(a) ≈ a/2 near 0, so (2/c) U silu(c D s) ≈ U D s
        linear = fit_shift(block, site, "linear", x, target, rank)[0].requires_grad_(False)
        c = 0.01 / (s @ linear.D.T).abs().max().clamp(min=1e-12)         # |c D s| ≤ 0.01 on every token
        shift.D, shift.U = torch.nn.Parameter(c * linear.D), torch.nn.Parameter(2 / c * linear.U)
    elif site in ("mlp_out", "block_out") and kind == "linear":  # z moves by exactly U D s: closed form, δ ≈ s M,
        M = torch.linalg.pinv(s) @ delta                        # kept to the top-r output directions V of s M
        Vt = torch.linalg.svd(s @ M, full_matrices=False).Vh[:rank]       # (reduced-rank least squares)
        shift.D, shift.U = torch.nn.Parameter(Vt @ M.T), torch.nn.Parameter(Vt.T.contiguous())   # U D s = s M V Vᵀ
    loss = lambda: ((block.run(x, site, shift)[0] - target) ** 2).sum() / (delta ** 2).sum()
    opt = torch.optim.LBFGS(shift.parameters(), max_iter=100, tolerance_change=0, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        value = loss()
        value.backward(inputs=list(shift.parameters()))     # the block's own weights stay out of it
        return value
    opt.step(closure)                                        # (after a closed form it has nothing left to do)
    return shift, 1 - loss().item()

def where_to_steer(block, x, update, sites=SITES):
    """({site: {kind: recovered}}, skip share ⟨δr, δz⟩ / ‖δz‖²) for an update; THEORY §5: z = r + y, δz = δr + δy."""
    (target, r_tuned), (z, r) = updated(block, update).run(x, "resid_mid"), block.run(x, "resid_mid")
    table = {site: {kind: fit_shift(block, site, kind, x, target)[1] for kind in KINDS} for site in sites}
    return table, (((r_tuned - r) * (target - z)).sum() / ((target - z) ** 2).sum()).item()

def wproj_zero(block, x, seed=0):
    """THEORY §5 with W_proj = 0: y = b_proj for every token, so any post-MLP steer Δ(y) is a constant."""
    base = updated(block, {"mlp.c_proj.weight": -block.mlp.c_proj.weight})          # W_proj ← 0
    table, _ = where_to_steer(base, x, random_update(block, seed), ("mlp_out", "block_out"))   # ΔW_proj ≠ 0
    return dict(mlp_out=max(table["mlp_out"].values()), block_out=table["block_out"]["linear"],   # reads z: per token
                y_variance=base.run(x, "mlp_out")[1].flatten(0, -2).var(0).max().item())   # across tokens

@torch.no_grad()
def projection_error(block, x, rank=RANK, seed=0):
    """Max |A y − A (I − P) z| in a block where P z = r (and in the unmodified block, where no P does that)."""
    g, d = torch.Generator().manual_seed(seed), x.shape[-1]
    Q = torch.linalg.qr(torch.randn(d, d, generator=g).to(x)).Q[:, : d // 2]
    P, I = Q @ Q.T, torch.eye(d).to(x)                         # P projects onto the skip term's subspace
    split = copy.deepcopy(block)
    for linear, proj in ((split.attn.c_proj, P), (split.mlp.c_proj, I - P)):  # attention writes into col(P),
        linear.weight.copy_(proj @ linear.weight)                              # the MLP into col(I − P)
        if linear.bias is not None:
            linear.bias.copy_(proj @ linear.bias)
    post_mlp = ns.LinearShift(d, rank, None).to(x)
    post_mlp.U.copy_(torch.randn(d, rank, generator=g))        # U = 0 at init; any A = U D will do
    post_block = copy.deepcopy(post_mlp)
    post_block.D.copy_(post_mlp.D @ (I - P))                   # A (I − P) z = A y when P z = r
    gap = lambda b, xx: (b.run(xx, "mlp_out", post_mlp)[0] - b.run(xx, "block_out", post_block)[0]).abs().max()
    return gap(split, x @ P).item(), gap(block, x).item()     # x @ P: the incoming stream lies in col(P) too

# ---- THEORY §6–§7: oracle shifts; joint adaptation ---------------------------------------------------
def oracle_demo(model, idx, x, layer, seed=0):
    """The oracle at `layer` after an update of every block: replay error, rank90 (and base output's, noise's), fits."""
    tuned = updated(model, {f"transformer.h.{i}.{name}": delta for i, block in enumerate(model.transformer.h)
                            for name, delta in random_update(block, seed + i).items()})
    deltas, z = ns.oracle(model, tuned, idx), model.embed(idx)
    for base_block, oracle_shift in zip(model.transformer.h, deltas):   # the oracle added at block_out of
        z = base_block(z) + oracle_shift                                 # every layer of the base model
    replay = (model.lm_head(model.transformer.ln_f(z)) - tuned(idx)[0]).abs().max().item()
    delta, block = deltas[layer].flatten(0, -2), model.transformer.h[layer]
    energy = lambda a: torch.linalg.svdvals(a - a.mean(0)) ** 2            # the covariance spectrum
    rank90 = lambda a: int((energy(a).cumsum(0) / energy(a).sum() < 0.9).sum()) + 1   # directions for 90%
    fits = {kind + "_fit": fit_shift(block, "block_out", kind, x, block(x) + delta.view_as(x))[1]
            for kind in ("linear", "nonlinear")}                 # steers at block_out that read z_base
    return dict(rank90=rank90(delta), rank90_base=rank90(block(x).flatten(0, -2).detach()),
                rank90_noise=rank90(torch.randn_like(delta)), replay_max_abs_err=replay, **fits)

@torch.no_grad()
def ortho_demo(model, rank=RANK):
    """Max |D V| (V: orthonormal basis of col(B) of the mlp.c_proj LoRA) before and after orthogonalize."""
    joint = copy.deepcopy(model)
    torch.manual_seed(0)
    loras, shifts = ns.lora(joint, rank, targets=("mlp.c_proj",)), ns.steer(joint, "block_out", "linear", rank)
    for lora in loras:
        lora.lora_B.normal_()                   # as after training (B = 0 at init)
    overlap = lambda: max((s.D @ torch.linalg.qr(l.lora_B).Q).abs().max().item() for s, l in zip(shifts, loras))
    before = overlap()
    ns.orthogonalize(joint)     # THEORY §7: D ← D (I − V Vᵀ)
    return dict(before=before, after=overlap())

# ---- the report: one line per claim, the JSON, two figures -------------------------------------------
def claims(r, exact):   # rows (claim, measured, predicted, tol, op, ok); `exact`: the tolerance of float precision
    rows = [("§3 bridge: W+ΔW == shift ΔW·x (max abs)", r["bridge_max_abs_err"], 0.0, exact, "="),
            ("§4 first-order error slope, gelu", r["first_order_slope"]["gelu"], 2.0, 0.1, "="),
            ("§4 first-order error slope, glu", r["first_order_slope"]["glu"], 2.0, 0.1, "="),
            ("§4 closed form vs jvp (max rel)", r["formula_vs_jvp_max_rel_err"], 0.0, max(1e-8, exact), "="),
            ("§5 W_proj=0: token variance of y", r["wproj_zero"]["y_variance"], 0.0, exact, "="),
            ("§5 W_proj=0: linear post-block − post-MLP", r["wproj_zero"]["block_out"] - r["wproj_zero"]["mlp_out"], 0.0, 0.0, "≥"),
            ("§5 A(I−P)z == A y (max abs)", r["projection_max_abs_err"], 0.0, exact, "="),
            ("§6 base + oracle at every layer == tuned", r["oracle"]["replay_max_abs_err"], 0.0, exact, "="),
            ("§7 |D·V| after orthogonalize", r["ortho_max_abs"]["after"], 0.0, exact, "=")]
    return [(c, m, p, t, op, abs(m - p) <= t if op == "=" else m >= p - t if op == "≥" else m <= p + t) for c, m, p, t, op in rows]

def plot(first, r, out):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, f in first.items():
        ax.loglog(EPS, f["errors"], "o-", label=f"{kind} MLP: slope {f['slope']:.3f}")
    ax.set(xlabel="update size ε", ylabel="max |z(θ+εΔ) − z(θ) − ε·jvp|", title="THEORY §4: first-order error")
    ax.legend()
    fig.savefig(os.path.join(out, "first_order.png"), dpi=120, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, kind in enumerate(KINDS):
        ax.bar(np.arange(len(SITES)) + 0.27 * (i - 1), [r["site_recovery"][s][kind] for s in SITES], 0.27, label=kind)
    ax.set(xticks=range(len(SITES)), xticklabels=SITES, ylabel="fraction of the block-output change recovered",
           title=f"THEORY §4–§5: where to steer (rank {RANK}; skip-path share {r['skip_share']:.2f})")
    ax.legend()
    fig.savefig(os.path.join(out, "sites.png"), dpi=120, bbox_inches="tight")

def main(argv=None):
    parser = argparse.ArgumentParser(description="Check the claims of THEORY.md §3–§7 with numbers.")
    parser.add_argument("--device", choices=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="float32 blurs the ε² check")
    parser.add_argument("--checkpoint", default="out/base/model.pt", help="a GPT.save file; else a fresh small GPT")
    parser.add_argument("--out", default="out/equivalence", help="folder for equivalence.json and the two figures")
    args = parser.parse_args(argv)
    device, start = args.device or ("cuda" if torch.cuda.is_available() else "cpu"), time.time()
    torch.set_num_threads(1)                # the matrices are small: one thread is fastest, more only contend
    plt.switch_backend("Agg")               # figures go to files only
    torch.manual_seed(0)                    # the random init when there is no checkpoint
    explicit = args.checkpoint != parser.get_default("checkpoint")      # then a missing file is an error
    name = args.checkpoint if explicit or os.path.isfile(args.checkpoint) else "random init (no checkpoint)"
    model = GPT.from_pretrained(name) if name == args.checkpoint else GPT(GPTConfig(n_layer=4, n_embd=64))
    model = ns.freeze(model.to(device, getattr(torch, args.dtype)).eval())
    idx = torch.randint(0, 256, (8, min(32, model.config.block_size)), generator=torch.Generator().manual_seed(0))
    idx, layer = idx.to(device), model.config.n_layer // 2                     # random byte tokens; a middle block
    with ns.capture(model, ["block_out"]) as acts:
        model(idx)
    x, block = acts["block_out"][layer - 1], model.transformer.h[layer]      # the stream entering the block
    first = {kind: first_order(model, x, layer, kind) for kind in ("gelu", "glu")}
    site_table, skip_share = where_to_steer(block, x, random_update(block, 0))
    r = dict(bridge_max_abs_err=bridge_error(block, x), first_order_slope={k: f["slope"] for k, f in first.items()},
             formula_vs_jvp_max_rel_err=max(f["rel_err"] for f in first.values()), site_recovery=site_table,
             skip_share=skip_share, wproj_zero=wproj_zero(block, x), oracle=oracle_demo(model, idx, x, layer),
             projection_max_abs_err=projection_error(block, x)[0], ortho_max_abs=ortho_demo(model),
             device=device, dtype=args.dtype, model=name, seconds=time.time() - start)
    print(f"{'claim':<41} | {'measured':>10} | {'predicted':>9} | {'diff':>9} | {'tol':>7} | ok")
    rows = claims(r, 1e-10 if args.dtype == "float64" else 1e-4)
    for claim, measured, predicted, tol, op, ok in rows:
        print(f"{claim:<41} | {measured:>10.4g} | {f'{op} {predicted:.3g}':>9} | {measured - predicted:>9.2g} | "
              f"{tol:>7.1g} | {'ok' if ok else 'NO'}")
    print("\nmeasured, not claimed: §6 oracle 90% energy in {rank90} directions (base block output {rank90_base}, noise "
          "{rank90_noise})\n§5, §8: skip share {:.2f}; share recovered by rank-4 linear steers: ".format(skip_share, **r["oracle"])
          + ", ".join(f"{site} {site_table[site]['linear']:.3f}" for site in SITES) + " (all kinds: sites.png)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "equivalence.json.tmp"), "w") as f:   # write, then rename: never half a file
        json.dump(r, f, indent=2)
    os.replace(os.path.join(args.out, "equivalence.json.tmp"), os.path.join(args.out, "equivalence.json"))
    plot(first, r, args.out)
    print(f"{name} | block {layer} | {device} {args.dtype} | {r['seconds']:.1f} s | details: {args.out}/")
    return all(ok for *_, ok in rows)

if __name__ == "__main__":
    try:
        sys.exit(0 if main() else 1)        # exit status 1 when a claim fails
    except ValueError as e:                 # e.g. a --checkpoint that is no checkpoint: one line, exit status 2
        print(f"equivalence.py: error: {e}", file=sys.stderr)
        sys.exit(2)
