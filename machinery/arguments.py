"""
machinery/arguments.py: train.py's arguments checked before any work (its resolve_args calls
these), so that a bad one costs nothing: one line, never a traceback. A first read skips it.
"""
import contextlib
import io
import math
import os

import nanosteer
from formats import checkpoints
from machinery import runtime
from machinery.checks import check_bounds, check_out_dir, check_set_aside
from machinery.files import RUN_FILES, earlier_run
from model import GPTConfig, resolve_site
from tasks import TASKS, byte_encoding, load_jsonl, pack


def check_choices(config):
    """Names that must be one of a list: task, site, adapter, activation, and joint's pairing."""
    if config.data is None and config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}: choose one of {', '.join(TASKS)} or pass --data FILE.jsonl")
    config.site = resolve_site(config.site)
    if config.adapter not in nanosteer.SHIFTS:
        raise ValueError(f"unknown adapter {config.adapter!r}: choose one of {', '.join(nanosteer.SHIFTS)}")
    if config.act not in nanosteer.ACTIVATIONS:
        raise ValueError(f"unknown activation {config.act!r}: choose one of {', '.join(nanosteer.ACTIVATIONS)}")
    if config.shift_init == "steerling" and config.adapter not in ("linear", "nonlinear"):
        raise ValueError(f"--shift-init steerling sets the D of a linear or nonlinear shift; a {config.adapter} "
                         "shift has none: drop --shift-init")
    if config.mode == "joint" and (config.site != "block_out" or config.adapter not in ("linear", "nonlinear")):
        raise ValueError("joint mode steers block_out with a linear or nonlinear shift, whose D the constraint "
                         "of THEORY §7 projects: drop --site/--adapter or set them so")


def check_numbers(config):
    """Counts and rates in their ranges (also NaN and infinity, which every comparison rejects)."""
    if config.lora_rank < 0 or (config.mode == "joint" and config.lora_rank == 0):
        raise ValueError(f"--lora-rank {config.lora_rank} is invalid: use ≥ 1 for LoRA (or 0 for full fine-tuning "
                         "in weight mode)")
    positive = dict(steps=config.steps, batch_size=config.batch_size, log_every=config.log_every,
                    n_train=config.n_train, n_eval=config.n_eval, rank=config.rank)
    at_least_zero = dict(warmup=config.warmup, ortho_every=config.ortho_every, ckpt_every=config.ckpt_every)
    bad = [k for k, v in positive.items() if not v > 0] + [k for k, v in at_least_zero.items() if not v >= 0]
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} must be {'positive' if bad[0] in positive else '≥ 0'}, "
                         f"got {getattr(config, bad[0])}")
    check_bounds({k: getattr(config, k) for k in ("steps", "warmup", "log_every", "ckpt_every", "ortho_every",
                                                 "batch_size", "n_train", "n_eval", "seed")})
    if config.batch_size < int(os.environ.get("WORLD_SIZE", 1)):
        raise ValueError(f"under torchrun --batch-size ≥ the number of processes: got {config.batch_size} for "
                         f"{os.environ['WORLD_SIZE']} processes")
    rates = dict(lr=config.lr, lora_lr=config.lora_lr, lora_alpha=1.0 if config.lora_alpha is None else config.lora_alpha)
    bad = [k for k, v in rates.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} must be positive and finite, got {getattr(config, bad[0])}")


def check_files(config, default_init):
    """Files to read exist, the output folder can be written, a resume file is there if asked for."""
    check_out_dir(config.out_dir, None if config.mode == "pretrain" else config.init, files=RUN_FILES)
    if config.resume and not os.path.isfile(os.path.join(config.out_dir, "resume.pt")):
        raise ValueError(f"--resume: there is no {os.path.join(config.out_dir, 'resume.pt')}; start the run without --resume")
    if config.resume:
        runtime.read_resume(os.path.join(config.out_dir, "resume.pt"), config)   # all but the tensors, now
    elif earlier_run(config.out_dir):
        check_set_aside(config.out_dir)                  # the new run moves it aside: can it?
    if config.mode != "pretrain" and not os.path.exists(config.init) and config.init != default_init \
            and config.init not in checkpoints.NAMES:
        raise ValueError(f"--init {config.init} does not exist: give a checkpoint file, a Hugging Face "
                         f"directory, a .gguf file, {checkpoints.SMOLLM2} or a gpt2 name")
    if config.data is not None and not os.path.isfile(config.data):
        raise ValueError(f"--data {config.data} is not a file: give a JSONL file of prompt/completion lines")
    if config.data is not None:
        check_data(config, default_init)


def check_data(config, default_init):
    """The --data file read whole now, so that a bad line costs nothing (train_once reads it again
    and only then warns of repeated prompts). When the run will first pretrain the missing base,
    each example must also fit that base's context, which is known now (bytes, GPTConfig())."""
    with contextlib.redirect_stderr(io.StringIO()):
        splits = load_jsonl(config.data, config.seed)
    if config.mode != "pretrain" and config.init == default_init and not os.path.exists(default_init):
        for examples in splits.values():
            pack(examples, byte_encoding(), GPTConfig().block_size)
