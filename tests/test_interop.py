"""
What is trained here runs elsewhere, and the other way round (formats/peft_lora.py,
formats/control_vectors.py, formats/convert.py), checked against the tools themselves:

- peft: our LoRA written as a peft folder and loaded by peft onto transformers' model gives our
  logits (1e-4): a tiny GPT-2 and a tiny Llama built offline, and SmolLM2 through its GGUF. A LoRA
  made by peft (A and B random, non-zero) loads here to peft's logits, its q, k, v with one A or three.
- llama.cpp (llama-cpp-python), on SmolLM2's GGUF: direction.N of a file is added at our layer N
  (one layer's vector at a time, against ours at N − 1, N, N + 1); and the block_out vector trained by
  train.py (results/smollm2/control_vector/, as is, not scaled), exported and applied by llama.cpp.
  llama.cpp multiplies the file's 4-bit weights with 8-bit copies of the activations, we with the
  weights dequantized in float32, so what is compared is what the vector changes, on 20 prompts: the
  cosine of the steered − unsteered next-token logits (≥ 0.99 on most, ≥ 0.95 on each), that shift's
  disagreement against the two sides' disagreement without a vector (at most 3 times it), and greedy
  continuations of 16 tokens, equal up to the end of text on most (past it, the model picks among
  near-ties, where the two kernels part even without a vector; the log counts both).
  A file written as repeng writes it loads to the same vector.
- refusals: whatever the other format cannot hold, or our model cannot compute, in one line.

peft, transformers and llama-cpp-python are test-only (requirements-test.txt, which .ci/run
installs); each test skips when its package is missing. Installing llama-cpp-python compiles
llama.cpp (8 min of CPU time on a 2-core machine). The log RESULTS.md quotes:

    NANOSTEER_INTEROP_LOG=results/smollm2/interop python -m pytest -q tests/test_interop.py -k "smollm2 or llama_cpp"

Run:  python -m pytest -q tests/test_interop.py"""
import copy
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT
from formats import adapters, checkpoints, convert
from formats.control_vectors import load_cvec, read_cvec, save_cvec
from formats.peft_lora import load_peft, save_peft
from machinery.files import write_atomically
from tasks import make_splits
from test_checkpoints import llama_config, needs_smollm2, one_line_error
from test_model import random_model
import nanosteer

torch.set_num_threads(1)
try:
    import peft                   # test-only, with transformers: the peft checks skip without them
except ImportError:
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs peft and transformers: pip install -r requirements-test.txt")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs: pip install gguf")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VECTOR = os.path.join(ROOT, "results", "smollm2", "control_vector", "adapters.pt")


def randomize(tensors, std, seed=0):
    """Give adapter tensors random values (a trained adapter's B is not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def max_diff(ours, theirs, vocab_size, seed=1):
    idx = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (ours(idx)[0] - theirs(idx).logits).abs().max().item()


def peft_made(ref, folder, config, std, seed=0):
    """A LoRA made by peft on a copy of ref, its A and B random, saved to folder -> the peft model."""
    made = peft.get_peft_model(copy.deepcopy(ref), config).eval()
    randomize([p for n, p in made.named_parameters() if "lora_" in n], std, seed)
    made.save_pretrained(folder)
    return made


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (our model, transformers' model, vocab size)}: the same random weights."""
    from test_reference import tiny_gpt2, tiny_llama
    tmp = tmp_path_factory.mktemp("tiny")
    gpt2_folder, gpt2_ref = tiny_gpt2(tmp / "gpt2")
    llama_folder, llama_ref = tiny_llama(tmp / "llama")
    return dict(gpt2=(checkpoints.load_hf_dir(gpt2_folder), gpt2_ref, 61),
                llama=(checkpoints.load(llama_folder)[0], llama_ref, 261))

# ---------------------------------------------------------------------------------------------
# peft, both ways: tiny models


