"""
Resumable runs of train.py: a run stopped after k steps (by Ctrl-C, or taken from a --ckpt-every
checkpoint) and continued with --resume ends with the results.json numbers (losses, accuracies)
and the adapter tensors of the uninterrupted run, exactly (same seed, same device). A resume.pt
from a run with other arguments, or damaged in any field, is a one-line error before anything
changes (none at all: tests/test_train.py).

Run:  python -m pytest tests/test_resume.py -q
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, ROOT, ctrl_c_as_in_a_terminal, script_ok

RUN = ["--mode", "joint", "--steps", "120", "--batch-size", "8", "--n-train", "200", "--device", "cpu"]


def outcome(out):
    """results.json without its wall-clock time, and the adapter tensors."""
    with open(out / "results.json") as f:
        results = {k: v for k, v in json.load(f).items() if k != "train_seconds"}
    return results, torch.load(out / "adapters.pt", weights_only=True)["tensors"]


def assert_same(a, b):
    (results_a, tensors_a), (results_b, tensors_b) = a, b
    assert results_a == results_b                      # every loss, the accuracies, the counts
    assert tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, tmp_path_factory):
    """The whole run at once, with a checkpoint every 50 steps (the last one: after step 100)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    script_ok("train.py", "--init", tiny_base, *RUN, "--ckpt-every", "50", "--out-dir", out)
    return out


@pytest.mark.slow
def test_resuming_a_periodic_checkpoint_ends_where_the_whole_run_ends(uninterrupted, tiny_base, tmp_path):
    state = torch.load(uninterrupted / "resume.pt", weights_only=True)
    assert state["step"] == 100 and len(state["losses"]) == 100
    (tmp_path / "resumed").mkdir()
    shutil.copy(uninterrupted / "resume.pt", tmp_path / "resumed" / "resume.pt")
    proc = script_ok("train.py", "--init", tiny_base, *RUN, "--resume", "--out-dir", tmp_path / "resumed")
    assert "step   100 |" in proc.stdout and "step    50 |" not in proc.stdout   # it went on from step 100
    whole = outcome(uninterrupted)
    assert whole[0]["losses"][-1] < whole[0]["losses"][0]
    assert_same(outcome(tmp_path / "resumed"), whole)


