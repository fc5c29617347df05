"""
End-to-end tests of train.py, run as a user runs it (a subprocess) on tiny budgets: a small base
is pretrained once, then every mode adapts it for 5 steps. Each run writes results.json, loss.png
and model.pt or adapters.pt; adapter files load back onto the untouched base and reproduce the
reported accuracy; the same seed gives the same numbers; bad arguments are one-line errors (exit
code 2) before any training and never overwrite the results of an earlier good run.

Run:  python -m pytest tests/test_train.py -q
"""
import hashlib
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import nanosteer
import train
from conftest import run_script, script_ok
from formats import adapters
from model import GPT, GPTConfig
from tasks import byte_encoding, exact_match, make_splits, pack

torch.set_num_threads(1)  # the same as the subprocesses' OMP_NUM_THREADS=1: identical numerics

TINY = ["--steps", "5", "--batch-size", "8", "--n-train", "200", "--log-every", "1", "--device", "cpu"]
KEYS = {"mode", "task", "site", "adapter", "rank", "lora_rank", "seed", "accuracy", "base_accuracy",
        "trainable_params", "total_params", "trainable_pct", "train_seconds", "steps"}


def train_py(*args):
    """Run train.py in the repo root; return the CompletedProcess."""
    return run_script("train.py", *args)


def train_ok(*args):
    return script_ok("train.py", *args)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def losses(stdout):
    """The loss column of the per-step log lines."""
    return [float(v) for v in re.findall(r"^step\s+\d+ \| loss (\S+) \|", stdout, flags=re.M)]