@needs_peft
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("targets, layers", [(None, None), (["attn.c_attn", "mlp.c_proj"], [1])])
def test_our_lora_loaded_by_peft_gives_our_logits(tiny, tmp_path, family, targets, layers):
    base, ref, vocab = tiny[family]
    model = copy.deepcopy(base)
    nanosteer.lora(model, 4, 6.0, targets, layers)
    randomize(nanosteer.adapter_parameters(model).values(), 0.3)
    save_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path / "peft")).eval()
    diff = max_diff(model, theirs, vocab)
    print(f"{family}, LoRA on {targets or 'every Linear'}: ours -> peft max |Δlogit| {diff:.1e}")
    assert max_diff(base, theirs, vocab) > 0.1          # the adapter changes the logits...
    assert diff <= 1e-4                                 # ...as ours does


@needs_peft
@pytest.mark.parametrize("family, targets, layers, rank_0", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"], None, 4), ("llama", LLAMA_TARGETS, None, 12),
    ("llama", ["q_proj", "v_proj"], None, 8), ("llama", ["q_proj"], [], 4),       # []: every block
    ("llama", ["model.layers.0.self_attn.q_proj", "v_proj"], [1], 4)])  # a whole name: in any block
def test_a_lora_made_by_peft_loads_here_to_peft_logits(tiny, tmp_path, family, targets, layers, rank_0):
    base, ref, vocab = tiny[family]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers)
    made = peft_made(ref, tmp_path / "made", config, 0.3)
    model = load_peft(copy.deepcopy(base), str(tmp_path / "made"))
    diff = max_diff(model, made, vocab)
    print(f"{family}, peft's LoRA on {targets}: peft -> ours max |Δlogit| {diff:.1e}")
    assert max_diff(base, made, vocab) > 0.01
    assert diff <= 1e-4
    # peft's q, k and v have their own A: here one LoRA of rank 3r (2r for q, v), B block-diagonal
    assert model.transformer.h[0].attn.c_attn.rank == rank_0


@needs_peft
def test_q_k_v_sharing_one_a_come_back_as_one_lora_and_the_same_files(tiny, tmp_path):
    base, _, _ = tiny["llama"]
    model = copy.deepcopy(base)
    nanosteer.lora(model, 2, 4.0, ["c_attn"])
    randomize(nanosteer.adapter_parameters(model).values(), 0.3)
    save_peft(model, tmp_path / "a")
    again = load_peft(copy.deepcopy(base), str(tmp_path / "a"))
    assert again.transformer.h[1].attn.c_attn.rank == 2
    save_peft(again, tmp_path / "b")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

# ---------------------------------------------------------------------------------------------
# peft, both ways: SmolLM2 as transformers reads its GGUF, in float64 on both sides: the bases then
# agree to about 2e-5 (both turn rotary's angles in float32, each its own way), in float32 not to 1e-4


@pytest.fixture(scope="module")
def smollm2():
    path = checkpoints.smollm2_path()
    ref = __import__("transformers").AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), dtype=torch.float64, gguf_file=os.path.basename(path)).eval()
    model, enc = checkpoints.load(checkpoints.SMOLLM2)
    return model.double(), enc, ref


@needs_peft
@needs_smollm2
def test_smollm2_lora_both_ways_through_peft(smollm2, tmp_path):
    base, _, ref = smollm2
    vocab = base.config.vocab_size
    model = copy.deepcopy(base)
    nanosteer.lora(model, 4, 8.0, layers=[0, 7, 29])
    randomize(nanosteer.adapter_parameters(model).values(), 0.05)
    save_peft(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path / "ours")).eval()
    out_diff = max_diff(model, theirs, vocab)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, layers_to_transform=[3, 16])
    made = peft_made(ref, tmp_path / "made", config, 0.05)
    in_diff = max_diff(load_peft(copy.deepcopy(base), str(tmp_path / "made")), made, vocab)
    lines = [f"SmolLM2-135M-Instruct in float64, ours and transformers' (from the GGUF), peft {peft.__version__}",
             f"our LoRA (rank 4, layers 0, 7, 29) loaded by peft: max |Δlogit| {out_diff:.1e}",
             f"peft's LoRA (rank 4, layers 3, 16) loaded here: max |Δlogit| {in_diff:.1e}",
             f"the bases alone, no adapter: max |Δlogit| {max_diff(base, ref, vocab):.1e}"]
    print("\n".join(lines))
    write_log("peft.txt", lines)
    assert min(max_diff(base, theirs, vocab), max_diff(base, made, vocab)) > 0.1
    assert out_diff <= 1e-4 and in_diff <= 1e-4

