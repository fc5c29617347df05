"""
A careless or hostile user, fed to every script: bad arguments and bad files must each stop the
script in one line, before any work, and change nothing on disk. For every case below: exit
status 2, exactly one line on stderr, no traceback, every file of the test's folder byte-identical
afterwards (the output folder holds a good model, results and a log), and no marker file from a
hostile pickle (proof that no code ran). Plus GPTConfig's own checks, in the same spirit.

The cases of one script run in one subprocess (`python tests/test_fuzz.py SCRIPT ...`, the driver
at the bottom): each case executes the script as `python SCRIPT ARGS` would (runpy, sys.argv),
its stderr captured, its files compared and then restored, so the cases cannot disturb each other.
One Python start per script keeps the whole file fast.

Run:  python -m pytest tests/test_fuzz.py -q
"""
import hashlib
import io
import json
import os
import random
import resource
import runpy
import shutil
import signal
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

if __name__ != "__main__":
    from conftest import ROOT, TINY_CONFIG, run_script
    from model import GPT, GPTConfig

SMALL_RUN = ["--init", "{base}", "--steps", "1", "--batch-size", "2", "--n-train", "8", "--n-eval", "4"]
TRAIN = ["--mode", "activation", *SMALL_RUN, "--out-dir", "{out}"]
QUICK = ["--quick", "--init", "{base}", "--tasks", "boolq", "--seeds", "1", "--steps", "1",
         "--batch-size", "2", "--n-eval", "4", "--out-dir", "{out}"]
SAMPLE = ["--init", "{base}", "--max-new-tokens", "2", "--temperature", "0"]
EQUIV = ["--init", "{base}", "--out", "{out}", "--device", "cpu"]

