"""
machinery/runtime.py: where and how train.py's loop runs, kept out of the loop so that it reads as the math.
A first read skips this file. It holds: the device and the number format (bf16 autocast), several
processes under torchrun (PyTorch's DDP), Ctrl-C, resume files, and the check of a finite loss.
"""
import math
import os
import signal
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce

from machinery.files import earlier_run, save_torch, set_aside, write_atomically

# ---------------------------------------------------------------------------------------------
# device and number format


def pick_device(name):
    """auto: cuda, then mps, then cpu; a named device must exist."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} is not available on this machine: use --device cpu")
    return name


def cpu_has_native_bf16():
    """Does this CPU multiply bf16 in hardware? Linux lists it among the CPU's flags (avx512_bf16 on
    AMD Zen 4 and Intel Cooper Lake on, amx_bf16 on Sapphire Rapids). Elsewhere we do not know: no."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}      # as people type them


def dtype_name(text):
    """--dtype's value as argparse's type: bf16 and fp32 are bfloat16 and float32."""
    return DTYPE_NAMES.get(text, text)


def slow_dtype_note(dtype, device):
    """One line to print before a run whose number format this CPU cannot run fast, else None:
    without native bf16 (AVX2 only, e.g. AMD Zen 3) bf16 matmuls are emulated, far slower."""
    if dtype != "bfloat16" or device != "cpu" or cpu_has_native_bf16():
        return None
    return ("warning: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 among its flags), so --dtype "
            "bfloat16 is emulated: about 15x slower than float32 (a SmolLM2 step: 70 s against 4 s); "
            "--dtype float32 is faster here")


def warn_if_slow(config):
    """Before any work: slow_dtype_note, once (rank 0 under torchrun), if it applies. On stdout, with
    the run's other lines (stderr keeps an error to its one line; compare.py logs its runs' stdout)."""
    device = pick_device(config.device)
    note = slow_dtype_note(pick_dtype(config.dtype, device), device)
    if note and os.environ.get("RANK", "0") == "0":
        print(note, flush=True)


def pick_dtype(name, device):
    """The number format of the forward and backward passes: "float32" or "bfloat16" (autocast; the
    weights and the optimizer stay float32). auto: bf16 on CUDA, float32 on a CPU. On a CPU with
    native bf16 (cpu_has_native_bf16) --dtype bfloat16 is faster on a pretrained LM, but it is not
    the default: measured on SmolLM2 it changed the accuracy of the same run (RESULTS.md)."""
    if name != "auto":
        return name
    return "bfloat16" if device == "cuda" else "float32"


def autocast(device, dtype):
    """A context in which matmuls run in bf16 (the float32 weights are cast on the fly), or nothing."""
    if dtype == "bfloat16":
        return torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)
    return nullcontext()

# ---------------------------------------------------------------------------------------------
# several processes (torchrun) and Ctrl-C


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


def mean_over_processes(loss, world):
    """Every process holds world × (its share of the batch's mean loss); their sum / world is the
    batch's mean (see the rescaling in train.train_steps)."""
    summed = all_reduce(loss) if world > 1 else loss
    return summed.item() / world


