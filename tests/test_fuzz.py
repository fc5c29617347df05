"""
A careless or hostile user, fed to every script: bad arguments and bad files must each stop the
script in one line, before any work, and change nothing on disk. For every case below: exit
status 2, exactly one line on stderr, no traceback, every file of the test's folder byte-identical
afterwards (the output folder holds a good model, results and a log), and no marker file from a
hostile pickle (proof that no code ran). The families: arguments and their bounds, our checkpoints,
other people's (Hugging Face folders, safetensors headers, GGUF metadata and tensor lists), adapter
and resume files, output folders (the --init file reached by a symlink or a hard link, a folder
where a file goes), compare.py's own folder. Plus GPTConfig's own checks, and seeded mutations:
a good file of each family changed at random in ways the seed fixes, which must load (exactly) or
be refused in one line, never raise anything else.

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
    "train: init a symlink to out/model.pt": ("train.py", TRAIN + ["--mode", "weight", "--lora-rank", "0",
                                                                   "--init", "{init_link}"], "init"),
    "train: init a hard link to out/model.pt": ("train.py", TRAIN + ["--mode", "weight", "--lora-rank", "0",
                                                                     "--init", "{init_hardlink}"], "init"),
    "train: init complex": ("train.py", TRAIN + ["--init", "{complex_init}"], "complex"),
    "train: results.json a folder": ("train.py", TRAIN + ["--out-dir", "{results_folder}"], "folder"),
    "train: resume with no tensors": ("train.py", TRAIN + ["--resume", "--out-dir", "{resume_no_tensors}"]),
    "train: resume of other shapes": ("train.py", TRAIN + ["--resume", "--out-dir", "{resume_shapes}"]),
    "train: resume without batches": ("train.py", TRAIN + ["--resume", "--out-dir", "{resume_no_batches}"]),
    "train: HF config without rms_norm_eps": ("train.py", TRAIN + ["--init", "{hf_no_eps}"], "rms_norm_eps"),
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
    "sample: HF folder with a NaN weight": ("sample.py", SAMPLE + ["--init", "{hf_nan}"], "nan"),
    "sample: HF config.json a list": ("sample.py", SAMPLE + ["--init", "{hf_list_config}"], "list"),
    "sample: HF config with 0 heads": ("sample.py", SAMPLE + ["--init", "{hf_zero_heads}"], "num_attention_heads"),
    "sample: safetensors header 10^12": ("sample.py", SAMPLE + ["--init", "{hf_huge_header}"], "header"),
    "sample: safetensors offsets past the end": ("sample.py", SAMPLE + ["--init", "{hf_bad_offsets}"], "bytes"),
    "sample: GGUF with 0 heads": ("sample.py", SAMPLE + ["--init", "{gguf_zero_heads}"], "head_count"),
    "sample: GGUF without rms epsilon": ("sample.py", SAMPLE + ["--init", "{gguf_no_eps}"], "epsilon"),
    "sample: GGUF with a lone bias": ("sample.py", SAMPLE + ["--init", "{gguf_bias}"], "bias"),
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
    "compare: config.json a list": ("experiments/compare.py", QUICK + ["--out-dir", "{cmp_list}"], "list"),
    "compare: config.json not JSON": ("experiments/compare.py", QUICK + ["--out-dir", "{cmp_corrupt}"],
                                      "cannot be read as json"),
    "compare: config.json a folder": ("experiments/compare.py", QUICK + ["--out-dir", "{cmp_config_folder}"]),
    "compare: train.log a folder": ("experiments/compare.py", QUICK + ["--out-dir", "{cmp_log_folder}"], "folder"),
    "compare: seeds 1000": ("experiments/compare.py", QUICK + ["--seeds", "1000"], "out of range"),
    "compare: steps 1e23": ("experiments/compare.py", QUICK + ["--steps", "99999999999999999999999"],
                            "out of range"),
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
    make_peer_files(paths, root)
    make_run_folders(paths, root)
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


def edit_json(path, change):
    with open(path) as f:
        value = json.load(f)
    change(value)
    with open(path, "w") as f:
        json.dump(value, f)


def make_peer_files(paths, root):
    """Other people's checkpoints, each damaged in one way: a Hugging Face Llama folder (config.json,
    model.safetensors) and GGUF files, as formats/checkpoints.py reads them."""
    import numpy as np
    from test_checkpoints import llama_config, write_gguf, write_llama_dir
    from test_model import random_model
    model = random_model(llama_config())
    for name in ("hf_nan", "hf_list_config", "hf_no_eps", "hf_zero_heads", "hf_huge_header", "hf_bad_offsets"):
        paths[name] = write_llama_dir(os.path.join(root, name), model)
    weights = os.path.join(paths["hf_nan"], "model.safetensors")
    with open(weights, "r+b") as f:                               # the last float: NaN
        f.seek(-4, os.SEEK_END)
        f.write(np.array([np.nan], dtype="<f4").tobytes())
    with open(os.path.join(paths["hf_list_config"], "config.json"), "w") as f:
        f.write("[1]")
    edit_json(os.path.join(paths["hf_no_eps"], "config.json"), lambda c: c.pop("rms_norm_eps"))
    edit_json(os.path.join(paths["hf_zero_heads"], "config.json"), lambda c: c.update(num_attention_heads=0))
    with open(os.path.join(paths["hf_huge_header"], "model.safetensors"), "r+b") as f:
        f.write((10 ** 12).to_bytes(8, "little"))
    with open(os.path.join(paths["hf_bad_offsets"], "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 64)                   # the last tensor's bytes cut short

    def set_meta(key, value):
        def edit(writer):
            import gguf
            if value is None:
                writer.kv_data[0].pop(key)
            else:
                writer.kv_data[0][key] = gguf.GGUFValue(value, gguf.GGUFValueType.UINT32)
        return edit
    paths["gguf_zero_heads"] = write_gguf(os.path.join(root, "zero_heads.gguf"), model,
                                          extra=set_meta("llama.attention.head_count", 0))
    paths["gguf_no_eps"] = write_gguf(os.path.join(root, "no_eps.gguf"), model,
                                      extra=set_meta("llama.attention.layer_norm_rms_epsilon", None))
    paths["gguf_bias"] = write_gguf(os.path.join(root, "bias.gguf"), model, extra=lambda w: w.add_tensor(
        "blk.0.attn_q.bias", np.zeros(32, dtype=np.float32)))


def make_run_folders(paths, root):
    """Folders of earlier runs: the --init model reached by a symlink and a hard link, a complex
    checkpoint, damaged resume files of a run these cases' arguments would resume, compare.py
    folders with a damaged config.json or a folder where its log goes."""
    paths["init_link"], paths["init_hardlink"] = os.path.join(root, "latest.pt"), os.path.join(root, "hard.pt")
    os.symlink(os.path.join(paths["out"], "model.pt"), paths["init_link"])
    os.link(os.path.join(paths["out"], "model.pt"), paths["init_hardlink"])
    state = GPT.load(paths["base"]).state_dict()
    torch.save(dict(config=dict(TINY_CONFIG), tokenizer="bytes",
                    model={k: v.to(torch.complex64) for k, v in state.items()}), os.path.join(root, "complex.pt"))
    paths["complex_init"] = os.path.join(root, "complex.pt")
    paths["results_folder"] = os.path.join(root, "results_folder")
    os.makedirs(os.path.join(paths["results_folder"], "results.json"))
    open(os.path.join(paths["results_folder"], "results.json", "keep"), "w").close()   # (not an empty folder)
    import train
    good = os.path.join(root, "resumable")
    argv = [a.format(**{**paths, "out": good}) for a in TRAIN] + ["--ckpt-every", "1"]
    with redirect_stdout(io.StringIO()):
        train.main(argv)
    for name, damage in (("resume_no_tensors", lambda st: st.update(tensors={})),
                         ("resume_shapes", lambda st: st["tensors"].update({k: torch.zeros(3) for k in st["tensors"]})),
                         ("resume_no_batches", lambda st: st.pop("batches"))):
        paths[name] = os.path.join(root, name)
        shutil.copytree(good, paths[name])
        state = torch.load(os.path.join(good, "resume.pt"), weights_only=True)
        damage(state)
        torch.save(state, os.path.join(paths[name], "resume.pt"))
    for name, config_json in (("cmp_list", "[1]"), ("cmp_corrupt", '{"init": '), ("cmp_config_folder", None),
                              ("cmp_log_folder", "{}")):
        paths[name] = os.path.join(root, name)
        os.makedirs(paths[name])
        if config_json is None:
            os.makedirs(os.path.join(paths[name], "config.json"))
            open(os.path.join(paths[name], "config.json", "keep"), "w").close()
        else:
            with open(os.path.join(paths[name], "config.json"), "w") as f:
                f.write(config_json)
    os.makedirs(os.path.join(paths["cmp_log_folder"], "train.log"))
    open(os.path.join(paths["cmp_log_folder"], "train.log", "keep"), "w").close()


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
# seeded mutations: a good file of each family changed at random, in ways the seed fixes; each must
# load, or be refused with a one-line ValueError, never another exception, and a refusal changes
# nothing (the model, the folder)

HOSTILE = [None, 0, -1, 2.5, 10 ** 12, 1e308, float("nan"), True, "x", "", [], [1], {}, {"rope_type": "x"}]
MUTATIONS = 30                                  # per seed and family


def loads_or_refuses(what, fn, *args):
    """fn(*args) -> "loaded" or "refused" (a one-line ValueError); anything else fails, naming what."""
    try:
        fn(*args)
        return "loaded"
    except ValueError as e:
        assert "\n" not in str(e), (what, str(e))
        return "refused"
    except Exception as e:                      # a traceback for the user: the test fails here
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("seed", range(3))
def test_seeded_mutations_of_hugging_face_configs_load_or_are_one_line(tmp_path, seed):
    from formats import checkpoints
    from test_checkpoints import llama_config, write_hf_dir, write_llama_dir
    from test_model import random_model, tiny_config
    rng, outcomes = random.Random(seed), []
    folders = [write_llama_dir(tmp_path / "llama", random_model(llama_config())),
               write_hf_dir(tmp_path / "gpt2", random_model(tiny_config()), "safetensors", "")]
    for folder in folders:
        path = os.path.join(folder, "config.json")
        good = json.load(open(path))
        keys = sorted(good) + ["rope_parameters", "rope_scaling", "head_dim", "n_inner", "partial_rotary_factor"]
        for _ in range(MUTATIONS):
            changed, key, value = dict(good), rng.choice(keys), rng.choice(HOSTILE)
            changed[key] = value
            with open(path, "w") as f:
                json.dump(changed, f)
            outcomes.append(loads_or_refuses(f"{key}={value!r}", checkpoints.load_hf_dir, folder))
    assert outcomes.count("refused") > MUTATIONS                      # (most of them are refused)


@pytest.mark.parametrize("seed", range(3))
def test_seeded_mutations_of_a_tokenizer_json_load_or_are_one_line(tmp_path, seed):
    from formats import bpe
    from test_checkpoints import llama_config, write_llama_dir
    from test_model import random_model
    rng = random.Random(seed)
    folder = write_llama_dir(tmp_path / "llama", random_model(llama_config()))
    path = os.path.join(folder, "tokenizer.json")
    good = json.load(open(path))
    for _ in range(MUTATIONS):
        tok = json.loads(json.dumps(good))
        where = rng.choice([tok, tok["model"], tok["pre_tokenizer"], tok["added_tokens"][0]])
        key = rng.choice(sorted(where) + ["normalizer", "post_processor", "dropout", "merges", "vocab"])
        where[key] = rng.choice(HOSTILE)
        with open(path, "w") as f:
            json.dump(tok, f)
        loads_or_refuses(f"{key}={where[key]!r}", bpe.tokenizer_from_json, folder)


@pytest.mark.parametrize("seed", range(3))
def test_seeded_damage_to_a_safetensors_file_loads_or_is_one_line(tmp_path, seed):
    from formats import checkpoints
    from test_checkpoints import write_hf_dir
    from test_model import random_model, tiny_config
    rng = random.Random(seed)
    folder = write_hf_dir(tmp_path / "gpt2", random_model(tiny_config()), "safetensors", "")
    path = os.path.join(folder, "model.safetensors")
    good = open(path, "rb").read()
    header_end = 8 + int.from_bytes(good[:8], "little")
    for _ in range(MUTATIONS):
        data = bytearray(good)
        how = rng.choice(["flip a header byte", "truncate", "flip a length byte"])
        if how == "truncate":
            data = data[:rng.randrange(len(data))]
        else:
            at = rng.randrange(8) if how == "flip a length byte" else rng.randrange(8, header_end)
            data[at] = rng.randrange(256)
        with open(path, "wb") as f:
            f.write(data)
        loads_or_refuses(how, checkpoints.load_hf_dir, folder)


@pytest.mark.parametrize("seed", range(3))
def test_seeded_mutations_of_gguf_metadata_load_or_are_one_line(tmp_path, seed, monkeypatch):
    import gguf
    from formats import checkpoints
    from test_checkpoints import llama_config, write_gguf
    from test_model import random_model
    rng, model = random.Random(seed), random_model(llama_config())
    keys = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
            "llama.attention.head_count_kv", "llama.context_length", "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.expert_count",
            "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
    values = [None, (0, "UINT32"), (10 ** 9, "UINT32"), (3, "UINT32"), (-1.0, "FLOAT32"), (float("nan"), "FLOAT32"),
              (0.0, "FLOAT32"), ("x", "STRING"), ("", "STRING"), (True, "BOOL"), (["a", "b"], "ARRAY")]
    write_header = gguf.GGUFWriter.write_header_to_file
    for i in range(MUTATIONS // 3):
        key, value = rng.choice(keys), rng.choice(values)

        def edited(writer, *args, key=key, value=value, **kwargs):     # the metadata, as the file gets it
            if value is None:
                writer.kv_data[0].pop(key, None)
            else:
                kind = getattr(gguf.GGUFValueType, value[1])
                writer.kv_data[0][key] = gguf.GGUFValue(value[0], kind, gguf.GGUFValueType.STRING
                                                        if kind == gguf.GGUFValueType.ARRAY else None)
            return write_header(writer, *args, **kwargs)
        monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", edited)
        path = write_gguf(tmp_path / f"{i}.gguf", model)
        loads_or_refuses(f"{key}={value}", checkpoints.load, path)


@pytest.mark.parametrize("seed", range(3))
def test_seeded_mutations_of_our_checkpoint_load_exactly_or_are_one_line(tmp_path, seed):
    from model import GPT
    from test_model import random_model, tiny_config
    rng, model = random.Random(seed), random_model(tiny_config(vocab_size=257))
    state, path = model.state_dict(), str(tmp_path / "m.pt")
    dtypes = [torch.float64, torch.bfloat16, torch.complex64, torch.int64, torch.bool, torch.float16]
    for _ in range(MUTATIONS):
        config, tensors = dict(model.config.__dict__), {k: v.clone() for k, v in state.items()}
        key = rng.choice(sorted(tensors))
        how = rng.choice(["config", "dtype", "shape", "drop", "extra", "value"])
        if how == "config":
            config[rng.choice(sorted(config))] = rng.choice(HOSTILE)
        elif how == "dtype":
            tensors[key] = tensors[key].to(rng.choice(dtypes))
        elif how == "shape":
            tensors[key] = tensors[key].reshape(-1)[:max(1, tensors[key].numel() - 1)]
        elif how == "drop":
            tensors.pop(key)
        elif how == "extra":
            tensors[key + "_"] = torch.zeros(2)
        else:
            tensors[key].view(-1)[0] = rng.choice([float("nan"), float("inf"), 1e30])
        torch.save(dict(config=config, model=tensors, tokenizer="bytes"), path)
        if loads_or_refuses(how, GPT.load, path) == "loaded":        # then exactly what the file holds
            loaded = GPT.load(path).state_dict()
            assert all(torch.equal(loaded[k].to(t.dtype), t) for k, t in tensors.items()), how


@pytest.mark.parametrize("seed", range(2))
def test_seeded_mutations_of_a_resume_file_are_refused_before_anything_changes(tmp_path, seed, tiny_base):
    import train
    rng, out = random.Random(seed), tmp_path / "run"
    argv = ["--init", str(tiny_base), "--mode", "joint", "--steps", "4", "--batch-size", "2", "--n-train", "8",
            "--n-eval", "4", "--device", "cpu", "--out-dir", str(out)]
    with redirect_stdout(io.StringIO()):
        train.main(argv + ["--ckpt-every", "2"])
    good = torch.load(out / "resume.pt", weights_only=True)
    for _ in range(MUTATIONS // 3):
        state = dict(good)
        field = rng.choice(sorted(state))
        state[field] = rng.choice(HOSTILE[:-1] + [torch.zeros(3), {}, {"x": torch.zeros(1)}])
        torch.save(state, out / "resume.pt")
        before = files_under(str(out))
        with redirect_stdout(io.StringIO()):
            outcome = loads_or_refuses(field, lambda: train.train(train.resolve_args(train.parse_args(
                argv + ["--resume"]))))
        assert outcome == "refused" and files_under(str(out)) == before, field


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