def results_of(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


@torch.no_grad()
def accuracy_on_test_split(model, task, seed):
    """Exact-match accuracy on the built-in task's test split, computed here from the split."""
    x, y = pack(make_splits(task, seed)["test"], byte_encoding(), model.config.block_size)
    model.eval()
    hits = [exact_match(model(x[i:i + 250])[0], y[i:i + 250]) for i in range(0, len(x), 250)]
    return torch.cat(hits).float().mean().item()



def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the base model, pretrained once by train.py itself, and the adaptation runs on top of it


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """`train.py --mode pretrain` for 80 steps: enough to learn the answer format (so accuracies
    are not all zero), a few seconds on one core."""
    out = tmp_path_factory.mktemp("base")
    proc = train_ok("--mode", "pretrain", "--steps", "80", "--batch-size", "32", "--n-train", "2000",
                    "--lr", "1e-2", "--log-every", "20", "--device", "cpu", "--out-dir", out)
    path = out / "model.pt"
    return SimpleNamespace(out=out, path=path, sha=sha256(path), files=sorted(os.listdir(out)), stdout=proc.stdout)


CASES = {  # name: arguments after --init BASE and TINY
    "full": ["--mode", "weight", "--lora-rank", "0"],
    "lora": ["--mode", "weight", "--lora-rank", "2"],
    "linear_block_out": ["--mode", "activation", "--site", "block_out", "--adapter", "linear", "--rank", "4"],
    "vector_post_mlp": ["--mode", "activation", "--site", "post_mlp", "--adapter", "vector"],
    "reft_mlp_hidden": ["--mode", "activation", "--site", "mlp_hidden", "--adapter", "reft", "--rank", "2",
                        "--layers", "0,2"],
    "joint": ["--mode", "joint", "--lora-rank", "2"],
    "joint_no_ortho": ["--mode", "joint", "--lora-rank", "2", "--ortho-every", "0"],
    "same_seed": ["--mode", "activation", "--site", "block_out", "--adapter", "linear", "--rank", "4"],
    "other_seed": ["--mode", "activation", "--site", "block_out", "--adapter", "linear", "--rank", "4",
                   "--seed", "1"],
}
ADAPTER_CASES = ["lora", "linear_block_out", "vector_post_mlp", "reft_mlp_hidden", "joint"]


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """run(name) -> that case's output dir, results and stdout; each case runs once per module."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            proc = train_ok("--init", base.path, *TINY, *CASES[name], "--out-dir", out)
            done[name] = SimpleNamespace(out=out, results=results_of(out), stdout=proc.stdout)
        return done[name]
    return get


def expected(name, config):
    """What results.json must say for a case, the parameter count worked out by hand:
    LoRA of rank r on c_attn (d->3d), attn.c_proj (d->d), c_fc (d->4d), mlp.c_proj (4d->d) is
    r·(4d + 2d + 5d + 5d) = 16·d·r per layer; a linear shift of rank r on a width-n site is 2nr;
    ReFT 2nr + r; a vector n."""
    d, L = config.n_embd, config.n_layer
    total = n_params(GPT(config))
    return {
        "full": dict(mode="weight", lora_rank=0, site=None, adapter=None, trainable_params=total),
        "lora": dict(mode="weight", lora_rank=2, site=None, adapter=None, trainable_params=L * 16 * d * 2),
        "linear_block_out": dict(mode="activation", site="block_out", adapter="linear", rank=4,
                                 trainable_params=L * 2 * d * 4),
        "vector_post_mlp": dict(mode="activation", site="mlp_out", adapter="vector", trainable_params=L * d),
        "reft_mlp_hidden": dict(mode="activation", site="mlp_hidden", adapter="reft", rank=2,
                                trainable_params=2 * (2 * (4 * d) * 2 + 2)),
        "joint": dict(mode="joint", lora_rank=2, site="block_out", adapter="linear", rank=4,
                      trainable_params=L * 16 * d * 2 + L * 2 * d * 4),
    }[name]


# ---------------------------------------------------------------------------------------------
# every mode runs end to end and writes its files


@pytest.mark.slow
def test_pretrain_writes_results_plot_and_a_checkpoint_that_reproduces_its_accuracy(base):
    r = results_of(base.out)
    assert KEYS <= set(r)
    assert (r["mode"], r["task"], r["seed"], r["steps"]) == ("pretrain", "pretrain", 0, 80)
    assert {"loss.png", "model.pt", "results.json"} <= set(base.files) and "adapters.pt" not in base.files
    assert (base.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = GPT.load(str(base.path))
    assert model.config == GPTConfig()                      # pretrain builds the default model
    assert r["trainable_params"] == r["total_params"] == n_params(model)
    assert r["trainable_pct"] == pytest.approx(100.0)
    assert r["accuracy"] > r["base_accuracy"]               # it learned something in 80 steps
    assert accuracy_on_test_split(model, "pretrain", 0) == r["accuracy"]
    assert len(losses(base.stdout)) == 5                    # steps 0, 20, 40, 60 and the last


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "lora", "linear_block_out", "vector_post_mlp", "reft_mlp_hidden", "joint"])
def test_each_mode_runs_end_to_end_and_reports_what_it_trained(name, run, base):
    r = run(name)
    res = r.results
    assert KEYS <= set(res)
    assert (res["task"], res["seed"], res["steps"]) == ("boolq", 0, 5)
    config = GPT.load(str(base.path)).config
    for key, value in expected(name, config).items():
        assert res[key] == value, key
    assert res["total_params"] == n_params(GPT(config))
    assert res["trainable_pct"] == pytest.approx(100.0 * res["trainable_params"] / res["total_params"])
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["base_accuracy"] <= 1.0
    assert res["train_seconds"] > 0
    assert len(losses(r.stdout)) == 5
    weights, other = ("model.pt", "adapters.pt") if name == "full" else ("adapters.pt", "model.pt")
    files = set(os.listdir(r.out))
    assert {"loss.png", "results.json", weights} <= files and other not in files
    assert (r.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_full_fine_tuning_checkpoint_reproduces_its_accuracy_and_differs_from_the_base(run, base):
    r = run("full")
    tuned, original = GPT.load(str(r.out / "model.pt")), GPT.load(str(base.path))
    assert accuracy_on_test_split(tuned, "boolq", 0) == r.results["accuracy"] > 0
    assert accuracy_on_test_split(original, "boolq", 0) == r.results["base_accuracy"]
    changed = [k for k, v in original.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert len(changed) > len(original.state_dict()) // 2   # full fine-tuning moved (almost) every tensor


@pytest.mark.slow
def test_block_out_adapter_file_is_under_one_percent_of_the_model(run, base):
    adapter_file = run("linear_block_out").out / "adapters.pt"
    assert os.path.getsize(adapter_file) < 0.01 * os.path.getsize(base.path)


# ---------------------------------------------------------------------------------------------
# adapter files load back onto the untouched base


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAPTER_CASES)
def test_adapters_load_onto_the_base_and_reproduce_the_reported_accuracy(name, run, base):
    r = run(name)
    original = GPT.load(str(base.path)).eval()
    model = adapters.load(GPT.load(str(base.path)), str(r.out / "adapters.pt")).eval()
    # the base tensors of the adapted model are exactly the base file's; the rest are the adapters
    base_sd, sd = torch.load(base.path, weights_only=True)["model"], model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base_sd.items())
    held = nanosteer.adapter_parameters(model)
    assert held and set(sd) - set(base_sd) == set(held)
    assert sum(p.numel() for p in held.values()) == r.results["trainable_params"]
    # the trained adapters do something: the logits move away from the base model's
    x, _ = pack(make_splits("boolq", 0)["test"][:16], byte_encoding(), model.config.block_size)
    with torch.no_grad():
        assert (model(x)[0] - original(x)[0]).abs().max() > 1e-5
    # and the loaded model scores exactly what train.py reported (not a vacuous 0 = 0)
    assert accuracy_on_test_split(model, "boolq", 0) == r.results["accuracy"] > 0
    assert accuracy_on_test_split(original, "boolq", 0) == r.results["base_accuracy"]


@pytest.mark.slow
def test_joint_mode_applies_the_orthogonality_constraint(run, base):
    """THEORY §7 through train.py: with --ortho-every 1 each block's D reads nothing of col(B) of
    its mlp.c_proj LoRA; with --ortho-every 0 it does."""
    def overlap(name):
        model = adapters.load(GPT.load(str(base.path)), str(run(name).out / "adapters.pt"))
        return max((block.slots["block_out"].shift.D @ torch.linalg.qr(block.mlp.c_proj.lora_B).Q).abs().max().item()
                   for block in model.transformer.h)
    assert overlap("joint") < 1e-5
    assert overlap("joint_no_ortho") > 1e-3


@pytest.mark.slow
def test_adaptation_leaves_the_base_checkpoint_byte_identical(run, base):
    for name in CASES:                    # every adaptation run of this module (cached if done)
        run(name)
    assert sha256(base.path) == base.sha
    assert sorted(os.listdir(base.out)) == base.files       # and nothing was written next to it


# ---------------------------------------------------------------------------------------------
# seeds


@pytest.mark.slow
def test_same_seed_gives_identical_numbers_and_tensors(run):
    a, b = run("linear_block_out"), run("same_seed")
    strip = lambda r: {k: v for k, v in r.items() if k != "train_seconds"}  # noqa: E731
    assert strip(a.results) == strip(b.results)
    assert losses(a.stdout) == losses(b.stdout)
    ta = torch.load(a.out / "adapters.pt", weights_only=True)["tensors"]
    tb = torch.load(b.out / "adapters.pt", weights_only=True)["tensors"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_another_seed_gives_other_losses_and_tensors(run):
    a, c = run("linear_block_out"), run("other_seed")
    assert c.results["seed"] == 1
    assert losses(a.stdout) != losses(c.stdout)
    ta = torch.load(a.out / "adapters.pt", weights_only=True)["tensors"]
    tc = torch.load(c.out / "adapters.pt", weights_only=True)["tensors"]
    assert ta.keys() == tc.keys() and not any(torch.equal(ta[k], tc[k]) for k in ta)


# ---------------------------------------------------------------------------------------------
# a user's JSONL task


@pytest.mark.slow
def test_own_jsonl_data_runs_end_to_end(tmp_path, base):
    data = tmp_path / "sums.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(50):
            a, b = i % 7, i // 7
            f.write(json.dumps({"prompt": f"{a}+{b}=" if i % 10 else f"ä{a}+{b}=", "completion": str(a + b)},
                               ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    proc = train_ok("--init", base.path, *TINY, "--mode", "activation", "--data", data, "--out-dir", out)
    res = results_of(out)
    assert KEYS <= set(res)
    assert res["task"] == "sums" and res["mode"] == "activation"
    assert 5 * res["accuracy"] == round(5 * res["accuracy"])  # 50 lines: 5 test examples
    assert {"adapters.pt", "loss.png", "results.json"} <= set(os.listdir(out))
    assert "40 training rows" in proc.stdout


# ---------------------------------------------------------------------------------------------
# bad inputs: exit code 2 and a one-line message, before any training


def write_bad_data(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps({"prompt": f"{i}=", "completion": str(i)}) for i in range(4)]
    path.write_text("\n".join(lines[:2] + ['{"prompt": "2=", "completion": 2'] + lines[2:]) + "\n")
    return path


def write_garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\x00\xff\x13" * 64)
    return path


def write_latin1(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    return path


def write_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


BAD = [  # arguments after the defaults (they override them), what the message must say
    pytest.param(lambda t: ["--mode", "activation", "--site", "nowhere"], "unknown site 'nowhere'", id="site"),
    pytest.param(lambda t: ["--mode", "activation", "--adapter", "spline"], "unknown adapter 'spline'", id="adapter"),
    pytest.param(lambda t: ["--mode", "finetune"], r"--mode: invalid choice: '?finetune'?", id="mode"),
    pytest.param(lambda t: ["--mode", "activation", "--task", "sudoku"], "unknown task 'sudoku'", id="task"),
    pytest.param(lambda t: ["--mode", "activation", "--rank", "0"], "--rank must be positive", id="rank-0"),
    pytest.param(lambda t: ["--mode", "activation", "--rank", "10000"], "rank 10000 is out of range",
                 id="rank-too-large"),
    pytest.param(lambda t: ["--mode", "weight", "--lora-rank", "10000"], "LoRA rank 10000 is out of range",
                 id="lora-rank-too-large"),
    pytest.param(lambda t: ["--mode", "activation", "--init", t / "missing.pt"], "missing.pt does not exist",
                 id="init-missing"),
    pytest.param(lambda t: ["--mode", "activation", "--init", write_garbage(t)], "garbage.pt is not a nanosteer",
                 id="init-not-a-checkpoint"),
    pytest.param(lambda t: ["--mode", "activation", "--init", t], "is not a Hugging Face model directory",
                 id="init-not-a-model-dir"),
    pytest.param(lambda t: ["--mode", "joint", "--adapter", "reft"], "joint mode steers block_out with a linear",
                 id="joint-reft"),
    pytest.param(lambda t: ["--mode", "joint", "--ortho-every", "-1"], "--ortho-every must be ≥ 0, got -1", id="ortho-negative"),
    pytest.param(lambda t: ["--mode", "activation", "--log-every", "0"], "must be positive", id="log-every-0"),
    pytest.param(lambda t: ["--mode", "weight", "--lora-alpha", "-1"], "--lora-alpha must be positive",
                 id="lora-alpha-negative"),
    pytest.param(lambda t: ["--mode", "joint", "--lora-alpha", "0"], "--lora-alpha must be positive",
                 id="lora-alpha-0"),
    pytest.param(lambda t: ["--mode", "pretrain"], r"--mode pretrain trains a new model from scratch, it takes no "
                 r"--init: drop --init \S*model.pt$", id="pretrain-with-init"),
    pytest.param(lambda t: ["--mode", "joint", "--ckpt-every", "-2"], "--ckpt-every must be ≥ 0, got -2", id="ckpt-negative"),
    pytest.param(lambda t: ["--mode", "joint", "--resume"], r"--resume: there is no \S*resume.pt; start the run "
                 "without --resume", id="resume-without-file"),
    pytest.param(lambda t: ["--mode", "activation", "--lr", "0"], "--lr must be positive and finite, got 0", id="lr-0"),
    pytest.param(lambda t: ["--mode", "activation", "--lr", "nan"], "--lr must be positive and finite, got nan",
                 id="lr-nan"),
    pytest.param(lambda t: ["--mode", "weight", "--lora-lr", "inf"], "--lora-lr must be positive and finite",
                 id="lora-lr-inf"),
    pytest.param(lambda t: ["--mode", "activation", "--warmup", "-1"], "--warmup must be ≥ 0, got -1", id="warmup"),
    pytest.param(lambda t: ["--mode", "activation", "--data", t / "nothing.jsonl"], "nothing.jsonl is not a file",
                 id="data-missing"),
    pytest.param(lambda t: ["--mode", "activation", "--data", write_latin1(t)], "latin1.jsonl line 2: expected a UTF-8 JSON object",
                 id="data-not-utf8"),
    pytest.param(lambda t: ["--mode", "activation", "--data", write_bad_data(t)], "broken.jsonl line 3",
                 id="data-malformed-line"),
    pytest.param(lambda t: ["--mode", "activation", "--data", write_empty(t)], "empty.jsonl has 0 examples",
                 id="data-empty"),
]


def assert_fails_before_training(proc, out, pattern):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: error:"), proc.stderr
    assert re.search(pattern, lines[-1]), lines[-1]
    if "invalid choice" not in lines[-1]:   # argparse puts its usage lines first; ours stand alone
        assert len(lines) == 1, proc.stderr
    assert "step" not in proc.stdout and not out.exists()


@pytest.mark.parametrize("make_args, pattern", BAD)
def test_bad_input_is_a_one_line_error_before_training(make_args, pattern, tmp_path, tiny_base):
    out = tmp_path / "out"
    proc = train_py("--init", tiny_base, *TINY, *make_args(tmp_path), "--out-dir", out)
    assert_fails_before_training(proc, out, pattern)


@pytest.mark.parametrize("flag, value", [
    ("--steps", "99999999999999999999999"), ("--batch-size", "1000000000"), ("--n-train", "10000000000"),
    ("--n-eval", "1000000"), ("--log-every", "10000000"), ("--ckpt-every", "10000000"), ("--warmup", "10000000"),
    ("--ortho-every", "10000000"), ("--seed", "18446744073709551616"), ("--seed", "-1")])
def test_every_size_argument_has_an_upper_bound_with_its_reason(flag, value):
    with pytest.raises(ValueError, match=rf"^{flag} {value} is out of range: it must be .+ \(.+\)$") as e:
        train.resolve_args(train.parse_args(["--mode", "joint", flag, value, "--out-dir", "unused"]))
    assert "\n" not in str(e.value)


def test_a_data_line_of_brackets_nested_100k_deep_is_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "x"}\n')
    with pytest.raises(ValueError, match="deep.jsonl line 1: expected a UTF-8 JSON object"):
        train.resolve_args(train.parse_args(["--mode", "activation", "--data", str(path), "--out-dir", "unused"]))


@pytest.mark.parametrize("content, match", [
    ("", "has 0 examples"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 7}\n', "line 2: expected"),
    ("".join(f'{{"prompt": "{i}' + "x" * 300 + '", "completion": "y"}\n' for i in range(3)), "longer than the block size")])
def test_a_bad_data_file_is_refused_before_the_missing_base_is_pretrained(tmp_path, monkeypatch, capsys, content,
                                                                          match):
    monkeypatch.setattr(train, "BASE_CHECKPOINT", str(tmp_path / "base" / "model.pt"))
    monkeypatch.setitem(train.DEFAULT_STEPS, "pretrain", 2)             # (the code before: a short pretraining)
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        train.main(["--mode", "activation", "--data", str(tmp_path / "data.jsonl"), "--device", "cpu",
                    "--n-eval", "10", "--out-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert "pretraining" not in out and not (tmp_path / "base").exists()


@pytest.mark.slow
def test_a_failed_run_leaves_an_earlier_good_run_untouched(run, base):
    good = run("linear_block_out").out
    before = {f: (good / f).read_bytes() for f in os.listdir(good)}
    proc = train_py("--init", good / "missing.pt", *TINY, *CASES["linear_block_out"], "--out-dir", good)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    # fails late, in building the model after the data is made: still nothing written
    proc = train_py("--init", base.path, *TINY, "--mode", "activation",
                    "--rank", "10000", "--out-dir", good)
    assert proc.returncode == 2 and "rank 10000 is out of range" in proc.stderr
    assert {f: (good / f).read_bytes() for f in os.listdir(good)} == before


def test_learning_rate_schedule_warms_up_for_50_steps_then_decays_to_a_tenth():
    import train
    factors = [train.lr_factor(step, 300) for step in range(300)]
    assert factors[:3] == [1 / 50, 2 / 50, 3 / 50] and factors[49] == factors[50] == 1.0
    assert all(a >= b for a, b in zip(factors[50:], factors[51:]))
    assert 0.1 <= factors[-1] < 0.11


# ---------------------------------------------------------------------------------------------
# nothing a user saved is lost: output folders checked first, a diverged run writes nothing


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_base):
    some_file = tmp_path / "some_file"
    some_file.write_text("keep me")
    proc = train_py("--init", tiny_base, *TINY, "--mode", "activation", "--out-dir", some_file)
    assert_fails_before_training(proc, tmp_path / "never", "is a file, not a folder")
    assert some_file.read_text() == "keep me"


def test_the_init_checkpoints_folder_is_refused_as_output(tmp_path, tiny_base):
    before = sha256(tiny_base)
    proc = train_py("--init", tiny_base, *TINY, "--mode", "weight", "--lora-rank", "0",
                    "--out-dir", tiny_base.parent)
    assert_fails_before_training(proc, tmp_path / "never", "holds the --init checkpoint")
    assert sha256(tiny_base) == before


@pytest.mark.parametrize("reach", ["symlink", "hard link", "dot-dot"])
def test_the_init_file_is_refused_as_output_whatever_path_reaches_it(tmp_path, tiny_base, reach):
    goodfull, elsewhere = tmp_path / "goodfull", tmp_path / "X"
    goodfull.mkdir(), elsewhere.mkdir()
    (goodfull / "model.pt").write_bytes(tiny_base.read_bytes())
    init = {"symlink": elsewhere / "latest.pt", "hard link": elsewhere / "hard.pt",
            "dot-dot": elsewhere / ".." / "goodfull" / "model.pt"}[reach]
    if reach == "symlink":
        init.symlink_to(goodfull / "model.pt")
    elif reach == "hard link":
        os.link(goodfull / "model.pt", init)
    before = sha256(goodfull / "model.pt"), sorted(os.listdir(goodfull))
    proc = train_py("--init", init, *TINY, "--mode", "weight", "--lora-rank", "0", "--out-dir", goodfull)
    assert proc.returncode == 2 and "holds the --init checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert (sha256(goodfull / "model.pt"), sorted(os.listdir(goodfull))) == before


def folder_bytes(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_a_folder_holds_one_run_the_earlier_one_moves_aside_whole(tmp_path, tiny_base):
    out = tmp_path / "run"
    train_ok("--init", tiny_base, *TINY, "--mode", "activation", "--out-dir", out)
    first = folder_bytes(out)
    proc = train_ok("--init", tiny_base, *TINY, "--mode", "weight", "--lora-rank", "0", "--out-dir", out)
    assert f"moved the earlier run in {out} to {out}-1" in proc.stdout
    assert folder_bytes(tmp_path / "run-1") == first                   # the activation run, whole
    assert sorted(os.listdir(out)) == ["loss.png", "model.pt", "outcomes.json", "results.json"]  # no adapters.pt
    proc = train_ok("--init", tiny_base, *TINY, "--mode", "weight", "--lora-rank", "0", "--out-dir", out)
    assert f"to {out}-2" in proc.stdout and folder_bytes(tmp_path / "run-1") == first   # the same command again


def test_a_refused_run_moves_nothing(tmp_path, tiny_base):
    out = tmp_path / "run"
    train_ok("--init", tiny_base, *TINY, "--mode", "activation", "--out-dir", out)
    first = folder_bytes(out)
    proc = train_py("--init", tiny_base, *TINY, "--mode", "activation", "--rank", "10000", "--out-dir", out)
    assert proc.returncode == 2 and folder_bytes(out) == first and not (tmp_path / "run-1").exists()


def test_a_folder_that_cannot_be_moved_aside_is_refused_before_any_work(tmp_path, tiny_base, monkeypatch):
    (tmp_path / "results.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    args = train.parse_args(["--init", str(tiny_base), "--mode", "activation", "--out-dir", "."])
    with pytest.raises(ValueError, match="holds an earlier run, which a new run moves aside first"):
        train.resolve_args(args)


def test_a_diverged_run_stops_with_one_line_and_leaves_a_good_model_untouched(tmp_path, tiny_base):
    good = tmp_path / "base"
    good.mkdir()
    (good / "model.pt").write_bytes(tiny_base.read_bytes())
    before = sorted(os.listdir(good)), sha256(good / "model.pt")
    proc = train_py("--mode", "pretrain", "--lr", "1e6", "--warmup", "0", "--steps", "5", "--batch-size", "8",
                    "--n-train", "200", "--n-eval", "20", "--device", "cpu", "--out-dir", good)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"the loss became (nan|inf) at step \d+ .*nothing was written", lines[0])
    assert (sorted(os.listdir(good)), sha256(good / "model.pt")) == before


def test_outcomes_file_holds_one_character_per_prompt_and_agrees_with_the_accuracies(run):
    r = run("linear_block_out")
    outcomes = json.load(open(r.out / "outcomes.json"))
    for split, key in (("test", "accuracy"), ("val", "val_accuracy")):
        assert set(outcomes[split]) <= {"0", "1"} and len(outcomes[split]) == 500   # --n-eval's default
        assert outcomes[split].count("1") / 500 == pytest.approx(r.results[key], abs=1e-6)


def test_resolve_args_returns_a_new_config_and_leaves_the_users_arguments_alone():
    import train
    args = train.parse_args(["--mode", "activation", "--layers", "0,1"])
    before = dict(vars(args))
    config = train.resolve_args(args)
    assert vars(args) == before and config is not args
    assert config.layers == [0, 1] and config.rank == 4 and config.lr == 1e-2


def test_dtype_is_bf16_on_cuda_and_float32_on_a_cpu_unless_asked():
    from machinery import runtime
    assert runtime.pick_dtype("auto", "cuda") == "bfloat16"
    assert runtime.pick_dtype("auto", "cpu") == "float32"         # measured: bf16 moved the accuracy
    assert runtime.pick_dtype("bfloat16", "cpu") == "bfloat16"
    assert runtime.pick_dtype("float32", "cuda") == "float32"


@pytest.mark.parametrize("typed, meant", [("bf16", "bfloat16"), ("fp32", "float32"), ("bfloat16", "bfloat16")])
def test_dtype_is_accepted_as_people_type_it(typed, meant):
    assert train.parse_args(["--dtype", typed]).dtype == meant


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_it_is_said_in_one_line_before_any_work(native, monkeypatch, capsys, tiny_base, tmp_path):
    from machinery import runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)

    def no_work(config):
        raise ValueError("(the run would start here)")
    monkeypatch.setattr(train, "train_once", no_work)
    with pytest.raises(SystemExit):
        train.main(["--init", str(tiny_base), "--mode", "activation", "--dtype", "bf16", "--device", "cpu",
                    "--out-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    warned = [line for line in out.splitlines() if line.startswith("warning: this CPU has no native bf16")]
    assert len(warned) == (0 if native else 1) and err.strip().endswith("(the run would start here)")
    if not native:
        assert warned[0] == out.splitlines()[0] and "float32 is faster" in warned[0] and "slower" in warned[0]


def test_the_linear_schedule_and_steerlings_init_are_what_steerling_trains_with():
    """--schedule linear: Hugging Face's linear decay, to 0 at the last step after the warmup;
    --shift-init steerling: D = 1e-3 × nn.Linear's Kaiming-uniform init, |D| ≤ 1e-3/√n."""
    assert [train.lr_factor(s, 100, 10, "linear") for s in (0, 9, 10, 55, 99)] == \
        pytest.approx([0.1, 1.0, 1.0, 0.5, 1 / 90])
    assert train.lr_factor(99, 100, 10) == pytest.approx(0.1, abs=1e-3)          # cosine: to 10%
    config = train.resolve_args(train.parse_args(["--mode", "activation", "--adapter", "nonlinear",
                                                  "--shift-init", "steerling", "--out-dir", "unused"]))
    model = train.build_model(config, "cpu", GPT(GPTConfig(n_layer=2, n_embd=32)))
    D = model.transformer.h[0].slots["block_out"].shift.D
    assert 0.5e-3 / 32 ** 0.5 < D.abs().max().item() <= 1e-3 / 32 ** 0.5 and D.requires_grad
    with pytest.raises(ValueError, match="--shift-init steerling sets the D"):
        train.resolve_args(train.parse_args(["--mode", "activation", "--adapter", "vector",
                                             "--shift-init", "steerling", "--out-dir", "unused"]))