class CtrlC:
    """Ctrl-C only sets a flag; the loop stops after the step, since half a step cannot be resumed.
    Under torchrun every process asks `pressed` after every step and they agree (a maximum over
    processes), so all of them stop after the same step and none waits for another in all-reduce."""

    def __init__(self, world):
        self.world, self.seen = world, False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.seen = True

    def pressed(self):
        if self.world == 1:
            return self.seen
        flag = torch.tensor([float(self.seen)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

# ---------------------------------------------------------------------------------------------
# one run a folder, and resumable runs: resume.pt in --out-dir


def holds_earlier_run(config):
    """Does --out-dir hold another run's files (a run we do not --resume)? Asked at the start."""
    return not config.resume and bool(earlier_run(config.out_dir))


def make_room(out_dir, proc):
    """Before this run's first file goes into out_dir: the earlier run there (proc.earlier_run, from
    the start) moves aside whole, once, so the folder never holds two runs' files. Said in one line."""
    if proc.earlier_run:
        print(f"moved the earlier run in {out_dir} to {set_aside(out_dir)} (a folder holds one run)")
        proc.earlier_run = False

FREE_ARGS = ("resume", "ckpt_every", "log_every", "device", "compile", "out_dir")   # they change no number


def save_resume(path, config, step, losses, model, optimizer, batches):
    """Everything the loop needs to go on from `step` as if never stopped."""
    state = dict(args=vars(config), step=step, losses=losses, optimizer=optimizer.state_dict(),
                 tensors={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 batches=batches.get_state(), torch_rng=torch.get_rng_state())
    write_atomically(path, lambda tmp: save_torch(state, tmp))


def read_resume(path, config):
    """resume.pt read (mmap: no tensor is read yet) and its every field checked that needs no model:
    the kinds of its fields, the run's arguments, the step in 0..--steps with a finite loss for each
    step done. Called before any work (machinery/arguments.py), and again by load_resume."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, another kind of file: one line for the user
        raise ValueError(f"{path} is not a resume file of train.py ({type(e).__name__}): start without --resume") from None
    kinds = dict(args=dict, step=int, losses=list, optimizer=dict, tensors=dict, batches=torch.Tensor,
                 torch_rng=torch.Tensor)
    bad = [k for k, kind in kinds.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if bad:
        raise ValueError(f"{path}: its {bad[0]} is missing or malformed, so the run cannot go on from it: "
                         "start without --resume, or in another --out-dir")
    for key, value in vars(config).items():
        if key not in FREE_ARGS and state["args"].get(key) != value:
            raise ValueError(f"{path} comes from a run with {key}={state['args'].get(key)!r}, not {value!r}: "
                             "resume with that run's arguments, or choose another --out-dir")
    step, losses = state["step"], state["losses"]
    finite = all(isinstance(x, float) and math.isfinite(x) for x in losses)
    if isinstance(step, bool) or not 0 <= step <= config.steps or len(losses) != step or not finite:
        raise ValueError(f"{path}: step {step} with {len(losses)} losses does not fit a run of --steps "
                         f"{config.steps}: the file is damaged; start without --resume")
    return state


def optimizer_fits(saved, optimizer):
    """Is saved (an AdamW state_dict) the state of exactly this optimizer's tensors, group by group?"""
    groups = saved.get("param_groups")
    if not (isinstance(saved.get("state"), dict) and isinstance(groups, list)
            and len(groups) == len(optimizer.param_groups)):
        return False
    shapes = {}                                      # the saved index of a tensor -> its shape here
    for theirs, ours in zip(groups, optimizer.param_groups):
        if not (isinstance(theirs, dict) and isinstance(theirs.get("params"), list)
                and len(theirs["params"]) == len(ours["params"])):
            return False
        shapes.update(zip(theirs["params"], [p.shape for p in ours["params"]]))
    for index, entry in saved["state"].items():
        if index not in shapes or not isinstance(entry, dict) or not isinstance(entry.get("step"), torch.Tensor):
            return False
        for key in ("exp_avg", "exp_avg_sq"):
            if not (isinstance(entry.get(key), torch.Tensor) and entry[key].shape == shapes[index]):
                return False
    return True


def check_resume(state, path, model, optimizer, batches):
    """What read_resume cannot check alone: the trainable tensors (every name, shape, a finite float),
    AdamW's state for exactly these tensors, and both generators' states of the right size."""
    mine, theirs = {n: p for n, p in model.named_parameters() if p.requires_grad}, state["tensors"]
    for name in sorted(set(mine) | set(theirs)):
        t = theirs.get(name)
        fits = name in mine and isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == mine[name].shape
        if not (fits and torch.isfinite(t).all()):
            raise ValueError(f"{path}: its tensor {name} is missing, not one this run trains, or not a finite "
                             "float of its shape: the file is of another run or damaged; start without --resume")
    generators = [(state["batches"], batches.get_state()), (state["torch_rng"], torch.get_rng_state())]
    if not optimizer_fits(state["optimizer"], optimizer) or \
            any(saved.dtype != torch.uint8 or saved.shape != now.shape for saved, now in generators):
        raise ValueError(f"{path}: its optimizer or generator state does not fit this run: the file is "
                         "damaged; start without --resume")


def load_resume(path, config, model, optimizer, batches):
    """Restore what save_resume wrote, if from a run with this config, after checking all of it:
    a refused file changes nothing. -> (steps done, their losses)"""
    state = read_resume(path, config)
    check_resume(state, path, model, optimizer, batches)
    model.load_state_dict(state["tensors"], strict=False)        # the trainable tensors; the rest is --init
    optimizer.load_state_dict(state["optimizer"])
    batches.set_state(state["batches"])
    torch.set_rng_state(state["torch_rng"])    # dropout draws from it (on CUDA from the GPU's, not saved)
    return state["step"], state["losses"]

# ---------------------------------------------------------------------------------------------
# a check after every step


def check_finite(losses, step):
    """A diverged run stops here, before anything is written over earlier results."""
    if not math.isfinite(losses[-1]):
        finite = [x for x in losses if math.isfinite(x)]
        last = f"the last finite loss was {finite[-1]:.4f}" if finite else "no step had a finite loss"
        raise ValueError(f"the loss became {losses[-1]} at step {step} ({last}); nothing was written: "
                         "try a smaller --lr or a longer --warmup")
