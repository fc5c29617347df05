"""
Shared test helpers. pytest loads this file before any test file, so the repo root is on sys.path
for every test (also for `python -m pytest tests/test_equivalence.py` run alone), and test files
import the helpers below with `from conftest import ...`.

    ROOT, run_script(...), script_ok(...)   run a repo script as a user runs it (a subprocess)
    ctrl_c_as_in_a_terminal                 preexec_fn for a subprocess a test sends Ctrl-C to
    tiny_base (fixture)                     an untrained 2-layer, width-32 checkpoint on bytes
"""
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402

# one thread everywhere, here and in the subprocesses: identical numerics, and tiny tensors run
# faster on one thread than on a busy pool
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def ctrl_c_as_in_a_terminal():
    """A background job of a shell (`pytest ... &`, nohup) starts with SIGINT ignored, its children
    inherit that, and Python then never raises KeyboardInterrupt: a Ctrl-C test would pass or fail
    by how pytest was launched. The child gets the default back, as when run from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(*args, timeout=300):
    """Run `python <args>` (e.g. "train.py", "--mode", "joint") in the repo root; the
    CompletedProcess. A first argument "torchrun" runs torchrun instead of python."""
    cmd = [sys.executable, "-m", "torch.distributed.run"] if args[0] == "torchrun" else [sys.executable, args[0]]
    return subprocess.run(cmd + [str(a) for a in args[1:]], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def script_ok(*args, timeout=300):
    """run_script, asserting exit status 0 (the failure shows the end of stderr)."""
    proc = run_script(*args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A small untrained base checkpoint (2 layers, width 32, byte tokenizer), made once."""
    path = tmp_path_factory.mktemp("tiny_base") / "model.pt"
    torch.manual_seed(0)
    GPT(GPTConfig(**TINY_CONFIG)).save(str(path), tokenizer="bytes")
    return path
