"""
formats/bpe.py: a checkpoint's own tokenizer as a tiktoken Encoding, byte-level BPE (GPT-2's scheme)
built from the vocabulary and merges in the checkpoint's files.

    enc = tokenizer_from_gguf(reader, name)   # GGUF metadata (tokenizer.ggml.*), read by gguf
    enc = tokenizer_from_json(folder)         # a Hugging Face directory's tokenizer.json

enc.stop_tokens lists the ids that end the model's turn and enc.chat_template is its chat template
(or None). A tokenizer setting the Encoding would not reproduce exactly is refused in one line
that names it. formats/checkpoints.py builds one for each checkpoint it loads.
"""
import os

import tiktoken

from formats.tensor_files import read_json, unsupported


# ---------------------------------------------------------------------------------------------
# byte-level BPE from a vocabulary and merges

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


def check_merge_order(name, vocab, merges):
    """tiktoken merges the adjacent pair whose joined bytes have the lowest id; BPE applies the
    merges list in its order. They agree when each merge's result has a larger id than the results
    of the merges before it, and every token longer than one byte-character is a merge's result."""
    last, made = -1, set()
    for a, b in merges:
        token = a + b
        if a not in vocab or b not in vocab or token not in vocab or token in made:
            raise ValueError(f"{name}: merge {a!r} {b!r} does not make a new token of the vocabulary")
        if vocab[token] <= last:
            raise ValueError(f"{name}: its ids are not in merge order ({token!r} = {vocab[token]} is merged "
                             f"after id {last}); nanosteer's tokenizer ranks merges by id")
        last = vocab[token]
        made.add(token)
    unmade = [t for t in vocab if len(t) > 1 and t not in made]
    if unmade:
        raise ValueError(f"{name}: token {unmade[0]!r} is made by no merge; nanosteer's tokenizer would "
                         "produce it where BPE does not")


def bpe_encoding(name, vocab, merges, special, pat_str):
    """A tiktoken Encoding from vocab {byte-level token string: id}, merges [(a, b)] in order and
    special {string: id}. tiktoken's rank of a token is its id (see check_merge_order)."""
    alphabet = byte_alphabet()
    if any(c not in alphabet for token in vocab for c in token):
        raise ValueError(f"{name}: its vocabulary is not byte-level BPE (GPT-2 style); not supported")
    check_merge_order(name, vocab, merges)
    if "<|endoftext|>" not in special:
        raise ValueError(f"{name}: its tokenizer has no <|endoftext|> token, which nanosteer uses to "
                         "separate examples")
    ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items()}
    enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)
    enc.stop_tokens, enc.chat_template = [enc.eot_token], None
    return enc


def check_gguf_fields(f, name):
    """The tokenizer.* metadata of a GGUF file of the types its reader needs: a string a token, one
    whole-number type a token, merges "a b", a token id, true or false, a template string."""
    tokens, types = f["tokenizer.ggml.tokens"], f.get("tokenizer.ggml.token_type")
    merges = f.get("tokenizer.ggml.merges", [])
    fields = {"tokenizer.ggml.tokens": isinstance(tokens, list) and all(isinstance(t, str) for t in tokens),
              "tokenizer.ggml.token_type": isinstance(types, list) and isinstance(tokens, list)
              and len(types) == len(tokens) and all(type(t) is int for t in types),
              "tokenizer.ggml.merges": isinstance(merges, list) and all(map(is_merge, merges)),
              "tokenizer.ggml.eos_token_id": f.get("tokenizer.ggml.eos_token_id") is None
              or is_id(f["tokenizer.ggml.eos_token_id"]),
              "tokenizer.chat_template": isinstance(f.get("tokenizer.chat_template", ""), str)}
    fields.update({k: isinstance(f.get(k, False), bool) for k in ("tokenizer.ggml.add_bos_token",
                                                                  "tokenizer.ggml.add_space_prefix")})
    bad = [field for field, ok in fields.items() if not ok]
    if bad:
        raise ValueError(f"{name}: {bad[0]} is missing or malformed: the file is damaged")


def tokenizer_from_gguf(reader, name):
    """GGUF metadata: every token (type 1 normal, 3 control, 4 user-defined), the merges, the
    pre-tokenizer's name, the end-of-turn token and the chat template."""
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in f:
        raise ValueError(f"{name} has no tokenizer (no tokenizer.ggml.tokens): nanosteer needs one")
    if "tokenizer.ggml.pre" not in f:
        raise ValueError(f"{name}: tokenizer.ggml.pre is missing, so how its text is split before BPE "
                         "is unknown; re-convert it with a recent llama.cpp")
    if f.get("tokenizer.ggml.model") != "gpt2" or f["tokenizer.ggml.pre"] not in ("gpt2", "smollm"):
        raise unsupported(name, "tokenizer.ggml.model/pre",
                          f"{f.get('tokenizer.ggml.model')}/{f['tokenizer.ggml.pre']}")
    check_gguf_fields(f, name)
    for field in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"):
        if f.get(field):
            raise unsupported(name, field, f[field])
    tokens = list(zip(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]))
    vocab = {t: i for i, (t, kind) in enumerate(tokens) if kind == 1}
    special = {t: i for i, (t, kind) in enumerate(tokens) if kind in (3, 4)}
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges", [])]    # each "a b" (checked)
    split = DIGITS_SPLIT if f["tokenizer.ggml.pre"] == "smollm" else GPT2_SPLIT
    enc = bpe_encoding(name, vocab, merges, special, split)
    eos = f.get("tokenizer.ggml.eos_token_id")
    enc.stop_tokens = sorted({enc.eot_token} | ({int(eos)} if eos is not None else set()))
    enc.chat_template = f.get("tokenizer.chat_template")
    return enc


