"""
notebooks/watching.py: notebook 3's view of a joint adapter during training (Adila et al., 2026; § as in
docs/THEORY.md): how much the block_out steer reads and writes where the LoRA on mlp.c_proj writes
(§7), recorded step by step. course.py offers them as course.overlaps, course.train_watching...
"""
import torch

import nanosteer as ns
import tasks
import train
from formats import checkpoints


def joint_parts(model):
    """Per block: (B of the LoRA on mlp.c_proj, the block_out steer) of a joint model, else one line."""
    parts = [(block.mlp.c_proj, block.slots["block_out"].shift) for block in model.transformer.h]
    if not all(isinstance(lora, ns.LoRALinear) and hasattr(shift, "D") for lora, shift in parts):
        raise ValueError("not a joint model: every block needs LoRA on mlp.c_proj and a linear block_out steer")
    return [(lora.lora_B, shift) for lora, shift in parts]

@torch.no_grad()
def overlaps(model):
    """Per block: (‖D V‖/‖D‖, ‖Vᵀ U‖/‖U‖), V an orthonormal basis of col(B) of the LoRA on mlp.c_proj:
    how much the block_out steer READS (D) and WRITES (U) in the directions the weight update writes.
    (nan while B = 0.) A random r×d matrix gives about sqrt(r/d) for either."""
    shares = []
    for B, shift in joint_parts(model):
        V = torch.linalg.qr(B).Q                                    # (d, r)
        read = (shift.D @ V).norm().item() / shift.D.norm().item()
        write = (V.T @ shift.U).norm().item() / max(shift.U.norm().item(), 1e-30)
        shares.append((read, write) if B.abs().max() > 0 else (float("nan"), float("nan")))
    return shares

@torch.no_grad()
def project_steer_writes(model):
    """U ← (I − V Vᵀ) U per block: the steer no longer WRITES where the MLP's LoRA writes."""
    for B, shift in joint_parts(model):
        if B.abs().max() > 0:
            V = torch.linalg.qr(B).Q
            shift.U -= V @ (V.T @ shift.U)

def train_watching(argv, every=10, project_writes=False):
    """train.py's loop for --mode joint, step for step (same seed, batches, lr schedule, constraint),
    recording overlaps(model) every `every` steps. project_writes: also project the steer's writes
    (exercise 3.3). -> dict(steps, read, write (per record, per block), losses)."""
    args = train.resolve_args(train.parse_args(argv))
    splits = tasks.make_splits(args.task, args.seed, args.n_train)
    base, enc = checkpoints.load(args.init)          # as train.train: loaded before build_model seeds
    model = train.build_model(args, "cpu", base)     # the adapters' random init
    joint_parts(model)                               # a joint model (--mode joint, every layer): before step 0
    train_x, train_y = tasks.pack(splits["train"], enc, model.config.block_size)
    optimizer = train.make_optimizer(model, args)
    batches = torch.Generator().manual_seed(args.seed)
    log = dict(steps=[], read=[], write=[], losses=[])
    for step in range(args.steps):
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * train.lr_factor(step, args.steps, args.warmup)
        rows = torch.randint(len(train_x), (args.batch_size,), generator=batches)
        _, loss = model(train_x[rows], train_y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.ortho_every and (step + 1) % args.ortho_every == 0:
            ns.orthogonalize(model)                                  # THEORY §7: D ← D (I − V Vᵀ)
            if project_writes:
                project_steer_writes(model)
        log["losses"].append(loss.item())
        if (step + 1) % every == 0 or step == args.steps - 1:
            read, write = zip(*overlaps(model))
            log["steps"].append(step + 1)
            log["read"].append(read)
            log["write"].append(write)
    return log