# ---------------------------------------------------------------------------------------------
# what a peft folder may not ask for, and what cannot go into one


def edit(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@needs_peft
@pytest.mark.parametrize("field, changes", [
    ("use_dora", dict(use_dora=True)), ("use_rslora", dict(use_rslora=True)), ("bias", dict(bias="all")),
    ("modules_to_save", dict(modules_to_save=["lm_head"])), ("rank_pattern", dict(rank_pattern={"q_proj": 8})),
    ("init_lora_weights", dict(init_lora_weights="pissa")), ("peft_type", dict(peft_type="LOHA")),
    ("layers_pattern", dict(layers_pattern="blocks", layers_to_transform=[0]))])
def test_peft_options_we_cannot_compute_are_refused_naming_the_field(tiny, tmp_path, field, changes):
    base, ref, _ = tiny["llama"]
    peft_made(ref, tmp_path, peft.LoraConfig(r=2, target_modules=["q_proj"]), 0.1)
    edit(tmp_path, **changes)
    model = copy.deepcopy(base)
    one_line_error(field, load_peft, model, str(tmp_path))
    assert not nanosteer.adapter_parameters(model)                 # refused: the model unchanged


@needs_peft
def test_peft_files_that_do_not_match_the_base_are_refused(tiny, tmp_path):
    base, ref, _ = tiny["llama"]
    peft_made(ref, tmp_path, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), 0.1)
    edit(tmp_path, r=3)                                        # the tensors are rank 2
    one_line_error(r"lora_A.weight is shape \(2, 32\); this model needs \(3, 32\)", load_peft,
                   copy.deepcopy(base), str(tmp_path))
    edit(tmp_path, r=2, target_modules=["q_proj"])               # v_proj's tensors: not targeted
    one_line_error("target_modules and the tensors disagree", load_peft, copy.deepcopy(base), str(tmp_path))
    gpt2, _, _ = tiny["gpt2"]                                    # a Llama adapter on a GPT-2
    one_line_error("is not a Linear of this model's blocks", load_peft, copy.deepcopy(gpt2), str(tmp_path))
    one_line_error("not a peft adapter folder", load_peft, copy.deepcopy(base), str(tmp_path / "none"))
    edit(tmp_path, target_modules=["q_proj", "v_proj"])
    import safetensors.torch                                     # peft's own requirement
    weights = tmp_path / "adapter_model.safetensors"
    factors = {k: v.double() * (1 + 1e-9) for k, v in safetensors.torch.load_file(weights).items()}
    safetensors.torch.save_file(factors, weights)
    one_line_error("torch.float64 with values a torch.float32 model would round", load_peft,
                   copy.deepcopy(base), str(tmp_path))
    exact = load_peft(copy.deepcopy(base).double(), str(tmp_path))           # a float64 model holds them
    q = exact.transformer.h[0].attn.c_attn                      # q and v: each its own A, B in its rows
    read = safetensors.torch.load_file(weights)
    mine = [(q.lora_A[:2], "lora_A"), (q.lora_B[:exact.config.n_embd, :2], "lora_B")]      # q's rows
    for ours, which in mine:
        assert ours.dtype == torch.float64
        assert torch.equal(ours, read[f"base_model.model.model.layers.0.self_attn.q_proj.{which}.weight"])
    edit(tmp_path, target_modules="model.layers.(0")                        # not a pattern
    one_line_error("is not a regular expression", load_peft, copy.deepcopy(base), str(tmp_path))
    edit(tmp_path, target_modules=".*q_proj", layers_to_transform=[0])        # peft refuses it too
    one_line_error("cannot be used with a pattern", load_peft, copy.deepcopy(base), str(tmp_path))
    weights.write_bytes(b"\x10" + bytes(30))                                # a damaged file
    one_line_error("is not a safetensors file", load_peft, copy.deepcopy(base), str(tmp_path))


