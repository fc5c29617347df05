"""
machinery/files.py: how this repository writes a file. Every file a run writes goes through
write_files, so that a failure or Ctrl-C never leaves half a file, or a mix of two runs' files,
behind. A first read skips this file.
"""
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent          # the repository root


def write_files(folder, writers):
    """The one way this repository writes files: {name: write} -> each write(tmp) fills a temporary
    file in folder; only when all have succeeded do they replace the old ones (os.replace, a rename).
    A failure or Ctrl-C leaves every old file as it was. A temporary keeps its extension (savefig)."""
    os.makedirs(folder or ".", exist_ok=True)
    temporary = {}
    try:
        for name, write in writers.items():
            root, extension = os.path.splitext(name)
            temporary[name] = os.path.join(folder, f"{root}.{os.getpid()}.tmp{extension}")
            write(temporary[name])
        for name, tmp in temporary.items():
            os.replace(tmp, os.path.join(folder, name))
    finally:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.remove(tmp)


RUN_FILES = ("results.json", "outcomes.json", "loss.png", "model.pt", "adapters.pt", "resume.pt")  # train.py's


def earlier_run(folder):
    """The files of a train.py run that folder holds, finished or stopped ([] when none)."""
    return [name for name in RUN_FILES if os.path.isfile(os.path.join(folder, name))]


def set_aside(folder):
    """A folder holds one run: move the earlier run, the whole folder, to the next free name
    <folder>-1, <folder>-2, ... (a rename: nothing is copied or lost). -> that name."""
    folder, n = os.path.normpath(folder), 1
    while os.path.lexists(f"{folder}-{n}"):
        n += 1
    os.rename(folder, f"{folder}-{n}")
    return f"{folder}-{n}"


def write_atomically(path, write):
    """One file through write_files: write(tmp) fills a temporary file that then replaces path."""
    write_files(os.path.dirname(path), {os.path.basename(path): write})


def save_torch(payload, path):
    """torch.save, byte for byte reproducible: torch names the archive inside a file after the
    file (our temporary names differ from run to run), but always 'archive' when given an open
    file, so the same tensors give the same bytes and the same sha256."""
    with open(path, "wb") as f:
        torch.save(payload, f)


def write_json(value, path):
    """The JSON files of a run (results.json, outcomes.json, equivalence.json), for write_files."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def write_text(text):
    """-> write(path) for write_files: the text, as UTF-8."""
    def write(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def read_json(path, kind=dict, fields=None):
    """The JSON file at path, which must hold a `kind` (a dict: an object), with fields {name: type}
    present and of their types if given (JSON's true is no number); anything else, or a file that
    is not JSON, is a one-line ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({type(e).__name__}): delete or restore it") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON {kind.__name__}: delete or restore it")
    for name, type_ in (fields or {}).items():
        if not isinstance(value.get(name), type_) or isinstance(value.get(name), bool) and type_ is not bool:
            raise ValueError(f"{path}: its {name} is missing or not a {type_.__name__} (damaged or edited): "
                             "delete or restore it")
    return value


def shown(path):
    """A path as printed and recorded: relative to the repository root when inside it."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(str(ROOT) + os.sep) else path
