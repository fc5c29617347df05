"""
Our loaders against the reference implementations: Hugging Face transformers and tokenizers write
a checkpoint (save_pretrained, Tokenizer.save), and we either load it to the same logits (1e-4) or
the same ids, or refuse it in one line that names the setting we do not implement. They are test
dependencies only (requirements-test.txt; .ci/run installs them), never imported by the project.

Checked: SmolLM2's GGUF file gives the same next-token logits (max |Δ| ≤ 1e-3 in float32), the same
greedy continuations, the same chat prompt and the same stop at <|im_end|>; tiny random Llama and
GPT-2 models (sharded too) load exactly, and every setting our model cannot compute (scaled rotary,
other activations, untied or unscaled GPT-2 attention, tokenizer normalizers, ...) is refused.

Run:  python -m pytest tests/test_reference.py -q
"""
import json
import os
import random
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="reference checks need Hugging Face transformers")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from formats import bpe  # noqa: E402
from formats import chat, checkpoints  # noqa: E402
from test_checkpoints import one_line_error  # noqa: E402
from test_checkpoints import needs_smollm2  # noqa: E402

PROMPTS = ["The capital of France is", "[MAX 2 [MIN 7 4] 1]=", "def fib(n):\n    return",
           "Über 3.14159 Äpfel, 12 345!"]


@pytest.fixture(scope="module")
def both():
    path = checkpoints.smollm2_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32,
                                                            gguf_file=os.path.basename(path)).eval()
    return checkpoints.load("smollm2-135m"), ref


@needs_smollm2
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_and_greedy_continuation_match_transformers(both, prompt):
    (model, enc), ref = both
    idx = torch.tensor([enc.encode(prompt)])
    with torch.no_grad():
        diff = (model(idx)[0] - ref(idx).logits).abs().max().item()
    print(f"{prompt!r}: max |Δlogit| {diff:.2e}")
    assert diff <= 1e-3
    ours = model.generate(idx, 16, temperature=0)
    theirs = ref.generate(idx, max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, theirs)


@needs_smollm2
def test_smollm2_tokenizer_matches_the_reference_bpe(both):
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    reader = gguf.GGUFReader(checkpoints.smollm2_path())
    tokens, merges = (reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges"))
    reference = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=[tuple(m.split(" ")) for m in merges]))
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    reference.decoder = decoders.ByteLevel()
    enc, rng = both[0][1], random.Random(0)
    alphabet = "ab 12\n\t.,'!é東🙂xyZ 0 9[]()=-"
    texts = PROMPTS + ["a  12 3.5 hello", "  leading and trailing  ", "it's 5's 'll 1st", "a\n\n1\n 2  \n3"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(2000)]
    for text in texts:
        assert enc.encode_ordinary(text) == reference.encode(text).ids, text
        assert enc.decode(enc.encode_ordinary(text)) == text


@needs_smollm2
def test_smollm2_chat_prompt_and_stop_at_end_of_turn_match_transformers(both):
    (model, enc), ref = both
    path = checkpoints.smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    question = "Question: is 41 larger than 14? Answer:"
    expected = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    ids = chat.chat_prompt(enc, question, "smollm2-135m")
    assert ids == list(expected)
    idx = torch.tensor([ids])
    ours = model.generate(idx, 40, temperature=0, stop=enc.stop_tokens)
    theirs = ref.generate(idx, max_new_tokens=40, do_sample=False)          # stops at its eos_token_id
    assert torch.equal(ours, theirs) and ours[0, -1].item() == enc.encode_single_token("<|im_end|>")
    assert ours.shape[1] < idx.shape[1] + 40                                 # it did stop early
    without = model.generate(idx, ours.shape[1] - idx.shape[1] + 3, temperature=0)
    assert "<|im_start|>" in enc.decode(without[0, ours.shape[1]:].tolist())  # without stop: a new turn

# ---------------------------------------------------------------------------------------------
# tiny random checkpoints written by transformers: loaded exactly, or refused naming the setting