# name: (script, arguments[, a word the error line must say]); a later argument overrides an
# earlier one (argparse: the last wins), so each case changes one thing of a run that would work
CASES = {
    # train.py
    "train: out-dir is a file": ("train.py", TRAIN + ["--out-dir", "{file}"]),
    "train: out-dir inside a file": ("train.py", TRAIN + ["--out-dir", "{file}/run"]),
    "train: out-dir is the init folder": ("train.py", TRAIN + ["--init", "{out}/model.pt"], "init"),
    "train: missing init": ("train.py", TRAIN + ["--init", "{missing}"]),
    "train: corrupt init": ("train.py", TRAIN + ["--init", "{corrupt}"]),
    "train: hostile init": ("train.py", TRAIN + ["--init", "{hostile}"]),
    "train: init whose tokenizer is itself": ("train.py", TRAIN + ["--init", "{selfref}"], "tokenizer"),
    "train: init with n_head=0": ("train.py", TRAIN + ["--init", "{zero_heads}"]),
    "train: lr nan": ("train.py", TRAIN + ["--lr", "nan"]),
    "train: lr negative": ("train.py", TRAIN + ["--lr", "-1"]),
    "train: steps negative": ("train.py", TRAIN + ["--steps", "-5"]),
    "train: batch size 0": ("train.py", TRAIN + ["--batch-size", "0"]),
    "train: mode typo": ("train.py", TRAIN + ["--mode", "activaton"]),
    "train: unknown flag": ("train.py", TRAIN + ["--stpes", "3"]),
    "train: site typo": ("train.py", TRAIN + ["--site", "block_ot"]),
    "train: adapter typo": ("train.py", TRAIN + ["--adapter", "lineer"]),
    "train: layer out of range": ("train.py", TRAIN + ["--layers", "0,7"]),
    "train: rank too large": ("train.py", TRAIN + ["--rank", "1000"]),
    "train: lora alpha 0": ("train.py", TRAIN + ["--mode", "joint", "--lora-alpha", "0"]),
    "train: missing data": ("train.py", TRAIN + ["--data", "{missing}"]),
    "train: data is a folder": ("train.py", TRAIN + ["--data", "{folder}"], "folder"),
    "train: resume without resume.pt": ("train.py", TRAIN + ["--resume"]),
    "train: batch size 1e9": ("train.py", TRAIN + ["--batch-size", "1000000000"], "out of range"),
    "train: steps 1e23": ("train.py", TRAIN + ["--steps", "99999999999999999999999"], "out of range"),
    "train: n-train 1e10": ("train.py", TRAIN + ["--n-train", "10000000000"], "out of range"),
    "train: n-eval 1e6": ("train.py", TRAIN + ["--n-eval", "1000000"], "out of range"),
    "train: seed 2**64": ("train.py", TRAIN + ["--seed", "18446744073709551616"], "out of range"),
    "train: data nested 100k deep": ("train.py", TRAIN + ["--data", "{deep_data}"], "line 1"),
    "train: diverged run": ("train.py", ["--mode", "pretrain", "--lr", "1e6", "--steps", "3",
                                         "--batch-size", "2", "--n-train", "8", "--n-eval", "4",
                                         "--out-dir", "{out}"], "loss"),
    # sample.py
    "sample: missing init": ("sample.py", SAMPLE + ["--init", "{missing}"]),
    "sample: corrupt init": ("sample.py", SAMPLE + ["--init", "{corrupt}"]),
    "sample: hostile init": ("sample.py", SAMPLE + ["--init", "{hostile}"]),
    "sample: init whose tokenizer is itself": ("sample.py", SAMPLE + ["--init", "{selfref}"], "tokenizer"),
    "sample: init with n_head=0": ("sample.py", SAMPLE + ["--init", "{zero_heads}"]),
    "sample: NaN checkpoint": ("sample.py", SAMPLE + ["--init", "{nan_weights}"]),
    "sample: HF folder without weights": ("sample.py", SAMPLE + ["--init", "{hf_no_weights}"]),
    "sample: HF folder with a hostile .bin": ("sample.py", SAMPLE + ["--init", "{hf_hostile}"]),
    "sample: temperature nan": ("sample.py", SAMPLE + ["--temperature", "nan"], "temperature"),
    "sample: temperature negative": ("sample.py", SAMPLE + ["--temperature", "-1"]),
    "sample: top-k 0": ("sample.py", SAMPLE + ["--top-k", "0"]),
    "sample: num-samples 1e8": ("sample.py", SAMPLE + ["--num-samples", "100000000"], "num-samples"),
    "sample: device typo": ("sample.py", SAMPLE + ["--device", "cuda0"]),
    "sample: max-new-tokens 1e9": ("sample.py", SAMPLE + ["--max-new-tokens", "1000000000"], "out of range"),
    "sample: seed 2**64": ("sample.py", SAMPLE + ["--seed", "18446744073709551616"], "out of range"),
    "sample: missing adapters": ("sample.py", SAMPLE + ["--adapters", "{missing}"]),
    "sample: hostile adapters": ("sample.py", SAMPLE + ["--adapters", "{hostile}"]),
    "sample: damaged adapters": ("sample.py", SAMPLE + ["--adapters", "{damaged_adapters}"]),
    "sample: adapters of another base": ("sample.py", SAMPLE + ["--adapters", "{other_adapters}"], "base"),
    # experiments/compare.py
    "compare: missing init keeps train.log": ("experiments/compare.py", QUICK + ["--init", "{missing}"]),
    "compare: hostile init": ("experiments/compare.py", QUICK + ["--init", "{hostile}"]),
    "compare: out-dir is a file": ("experiments/compare.py", QUICK + ["--out-dir", "{file}"]),
    "compare: seeds 0": ("experiments/compare.py", QUICK + ["--seeds", "0"]),
    "compare: steps negative": ("experiments/compare.py", QUICK + ["--steps", "-1"]),
    "compare: task typo": ("experiments/compare.py", QUICK + ["--tasks", "bolq"]),
    "compare: budget typo": ("experiments/compare.py", QUICK + ["--budget", "nanoo"]),
    "compare: n-eval 1e6": ("experiments/compare.py", QUICK + ["--n-eval", "1000000"], "out of range"),
    "compare: seeds 1000": ("experiments/compare.py", QUICK + ["--seeds", "1000"], "out of range"),
    "compare: batch size 1e9": ("experiments/compare.py", QUICK + ["--batch-size", "1000000000"], "out of range"),
    # equivalence.py
    "equivalence: out is a file": ("equivalence.py", EQUIV + ["--out", "{file}"]),
    "equivalence: out inside a file": ("equivalence.py", EQUIV + ["--out", "{file}/figures"]),
    "equivalence: missing init": ("equivalence.py", EQUIV + ["--init", "{missing}"]),
    "equivalence: own base not made yet": ("equivalence.py", EQUIV + ["--init", "out/base/model.pt"]),
    "equivalence: corrupt init": ("equivalence.py", EQUIV + ["--init", "{corrupt}"]),
    "equivalence: hostile init": ("equivalence.py", EQUIV + ["--init", "{hostile}"]),
    "equivalence: dtype typo": ("equivalence.py", EQUIV + ["--dtype", "float16"]),
}


