"""equivalence.py: docs/THEORY.md §3–§8 (Adila et al., 2026, "Weight Updates as Activation Shifts")
checked with numbers, one function per demonstration, in THEORY's order: a random low-rank update
stands in for a fine-tune; the exact bridge (§3); first order through the MLP (§4); where to steer,
measured by fitting a steer at each site (§4–§5); the skip share and the projection (§5); oracle
shifts (§6); the joint constraint (§7); folding (§8). main() prints a row per check (kind: theorem,
sanity, measured | measured | predicted | diff | tol | ok; exit 1 if a theorem or sanity row fails,
2 on a bad argument), writes equivalence.json and 3 figures (machinery/figures.py draws them).
`--init smollm2-135m`: a real LM."""
from machinery.interrupt import one_line_on_ctrl_c   # first: Ctrl-C while torch loads is one line too
if __name__ == "__main__":
    one_line_on_ctrl_c("equivalence.py")
import copy
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from formats import checkpoints
import nanosteer as ns
import tasks
from machinery.checks import OneLineParser, check_out_dir
from machinery.figures import figure_writers
from machinery.files import shown, write_files, write_json
from model import SITES as ALL_SITES, GPT, Block, GPTConfig, gelu_prime
from train import BASE_CHECKPOINT

PROSE = Path(__file__).resolve().parent / "docs" / "probe_text.txt"  # the text the checks read
EPS = [10.0 ** (-k / 2) for k in range(2, 9)]     # 1e-1 ... 1e-4: update sizes of the §4 checks
FOLDS = {site: ("vector",) if site in ("resid_mid", "block_out") else ("vector", "linear", "reft")
         for site in ALL_SITES}                   # the shifts that fold at each site (THEORY §8)
RANK, SCALE = 4, 0.3    # rank of random updates and fitted steers; ‖ΔW‖ / ‖W‖ of a random update
SITES, KINDS = ("attn_out", "mlp_in", "mlp_out", "block_out"), ("vector", "linear", "nonlinear")

# ---- a stand-in for a fine-tune: a random low-rank update of every weight matrix -----------------
def random_update(module, seed, rank=RANK, biases=False):
    """{name: Δθ}: each weight matrix moves by a LoRA-like ΔW = B A of rank r, ‖ΔW‖ = SCALE·‖W‖;
    with biases=True its bias (if any) by a random Δb, ‖Δb‖ = SCALE·‖W‖. Norms stay put."""
    g, update, params = torch.Generator().manual_seed(seed), {}, dict(module.named_parameters())
    for name, p in [(name, p) for name, p in params.items() if p.dim() == 2]:
        bias = name.removesuffix("weight") + "bias"
        dW = torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g)
        db = torch.randn(p.shape[0], generator=g) if biases and bias in params else None
        for key, delta in [(name, dW)] + [(bias, db)] * (db is not None):
            update[key] = (delta * SCALE * p.norm().item() / delta.norm()).to(p)
    return update

@torch.no_grad()
def with_update(module, update):
    """A copy of module with θ ← θ + Δθ."""
    module = copy.deepcopy(module)
    for name, delta in update.items():
        module.get_parameter(name).add_(delta)
    return module