@pytest.mark.slow
def test_a_run_stopped_by_ctrl_c_and_resumed_ends_where_the_whole_run_ends(uninterrupted, tiny_base, tmp_path):
    out = tmp_path / "stopped"
    cmd = [sys.executable, "train.py", "--init", str(tiny_base), *RUN, "--log-every", "1", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    for line in proc.stdout:                           # Ctrl-C as soon as step 3 is logged
        if line.startswith("step     3 |"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    k = torch.load(out / "resume.pt", weights_only=True)["step"]
    assert f"wrote {out / 'resume.pt'} after step {k - 1}; stopped (Ctrl-C)" in stdout
    assert not (out / "results.json").exists()
    assert 4 <= k < 120                                # it stopped at a step boundary, mid-run
    resumed = script_ok("train.py", "--init", tiny_base, *RUN, "--resume", "--out-dir", out)
    assert "step     0 |" not in resumed.stdout and "step   119 |" in resumed.stdout
    assert_same(outcome(out), outcome(uninterrupted))


@pytest.fixture(scope="module")
def short_run(tiny_base, tmp_path_factory):
    """A 4-step run that leaves its resume.pt behind."""
    out = tmp_path_factory.mktemp("short_run")
    script_ok("train.py", "--init", tiny_base, *RUN, "--steps", "4", "--ckpt-every", "2", "--out-dir", out)
    return out


@pytest.mark.parametrize("change, key", [(["--lr", "0.5"], "lr"), (["--mode", "activation"], "mode"),
                                         (["--seed", "1"], "seed")])
def test_resuming_with_other_arguments_is_a_one_line_error(change, key, short_run, tiny_base):
    import train
    before = (short_run / "resume.pt").read_bytes()
    argv = ["--init", str(tiny_base), *RUN, "--steps", "4", *change, "--resume", "--out-dir", str(short_run)]
    with pytest.raises(ValueError) as e:
        train.train(train.resolve_args(train.parse_args(argv)))
    assert str(e.value).startswith(f"{short_run / 'resume.pt'} comes from a run with {key}=")
    assert "\n" not in str(e.value) and (short_run / "resume.pt").read_bytes() == before


def test_a_corrupt_resume_file_is_a_one_line_error(short_run, tiny_base, tmp_path):
    import train
    shutil.copytree(short_run, tmp_path / "run")
    with open(tmp_path / "run" / "resume.pt", "r+b") as f:
        f.truncate(100)
    argv = ["--init", str(tiny_base), *RUN, "--steps", "4", "--resume", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="is not a resume file of train.py") as e:
        train.train(train.resolve_args(train.parse_args(argv)))
    assert "\n" not in str(e.value)


def first_key(d):
    return sorted(d)[0]


DAMAGED = {  # what is done to resume.pt: the run must refuse it before anything changes
    "no tensors": lambda s: s.update(tensors={}),
    "a tensor missing": lambda s: s["tensors"].pop(first_key(s["tensors"])),
    "a tensor of another shape": lambda s: s["tensors"].update({first_key(s["tensors"]): torch.zeros(3, 3)}),
    "a NaN tensor": lambda s: s["tensors"][first_key(s["tensors"])].fill_(float("nan")),
    "an extra tensor": lambda s: s["tensors"].update({"transformer.wte.weight": torch.zeros(257, 32)}),
    "no batches": lambda s: s.pop("batches"),
    "batches of another size": lambda s: s.update(batches=torch.zeros(7, dtype=torch.uint8)),
    "torch_rng a list": lambda s: s.update(torch_rng=[1, 2]),
    "step past --steps": lambda s: s.update(step=10 ** 9),
    "step negative": lambda s: s.update(step=-1),
    "step True": lambda s: s.update(step=True),
    "losses too few": lambda s: s["losses"].pop(),
    "a NaN loss": lambda s: s["losses"].__setitem__(0, float("nan")),
    "no optimizer state": lambda s: s.update(optimizer={}),
    "optimizer of other shapes": lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
    "optimizer of fewer tensors": lambda s: s["optimizer"]["param_groups"][0]["params"].pop(),
    "args a list": lambda s: s.update(args=[]),
    "not a dict": lambda s: s.clear() or s.update({"x": 1}),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_a_resume_file_is_checked_whole_before_anything_changes(name, short_run, tiny_base, tmp_path):
    import train
    shutil.copytree(short_run, tmp_path / "run")
    path = tmp_path / "run" / "resume.pt"
    state = torch.load(path, weights_only=True)
    DAMAGED[name](state)
    torch.save(state, path)
    before = {f: (tmp_path / "run" / f).read_bytes() for f in os.listdir(tmp_path / "run")}
    argv = ["--init", str(tiny_base), *RUN, "--steps", "4", "--resume", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"resume.pt\b.*(damaged|another run|malformed|comes from)") as e:
        train.train(train.resolve_args(train.parse_args(argv)))
    assert "\n" not in str(e.value)
    assert {f: (tmp_path / "run" / f).read_bytes() for f in os.listdir(tmp_path / "run")} == before

# ---------------------------------------------------------------------------------------------
# Ctrl-C anywhere, not only mid-training: one line (or, mid-training, the resume.pt line), exit 130


def interrupted(args, after):
    """Run `python args...`, Ctrl-C it `after` seconds in -> (exit status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("script, after", [("train.py", 0.4), ("train.py", 2.5), ("sample.py", 0.4),
                                           ("sample.py", 1.8), ("equivalence.py", 0.4), ("equivalence.py", 5.0)])
def test_ctrl_c_anywhere_is_one_line_and_exit_130(script, after, tiny_base, tmp_path):
    args = {"train.py": ["--init", tiny_base, *RUN, "--steps", "5000", "--out-dir", tmp_path / "out"],
            "sample.py": ["--init", tiny_base, "--max-new-tokens", "120", "--num-samples", "64"],
            "equivalence.py": ["--out", tmp_path / "eq"]}[script]
    rc, stdout, stderr = interrupted([script, *args], after)
    assert rc == 130 and "Traceback" not in stderr, (rc, stderr[-2000:])
    assert stderr.strip() == f"{script}: stopped (Ctrl-C)" or "stopped (Ctrl-C)" in stdout, stderr