# ---------------------------------------------------------------------------------------------
# the test's folder: good files, bad files, and an output folder that holds earlier results


class Hostile:
    """Unpickling this object creates the marker file: had a loader run it, the marker exists."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_arena(root):
    """Every file the cases name, under root. -> {placeholder: path}."""
    checkpoints = ("base", "missing", "corrupt", "hostile", "selfref", "zero_heads", "nan_weights",
                   "damaged_adapters", "other_adapters")
    paths = {name: os.path.join(root, name + ".pt") for name in checkpoints}
    for name in ("out", "file", "folder", "hf_no_weights", "hf_hostile"):
        paths[name] = os.path.join(root, name)
    paths["deep_data"] = os.path.join(root, "deep.jsonl")
    with open(paths["deep_data"], "w") as f:                             # brackets nested 100k deep
        f.write('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "x"}\n')
    paths["marker"] = os.path.join(root, "CODE-RAN")
    torch.manual_seed(0)
    base = GPT(GPTConfig(**TINY_CONFIG))
    base.save(paths["base"])
    os.makedirs(paths["out"])
    shutil.copy(paths["base"], os.path.join(paths["out"], "model.pt"))      # a good model and its run
    with open(os.path.join(paths["out"], "results.json"), "w") as f:
        json.dump({"test_acc": 0.5}, f)
    with open(os.path.join(paths["out"], "train.log"), "w") as f:
        f.write("step    1 | loss 1.2345\n" * 280)                             # an earlier 7 kB log
    with open(paths["file"], "w") as f:
        f.write("a file where a folder is wanted\n")
    os.makedirs(paths["folder"])
    with open(paths["corrupt"], "wb") as f:
        f.write(random.Random(0).randbytes(4096))
    torch.save({"config": {}, "model": Hostile(paths["marker"]), "tokenizer": "bytes"}, paths["hostile"])
    base.save(paths["selfref"], tokenizer=paths["selfref"])                  # its tokenizer: itself
    state = base.state_dict()
    zero_heads = dict(config={**TINY_CONFIG, "n_head": 0}, model=state, tokenizer="bytes")
    torch.save(zero_heads, paths["zero_heads"])
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    torch.save(dict(config=dict(TINY_CONFIG), model=nan_state, tokenizer="bytes"), paths["nan_weights"])
    hf_config = dict(model_type="gpt2", n_positions=128, vocab_size=257, n_layer=2, n_head=2, n_embd=32)
    for folder in ("hf_no_weights", "hf_hostile"):
        os.makedirs(paths[folder])
        with open(os.path.join(paths[folder], "config.json"), "w") as f:
            json.dump(hf_config, f)
    hostile_bin = os.path.join(paths["hf_hostile"], "pytorch_model.bin")
    torch.save({"wte.weight": Hostile(paths["marker"])}, hostile_bin)
    make_adapters(paths)
    return paths


def make_adapters(paths):
    """Adapters damaged (a tensor missing), and adapters trained on another base of one config."""
    from formats import adapters
    import nanosteer
    model = GPT.load(paths["base"])
    nanosteer.steer(model, "block_out", "linear", rank=2)
    adapters.save(model, paths["damaged_adapters"])
    payload = torch.load(paths["damaged_adapters"], weights_only=True)
    payload["tensors"].pop(sorted(payload["tensors"])[0])
    torch.save(payload, paths["damaged_adapters"])
    torch.manual_seed(1)
    other = GPT(GPTConfig(**TINY_CONFIG))
    nanosteer.steer(other, "block_out", "vector")
    adapters.save(other, paths["other_adapters"])


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case, one subprocess per script -> {case: {"rc", "stderr", "changed"}}."""
    root = str(tmp_path_factory.mktemp("fuzz"))
    paths = make_arena(root)
    results = {}
    for script in sorted({case[0] for case in CASES.values()}):
        cases = {name: [a.format(**paths) for a in case[1]]
                 for name, case in CASES.items() if case[0] == script}
        proc = run_script("tests/test_fuzz.py", script, root, json.dumps(cases), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("case", CASES)
def test_a_bad_argument_or_file_stops_in_one_line_and_changes_nothing(outcomes, case):
    default_init = os.path.join(ROOT, "out", "base", "model.pt")
    if case.startswith("equivalence: own base") and os.path.exists(default_init):
        pytest.skip("out/base/model.pt exists here (python train.py --mode pretrain made it)")
    result = outcomes[case]
    lines = result["stderr"].strip().splitlines()
    assert "Traceback" not in result["stderr"], result["stderr"][-2000:]
    assert result["rc"] == 2, result["stderr"][-2000:]
    assert len(lines) == 1, result["stderr"][-2000:]
    assert result["changed"] == [], f"files changed: {result['changed']}"
    if len(CASES[case]) == 3:                                   # and it says what was wrong
        assert CASES[case][2] in lines[0].lower(), lines[0]


BAD_CONFIGS = [dict(n_head=0), dict(n_embd=30, n_head=4), dict(n_head=4, n_kv_head=3), dict(n_layer=0),
               dict(n_embd=-8), dict(vocab_size=0), dict(block_size=2.5), dict(n_layer=True),
               dict(dropout=1.0), dict(dropout=-0.1), dict(norm_eps=0.0), dict(rope_theta=float("nan")),
               dict(mlp_width=-1), dict(n_kv_head=-2), dict(mlp="swiglu"), dict(bias="yes"),
               dict(pos="rotary", n_embd=6, n_head=2)]


@pytest.mark.parametrize("fields", BAD_CONFIGS, ids=[str(c) for c in BAD_CONFIGS])
def test_a_bad_model_config_is_a_one_line_value_error(fields):
    with pytest.raises(ValueError) as e:
        GPTConfig(**fields)
    assert "\n" not in str(e.value) and any(f in str(e.value) for f in fields)


# ---------------------------------------------------------------------------------------------
# the driver: python tests/test_fuzz.py SCRIPT ROOT CASES_JSON  (prints one JSON line of outcomes)


class TimedOut(BaseException):
    """A case that ran past its limit (a BaseException, so no `except Exception` can swallow it)."""


def files_under(root):
    """{path: sha256} of every file under root."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.join(folder, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


def restore(root, saved):
    """Put root back as it was: saved = {path: bytes}; anything new is removed."""
    for folder, dirs, names in os.walk(root, topdown=False):
        for name in names:
            if os.path.join(folder, name) not in saved:
                os.remove(os.path.join(folder, name))
        for name in dirs:
            if not os.listdir(os.path.join(folder, name)) and not any(
                    p.startswith(os.path.join(folder, name) + os.sep) for p in saved):
                os.rmdir(os.path.join(folder, name))
    for path, content in saved.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def time_out(signum, frame):
    raise TimedOut()


def run_case(script, argv, limit=20):
    """Run `python script *argv` in this process, as python would -> (exit status, stderr)."""
    err = io.StringIO()
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))   # as python does for a script
    signal.signal(signal.SIGALRM, time_out)
    signal.alarm(limit)
    rc = 0
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:                     # sys.exit(n); sys.exit("text") prints it, exit 1
        rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            err.write(f"{e.code}\n")
    except TimedOut:
        rc = None
        err.write(f"ran past {limit} s\n")
    except BaseException:                       # python would print a traceback and exit 1
        rc = 1
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        sys.path.pop(0)
    return rc, err.getvalue()


def drive(script, root, cases):
    """Each case on a fresh copy of root's files -> {case: {"rc", "stderr", "changed"}}."""
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root_dir)
    os.chdir(root_dir)
    saved = {}
    for path in files_under(root):
        with open(path, "rb") as f:
            saved[path] = f.read()
    before, results = files_under(root), {}
    for name, argv in cases.items():
        start = time.perf_counter()
        rc, stderr = run_case(script, argv)
        seconds = round(time.perf_counter() - start, 2)
        after = files_under(root)
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        results[name] = dict(rc=rc, stderr=stderr, changed=[os.path.relpath(p, root) for p in changed],
                             seconds=seconds)
        restore(root, saved)
    return results


if __name__ == "__main__":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""     # the cases run on the CPU, as cheaply as they can
    # 4 GiB of address space: a case that allocates without bound fails fast instead
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    outcome = drive(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    sys.stdout.write("\n" + json.dumps(outcome) + "\n")