def tiny_llama(tmp_path, **kw):
    """A random 2-layer Llama saved by transformers, with a tokenizer.json; -> (folder, reference)."""
    from test_checkpoints import tiny_vocab, write_llama_dir
    from test_model import random_model
    from test_checkpoints import llama_config
    config = transformers.LlamaConfig(**{**dict(vocab_size=len(tiny_vocab()), hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64, tie_word_embeddings=True), **kw})
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path / "llama")
    write_llama_dir(tmp_path / "tok", random_model(llama_config()))          # borrow its tokenizer.json
    os.replace(tmp_path / "tok" / "tokenizer.json", tmp_path / "llama" / "tokenizer.json")
    return str(tmp_path / "llama"), ref


def max_logit_diff(model, ref, vocab_size):
    idx = torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(idx)[0] - ref(idx).logits).abs().max().item()


def edit_config(folder, **changes):
    """Rewrite config.json as an older (or another) writer would have written it."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf = json.load(f)
    for key, value in changes.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    with open(path, "w") as f:
        json.dump(hf, f)


def test_tiny_random_llama_written_by_transformers_loads_to_the_same_logits(tmp_path):
    folder, ref = tiny_llama(tmp_path, rope_theta=500000.0)
    model, _ = checkpoints.load(folder)
    assert (model.config.rope_theta, model.config.n_kv_head, model.config.tie_embeddings) == (500000.0, 2, True)
    assert max_logit_diff(model, ref, 261) <= 1e-4


def test_sharded_llama_directory_loads_to_the_same_logits(tmp_path):
    single, ref = tiny_llama(tmp_path)
    folder = str(tmp_path / "sharded")
    ref.save_pretrained(folder, max_shard_size="20KB")                      # shards + an index
    os.replace(os.path.join(single, "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    assert not os.path.isfile(os.path.join(folder, "model.safetensors"))
    model, _ = checkpoints.load(folder)
    assert max_logit_diff(model, ref, 261) <= 1e-4


@pytest.mark.parametrize("rope", [{"type": "linear", "factor": 4.0},                  # older files
                                  {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_scaled_rotary_is_refused_naming_the_field(tmp_path, rope):
    folder, ref = tiny_llama(tmp_path)
    edit_config(folder, rope_parameters=None, rope_scaling=rope)
    scaled = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert max_logit_diff(scaled, ref, 261) > 1e-4                          # the field changes the model
    one_line_error("rope_scaling", checkpoints.load, folder)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_llama_hidden_act_other_than_silu_is_refused(tmp_path, act):
    folder, _ = tiny_llama(tmp_path, hidden_act=act)
    assert "hidden_act" in one_line_error(f"hidden_act = '{act}'", checkpoints.load, folder)


def tiny_gpt2(tmp_path, **kw):
    config = transformers.GPT2Config(**{**dict(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4), **kw})
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():                       # random biases and norms too, so misplaced ones show
        for p in ref.parameters():
            p.normal_(std=0.3)
    ref.save_pretrained(tmp_path / "gpt2")
    return str(tmp_path / "gpt2"), ref


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False}, {"reorder_and_upcast_attn": True},
                                {"n_inner": 48}, {"activation_function": "gelu_pytorch_tanh"}])
def test_gpt2_variants_written_by_transformers_load_to_the_same_logits(tmp_path, kw):
    folder, ref = tiny_gpt2(tmp_path, **kw)
    model = checkpoints.load_hf_dir(folder)
    assert max_logit_diff(model, ref, 61) <= 1e-4


@pytest.mark.parametrize("field, value", [("scale_attn_weights", False), ("activation_function", "relu"),
                                          ("activation_function", "gelu"), ("scale_attn_by_inverse_layer_idx", True)])
def test_gpt2_settings_our_block_cannot_compute_are_refused(tmp_path, field, value):
    folder, ref = tiny_gpt2(tmp_path, **{field: value})
    one_line_error(f"{field} = {value!r}", checkpoints.load_hf_dir, folder)

# ---------------------------------------------------------------------------------------------
# two settings for one thing: loaded as transformers itself reads them, checked on its logits

def with_head_of_its_own(folder, same_as_embedding=False):
    """Add an lm_head.weight to a tied checkpoint's model.safetensors, as an edited file has it."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    embedding = next(t for k, t in tensors.items() if k.endswith(("embed_tokens.weight", "wte.weight")))
    torch.manual_seed(2)
    tensors["lm_head.weight"] = embedding.clone() if same_as_embedding else torch.randn_like(embedding)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("make, vocab", [(tiny_llama, 261), (tiny_gpt2, 61)], ids=["llama", "gpt2"])