def test_what_a_peft_lora_file_cannot_hold_is_refused(tmp_path):
    base = random_model(llama_config())
    model = copy.deepcopy(base)
    nanosteer.lora(model, 2)
    nanosteer.steer(model, "block_out", "vector", layers=[1])
    one_line_error("also holds shifts", save_peft, model, str(tmp_path))
    model = copy.deepcopy(base)
    nanosteer.lora(model, 2, layers=[0])
    nanosteer.lora(model, 4, layers=[1])
    one_line_error("differ in rank or alpha", save_peft, model, str(tmp_path))
    assert not os.listdir(tmp_path)

# ---------------------------------------------------------------------------------------------
# control vectors: the file, repeng's way of writing it, what llama.cpp cannot apply


def write_as_repeng(model, path):
    """The model's block_out vectors as repeng's ControlVector.export_gguf writes them: model_hint,
    a uint32 layer_count, then direction.{layer} for each layer of its directions dict."""
    import gguf
    directions = {layer: block.slots["block_out"].shift.v.detach().numpy()
                  for layer, block in enumerate(model.transformer.h) if block.slots["block_out"].shift}
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@needs_gguf
def test_control_vector_round_trip_and_repengs_file_give_the_same_model(tmp_path):
    base = random_model(llama_config())
    model = copy.deepcopy(base)
    nanosteer.steer(model, "block_out", "vector", layers=[1])
    randomize(nanosteer.adapter_parameters(model).values(), 0.5)
    assert save_cvec(model, str(tmp_path / "v.gguf")) == [1]
    write_as_repeng(model, str(tmp_path / "repeng.gguf"))
    idx = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for name in ("v.gguf", "repeng.gguf"):
        again = copy.deepcopy(base)
        assert load_cvec(again, str(tmp_path / name)) == [1]
        assert torch.equal(again(idx)[0], model(idx)[0])


@pytest.mark.parametrize("site, kind, layer, why", [
    ("block_out", "linear", 1, "holds a linear shift"), ("mlp_out", "vector", 1, "holds a vector shift"),
    ("block_out", "vector", 0, "layer 0 block_out holds a non-zero vector")])
def test_what_llama_cpp_cannot_apply_is_refused(tmp_path, site, kind, layer, why):
    model = random_model(llama_config())
    nanosteer.steer(model, site, kind, layers=[layer])
    randomize(nanosteer.adapter_parameters(model).values(), 0.5)
    one_line_error(why, save_cvec, model, str(tmp_path / "v.gguf"))
    assert not os.path.exists(tmp_path / "v.gguf")


@needs_gguf
def test_a_zero_vector_at_layer_0_is_left_out_and_lora_is_refused(tmp_path):
    model = random_model(llama_config())
    nanosteer.steer(model, "block_out", "vector")                # layers 0 and 1, both zero
    assert save_cvec(model, str(tmp_path / "v.gguf")) == [1]
    nanosteer.lora(model, 2)
    one_line_error("holds LoRA", save_cvec, model, str(tmp_path / "w.gguf"))


