"""
experiments/fits.py: where to steer, measured (docs/THEORY.md §4–§6; Adila et al., 2026). A random low-rank
weight update stands in for a fine-tune; a shift fitted at a site of the block says how much of
the update's effect on the block output a steer there can recover. Also: the W_proj = 0 case, the
oracle shift's rank and fits, the MLP's share of each layer's write. These are measurements, not
identities: equivalence.py prints them next to its claims, notebook 2 studies them (its oracle fits
in notebooks/course.py use the same L-BFGS, closed-form linear fit and SiLU start).
"""
import copy

import torch

import nanosteer as ns

RANK, SCALE = 4, 0.3    # rank of random updates and fitted steers; ‖ΔW‖ / ‖W‖ of a random update
SITES, KINDS = ("attn_out", "mlp_in", "mlp_out", "block_out"), ("vector", "linear", "nonlinear")


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
    THEORY §5: z = p + y, so δz = δp + δy; the skip share is the part δp carries."""
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


@torch.no_grad()
def mlp_share(model, idx):
    """THEORY §5, the paper's per-layer picture: ‖y‖ / (‖y‖ + ‖a‖) per layer, mean over tokens."""
    with ns.capture(model, ["attn_out", "mlp_out"]) as acts:
        model(idx)
    return [(y.norm(dim=-1) / (y.norm(dim=-1) + a.norm(dim=-1))).mean().item()
            for a, y in zip(acts["attn_out"], acts["mlp_out"])]
