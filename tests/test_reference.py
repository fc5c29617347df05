"""
Our loaders against a reference implementation: Hugging Face transformers (and tokenizers). They
are references, never dependencies: these tests skip unless transformers is installed, so run them
in a side environment, e.g.

    python -m venv --system-site-packages /tmp/ref && /tmp/ref/bin/pip install transformers
    /tmp/ref/bin/python -m pytest tests/test_reference.py -q

Checked: SmolLM2's GGUF file gives the same next-token logits (max |Δ| ≤ 1e-3 in float32) and the
same 16-token greedy continuations in both; a random tiny Llama written by transformers loads to
logits within 1e-4; our tokenizer gives the reference BPE's ids on thousands of strings.
"""
import os
import random
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="reference checks need Hugging Face transformers")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import checkpoints  # noqa: E402
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


def test_tiny_random_llama_written_by_transformers_loads_to_the_same_logits(tmp_path):
    from test_checkpoints import tiny_vocab, write_llama_dir
    config = transformers.LlamaConfig(vocab_size=len(tiny_vocab()), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path / "llama", safe_serialization=True)
    from test_model import random_model
    from test_checkpoints import llama_config
    write_llama_dir(tmp_path / "tok", random_model(llama_config()))          # borrow its tokenizer.json
    os.replace(tmp_path / "tok" / "tokenizer.json", tmp_path / "llama" / "tokenizer.json")
    model, _ = checkpoints.load(str(tmp_path / "llama"))
    assert (model.config.rope_theta, model.config.n_kv_head, model.config.tie_embeddings) == (500000.0, 2, True)
    idx = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(idx)[0] - ref(idx).logits).abs().max().item()
    print(f"tiny random Llama: max |Δlogit| {diff:.2e}")
    assert diff <= 1e-4


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