@needs_gguf
@pytest.mark.parametrize("name, values, why", [
    ("direction.0", np.ones(32, np.float32), "llama.cpp does not steer"),
    ("direction.2", np.ones(32, np.float32), "llama.cpp does not steer"),       # 2 layers: 0, 1
    ("direction.1", np.ones(16, np.float32), r"need F32 of shape \(32,\)"),
    ("direction.1", np.ones(32, np.float16), r"need F32 of shape \(32,\)"),
    ("bias.1", np.ones(32, np.float32), "is not a direction.N")])
def test_control_vectors_that_do_not_fit_are_refused(tmp_path, name, values, why):
    import gguf
    writer = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = random_model(llama_config())
    one_line_error(why, load_cvec, model, str(tmp_path / "v.gguf"))
    assert not nanosteer.adapter_parameters(model)

# ---------------------------------------------------------------------------------------------
# the command


def test_convert_command_both_ways_and_its_one_line_errors(tiny_base, tmp_path, capsys):
    from model import GPT
    model = GPT.load(str(tiny_base))
    nanosteer.lora(model, 2, layers=[1])
    randomize(nanosteer.adapter_parameters(model).values(), 0.3)
    adapters.save(model, str(tmp_path / "a.pt"))
    convert.main(["--init", str(tiny_base), "--adapters", str(tmp_path / "a.pt"), "--to-peft", str(tmp_path / "p")])
    assert "peft LoRA r=2, lora_alpha=4 on 4 modules" in capsys.readouterr().out
    convert.main(["--init", str(tiny_base), "--from-peft", str(tmp_path / "p"), "--adapters", str(tmp_path / "b.pt")])
    assert "LoRA on 4 Linear layers" in capsys.readouterr().out
    again = adapters.load(GPT.load(str(tiny_base)), str(tmp_path / "b.pt"))
    idx = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(idx)[0], model(idx)[0])
    with pytest.raises(SystemExit) as stop:
        convert.main(["--init", str(tiny_base), "--adapters", str(tmp_path / "a.pt"), "--to-cvec", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "holds LoRA" in err
    before = {f: (tmp_path / f).read_bytes() for f in ("a.pt", "b.pt", "p/adapter_model.safetensors")}
    for way in (["--from-peft", str(tmp_path / "p"), "--adapters", str(tmp_path / "a.pt")],   # a trained file
                ["--adapters", str(tmp_path / "b.pt"), "--to-peft", str(tmp_path / "p")]):   # an adapter folder
        with pytest.raises(SystemExit) as stop:
            convert.main(["--init", str(tiny_base), *way])
        assert stop.value.code == 2 and "give a new name (convert.py never overwrites)" in capsys.readouterr().err
    assert before == {f: (tmp_path / f).read_bytes() for f in before}

# ---------------------------------------------------------------------------------------------
# llama.cpp itself: the trained vector, applied by llama.cpp to SmolLM2's GGUF

needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="needs llama.cpp: pip install "
                                     "llama-cpp-python==0.3.36 (it compiles llama.cpp; see the docstring)")


@pytest.fixture(scope="module")
def llama_cpp_and_ours():
    """llama.cpp on SmolLM2's GGUF (one thread; a float32 KV cache, not its default float16,
    to leave only its quantized matmuls between its numbers and ours), and our model of it."""
    import llama_cpp
    llm = llama_cpp.Llama(checkpoints.smollm2_path(), n_ctx=256, n_batch=256, logits_all=True, n_threads=1,
                          n_threads_batch=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          verbose=False)
    return llm, *checkpoints.load(checkpoints.SMOLLM2)


def llama_cpp_run(llm, ids, steps=0):
    """Next-token logits after ids, and ids continued greedily by `steps` tokens."""
    llm.reset()
    llm.eval(ids)
    first, out = llm.scores[len(ids) - 1].copy(), list(ids)
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return first.astype(np.float64), out


def llama_cpp_steered(llm, path, n_layer, n_embd, ids, steps=0):
    """llama_cpp_run with the control vector at path: what llama.cpp's common_control_vector_load
    makes of the file (one float array from layer 1 on, direction.N at row N − 1), passed to
    llama_set_adapter_cvec for layers 1..n_layer, and taken off again afterwards."""
    import ctypes
    import llama_cpp
    data = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    for layer, v in read_cvec(path, n_layer, n_embd).items():
        data[layer - 1] = v
    pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, pointer, data.size, n_embd, 1, n_layer) == 0
    try:
        return llama_cpp_run(llm, ids, steps)
    finally:
        llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, n_embd, -1, -1)


