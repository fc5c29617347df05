"""equivalence.py: docs/THEORY.md §3–§8 (Adila et al., 2026, "Weight Updates as Activation Shifts")
checked with numbers, one function per demonstration. main() prints a line per claim (measured |
predicted | diff | tol | ok), writes equivalence.json and three figures. `python equivalence.py`
runs on the built-in base model (else a fresh small GPT); `--init smollm2-135m` on a real one."""
import argparse
import copy
import json
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

import checkpoints
import nanosteer as ns
import tasks
from tools.fits import (KINDS, RANK, SITES, fit_shift, mlp_share, oracle_fits,  # noqa: F401 (fit_shift:
                  random_update, updated, where_to_steer, wproj_zero)       # notebook 2 uses eq's)
from model import SITES as ALL_SITES, GPT, Block, GPTConfig, gelu_prime

EPS = [10.0 ** (-k / 2) for k in range(2, 9)]     # 1e-1 ... 1e-4: update sizes of the §4 checks
FOLDS = {site: ("vector",) if site in ("resid_mid", "block_out") else ("vector", "linear", "reft")
         for site in ALL_SITES}                   # the shifts that fold at each site (THEORY §8)

# ---- THEORY §3: the exact bridge at one linear layer ------------------------------------------
@torch.no_grad()
def bridge_error(block, x, rank=RANK):
    """Largest gap, over the block's Linears, between W ← W + ΔW and shifting the output by ΔW x."""
    torch.manual_seed(0)                                  # LoRA's random A
    worst = 0.0
    for path in [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
        shifted = copy.deepcopy(block)                    # a LoRALinear outputs W x + b + s·B A x
        lora = ns.LoRALinear(shifted.get_submodule(path), rank, alpha=rank).to(x)
        lora.lora_B.normal_(std=0.02)                     # (B = 0 at init; a trained one has B ≠ 0)
        shifted.set_submodule(path, lora)                 # e.g. path "mlp.c_fc"
        merged = updated(block, {path + ".weight": lora.scale * lora.lora_B @ lora.lora_A})
        worst = max(worst, (shifted(x) - merged(x)).abs().max().item())  # (W + ΔW) x == W x + ΔW x
    return worst

# ---- THEORY §4: first-order transport through the MLP -----------------------------------------
def linear_change(d, name, h):                   # ΔW h + Δb: how the Linear `name` moves (§3)
    return h @ d[name + ".weight"].T + d.get(name + ".bias", 0.0)

def moved(block, direction, e):                  # the parameters θ + εΔ
    return {k: block.get_parameter(k) + e * d for k, d in direction.items()}

def mlp_first_order(mlp, h, d, proj_term=True):
    """THEORY §4, closed form: δy ≈ ΔW_proj m + Δb_proj + W_proj δm for an update d of the MLP;
    proj_term=False leaves ΔW_proj m out (the slope-1 control)."""
    u = mlp.c_fc(h)
    if mlp.gated:               # GLU: δm = silu'(a_g) ⊙ a_u ⊙ δa_g + silu(a_g) ⊙ δa_u, silu = a·sig
        a_g, sig = mlp.c_gate(h), torch.sigmoid(mlp.c_gate(h))     # silu'(a) = sig·(1 + a(1 − sig))
        dm = sig * (1 + a_g * (1 - sig)) * u * linear_change(d, "c_gate", h) \
            + a_g * sig * linear_change(d, "c_fc", h)
    else:                       # GELU: δm = gelu'(u) ⊙ (ΔW_fc h + Δb_fc)
        dm = gelu_prime(u) * linear_change(d, "c_fc", h)
    dy = dm @ mlp.c_proj.weight.T + d.get("c_proj.bias", 0.0)
    return dy + mlp.hidden(h) @ d["c_proj.weight"].T if proj_term else dy

def closed_form_change(block, direction, x, proj_term=True):
    """δz of an MLP-only update ("mlp." names) by the closed form: r does not move, so δz = δy."""
    d = {k.removeprefix("mlp."): v for k, v in direction.items()}
    return mlp_first_order(block.mlp, block.run(x, "mlp_in")[1], d, proj_term)

def jvp_change(block, direction, x):             # d/dε block(x; θ + εΔ) at ε = 0, by autodiff
    params = {k: block.get_parameter(k).detach() for k in direction}
    with sdpa_kernel(SDPBackend.MATH):           # the fused CPU attention kernel has no forward AD
        return jvp(partial(functional_call, block, args=(x,)), (params,), (direction,))[1]

@torch.no_grad()
def first_order_errors(block, x, direction, predict=jvp_change, eps=EPS):
    """max |z(θ + εΔ) − z(θ) − ε·predict(Δ)| per ε: ~ε² if predict is the whole first-order term."""
    z, dz = block(x), predict(block, direction, x)
    z_moved = [functional_call(block, moved(block, direction, e), (x,)) for e in eps]
    return [(z_e - z - e * dz).abs().max().item() for z_e, e in zip(z_moved, eps)]

def first_order(model, x, layer, kind, eps=EPS):
    """One MLP kind (the model's block, else a fresh one), updates with biases: jvp's error slope
    (Taylor), closed form vs jvp and central differences, the slope without ΔW_proj m (control)."""
    torch.manual_seed(0)
    block = model.transformer.h[layer] if model.config.mlp == kind else \
        Block(replace(model.config, mlp=kind)).to(x)
    errors = first_order_errors(block, x, random_update(block, 1, biases=True), eps=eps)
    d_mlp = {"mlp." + k: v for k, v in random_update(block.mlp, 2, biases=True).items()}
    closed, auto = closed_form_change(block, d_mlp, x), jvp_change(block, d_mlp, x)
    h = 1e-4 if x.dtype == torch.float64 else 1e-2    # central differences: error ~h² + ulp/h
    with torch.no_grad():                             # (z(θ + hΔ) − z(θ − hΔ)) / 2h
        diff = (functional_call(block, moved(block, d_mlp, h), (x,))
                - functional_call(block, moved(block, d_mlp, -h), (x,))) / (2 * h)
    control = first_order_errors(block, x, d_mlp, partial(closed_form_change, proj_term=False), eps)
    slope = [float(np.polyfit(np.log(eps), np.log(e), 1)[0]) for e in (errors, control)]
    return dict(errors=errors, slope=slope[0], control_errors=control, control_slope=slope[1],
                rel_err=((closed - auto).abs().max() / auto.abs().max()).item(),
                fd_rel_err=((closed - diff).abs().max() / diff.abs().max()).item())

# ---- THEORY §5: the projection statement --------------------------------------------------------
@torch.no_grad()
def projection_error(block, x, rank=RANK, seed=0):
    """Max |A y − A (I − P) z| in a block where P z = r (and in the unmodified block: no such P)."""
    g, d = torch.Generator().manual_seed(seed), x.shape[-1]
    Q = torch.linalg.qr(torch.randn(d, d, generator=g).to(x)).Q[:, : d // 2]
    P, I = Q @ Q.T, torch.eye(d).to(x)                    # P projects onto the skip term's subspace
    split = copy.deepcopy(block)                          # attention writes into col(P), the MLP
    for linear, proj in ((split.attn.c_proj, P), (split.mlp.c_proj, I - P)):   # into col(I − P)
        linear.weight.copy_(proj @ linear.weight)
        if linear.bias is not None:
            linear.bias.copy_(proj @ linear.bias)
    post_mlp = ns.LinearShift(d, rank, None).to(x)
    post_mlp.U.copy_(torch.randn(d, rank, generator=g))   # U = 0 at init; any A = U D will do
    post_block = copy.deepcopy(post_mlp)
    post_block.D.copy_(post_mlp.D @ (I - P))              # A (I − P) z = A y when P z = r
    gaps = [(b.run(xx, "mlp_out", post_mlp)[0] - b.run(xx, "block_out", post_block)[0]).abs().max()
            for b, xx in ((split, x @ P), (block, x))]    # x @ P: the incoming stream in col(P)
    return gaps[0].item(), gaps[1].item()

# ---- THEORY §6–§8: oracle shifts; joint adaptation; folding -------------------------------------
def oracle_demo(model, idx, layer, seed=0):
    """THEORY §6 after an update of every block: the oracle at every block_out replays the tuned
    logits (max error); its rank and fits at `layer`, on the tuned stream (fits.oracle_fits)."""
    blocks = model.transformer.h
    tuned = updated(model, {f"transformer.h.{i}.{name}": delta for i, block in enumerate(blocks)
                            for name, delta in random_update(block, seed + i).items()})
    deltas, z, zs = ns.oracle(model, tuned, idx), model.embed(idx), []
    for block, oracle_shift in zip(blocks, deltas):   # the base model; the oracle at each block_out
        zs.append(z)                                  # z_tuned,ℓ−1: the replay IS the tuned stream
        z = block(z) + oracle_shift
    replay = (model.lm_head(model.transformer.ln_f(z)) - tuned(idx)[0]).abs().max().item()
    return dict(replay_max_abs_err=replay, **oracle_fits(blocks[layer], zs[layer], deltas[layer]))

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
    """Rows (claim, measured, predicted, tol, op, ok); `exact`: the tolerance of float precision."""
    f, w, o = r["first_order"], r["wproj_zero"], r["oracle"]
    gain, fd_tol = w["block_out"] - w["mlp_out"], 1e-6 if exact < 1e-8 else 1e-2
    rows = [("§3 bridge: W+ΔW == shift ΔW·x (max abs)", r["bridge_max_abs_err"], 0, exact, "=")]
    rows += [(f"§4 Taylor sanity: jvp's error slope, {k}", f[k]["slope"], 2, 0.1, "=") for k in f]
    rows += [("§4 closed form vs jvp (max rel)", max(v["rel_err"] for v in f.values()), 0,
              max(1e-8, exact), "="),
             ("§4 closed form vs central diff. (max rel)", max(v["fd_rel_err"] for v in f.values()),
              0, fd_tol, "=")]
    rows += [(f"§4 control without ΔW_proj·m: slope, {k}", f[k]["control_slope"], 1, 0.1, "=")
             for k in f]
    rows += [("§5 W_proj=0: token variance of y", w["y_variance"], 0, exact, "="),
             ("§5 W_proj=0: linear post-block − post-MLP", gain, 0, 0, "≥"),
             ("§5 A(I−P)z == A y (max abs)", r["projection_max_abs_err"], 0, exact, "="),
             ("§6 base + oracle at every layer == tuned", o["replay_max_abs_err"], 0, exact, "="),
             ("§7 |D·V| after orthogonalize", r["ortho_max_abs"]["after"], 0, exact, "=")]
    rows += [(f"§8 fold at {s}: max |Δlogit|", e, 0, exact, "=") for s, e in r["fold"].items()]
    return [(c, m, p, t, op, abs(m - p) <= t if op == "=" else m >= p - t)
            for c, m, p, t, op in rows]

def plot(r, out):
    """first_order.png, sites.png, mlp_share.png into out, each written, then renamed."""
    figures = [plt.subplots(figsize=(6.5, 4)) for _ in range(3)]
    (_, ax), (_, bx), (_, cx) = figures
    for kind, f in r["first_order"].items():
        ax.loglog(EPS, f["errors"], "o-", label=f"{kind}, ε·jvp: slope {f['slope']:.2f}")
        ax.loglog(EPS, f["control_errors"], "s--", label=f"{kind}, closed form without ΔW_proj·m "
                  f"(MLP update only): slope {f['control_slope']:.2f}")
    ax.set(xlabel="update size ε", ylabel="max |z(θ+εΔ) − z(θ) − ε·prediction|",
           title="THEORY §4: first-order error")
    for i, kind in enumerate(KINDS):
        bx.bar(np.arange(len(SITES)) + 0.27 * (i - 1), [r["site_recovery"][s][kind] for s in SITES],
               0.27, label=kind)
    bx.set(xticks=range(len(SITES)), xticklabels=SITES, ylabel="share of the change recovered",
           title=f"THEORY §4–§5: where to steer (rank {RANK}; skip share {r['skip_share']:.2f})")
    cx.plot(r["mlp_share"], "o-", label=f"{r['model']}, {r['tokens']} tokens of text")
    cx.set(xlabel="layer", ylabel="‖y‖ / (‖y‖ + ‖a‖)", ylim=(0, 1),
           title="THEORY §5: the MLP's share of each layer's write to the stream")
    for (fig, axes), name in zip(figures, ("first_order", "sites", "mlp_share")):
        axes.legend(fontsize=8)
        fig.savefig(os.path.join(out, name + ".tmp.png"), dpi=150, bbox_inches="tight")
        os.replace(os.path.join(out, name + ".tmp.png"), os.path.join(out, name + ".png"))
        plt.close(fig)

def load(args):
    """-> (frozen model in eval mode, tokens (8, T) of prose: docs/THEORY.md, a name)."""
    explicit = args.init != "out/base/model.pt"            # then a missing file is an error
    name = args.init if explicit or os.path.isfile(args.init) else "random init (no checkpoint)"
    torch.manual_seed(0)                                   # the init when there is no checkpoint
    model, enc = checkpoints.load(name) if name == args.init else \
        (GPT(GPTConfig(n_layer=4, n_embd=64)), tasks.byte_encoding())
    model = ns.freeze(model.to(args.device, getattr(torch, args.dtype)).eval())
    text = (Path(__file__).resolve().parent / "docs" / "THEORY.md").read_text(encoding="utf-8")
    ids, T = enc.encode(text), min(32, model.config.block_size)
    return model, torch.tensor(ids[: 8 * T]).view(8, T).to(args.device), name

def compute(model, idx, layer):
    """Every demonstration, on block `layer` and the stream x entering it -> the results."""
    with ns.capture(model, ["block_out"]) as acts:
        model(idx)
    x, block = acts["block_out"][layer - 1], model.transformer.h[layer]
    site_table, skip_share = where_to_steer(block, x, random_update(block, 0))
    return dict(bridge_max_abs_err=bridge_error(block, x), site_recovery=site_table,
                first_order={kind: first_order(model, x, layer, kind) for kind in ("gelu", "glu")},
                skip_share=skip_share, wproj_zero=wproj_zero(block, x),
                oracle=oracle_demo(model, idx, layer), ortho_max_abs=ortho_demo(model),
                projection_max_abs_err=projection_error(block, x)[0], tokens=idx.numel(),
                fold=fold_errors(model, idx, layer), mlp_share=mlp_share(model, idx))

def print_report(r, rows):
    print(f"{'claim':<42} | {'measured':>10} | {'predicted':>9} | {'diff':>9} | {'tol':>7} | ok")
    for claim, measured, predicted, tol, op, ok in rows:
        print(f"{claim:<42} | {measured:>10.4g} | {f'{op} {predicted:.3g}':>9} | "
              f"{measured - predicted:>9.2g} | {tol:>7.1g} | {'ok' if ok else 'NO'}")
    sites = ", ".join(f"{s} {r['site_recovery'][s]['linear']:.3f}" for s in SITES)
    o, shares = r["oracle"], " ".join(f"{share:.2f}" for share in r["mlp_share"])
    print(f"\nmeasured, not claimed: §6 oracle 90% energy in {o['rank90']} directions (base "
          f"block output {o['rank90_base']}, noise {o['rank90_noise']})\n§5 skip share "
          f"{r['skip_share']:.2f}; share recovered by rank-{RANK} linear steers: {sites} (all "
          f"kinds: sites.png)\n§5 MLP share per layer: {shares} (mlp_share.png)")

def write(r, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "equivalence.json.tmp"), "w") as f:   # write, then rename
        json.dump(r, f, indent=2)
    os.replace(os.path.join(out, "equivalence.json.tmp"), os.path.join(out, "equivalence.json"))
    plot(r, out)

def main(argv=None):
    parser = argparse.ArgumentParser(description="Check docs/THEORY.md §3–§8 with numbers.")
    parser.add_argument("--init", "--checkpoint", default="out/base/model.pt",
                        help="any checkpoints.load name: smollm2-135m, a .gguf, a GPT.save file...")
    parser.add_argument("--device", choices=["cpu", "cuda"] if torch.cuda.is_available() else
                        ["cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="float32 blurs the ε² check")
    parser.add_argument("--out", default="out/equivalence", help="folder for JSON and figures")
    args, start = parser.parse_args(argv), time.time()
    torch.set_num_threads(1)                # the matrices are small: one thread is fastest
    plt.switch_backend("Agg")               # figures go to files only
    model, idx, name = load(args)
    layer = model.config.n_layer // 2       # a middle block
    r = dict(compute(model, idx, layer), model=name, device=args.device, dtype=args.dtype)
    rows, r["seconds"] = claims(r, 1e-10 if args.dtype == "float64" else 1e-4), time.time() - start
    print_report(r, rows)
    write(r, args.out)
    print(f"{name} | block {layer} | {args.device} {args.dtype} | {r['seconds']:.0f}s | {args.out}")
    return all(ok for *_, ok in rows)

if __name__ == "__main__":
    try:
        sys.exit(0 if main() else 1)        # exit status 1 when a claim fails
    except ValueError as e:                 # e.g. an --init that is no checkpoint: one line, exit 2
        print(f"equivalence.py: error: {e}", file=sys.stderr)
        sys.exit(2)