def is_merge(m):
    """One entry of tokenizer.json's merges: "a b", or ["a", "b"] (newer files)."""
    pair = m.split(" ") if isinstance(m, str) else m
    return isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)


def is_id(i):
    """A token id: a whole number that tiktoken can hold (no bool: JSON's true is not 1)."""
    return type(i) is int and 0 <= i < 2 ** 31


def check_parts(tok, path):
    """Every part of tokenizer.json our reader reads, of the type it needs, before it is read."""
    model, added = tok.get("model"), tok.get("added_tokens", [])
    parts = {"model": isinstance(model, dict),
             "model.vocab": isinstance(model, dict) and isinstance(model.get("vocab"), dict)
             and all(map(is_id, model["vocab"].values())),
             "model.merges": isinstance(model, dict) and isinstance(model.get("merges"), list)
             and all(map(is_merge, model["merges"])),
             "added_tokens": isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                             and is_id(t.get("id")) for t in added)}
    for name, inner in (("normalizer", None), ("post_processor", "processors"), ("pre_tokenizer", "pretokenizers")):
        value = tok.get(name) or {}
        listed = value.get(inner, [value]) if isinstance(value, dict) and inner else [value]
        parts[name] = isinstance(listed, list) and all(isinstance(p, dict) for p in listed) and listed != []
    bad = [name for name, ok in parts.items() if not ok]
    if bad:
        raise ValueError(f"{path}: its {bad[0]} is missing or malformed: the file is damaged or not a BPE tokenizer")


def check_tokenizer_json(tok, path):
    """Refuse every setting of tokenizer.json that our Encoding would not reproduce."""
    check_parts(tok, path)
    model = tok["model"]
    if model.get("type") != "BPE":
        raise unsupported(path, "model.type", model.get("type"))
    for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(field):
            raise unsupported(path, f"model.{field}", model[field])
    if tok.get("normalizer"):
        raise unsupported(path, "normalizer", tok["normalizer"].get("type", tok["normalizer"]))
    post = tok.get("post_processor") or {"type": "ByteLevel"}      # ByteLevel: offsets only, no ids
    for part in post.get("processors", [post]):
        if part.get("type") != "ByteLevel":
            raise unsupported(path, "post_processor", part.get("type"))
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds not in (["ByteLevel"], ["Digits", "ByteLevel"]):
        raise unsupported(path, "pre_tokenizer", "+".join(map(str, kinds)))
    if kinds[0] == "Digits" and not parts[0].get("individual_digits"):
        raise unsupported(path, "pre_tokenizer Digits.individual_digits", parts[0].get("individual_digits"))
    if parts[-1].get("add_prefix_space") or parts[-1].get("use_regex") is False:
        raise unsupported(path, "pre_tokenizer ByteLevel add_prefix_space/use_regex",
                          f"{parts[-1].get('add_prefix_space')}/{parts[-1].get('use_regex')}")
    not_special = [t["content"] for t in tok.get("added_tokens", []) if not t.get("special")]
    if not_special:
        raise unsupported(path, "added_tokens (not special)", not_special[0])
    return kinds


def tokenizer_from_json(folder):
    """Hugging Face's tokenizer.json: a BPE model (vocab, merges), its added tokens and the
    pre-tokenizer; end-of-turn ids from config.json / generation_config.json."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no tokenizer.json: nanosteer needs the model's own tokenizer")
    tok = read_json(path)
    kinds = check_tokenizer_json(tok, path)
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if t not in special}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tok["model"]["merges"]]
    enc = bpe_encoding(folder, vocab, merges, special, DIGITS_SPLIT if kinds[0] == "Digits" else GPT2_SPLIT)
    stop = {enc.eot_token}
    for name in ("config.json", "generation_config.json"):
        eos = read_json(os.path.join(folder, name)).get("eos_token_id")
        stop |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tok_config = read_json(os.path.join(folder, "tokenizer_config.json"))
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos      # older files: an AddedToken dict
    if eos in special:
        stop.add(special[eos])
    enc.stop_tokens, enc.chat_template = sorted(stop), tok_config.get("chat_template")
    return enc