def test_a_tied_config_whose_file_holds_its_own_head_loads_as_transformers_does(tmp_path, make, vocab):
    folder, tied = make(tmp_path)
    assert tied.config.tie_word_embeddings
    with_head_of_its_own(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = checkpoints.load_hf_dir(folder)
    assert max_logit_diff(model, ref, vocab) <= 1e-4           # transformers ≥ 5 keeps the file's head
    assert not model.config.tie_embeddings
    with_head_of_its_own(folder, same_as_embedding=True)      # the same tensor twice: tied, as it was
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = checkpoints.load_hf_dir(folder)
    assert max_logit_diff(model, ref, vocab) <= 1e-4 and model.config.tie_embeddings


@pytest.mark.parametrize("changes", [
    dict(rope_theta=12345.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    dict(rope_theta=12345.0, rope_parameters={"rope_type": "default"}),
    dict(rope_theta=12345.0, rope_parameters=None, rope_scaling={"rope_type": "default", "rope_theta": 777.0}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 555.0}, rope_scaling={"type": "default",
                                                                                       "rope_theta": 777.0})])
def test_duplicate_rotary_settings_are_read_with_transformers_precedence(tmp_path, changes):
    folder, _ = tiny_llama(tmp_path)
    edit_config(folder, **changes)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, _ = checkpoints.load(folder)
    assert max_logit_diff(model, ref, 261) <= 1e-6


def test_a_scaled_rope_scaling_beside_a_default_rope_parameters_is_refused(tmp_path):
    folder, ref = tiny_llama(tmp_path)
    edit_config(folder, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rope_scaling={"rope_type": "linear", "factor": 4.0})
    scaled = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert max_logit_diff(scaled, ref, 261) > 1e-4                           # transformers scales
    one_line_error("rope_scaling", checkpoints.load, folder)

# ---------------------------------------------------------------------------------------------
# a config.json with a field missing, of the wrong type or out of range: one line naming it


@pytest.mark.parametrize("changes, match", [
    (dict(rms_norm_eps=None), "rms_norm_eps is missing"),
    (dict(num_attention_heads=0), "num_attention_heads = 0 must be a whole number ≥ 1"),
    (dict(hidden_size="32"), "hidden_size = '32' must be a whole number"),
    (dict(max_position_embeddings=None), "max_position_embeddings is missing"),
    (dict(num_key_value_heads=2.5), "num_key_value_heads = 2.5"),
    (dict(rms_norm_eps=-1), "rms_norm_eps = -1 must be a finite number > 0"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings = 'yes' must be true or false"),
    (dict(rope_parameters=[10000.0]), "rope_parameters = .* must be an object"),
    (dict(num_hidden_layers=True), "num_hidden_layers = True")])
def test_a_llama_config_field_missing_or_malformed_is_one_line(tmp_path, changes, match):
    folder, _ = tiny_llama(tmp_path)
    edit_config(folder, **changes)
    one_line_error(match, checkpoints.load, folder)


@pytest.mark.parametrize("changes, match", [
    (dict(n_positions=None), "n_positions is missing"), (dict(n_head=0), "n_head = 0 must be"),
    (dict(n_inner=0), "n_inner = 0 must be"), (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon")])
def test_a_gpt2_config_field_missing_or_malformed_is_one_line(tmp_path, changes, match):
    folder, _ = tiny_gpt2(tmp_path)
    edit_config(folder, **changes)
    one_line_error(match, checkpoints.load_hf_dir, folder)


@pytest.mark.parametrize("content, match", [("[1]", "holds a list, not a JSON dict"),
                                            ("{", "cannot be read as JSON"), (None, "cannot be read as JSON")])
def test_a_config_json_that_is_no_object_is_one_line(tmp_path, content, match):
    folder, _ = tiny_llama(tmp_path)
    path = os.path.join(folder, "config.json")
    os.remove(path)
    if content is None:
        os.mkdir(path)                                                     # a folder named config.json
    else:
        with open(path, "w") as f:
            f.write(content)
    one_line_error(match, checkpoints.load, folder)

# ---------------------------------------------------------------------------------------------
# tokenizers written by Hugging Face tokenizers: the same ids, or refused naming the setting


def byte_level_tokenizer(vocab_order, merges, **settings):
    """A byte-level BPE Tokenizer: the 256 byte characters, <|endoftext|>, then the merges' results
    with ids in vocab_order (a permutation of the merges' indices)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(bpe.byte_alphabet(), key=bpe.byte_alphabet().get)
    vocab = {c: i for i, c in enumerate(alphabet)}
    for rank in vocab_order:
        vocab[merges[rank][0] + merges[rank][1]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings.get("add_prefix_space", False))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    if "normalizer" in settings:
        tok.normalizer = settings["normalizer"]
    if "post_processor" in settings:
        tok.post_processor = settings["post_processor"]
    return tok


MERGES_HEL = [("h", "e"), ("e", "l"), ("l", "o"), ("he", "l"), ("hel", "lo")]


def saved_tokenizer(tmp_path, tok):
    folder = tmp_path / "tok"
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_tokenizer_with_ids_in_merge_order_gives_the_reference_ids(tmp_path):
    tok = byte_level_tokenizer(range(len(MERGES_HEL)), MERGES_HEL)
    enc = bpe.tokenizer_from_json(saved_tokenizer(tmp_path, tok))
    rng = random.Random(0)
    texts = ["hello", "hel", "hell  o", "ohel lo hello", "é hello 12"]
    texts += ["".join(rng.choice("helo é1") for _ in range(rng.randint(1, 20))) for _ in range(300)]
    for text in texts:
        assert enc.encode_ordinary(text) == tok.encode(text).ids, text


def test_tokenizer_with_ids_out_of_merge_order_is_refused(tmp_path):
    # 'el' gets a smaller id than 'he', though 'he' is merged first: the reference cuts 'hel' into
    # [he, l], ranking by id would give [h, el]
    tok = byte_level_tokenizer([1, 0], MERGES_HEL[:2])
    assert [tok.id_to_token(i) for i in tok.encode("hel").ids] == ["he", "l"]
    one_line_error("not in merge order", bpe.tokenizer_from_json, saved_tokenizer(tmp_path, tok))


def test_tokenizer_settings_we_do_not_reproduce_are_refused(tmp_path):
    from tokenizers import normalizers, processors
    cases = [("add_prefix_space", dict(add_prefix_space=True), "x", ["Ġ", "x"]),
             ("normalizer", dict(normalizer=normalizers.Lowercase()), "X", ["x"]),
             ("post_processor", dict(post_processor=processors.TemplateProcessing(
                 single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 261)])), "x", ["<|endoftext|>", "x"])]
    for i, (field, settings, text, reference) in enumerate(cases):
        tok = byte_level_tokenizer(range(len(MERGES_HEL)), MERGES_HEL, **settings)
        assert [tok.id_to_token(t) for t in tok.encode(text).ids] == reference    # it does change the ids
        one_line_error(field, bpe.tokenizer_from_json, saved_tokenizer(tmp_path / str(i), tok))
