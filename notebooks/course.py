"""
notebooks/course.py: what only the course's notebooks need; they import it with the repository root
on sys.path (Adila et al., 2026, "Weight Updates as Activation Shifts"; § as in docs/THEORY.md).

- notebook 2: steers fitted to the oracle, and the paper's metric, KL(tuned ‖ steered) (§6);
- notebook 3: how much a joint adapter's steer reads and writes where its LoRA writes (§7), from
  notebooks/watching.py;
- the exercise solutions, `solution_<notebook>_<exercise>`: the numbers a lecturer would show.
"""
import contextlib
import copy
import io

import numpy as np
import torch
import torch.nn.functional as F

import equivalence as eq
import nanosteer as ns
import tasks
import train
from experiments import stats
from formats import adapters
from model import GPT, gelu_prime
from watching import joint_parts, overlaps, project_steer_writes, train_watching  # noqa: F401 (notebook 3's)

# ---------------------------------------------------------------------------------------------
# notebook 2: fitting a map to the oracle, and the KL divergence of the steered model

def share_recovered(shift, s, delta):
    """1 − ‖Δ(s) − δ‖² / ‖δ‖²: eq.fit_shift's score where the shift adds to z directly."""
    return 1 - ((shift(s) - delta) ** 2).sum().item() / (delta ** 2).sum().item()

def fit_in_place(shift, s, delta, iters=200):
    """Fit `shift` so that Δ(s) ≈ δ: eq.lbfgs on ‖Δ(s) − δ‖² / ‖δ‖²."""
    scale = (delta ** 2).sum()
    eq.lbfgs(shift.parameters(), lambda: ((shift(s) - delta) ** 2).sum() / scale, iters)
    return shift

def random_start(s, rank, seed, act="silu"):
    """U σ(D s) with U = 0 (as in training) and D random, scaled so that D s has unit spread in each
    direction: σ's curved range, not its linear one."""
    torch.manual_seed(seed)
    shift = ns.NonlinearShift(s.shape[-1], rank, act, s.dtype)
    with torch.no_grad():
        shift.D.div_((s @ shift.D.T).std(0, keepdim=True).T.clamp(min=1e-12))
    return shift

def fit_oracle(s, delta, kind, rank=eq.RANK, seeds=(0, 1, 2)):
    """The best `kind` shift of rank r with Δ(s) ≈ δ (s: what the steer reads, (N, n); δ: the
    oracle, (N, d)) -> (shift, None), or for "nonlinear random", the best of several random starts,
    (shift, the share recovered from each start). "nonlinear" and "reft" start at the linear fit."""
    if kind not in (*ns.SHIFTS, "nonlinear random"):
        raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(ns.SHIFTS)}, nonlinear random")
    if kind == "nonlinear random":
        fitted = [fit_in_place(random_start(s, rank, seed), s, delta) for seed in seeds]
        shares = [share_recovered(f, s, delta) for f in fitted]
        return fitted[int(np.argmax(shares))], shares
    if kind == "nonlinear":   # eq.fit_shift's start: the linear fit, in silu's near-linear range
        linear = fit_oracle(s, delta, "linear", rank)[0].requires_grad_(False)
        shift = ns.NonlinearShift(s.shape[-1], rank, "silu", s.dtype)
        shift.D, shift.U = map(torch.nn.Parameter, eq.silu_start(s, linear.D, linear.U))
        return fit_in_place(shift, s, delta), None
    if kind == "reft":        # LoReFT, Rᵀ(W s + b − R s), from the linear fit U D s: R spans col(U),
        linear, _ = fit_oracle(s, delta, "linear", rank)                  # W = R + R U D, b = 0
        shift = ns.ReFTShift(s.shape[-1], rank, None, s.dtype)           # (holds every rank-r U D)
        with torch.no_grad():
            shift.R_free.copy_(linear.U)
            shift.W.copy_(shift.R() + shift.R() @ linear.U @ linear.D)
        return fit_in_place(shift, s, delta), None                       # then b (and all) move
    torch.manual_seed(0)
    shift = ns.SHIFTS[kind](s.shape[-1], rank, "silu", s.dtype)
    if kind == "linear":      # closed form, as eq.fit_shift's where the shift adds to z directly
        shift.D, shift.U = map(torch.nn.Parameter, eq.least_squares(s, delta, rank))
        return shift, None
    return fit_in_place(shift, s, delta), None

