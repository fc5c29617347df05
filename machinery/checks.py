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


def check_out_dir(out_dir, init=None, flag="--out-dir", files=()):
    """An output folder must be a folder we can write (it may not exist yet), where none of the
    files the script writes is a folder, and not the folder of the checkpoint the run starts from
    (a run's files there could replace or be mistaken for it). Every script checks its output
    folder here, before any work."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{flag} {out_dir} is a file, not a folder: give a folder")
    folders = [name for name in files if os.path.isdir(os.path.join(out_dir, name))]
    if folders:
        raise ValueError(f"{flag} {out_dir}: its {folders[0]} is a folder, where the script writes a file: "
                         f"move it away, or choose another {flag}")
    existing = out_dir
    while not os.path.exists(existing):                 # the nearest folder that exists must be writable
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing) or not can_write_in(existing):
        raise ValueError(f"{flag} {out_dir} cannot be written ({existing} is not a writable folder): "
                         f"choose another {flag}")
    if init is not None and os.path.exists(init) and holds(out_dir, init):
        raise ValueError(f"{flag} {out_dir} holds the --init checkpoint {init}, which the run "
                         f"could write over or move: choose another {flag}")


def holds(folder, path):
    """Does folder hold path, whatever way path reaches it (a symlink, `..`, a hard link)? Yes when
    path's real location is folder, or in it at any depth, or when a file of folder is the very
    same file (os.path.samefile: the same inode, which a hard link shares)."""
    real, inside = os.path.realpath(path), os.path.realpath(folder)
    if real == inside or real.startswith(inside + os.sep):
        return True
    try:
        with os.scandir(folder) as entries:      # the files a run writes or replaces: folder's own
            return any(e.is_file() and os.path.samefile(e.path, path) for e in entries)
    except OSError:                              # no such folder (yet), or one we cannot list
        return False


def check_set_aside(out_dir, flag="--out-dir"):
    """A folder that holds an earlier run is moved aside whole before a new run writes there
    (machinery/files.py's set_aside). Check now, before any work, that it can be: not the current
    folder or one holding it, not a mount point, in a folder we can write."""
    real, here = os.path.realpath(out_dir), os.path.realpath(os.getcwd())
    parent = os.path.dirname(os.path.abspath(os.path.normpath(out_dir)))
    if here == real or here.startswith(real + os.sep) or os.path.ismount(real) or not can_write_in(parent):
        raise ValueError(f"{flag} {out_dir} holds an earlier run, which a new run moves aside first, but this folder "
                         f"cannot be moved (the current folder, a mount point or read-only): choose another {flag}")


def can_write_in(folder):
    """Try it: os.access says yes to root even on a read-only file system."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


MOST = dict(n_layer=1024, n_head=4096, n_kv_head=4096, n_embd=65_536, mlp_width=1_048_576, vocab_size=16_777_216,
            block_size=16_777_216)            # each field's largest value (published LMs: under a tenth of it)


def check_config(config):
    """Every field of a GPTConfig checked, in one line each, so a bad config never reaches a tensor."""
    least_values = dict(block_size=1, vocab_size=1, n_layer=1, n_head=1, n_embd=1, mlp_width=0,
                        n_kv_head=0)
    for field, least in least_values.items():
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"config {field}={value!r}: it must be a whole number >= {least}")
    for field, most in MOST.items():
        if getattr(config, field) > most:
            raise ValueError(f"config {field}={getattr(config, field)}: at most {most:,} (far past any published "
                             "model: the config is damaged, and building it would take minutes or overflow)")
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


def regular_file(path, what="checkpoint"):
    """A path to read must be a regular file: a FIFO or a device would block the reader for ever."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file: give a {what} file")


def check_names_and_shapes(tensors, model_tensors, source):
    """A checkpoint's tensors {name: tensor} against the model's (a model made on the meta device:
    nothing allocated yet): every name known and given, every shape right."""
    for name, tensor in tensors.items():
        if name not in model_tensors:
            raise ValueError(f"{source}: unexpected tensor {name!r} for this architecture")
        if tensor.shape != model_tensors[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(model_tensors[name].shape)}")
    missing = sorted(set(model_tensors) - set(tensors))
    if missing:
        raise ValueError(f"{source}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")


def exact_dtype(tensors, source):
    """Every tensor a real float one (complex, integers or anything else refused) and finite. ->
    the dtype that holds them all exactly: float64 if one is, else float32 (float16 and bfloat16
    widen to it exactly). A checkpoint's numbers are never rounded on the way in."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{source}: {name} is {kind}, not a tensor of real floats: not loaded")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: tensor {name} holds NaN or infinity: the checkpoint is damaged")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32


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


# The upper bound of every size argument, with its reason: a typo costs one line, not hours or a crash.
LIMITS = {
    "steps": (1_000_000, "a million steps is days on a CPU"),
    "warmup": (1_000_000, "the bound of --steps"), "log_every": (1_000_000, "the bound of --steps"),
    "ckpt_every": (1_000_000, "the bound of --steps"), "ortho_every": (1_000_000, "the bound of --steps"),
    "batch_size": (4096, "a step's rows must fit in memory at once; 16 to 256 is what these models use"),
    "n_train": (1_000_000, "a million examples take a minute to make and pack; the tasks have no more to teach"),
    "n_eval": (50_000, "val and test prompts are drawn without repeats, and the pretraining task has about "
                       "340,000 in all"),
    "seeds": (100, "each seed is a whole set of runs; 3 decide the paper's claims"),
    "max_new_tokens": (100_000, "longer than any model's context here (SmolLM2: 8,192 tokens)"),
    "num_samples": (1000, "every sample is a row in memory at once"),
    "seed": (2 ** 63 - 1, "torch seeds its generators with a signed 64-bit number"),
}


def check_bounds(values):
    """{argument: value}, each at most its LIMITS bound (and a seed ≥ 0); the other lower bounds
    are checked where each script parses its arguments."""
    for name, value in values.items():
        high, why = LIMITS[name]
        if value is not None and (value > high or name == "seed" and value < 0):
            what = f"in 0..{high:,}" if name == "seed" else f"at most {high:,}"
            raise ValueError(f"--{name.replace('_', '-')} {value} is out of range: it must be {what} ({why})")


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