def our_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, -1].double().numpy()


def with_vector(model, layer, v):
    """A copy of model with the vector v in layer's block_out slot."""
    steered = copy.deepcopy(model)
    shift, = nanosteer.steer(steered, "block_out", "vector", layers=[layer])
    with torch.no_grad():
        shift.v.copy_(v)
    return steered


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def prompts(enc):
    """20 prompts: 10 ListOps questions held out of training (the vector's task) and 10 others."""
    listops = [p for p, _ in make_splits("listops", 0, n_train=0, n_eval=10)["test"]]
    other = ["The capital of France is", "def fib(n):\n    return", "Once upon a time", "2 + 2 =",
             "The weather today is", "My favourite colour is", "import numpy as", "Q: What is 7 times 6?\nA:",
             "The quick brown fox", "[MAX 2 [MIN 7 4] 1] is a list whose value"]
    return [enc.encode_ordinary(p) for p in listops + other]


@needs_smollm2
@needs_llama_cpp
@pytest.mark.skipif(not os.path.isfile(VECTOR), reason=f"needs the trained vector {VECTOR}")
def test_llama_cpp_adds_direction_n_at_our_layer_n(llama_cpp_and_ours, tmp_path):
    llm, model, enc = llama_cpp_and_ours
    trained, c = adapters.load(copy.deepcopy(model), VECTOR), model.config
    ids = enc.encode_ordinary("The capital of France is")
    base = our_logits(model, ids)
    lines = [f"llama-cpp-python {__import__('llama_cpp').__version__}, SmolLM2-135M-Instruct (Q4_1 GGUF), "
             f"{enc.decode(ids)!r}: the shift of one layer's vector (3 times the trained one) in llama.cpp, "
             "against ours with it at that layer and the layers beside it"]
    for layer in (1, 15, c.n_layer - 1):     # one layer's trained vector alone, 3 times as long so
                                             # that one layer's shift stands well out of the kernels' noise
        v = 3 * trained.transformer.h[layer].slots["block_out"].shift.v.detach()
        save_cvec(with_vector(model, layer, v), str(tmp_path / "one.gguf"))
        steered, _ = llama_cpp_steered(llm, str(tmp_path / "one.gguf"), c.n_layer, c.n_embd, ids)
        theirs = steered - llama_cpp_run(llm, ids)[0]
        agree = {}
        for at in (layer - 1, layer, layer + 1):
            if 0 <= at < c.n_layer:
                agree[at] = cosine(our_logits(with_vector(model, at, v), ids) - base, theirs)
        at_layers = ", ".join(f"{at} {x:.4f}" for at, x in agree.items())
        lines.append(f"direction.{layer}: cosine with ours at layer {at_layers}")
        print(lines[-1])
        assert max(agree, key=agree.get) == layer and agree[layer] >= 0.99
    write_log("layers.txt", lines)