def oracle_inputs(base, tuned, idx, site):
    """Per layer ℓ: (what a steer at `site` of base block ℓ reads on the TUNED stream, the oracle
    Δ_ℓ), both (tokens, width). THEORY §6: Δ_ℓ = z_FT,ℓ − block_ℓ(z_FT,ℓ−1), so the steer that
    should produce Δ_ℓ sees block ℓ's activations on that same stream z_FT,ℓ−1."""
    with ns.capture(tuned, ["block_out"]) as acts:
        tuned(idx)
    streams = [base.embed(idx)] + acts["block_out"][:-1]        # z_FT,ℓ−1 (ns.oracle's convention)
    return [(block.probe(x, site)[1].flatten(0, 1), delta.flatten(0, 1))
            for block, x, delta in zip(base.transformer.h, streams, ns.oracle(base, tuned, idx))]

ORACLE_ROWS = {"vector": ("block_out", "vector"), "linear U·D·z": ("block_out", "linear"),   # name: (site, kind)
               "nonlinear, linear start": ("block_out", "nonlinear"),
               "nonlinear, best random start": ("block_out", "nonlinear random"),
               "ReFT form at block_out": ("block_out", "reft"), "ReFT at mlp_out (reads y)": ("mlp_out", "reft")}

@torch.no_grad()
def steered_logits(base, tuned, idx, site=None, shifts=None):
    """Logits of the base model's blocks with shifts[ℓ] at `site` of block ℓ (none: no steer), read
    out by the TUNED model's final LayerNorm and head: full fine-tuning also moved ln_f and the tied
    embedding, which no block-level steer can change (the embedding's change is inside Δ_0)."""
    shifts = shifts or [None] * base.config.n_layer
    z = base.embed(idx)
    for block, shift in zip(base.transformer.h, shifts):
        z = block.probe(z, site, shift)[0] if shift is not None else block(z)
    return tuned.lm_head(tuned.transformer.ln_f(z))

