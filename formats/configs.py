"""
formats/configs.py: other people's configs -> our GPTConfig: a Hugging Face config.json (GPT-2 or
Llama) and a GGUF file's llama.* metadata. One check for all of them: every field a reader needs is
checked for presence, type and range (`need`) before anything is computed from it, in one line that
names the field; every setting our model cannot reproduce exactly is refused (`unsupported`).
formats/checkpoints.py calls these before it reads a single weight. A first read skips this file.
"""
import math
import numbers
import os

from formats.tensor_files import read_json, unsupported
from model import GPTConfig

LLAMA = dict(bias=False, mlp="glu", norm="rmsnorm", pos="rotary")   # a Llama block, in our switches
REQUIRED = object()                  # need()'s default: the field must be there
KINDS = {"count": "a whole number ≥ 1", "positive": "a finite number > 0", "flag": "true or false",
         "text": "a string", "table": "an object"}


def of_kind(value, kind):
    """Is value of the kind (KINDS)? bool is no number here: JSON's true is not the count 1."""
    if kind == "flag":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "count":
        return isinstance(value, numbers.Integral) and value >= 1
    if kind == "positive":
        return isinstance(value, numbers.Real) and 0 < value < math.inf
    return isinstance(value, {"text": str, "table": dict}[kind])


def need(fields, key, kind, source, default=REQUIRED, prefix=""):
    """fields[key], which must be of `kind` (KINDS); a missing or null field is the default, or,
    without one, a one-line error naming it (as prefix + key)."""
    value = fields.get(key)
    if value is None:
        if default is REQUIRED:
            raise ValueError(f"{source}: {prefix}{key} is missing; nanosteer needs it to build the model")
        return default
    if not of_kind(value, kind):
        raise ValueError(f"{source}: {prefix}{key} = {value!r} must be {KINDS[kind]}: the file is damaged")
    return value

# ---------------------------------------------------------------------------------------------
# Hugging Face config.json


def gpt2_config(hf, source):
    """GPT2Config -> ours. Refused: whatever changes the function and our GPT-2 block cannot do.
    (reorder_and_upcast_attn only changes the order of float operations: the same function.)"""
    act = need(hf, "activation_function", "text", source, "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):    # all three: the tanh GELU
        raise unsupported(source, "activation_function", act)
    for field, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False)):
        if need(hf, field, "flag", source, default) != default:
            raise unsupported(source, field, hf[field])
    counts = {ours: need(hf, key, "count", source) for ours, key in (
        ("block_size", "n_positions"), ("vocab_size", "vocab_size"), ("n_layer", "n_layer"),
        ("n_head", "n_head"), ("n_embd", "n_embd"))}
    return GPTConfig(**counts, mlp_width=need(hf, "n_inner", "count", source, 0),
                     norm_eps=need(hf, "layer_norm_epsilon", "positive", source, 1e-5),
                     tie_embeddings=need(hf, "tie_word_embeddings", "flag", source, True))


def rope_settings(hf, source):
    """The rotary settings as transformers ≥ 5 reads them (PreTrainedConfig.convert_rope_params_to_dict):
    rope_scaling, when given, wins over rope_parameters; inside the one chosen, its rope_theta and
    partial_rotary_factor win over the top-level fields of the same names. -> θ; scaled or partial
    rotary is refused."""
    rope = need(hf, "rope_scaling", "table", source, None) or need(hf, "rope_parameters", "table", source, {})
    kind = need(rope, "rope_type", "text", source, None) or need(rope, "type", "text", source, "default")
    theta = need(rope, "rope_theta", "positive", source, None) or need(hf, "rope_theta", "positive", source, 1e4)
    partial = need(rope, "partial_rotary_factor", "positive", source, None) or \
        need(hf, "partial_rotary_factor", "positive", source, 1.0)
    if kind != "default":
        raise unsupported(source, "rope_scaling", rope)
    if partial != 1.0:
        raise unsupported(source, "partial_rotary_factor", partial)
    return theta


def llama_config(hf, source):
    """LlamaConfig -> ours. Refused: scaled or partial rotary, an MLP other than SiLU-gated,
    biases, a head size other than n_embd / n_head."""
    theta = rope_settings(hf, source)
    if need(hf, "hidden_act", "text", source, "silu") != "silu":
        raise unsupported(source, "hidden_act", hf["hidden_act"])
    for field in ("attention_bias", "mlp_bias"):
        if need(hf, field, "flag", source, False):
            raise unsupported(source, field, hf[field])
    width, heads = need(hf, "hidden_size", "count", source), need(hf, "num_attention_heads", "count", source)
    if need(hf, "head_dim", "count", source, width // heads) != width // heads:
        raise unsupported(source, "head_dim", hf["head_dim"])
    counts = {ours: need(hf, key, "count", source) for ours, key in (
        ("block_size", "max_position_embeddings"), ("vocab_size", "vocab_size"),
        ("n_layer", "num_hidden_layers"), ("mlp_width", "intermediate_size"))}
    return GPTConfig(**counts, n_head=heads, n_embd=width, rope_theta=theta,
                     n_kv_head=need(hf, "num_key_value_heads", "count", source, 0),
                     norm_eps=need(hf, "rms_norm_eps", "positive", source),
                     tie_embeddings=need(hf, "tie_word_embeddings", "flag", source, False),
                     **LLAMA)


def hf_config(folder):
    """config.json of a Hugging Face directory -> (its dict, our GPTConfig), every field checked."""
    source = os.path.join(folder, "config.json")
    if not os.path.exists(source):
        raise ValueError(f"{folder} is not a Hugging Face model directory (no config.json)")
    hf = read_json(source)
    if hf.get("model_type") not in ("gpt2", "llama"):
        raise ValueError(f"{folder}: model_type {hf.get('model_type')!r} is not supported (gpt2 and llama are)")
    return hf, (gpt2_config if hf["model_type"] == "gpt2" else llama_config)(hf, source)

# ---------------------------------------------------------------------------------------------
# GGUF metadata


def gguf_config(meta, names, n_vocab, path):
    """llama.* metadata (the prefix taken off) -> our config; refused: scaled or partial rotary,
    experts, other head sizes. names: the file's tensor names (a head of its own: output.weight)."""
    def count(key, default=REQUIRED):
        return need(meta, key, "count", path, default, prefix="llama.")

    width, heads = count("embedding_length"), count("attention.head_count")
    head_size = width // heads
    scaling = (meta.get("rope.scaling.type", "none"), meta.get("rope.scaling.factor", 1.0))
    if scaling[0] != "none" or scaling[1] not in (0.0, 1.0) or "rope_freqs.weight" in names:
        raise unsupported(path, "llama.rope.scaling.type/factor", f"{scaling[0]}/{scaling[1]}")
    for field in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(field, head_size) != head_size:
            raise unsupported(path, f"llama.{field}", meta[field])
    if meta.get("expert_count", 0):
        raise unsupported(path, "llama.expert_count", meta["expert_count"])
    return GPTConfig(block_size=count("context_length"), vocab_size=n_vocab, n_layer=count("block_count"),
                     n_head=heads, n_kv_head=count("attention.head_count_kv", 0), n_embd=width,
                     mlp_width=count("feed_forward_length"),
                     norm_eps=need(meta, "attention.layer_norm_rms_epsilon", "positive", path, prefix="llama."),
                     rope_theta=need(meta, "rope.freq_base", "positive", path, 1e4, prefix="llama."),
                     tie_embeddings="output.weight" not in names, **LLAMA)