@needs_smollm2
@needs_llama_cpp
@pytest.mark.skipif(not os.path.isfile(VECTOR), reason=f"needs the trained vector {VECTOR}")
def test_llama_cpp_applies_our_exported_vector_as_we_do(llama_cpp_and_ours, tmp_path):
    llm, model, enc = llama_cpp_and_ours
    steered, c = adapters.load(copy.deepcopy(model), VECTOR), model.config
    save_cvec(steered, str(tmp_path / "v.gguf"))
    write_as_repeng(steered, str(tmp_path / "repeng.gguf"))               # repeng's file: the same model
    from_repeng = copy.deepcopy(model)
    assert load_cvec(from_repeng, str(tmp_path / "repeng.gguf")) == list(range(1, c.n_layer))
    ids = enc.encode_ordinary("The capital of France is")
    assert np.array_equal(our_logits(from_repeng, ids), our_logits(steered, ids))
    rows, cosines, ratios, same, same_text, same_base = [], [], [], 0, 0, 0
    for ids in prompts(enc):
        ours_base, ours = our_logits(model, ids), our_logits(steered, ids)
        theirs_base, theirs_base_out = llama_cpp_run(llm, ids, 16)
        same_base += model.generate(torch.tensor([ids]), 16, temperature=0)[0].tolist() == theirs_base_out
        theirs, theirs_out = llama_cpp_steered(llm, str(tmp_path / "v.gguf"), c.n_layer, c.n_embd, ids, 16)
        cosines.append(cosine(ours - ours_base, theirs - theirs_base))
        # the shifts' disagreement, against the kernels' own disagreement on the unsteered model
        ratios.append(np.linalg.norm((ours - ours_base) - (theirs - theirs_base))
                      / np.linalg.norm(ours_base - theirs_base))
        ours_out = steered.generate(torch.tensor([ids]), 16, temperature=0)[0].tolist()
        same += ours_out == theirs_out
        same_text += until_end(ours_out, len(ids), enc) == until_end(theirs_out, len(ids), enc)
        rows.append(f"{cosines[-1]:.4f} | {ratios[-1]:5.2f} | {np.linalg.norm(ours - ours_base):7.1f} | "
                    f"{until_end(ours_out, len(ids), enc) == until_end(theirs_out, len(ids), enc)!s:5} | "
                    f"{ours_out == theirs_out!s:5} | {enc.decode(ids)[:36]!r}")
    n = len(rows)
    report = [f"SmolLM2-135M-Instruct (Q4_1 GGUF), llama-cpp-python {__import__('llama_cpp').__version__}: the "
              f"block_out vector of {os.path.relpath(VECTOR, ROOT)}, exported by save_cvec, applied by llama.cpp",
              "cosine | ratio | |shift| | greedy equal to end of text | all 16 tokens | prompt", *rows,
              f"cosine of the logit shifts: min {min(cosines):.4f}, median {np.median(cosines):.4f}, "
              f"at least 0.99 on {sum(x >= 0.99 for x in cosines)} of {n} prompts",
              f"ratio (shift disagreement / unsteered disagreement): max {max(ratios):.2f}, median {np.median(ratios):.2f}",
              f"greedy continuations equal up to the end of text on {same_text} of {n}; "
              f"all 16 tokens, past the end of text, on {same} of {n} (without the vector: {same_base} of {n})"]
    print("\n".join(report))
    write_log("shift.txt", report)
    assert sum(x >= 0.99 for x in cosines) > n / 2 and min(cosines) >= 0.95
    assert max(ratios) <= 3              # the vector adds no disagreement beyond the kernels' own
    assert same_text > n / 2


def until_end(ids, start, enc):
    """The continuation after position start, up to and with the first end-of-text token."""
    new = ids[start:]
    ends = [i for i, token in enumerate(new) if token in enc.stop_tokens]
    return new[:ends[0] + 1] if ends else new


def write_log(name, lines):
    """With NANOSTEER_INTEROP_LOG=folder set, the lines go to folder/name (RESULTS.md quotes them)."""
    folder = os.environ.get("NANOSTEER_INTEROP_LOG")
    if not folder:
        return
    command = f'$ NANOSTEER_INTEROP_LOG={folder} python -m pytest -q tests/test_interop.py -k "smollm2 or llama_cpp"'

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join([command, *lines]) + "\n")
    write_atomically(os.path.join(folder, name), write)