@torch.no_grad()
def kl_to_tuned(tuned_logits, logits, mask):
    """The paper's metric: KL(p_tuned ‖ p_steered) in nats, the mean over the positions in mask."""
    log_p, log_q = F.log_softmax(tuned_logits, -1), F.log_softmax(logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                     # (B, T)
    return kl[mask].mean().item()

def oracle_table(base, tuned, idx_fit, idx_test, rank=eq.RANK, seeds=(0, 1, 2), names=None):
    """THEORY §6 with the paper's metric: every layer's steer is fitted on idx_fit to that layer's
    oracle, then all layers are steered at once on idx_test. names: the rows of ORACLE_ROWS to fit
    (default: all). -> {row: (share recovered per layer, KL to the tuned model)}."""
    eot = tasks.get_tokenizer("bytes").eot_token
    target, layers = tuned(idx_test)[0].detach(), base.config.n_layer
    mask = (idx_test == eot).cumsum(1) <= 2      # <eot> prompt completion <eot>, then <eot> padding

    def kl(site=None, shifts=None):
        return kl_to_tuned(target, steered_logits(base, tuned, idx_test, site, shifts), mask)
    oracle = [eq.Replay(delta) for delta in ns.oracle(base, tuned, idx_test)]
    rows = {"no steer": ([0.0] * layers, kl()), "oracle": ([1.0] * layers, kl("block_out", oracle))}
    for name, (site, kind) in ORACLE_ROWS.items():
        if names is None or name in names:
            inputs = oracle_inputs(base, tuned, idx_fit, site)
            fitted = [fit_oracle(s, delta, kind, rank, seeds)[0] for s, delta in inputs]
            shares = [share_recovered(f, s, d) for f, (s, d) in zip(fitted, inputs)]
            rows[name] = (shares, kl(site, fitted))
    return rows

# ---------------------------------------------------------------------------------------------
# notebook 3: what a joint adapter's steer reads and writes, during training; the baseline

def majority_baseline(task, seed=0):
    """compare.py's majority-class row: train's commonest completion -> (it, its test accuracy)."""
    return stats.majority_baseline(tasks.make_splits(task, seed))

# ---------------------------------------------------------------------------------------------
# the exercise solutions: solution_<notebook>_<exercise>

def train_quietly(argv):
    """train.py's run for these arguments, without its progress lines -> its results."""
    with contextlib.redirect_stdout(io.StringIO()):
        return train.train(train.resolve_args(train.parse_args(argv)))

def erf_gelu_prime(u):      # (u·Φ(u))' = Φ(u) + u·φ(u), the exact GELU's; GPT-2 uses the tanh form
    phi = torch.exp(-u ** 2 / 2) / (2 * torch.pi) ** 0.5
    return 0.5 * (1 + torch.erf(u / 2 ** 0.5)) + u * phi

def solution_1_1(block, x, d_mlp):
    """Exercise 1.1: the first-order formula with the erf GELU's derivative in term 2 -> dict(eps,
    errors, slope_large ≈ 2 (over the 3 largest ε), slope_small ≈ 1 (the 3 smallest), mismatch =
    max |gelu' − erf gelu'|)."""
    def formula(b, direction, xx):
        h = b.probe(xx, "mlp_in")[1]
        u = b.mlp.c_fc(h)
        dm = erf_gelu_prime(u) * (h @ direction["mlp.c_fc.weight"].T)
        return b.mlp.hidden(h) @ direction["mlp.c_proj.weight"].T + dm @ b.mlp.c_proj.weight.T
    direction, eps = {"mlp." + k: v for k, v in d_mlp.items()}, [10.0 ** (-k / 2) for k in range(2, 13)]
    errors = eq.first_order_errors(block, x, direction, formula, eps)    # ε from 1e-1 down to 1e-6
    u = block.mlp.c_fc(block.probe(x, "mlp_in")[1])
    slope = [float(np.polyfit(np.log(eps[i:i + 3]), np.log(errors[i:i + 3]), 1)[0])
             for i in (0, len(eps) - 3)]
    return dict(eps=eps, errors=errors, slope_large=slope[0], slope_small=slope[1],
                mismatch=(gelu_prime(u) - erf_gelu_prime(u)).abs().max().item())

def solution_1_2(block, x, d_mlp):
    """Exercise 1.2: what an mlp_in steer (Δh, reaching z only as J(h)Δh) and an attn_out steer (the
    paper's pre-MLP: skip path and MLP) recover of an update of W_fc alone (term 2's world) and of
    W_proj alone (term 1's) -> {update: {site: share recovered by a rank-4 linear steer}}."""
    parts = {"W_fc only (term 2)": {"mlp.c_fc.weight": d_mlp["c_fc.weight"]},
             "W_proj only (term 1)": {"mlp.c_proj.weight": d_mlp["c_proj.weight"]}}
    target = {name: eq.with_update(block, update)(x) for name, update in parts.items()}
    return {name: {site: eq.fit_shift(block, site, "linear", x, target[name])[1]
                   for site in ("mlp_in", "attn_out")} for name in parts}

def solution_1_3(model, idx, layer, rank=4):
    """Exercise 1.3: the rank (σ > 1e-9 σ_max) of the shift of u = W_fc h + b that a LoRA on
    mlp.c_fc makes, and of the shift of m = gelu(u) it causes -> dict(u=rank, m=rank, width of m)."""
    with ns.capture(model, ["mlp_in", "mlp_hidden"]) as acts:
        model(idx)
    lora_model = copy.deepcopy(model)
    lora, = ns.lora(lora_model, rank, targets=("mlp.c_fc",), layers=layer)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.02)
        h = acts["mlp_in"][layer]
        du = (lora(h) - model.transformer.h[layer].mlp.c_fc(h)).flatten(0, 1)
        with ns.capture(lora_model, ["mlp_hidden"]) as acts_lora:
            lora_model(idx)
        dm = (acts_lora["mlp_hidden"][layer] - acts["mlp_hidden"][layer]).flatten(0, 1)
    ranks = [int(torch.linalg.matrix_rank(a, rtol=1e-9)) for a in (du, dm)]
    return dict(u=ranks[0], m=ranks[1], width=dm.shape[-1])