# ---- THEORY §3: the exact bridge at one linear layer ------------------------------------------
@torch.no_grad()
def bridge_error(block, x, rank=RANK):
    """Largest gap, over the block's Linears, between W ← W + ΔW and shifting the output by ΔW x."""
    torch.manual_seed(0)                                  # LoRA's random A
    worst = 0.0
    for path in [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
        shifted = copy.deepcopy(block)                    # a LoRALinear outputs W x + b + γ·B A x
        lora = ns.LoRALinear(shifted.get_submodule(path), rank, alpha=rank).to(x)
        lora.lora_B.normal_(std=0.02)                     # (B = 0 at init; a trained one has B ≠ 0)
        shifted.set_submodule(path, lora)                 # e.g. path "mlp.c_fc"
        merged = with_update(block, {path + ".weight": lora.scale * lora.lora_B @ lora.lora_A})
        worst = max(worst, (shifted(x) - merged(x)).abs().max().item())  # (W + ΔW) x == W x + ΔW x
    return worst

# ---- THEORY §4: first-order transport through the MLP -----------------------------------------
def linear_change(delta, name, h):               # ΔW h + Δb: how the Linear `name` moves (§3)
    return h @ delta[name + ".weight"].T + delta.get(name + ".bias", 0.0)

def shifted_params(block, direction, e):          # the parameters θ + εΔ
    return {k: block.get_parameter(k) + e * step for k, step in direction.items()}

def mlp_first_order(mlp, h, delta, proj_term=True):
    """THEORY §4, closed form: δy ≈ ΔW_proj m + Δb_proj + W_proj δm for an update delta of the MLP;
    proj_term=False leaves ΔW_proj m out (the slope-1 control)."""
    u = mlp.c_fc(h)
    if mlp.gated:               # GLU, m = silu(g) ⊙ u: δm = silu'(g) ⊙ u ⊙ δg + silu(g) ⊙ δu
        g, sg = mlp.c_gate(h), torch.sigmoid(mlp.c_gate(h))       # sg = sigmoid(g), silu(g) = g sg,
        dm = sg * (1 + g * (1 - sg)) * u * linear_change(delta, "c_gate", h) \
            + g * sg * linear_change(delta, "c_fc", h)            # silu'(g) = sg (1 + g (1 − sg))
    else:                       # GELU: δm = gelu'(u) ⊙ (ΔW_fc h + Δb_fc)
        dm = gelu_prime(u) * linear_change(delta, "c_fc", h)
    dy = dm @ mlp.c_proj.weight.T + delta.get("c_proj.bias", 0.0)
    return dy + mlp.hidden(h) @ delta["c_proj.weight"].T if proj_term else dy

def closed_form_change(block, direction, x, proj_term=True):
    """δz of an MLP-only update ("mlp." names) by the closed form: p does not move, so δz = δy."""
    delta = {k.removeprefix("mlp."): v for k, v in direction.items()}
    return mlp_first_order(block.mlp, block.probe(x, "mlp_in")[1], delta, proj_term)

def jvp_change(block, direction, x):             # d/dε block(x; θ + εΔ) at ε = 0, by autodiff
    params = {k: block.get_parameter(k).detach() for k in direction}
    with sdpa_kernel(SDPBackend.MATH):           # the fused CPU attention kernel has no forward AD
        return jvp(partial(functional_call, block, args=(x,)), (params,), (direction,))[1]

@torch.no_grad()
def first_order_errors(block, x, direction, predict=jvp_change, eps=EPS):
    """max |z(θ + εΔ) − z(θ) − ε·predict(Δ)| per ε: ~ε² if predict is the whole first-order term."""
    z, dz = block(x), predict(block, direction, x)
    z_shifted = [functional_call(block, shifted_params(block, direction, e), (x,)) for e in eps]
    return [(z_e - z - e * dz).abs().max().item() for z_e, e in zip(z_shifted, eps)]

def first_order(model, x, layer, kind, eps=EPS):
    """One MLP kind (the model's block, else a fresh one), updates with biases: jvp's error slope
    (Taylor), closed form vs jvp and central differences, the slope without ΔW_proj m (control)."""
    torch.manual_seed(0)
    block = model.transformer.h[layer] if model.config.mlp == kind else \
        Block(replace(model.config, mlp=kind)).to(x)
    # Taylor's slope 2 holds for any update: checked on one of every weight and bias (seed 1); the
    # closed form covers the MLP alone, so it is checked on an update of the MLP only (seed 2)
    errors = first_order_errors(block, x, random_update(block, 1, biases=True), eps=eps)
    mlp_update = {"mlp." + k: v for k, v in random_update(block.mlp, 2, biases=True).items()}
    closed, auto = closed_form_change(block, mlp_update, x), jvp_change(block, mlp_update, x)
    step = 1e-4 if x.dtype == torch.float64 else 1e-2  # error ~ step² + ulp/step
    with torch.no_grad():                               # (z(θ + step Δ) − z(θ − step Δ)) / 2 step
        ahead = functional_call(block, shifted_params(block, mlp_update, step), (x,))
        behind = functional_call(block, shifted_params(block, mlp_update, -step), (x,))
        diff = (ahead - behind) / (2 * step)
    control = first_order_errors(block, x, mlp_update, partial(closed_form_change, proj_term=False),
                                 eps)
    slope = [float(np.polyfit(np.log(eps), np.log(e), 1)[0]) for e in (errors, control)]
    return dict(errors=errors, slope=slope[0], control_errors=control, control_slope=slope[1],
                rel_err=((closed - auto).abs().max() / auto.abs().max()).item(),
                fd_rel_err=((closed - diff).abs().max() / diff.abs().max()).item())

# ---- THEORY §4–§5: where to steer, measured by fitting a steer at each site ----------------------
def lbfgs(params, loss, iters=100):
    """Minimize loss() over params by full-batch L-BFGS: no lr to tune."""
    params = list(params)
    opt = torch.optim.LBFGS(params, max_iter=iters, tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward(inputs=params)       # only params: a block's own weights stay out of it
        return value
    opt.step(closure)

def least_squares(s, delta, rank):
    """The rank-r linear map U D s closest to δ, closed form (reduced-rank least squares): δ ≈ s M,
    kept to the top-r output directions V of s M, so U D s = s M V Vᵀ -> (D, U) = (Vᵀ Mᵀ, V)."""
    M = torch.linalg.pinv(s) @ delta
    Vt = torch.linalg.svd(s @ M, full_matrices=False).Vh[:rank]
    return Vt @ M.T, Vt.T.contiguous()

def silu_start(s, D, U):
    """A nonlinear shift U σ(D s) that starts as the linear U D s: silu(a) ≈ a/2 near 0, so
    (2/c) U silu(c D s) ≈ U D s when |c D s| ≤ 0.01 on every token -> (c D, (2/c) U)."""
    c = 0.01 / (s @ D.T).abs().max().clamp(min=1e-12)
    return c * D, 2 / c * U

def fit_shift(block, site, kind, x, target, rank=RANK):
    """A `kind` shift at `site` fitted (full-batch L-BFGS: no lr to tune) so that block(x) ≈ target,
    and the share recovered, 1 − ‖z_steered − target‖² / ‖z − target‖². A nonlinear shift starts
    from the linear fit."""
    torch.manual_seed(0)
    s, delta = block.probe(x, site)[1].flatten(0, -2), (target - block(x)).flatten(0, -2)
    shift = ns.SHIFTS[kind](s.shape[-1], rank, "silu").to(x)
    if kind == "nonlinear":
        linear = fit_shift(block, site, "linear", x, target, rank)[0].requires_grad_(False)
        shift.D, shift.U = map(torch.nn.Parameter, silu_start(s, linear.D, linear.U))
    elif site in ("mlp_out", "block_out") and kind == "linear":   # z moves by exactly U D s
        shift.D, shift.U = map(torch.nn.Parameter, least_squares(s, delta, rank))

    def loss():
        return ((block.probe(x, site, shift)[0] - target) ** 2).sum() / (delta ** 2).sum()
    lbfgs(shift.parameters(), loss)                   # (after a closed form: nothing left to do)
    return shift, 1 - loss().item()

def where_to_steer(block, x, update, sites=SITES):
    """({site: {kind: share recovered}}, skip share ⟨δp, δz⟩ / ‖δz‖²) for an update of the block.
    THEORY §5: z = p + y, so δz = δp + δy; the skip share is δp's projection coefficient on δz."""
    (target, r_tuned), (z, r) = with_update(block, update).probe(x, "resid_mid"), block.probe(x, "resid_mid")
    table = {site: {kind: fit_shift(block, site, kind, x, target)[1] for kind in KINDS}
             for site in sites}
    return table, (((r_tuned - r) * (target - z)).sum() / ((target - z) ** 2).sum()).item()

def wproj_zero(block, x, seed=0):
    """THEORY §5 with W_proj = 0: y = b_proj for every token, so a post-MLP steer is a constant."""
    base = with_update(block, {"mlp.c_proj.weight": -block.mlp.c_proj.weight})      # W_proj ← 0
    table, _ = where_to_steer(base, x, random_update(block, seed), ("mlp_out", "block_out"))
    return dict(mlp_out=max(table["mlp_out"].values()), block_out=table["block_out"]["linear"],
                y_variance=base.probe(x, "mlp_out")[1].flatten(0, -2).var(0).max().item())

@torch.no_grad()
def mlp_share(model, idx):
    """THEORY §5, the paper's per-layer picture: ‖y‖ / (‖y‖ + ‖a‖) per layer, mean over tokens."""
    with ns.capture(model, ["attn_out", "mlp_out"]) as acts:
        model(idx)
    return [(y.norm(dim=-1) / (y.norm(dim=-1) + a.norm(dim=-1))).mean().item()
            for a, y in zip(acts["attn_out"], acts["mlp_out"])]

# ---- THEORY §5: the projection statement --------------------------------------------------------
@torch.no_grad()
def projection_error(block, x, rank=RANK, seed=0):
    """Max |U D y − U D (I − Π) z| in a block where Π z = p (in the unmodified block: no such Π)."""
    g, d = torch.Generator().manual_seed(seed), x.shape[-1]
    Q = torch.linalg.qr(torch.randn(d, d, generator=g).to(x)).Q[:, : d // 2]  # a QR basis; Π = Q Qᵀ
    Pi, I = Q @ Q.T, torch.eye(d).to(x)                   # Π projects onto the skip term's subspace
    split = copy.deepcopy(block)                          # attention writes into col(Π), the MLP
    for linear, proj in ((split.attn.c_proj, Pi), (split.mlp.c_proj, I - Pi)):  # into col(I − Π)
        linear.weight.copy_(proj @ linear.weight)
        if linear.bias is not None:
            linear.bias.copy_(proj @ linear.bias)
    post_mlp = ns.LinearShift(d, rank, None).to(x)
    post_mlp.U.copy_(torch.randn(d, rank, generator=g))   # U = 0 at init; any U D will do
    post_block = copy.deepcopy(post_mlp)
    post_block.D.copy_(post_mlp.D @ (I - Pi))             # U D (I − Π) z = U D y when Π z = p
    gaps = []
    for b, xx in ((split, x @ Pi), (block, x)):           # x Π: the incoming stream in col(Π)
        after_mlp = b.probe(xx, "mlp_out", post_mlp)[0]
        after_block = b.probe(xx, "block_out", post_block)[0]
        gaps.append((after_mlp - after_block).abs().max().item())
    return gaps[0], gaps[1]

@torch.no_grad()
def skip_share(block, x, update):
    """THEORY §5: δz = δp + δy, so ⟨δp, δz⟩/‖δz‖² + ⟨δy, δz⟩/‖δz‖² = 1. The skip share, the first
    term, is a projection coefficient, not a fraction: < 0 where δp points against δz, > 1 where
    δy does. -> (over all tokens, per token: min, max, the share of tokens outside [0, 1])."""
    z_ft, p_ft = with_update(block, update).probe(x, "resid_mid")
    z, p = block.probe(x, "resid_mid")
    dp, dz = (p_ft - p).flatten(0, -2), (z_ft - z).flatten(0, -2)      # (tokens, d)
    t = (dp * dz).sum(-1) / (dz * dz).sum(-1)
    return ((dp * dz).sum() / (dz * dz).sum()).item(), dict(
        min=t.min().item(), max=t.max().item(), outside=((t < 0) | (t > 1)).double().mean().item())

# ---- THEORY §6–§8: oracle shifts; joint adaptation; folding -------------------------------------
def rank90(a):
    """How many directions hold 90% of the variance of a's rows."""
    energy = torch.linalg.svdvals(a - a.mean(0)) ** 2
    return int((energy.cumsum(0) / energy.sum() < 0.9).sum()) + 1

def oracle_fits(block, x, delta):
    """THEORY §6: rank90 of the oracle shifts delta (B, T, d) of `block` next to the base block
    output's and noise's, and the shares recovered by linear and nonlinear post-block fits."""
    fits = {kind + "_fit": fit_shift(block, "block_out", kind, x, block(x) + delta)[1]
            for kind in ("linear", "nonlinear")}
    flat = delta.flatten(0, -2)
    return dict(rank90=rank90(flat), rank90_base=rank90(block(x).flatten(0, -2).detach()),
                rank90_noise=rank90(torch.randn_like(flat)), **fits)

class Replay(torch.nn.Module):
    """A "shift" that adds one stored (B, T, d) tensor, whatever it reads: an oracle in a slot."""
    def __init__(self, delta):
        super().__init__()
        self.delta = delta
    def forward(self, s):
        return self.delta

def oracle_demo(model, idx, layer, seed=0):
    """THEORY §6 after an update of every block: the oracle Δ_ℓ put into every block_out SLOT of
    the base model replays the tuned logits (a sanity check, z + (z_FT − z) = z_FT, of where the
    slots sit and of ns.oracle's convention); the oracle's rank and fits at `layer`."""
    blocks = model.transformer.h
    tuned = with_update(model, {f"transformer.h.{i}.{name}": delta for i, block in enumerate(blocks)
                            for name, delta in random_update(block, seed + i).items()})
    deltas = ns.oracle(model, tuned, idx)
    with torch.no_grad(), ns.capture(tuned, ["block_out"]) as acts:    # z_FT,ℓ, layer by layer
        for block, delta in zip(blocks, deltas):
            block.slots["block_out"].shift = Replay(delta)
        replay = (model(idx)[0] - tuned(idx)[0]).abs().max().item()
        for block in blocks:
            block.slots["block_out"].shift = None        # the slots are empty again
    x = ([model.embed(idx)] + acts["block_out"])[layer]  # z_FT,ℓ−1: the stream entering `layer`
    return dict(replay_max_abs_err=replay, **oracle_fits(blocks[layer], x, deltas[layer]))

@torch.no_grad()
def ortho_demo(model, rank=RANK):
    """Max |D V| (V: orthonormal basis of col(B) of the mlp.c_proj LoRA) before and after."""
    joint = copy.deepcopy(model)
    torch.manual_seed(0)
    loras = ns.lora(joint, rank, targets=("mlp.c_proj",))
    shifts = ns.steer(joint, "block_out", "linear", rank)
    bases = [torch.linalg.qr(lora.lora_B.normal_()).Q for lora in loras]  # B ≠ 0, as after training
    before = max((shift.D @ V).abs().max().item() for shift, V in zip(shifts, bases))
    ns.orthogonalize(joint)                      # THEORY §7: D ← D (I − V Vᵀ)
    after = max((shift.D @ V).abs().max().item() for shift, V in zip(shifts, bases))
    return dict(before=before, after=after)

@torch.no_grad()
def fold_errors(model, idx, layer, seed=0):
    """THEORY §8: {site: max |logits after ns.fold − before|} over the kinds that fold there (linear
    only, without biases), each shift with random non-zero values, in block `layer`."""
    block, errors, g = model.transformer.h[layer], {}, torch.Generator().manual_seed(seed)
    for site, kinds in FOLDS.items():
        for kind in [k for k in kinds if block.mlp.c_proj.bias is not None or k == "linear"]:
            model.transformer.h[layer] = copy.deepcopy(block)    # fold changes the block's weights
            for p in ns.steer(model, site, kind, RANK, layers=layer)[0].parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
            error = (model(idx)[0] - ns.fold(model)(idx)[0]).abs().max().item()
            errors[site] = max(errors.get(site, 0.0), error)
    model.transformer.h[layer] = block
    return errors

# ---- the report: one line per claim, the JSON, three figures ------------------------------------
def claims(r, exact):
    """Rows (kind, claim, measured, predicted, tol, ok); `exact`: the float precision. kind:
    "theorem" (THEORY proves it; the number checks the code), "sanity" (true by construction or by
    Taylor's theorem: it checks the code), "measured" (a fact about these weights, not a law)."""
    f, w, o, fd_tol = r["first_order"], r["wproj_zero"], r["oracle"], 1e-6 if exact < 1e-8 else 1e-2
    rel, fd = max(v["rel_err"] for v in f.values()), max(v["fd_rel_err"] for v in f.values())
    rows = [("theorem", "§3 bridge: W+ΔW == shift ΔW·x (max abs)", r["bridge_max_abs_err"], 0,
             exact),
            *[("sanity", f"§4 Taylor: jvp's error slope, {k}", f[k]["slope"], 2, 0.1) for k in f],
            ("theorem", "§4 closed form vs jvp (max rel)", rel, 0, max(1e-8, exact)),
            ("theorem", "§4 closed form vs central diff. (max rel)", fd, 0, fd_tol),
            *[("theorem", f"§4 control without ΔW_proj·m: slope, {k}", f[k]["control_slope"], 1,
               0.1) for k in f],
            ("theorem", "§5 W_proj=0: token variance of y", w["y_variance"], 0, exact),
            ("measured", "§5 W_proj=0: linear post-block − post-MLP",  # no theorem: a bias-free
             w["block_out"] - w["mlp_out"], 0, None),          # U·D·z need not beat a constant
            ("theorem", "§5 UD(I−Π)z == UDy (max abs)", r["projection_max_abs_err"], 0, exact),
            ("sanity", "§6 base + oracle in block_out slots == tuned", o["replay_max_abs_err"], 0,
             exact),
            ("sanity", "§7 |D·V| after orthogonalize", r["ortho_max_abs"]["after"], 0, exact),
            *[("theorem", f"§8 fold at {s}: max |Δlogit|", e, 0, exact)
              for s, e in r["fold"].items()]]
    return [(kind, c, m, p, t, m > p if t is None else abs(m - p) <= t)
            for kind, c, m, p, t in rows]

def load(args):
    """-> (frozen model, tokens (8, T) of docs/probe_text.txt, its name). No --init: the committed
    base model if it is there, else a fresh small GPT; an --init given is loaded or refused."""
    name = args.init or (BASE_CHECKPOINT if os.path.isfile(BASE_CHECKPOINT) else None)
    torch.manual_seed(0)                                   # the init when there is no checkpoint
    model, enc = checkpoints.load(name) if name else \
        (GPT(GPTConfig(n_layer=4, n_embd=64)), tasks.byte_encoding())
    model = ns.freeze(model.to(args.device, getattr(torch, args.dtype)).eval())
    ids, T = enc.encode(PROSE.read_text("utf-8")), min(32, model.config.block_size)
    idx = torch.tensor(ids[: 8 * T]).view(8, T).to(args.device)
    return model, idx, shown(name) if name else "random init (no checkpoint)"

def compute(model, idx, layer):
    """Every demonstration, on block `layer` and the stream x entering it -> the results."""
    with ns.capture(model, ["block_out"]) as acts:
        model(idx)
    x, block = acts["block_out"][layer - 1], model.transformer.h[layer]
    update = random_update(block, 0)
    share, share_per_token = skip_share(block, x, update)
    return dict(bridge_max_abs_err=bridge_error(block, x), tokens=idx.numel(),
                site_recovery=where_to_steer(block, x, update)[0], skip_share=share,
                skip_share_per_token=share_per_token, wproj_zero=wproj_zero(block, x),
                first_order={kind: first_order(model, x, layer, kind) for kind in ("gelu", "glu")},
                oracle=oracle_demo(model, idx, layer), ortho_max_abs=ortho_demo(model),
                projection_max_abs_err=projection_error(block, x)[0],
                fold=fold_errors(model, idx, layer), mlp_share=mlp_share(model, idx))

def print_report(r, rows):
    print(f"{'kind':<8} | {'claim':<44} | {'measured':>10} | predicted | {'diff':>8} |   tol | ok")
    for kind, claim, measured, predicted, tol, ok in rows:
        op, tol = ("=", f"{tol:5.0e}") if tol is not None else (">", "-")
        verdict = ("ok" if ok else "NO") if kind != "measured" else ("yes" if ok else "no")
        print(f"{kind:<8} | {claim:<44} | {measured:>10.4g} | {f'{op} {predicted:.3g}':>9} | "
              f"{measured - predicted:>8.2g} | {tol:>5} | {verdict}")
    sites = ", ".join(f"{s} {r['site_recovery'][s]['linear']:.3f}" for s in SITES)
    o, t = r["oracle"], r["skip_share_per_token"]
    print(f"exit status 1 if a theorem or sanity row is NO; a measured row is a fact, not a law\n"
          f"\nalso measured (facts about these weights): §6 oracle 90% energy in {o['rank90']} "
          f"directions (base block output {o['rank90_base']}, noise {o['rank90_noise']})\n§5 skip "
          f"share ⟨δp, δz⟩/‖δz‖² {r['skip_share']:.2f}, a projection coefficient, not a fraction: "
          f"per token from {t['min']:.2f} to {t['max']:.2f}, {t['outside']:.0%} of tokens outside "
          f"[0, 1]\nshare of δz recovered by rank-{RANK} linear steers: {sites} (sites.png)\n§5 "
          f"MLP share ‖y‖/(‖y‖ + ‖a‖) per layer: {' '.join(f'{v:.2f}' for v in r['mlp_share'])}")

def write(r, out):
    """equivalence.json and the three figures, through write_files: all of them or none."""
    write_files(out, {"equivalence.json": partial(write_json, r), **figure_writers(r, EPS, RANK)})

def main(argv=None):
    parser = OneLineParser(description="Check docs/THEORY.md §3–§8 with numbers.")
    parser.add_argument("--init", "--checkpoint", help="any checkpoints.load name: smollm2-135m, a "
                        ".gguf, a GPT.save file... (default: the committed base model, results/base/model.pt)")
    parser.add_argument("--device", choices=["cpu", "cuda"] if torch.cuda.is_available() else
                        ["cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="float32 blurs the ε² check")
    parser.add_argument("--out", default="out/equivalence", help="folder for JSON and figures")
    args, start = parser.parse_args(argv), time.time()
    check_out_dir(args.out, flag="--out")  # before any work: a bad folder costs nothing
    torch.set_num_threads(1)                # the matrices are small: one thread is fastest
    plt.switch_backend("Agg")               # figures go to files only
    model, idx, name = load(args)
    layer = model.config.n_layer // 2       # a middle block
    r = dict(compute(model, idx, layer), model=name, device=args.device, dtype=args.dtype)
    rows, r["seconds"] = claims(r, 1e-10 if args.dtype == "float64" else 1e-4), time.time() - start
    print_report(r, rows)
    write(r, args.out)
    print(f"{name} | block {layer} | {args.device} {args.dtype} | {r['seconds']:.0f}s | "
          f"{shown(args.out)}")
    return all(ok for kind, *_, ok in rows if kind != "measured")

if __name__ == "__main__":
    try:
        sys.exit(0 if main() else 1)        # exit status 1: a theorem or sanity check failed
    except ValueError as e:                 # a bad argument, found before any work: one line
        print(f"equivalence.py: error: {e}", file=sys.stderr)
        sys.exit(2)
