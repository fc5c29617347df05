"""
machinery/checks.py: checks that come before any work, so that a bad argument costs nothing: one
line for the user, never a traceback. The command-line parser, output folders, a model's config,
layer lists and whole numbers. A first read skips this file (train.py's own arguments:
machinery/arguments.py).
"""
import argparse
import math
import numbers
import os
import tempfile

import torch


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (argparse prints its usage above it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def check_out_dir(out_dir, init=None, flag="--out-dir"):
    """An output folder must be a folder we can write (it may not exist yet), and not the folder of
    the checkpoint the run starts from (a run's files there could replace or be mistaken for it).
    Every script checks its output folder here, before any work."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{flag} {out_dir} is a file, not a folder: give a folder")
    existing = out_dir
    while not os.path.exists(existing):                 # the nearest folder that exists must be writable
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing) or not can_write_in(existing):
        raise ValueError(f"{flag} {out_dir} cannot be written ({existing} is not a writable folder): "
                         f"choose another {flag}")
    if init is not None and os.path.isfile(init):
        if os.path.realpath(os.path.dirname(init) or ".") == os.path.realpath(out_dir):
            raise ValueError(f"{flag} {out_dir} holds the --init checkpoint {init}, which the run "
                             f"could write over: choose another {flag}")


def can_write_in(folder):
    """Try it: os.access says yes to root even on a read-only file system."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_config(config):
    """Every field of a GPTConfig checked, in one line each, so a bad config never reaches a tensor."""
    least_values = dict(block_size=1, vocab_size=1, n_layer=1, n_head=1, n_embd=1, mlp_width=0,
                        n_kv_head=0)
    for field, least in least_values.items():
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"config {field}={value!r}: it must be a whole number >= {least}")
    for field, where in (("dropout", "in [0, 1)"), ("norm_eps", "> 0"), ("rope_theta", "> 0")):
        value = getattr(config, field)
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not number or not (0 <= value < 1 if field == "dropout" else 0 < value < math.inf):
            raise ValueError(f"config {field}={value!r}: it must be a number {where}")
    choices = dict(mlp=("gelu", "glu"), norm=("layernorm", "rmsnorm"),
                   pos=("learned", "rotary"), bias=(True, False), tie_embeddings=(True, False))
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ValueError(f"unknown {field} {getattr(config, field)!r}: use one of "
                             f"{', '.join(map(str, allowed))}")
    if config.n_embd % config.n_head or config.n_head % (config.n_kv_head or config.n_head):
        raise ValueError(f"n_embd {config.n_embd} must be a multiple of n_head {config.n_head}, "
                         f"and n_head a multiple of n_kv_head {config.n_kv_head}")
    if config.pos == "rotary" and (config.n_embd // config.n_head) % 2:
        raise ValueError("rotary positions need an even head size n_embd / n_head")


def check_layers(model, layers):
    """None -> every layer; an int or a list of ints -> that list, if each layer exists, once."""
    n_layer = model.config.n_layer
    if layers is None:
        return list(range(n_layer))
    layers = [layers] if isinstance(layers, numbers.Integral) else layers
    listed = isinstance(layers, (list, tuple, range))
    ints = listed and all(isinstance(x, numbers.Integral) for x in layers)
    if not ints or any(isinstance(x, bool) for x in layers):
        raise ValueError(f"layers must be an int or a list of ints, not {layers!r}")
    bad = [layer for layer in layers if not 0 <= layer < n_layer]
    if bad or not layers:
        raise ValueError(f"layers {bad or list(layers)} do not exist: "
                         f"this model has layers 0..{n_layer - 1}")
    if len(set(layers)) < len(layers):
        raise ValueError(f"layers {list(layers)} name a layer twice: name each once")
    return list(layers)


def whole_number(value, low, high, message):
    """value as an int if it is a whole number (no bool) in low..high, else ValueError(message)."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or not low <= value <= high:
        raise ValueError(message)
    return int(value)


def check_generation(c, n_prompt, max_new_tokens, num_samples, device):
    """sample.py's run on a model of config c: the prompt and --max-new-tokens within the context,
    and an estimate of the memory the --num-samples rows need (float32: per token the residual
    stream, q, k, v and the MLP's hidden width, one layer's attention scores, and every layer's
    cached keys and values) against what the device has free."""
    if n_prompt + max_new_tokens > c.block_size:
        raise ValueError(f"the prompt ({n_prompt} tokens) and --max-new-tokens {max_new_tokens} exceed the "
                         f"model's context of {c.block_size} tokens: use --max-new-tokens ≤ "
                         f"{max(c.block_size - n_prompt, 0)}")
    T = n_prompt + max_new_tokens
    cache = 2 * c.n_layer * (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head)   # k, v a token
    per_row = 4 * (T * (4 * c.n_embd + 3 * c.d_mlp + c.n_head * T + cache) + c.vocab_size)  # bytes
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):   # a system that does not say: no bound
            free = math.inf
    if per_row * num_samples > free / 2:
        raise ValueError(f"--num-samples {num_samples} needs about {per_row * num_samples / 1e9:.1f} GB "
                         f"at this length, more than half the {free / 1e9:.1f} GB free: use at most "
                         f"{max(int(free / 2 // per_row), 1)}")