def solution_2_1(base, tuned, idx, leave_out, scale=1.0):
    """Exercise 2.1: the oracle at every layer but `leave_out`, times `scale` -> max |z − z_FT| per
    layer: 0 before the left-out layer, then the error it leaves, carried on by the later layers."""
    deltas = ns.oracle(base, tuned, idx)
    with ns.capture(tuned, ["block_out"]) as acts:
        tuned(idx)
    z, gaps = base.embed(idx), []
    with torch.no_grad():
        for layer, (block, delta, z_ft) in enumerate(zip(base.transformer.h, deltas, acts["block_out"])):
            z = block(z) + (0 if layer == leave_out else scale * delta)
            gaps.append((z - z_ft).abs().max().item())
    return gaps

def solution_2_2(base, checkpoint, work, steps, batch, rank=4):
    """Exercise 2.2: a rank-4 LoRA fine-tune instead of a full one, merged -> dict(ranks: per block,
    each Linear's weight change's rank, ≤ rank by the bridge; fitted: eq.where_to_steer per block)."""
    train_quietly(["--mode", "weight", "--lora-rank", str(rank), "--task", "boolq",
                   "--init", checkpoint, "--steps", str(steps), "--batch-size", str(batch),
                   "--n-train", "2000", "--out-dir", work + "/run"])
    tuned = ns.merge(adapters.load(GPT.load(checkpoint).double(), work + "/run/adapters.pt")).eval()
    ranks, fitted = [], []
    idx, _ = tasks.pack(tasks.make_splits("boolq", 0, n_train=0)["test"][:16], tasks.get_tokenizer("bytes"),
                        base.config.block_size)
    with ns.capture(base, ["block_out"]) as acts:
        base(idx)
    streams = [base.embed(idx)] + acts["block_out"][:-1]
    for layer, (b, t) in enumerate(zip(base.transformer.h, tuned.transformer.h)):
        update = {n: t.get_parameter(n) - p for n, p in b.named_parameters()}
        ranks.append({n: int(torch.linalg.matrix_rank(d, rtol=1e-9))      # merged in float64: exact
                      for n, d in update.items() if d.dim() == 2})
        fitted.append(eq.where_to_steer(b, streams[layer].detach(), update))
    return dict(ranks=ranks, fitted=fitted)

def solution_3_1(checkpoint, work, steps, batch, n_train, lora_rank=1):
    """Exercise 3.1: equal budgets across sites. LoRA rank r_l on every Linear has 16·d·r_l parameters per
    block (r(d+3d) + r(d+d) + r(d+4d) + r(4d+d)); a rank-r_s shift has 2·d·r_s; so r_s = 8·r_l.
    -> {name: results of train.train} for LoRA r_l, post-block r_s, post-MLP r_s."""
    common = ["--task", "boolq", "--init", checkpoint, "--steps", str(steps), "--batch-size", str(batch),
              "--n-train", str(n_train)]
    r_s = str(8 * lora_rank)
    runs = {f"LoRA r={lora_rank}": ["--mode", "weight", "--lora-rank", str(lora_rank)],
            f"post-block r={r_s}": ["--mode", "activation", "--site", "post_block", "--rank", r_s],
            f"post-MLP r={r_s}": ["--mode", "activation", "--site", "post_mlp", "--rank", r_s]}
    return {name: train_quietly([*common, *flags, "--out-dir", f"{work}/ex31-{i}"])
            for i, (name, flags) in enumerate(runs.items())}

def solution_3_2(argv, everies=(1, 10, 0), every=5):
    """Exercise 3.2: how often to orthogonalize -> {ortho_every: train_watching log} (the read overlap is
    ~0 right after each projection and grows between projections)."""
    return {k: train_watching([*argv, "--ortho-every", str(k)], every=every) for k in everies}

def solution_3_3(argv, every=10):
    """Exercise 3.3: constrain the steer's writes as well as its reads -> train_watching log."""
    return train_watching([*argv, "--ortho-every", "1"], every=every, project_writes=True)
