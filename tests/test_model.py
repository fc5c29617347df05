"""
Tests of model.py, the GPT-2 in plain PyTorch: the GELU formula, causality, init, greedy
generation, the Llama-family switches, and our own checkpoint files (other formats:
tests/test_checkpoints.py).

Run:  python -m pytest tests/test_model.py -q
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from model import GPT, GPTConfig, gelu, gelu_prime, rotary  # noqa: E402

torch.set_num_threads(1)  # tensors this small run faster on one thread than on a busy pool

def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32), **kw})


def random_model(config, seed=0):
    """A model whose every parameter is random, biases and LayerNorms included, so that a
    weight loaded into the wrong place (or left untransposed) shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tokens(config, B=2, T=12, seed=1):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the forward pass


def test_gelu_is_gpt2_tanh_approximation():
    u = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    formula = 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
    torch.testing.assert_close(gelu(u), formula, rtol=0, atol=1e-12)
    assert (gelu(u) - F.gelu(u)).abs().max() > 1e-5   # and it is not the exact erf GELU


def test_gelu_prime_is_the_derivative_of_gelu():
    u = torch.linspace(-8, 8, 2001, dtype=torch.float64, requires_grad=True)
    (autograd,) = torch.autograd.grad(gelu(u).sum(), u)
    torch.testing.assert_close(gelu_prime(u.detach()), autograd, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_causal_future_tokens_do_not_change_past_logits(mlp):
    config = tiny_config(mlp=mlp)
    model = random_model(config)
    idx = tokens(config)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % config.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # the change does reach the later positions


def test_loss_is_cross_entropy_ignoring_minus_one():
    config = tiny_config()
    model = random_model(config)
    idx, targets = tokens(config), tokens(config, seed=2)
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    assert logits.shape == (keep.sum(), config.vocab_size)        # the head runs at targets only
    every_position, no_loss = model(idx)
    assert every_position.shape == (2, 12, config.vocab_size) and no_loss is None
    torch.testing.assert_close(logits, every_position[keep], rtol=0, atol=1e-6)
    reference = -torch.log_softmax(every_position, dim=-1)[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)


def test_too_long_sequence_is_a_one_line_error():
    config = tiny_config()
    with pytest.raises(ValueError, match="block_size") as e:
        GPT(config)(torch.zeros(1, config.block_size + 1, dtype=torch.long))
    assert "\n" not in str(e.value)


def test_init_weights_is_gpt2_init():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, n_embd=128)
    model = GPT(config)
    block = model.transformer.h[0]
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.001
    for proj in (block.attn.c_proj, block.mlp.c_proj):  # residual projections: 0.02 / sqrt(2 L)
        assert abs(proj.weight.std().item() - 0.02 / math.sqrt(2 * config.n_layer)) < 0.0005
    assert torch.equal(block.ln_1.weight, torch.ones(128)) and torch.equal(block.ln_1.bias, torch.zeros(128))
    assert torch.equal(block.attn.c_attn.bias, torch.zeros(3 * 128))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


# ---------------------------------------------------------------------------------------------
# generate


def test_generate_greedy_is_repeated_argmax():
    config = tiny_config()
    model = random_model(config)
    prompt = tokens(config, T=10)
    out = model.generate(prompt, max_new_tokens=10, temperature=0)  # runs past block_size = 16
    idx = prompt
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(idx[:, -config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)
    # sampling restricted to the single most likely token is greedy decoding too
    assert torch.equal(model.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=1), idx)


# ---------------------------------------------------------------------------------------------
# checkpoints: our own format


@pytest.mark.parametrize("mlp", ["gelu", "glu"])
def test_save_then_load_reproduces_logits(tmp_path, mlp):
    config = tiny_config(mlp=mlp)
    model = random_model(config)
    path = str(tmp_path / "ckpt.pt")
    model.save(path, tokenizer="bytes")
    loaded = GPT.load(path).eval()
    assert loaded.config == config
    idx = tokens(config)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert not os.path.exists(path + ".tmp")


def test_a_checkpoint_that_does_not_match_its_config_is_a_one_line_error(tmp_path):
    model = GPT(tiny_config())
    for name, change in (("shape", lambda c, sd: sd.update({"transformer.wte.weight": torch.zeros(3, 3)})),
                         ("field", lambda c, sd: c.update({"n_experts": 8}))):
        config, state = dict(model.config.__dict__), dict(model.state_dict())
        change(config, state)
        torch.save(dict(config=config, model=state), tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match="does not match its own config") as e:
            GPT.load(str(tmp_path / f"{name}.pt"))
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the Llama-family switches, each checked against an independent computation

def llama_tiny(**kw):
    return tiny_config(**{**dict(n_head=4, n_kv_head=2, mlp_width=48, bias=False, mlp="glu", norm="rmsnorm",
                                 pos="rotary", rope_theta=500000.0), **kw})


def test_llama_config_builds_a_llama_block():
    model = random_model(llama_tiny(tie_embeddings=False))
    block = model.transformer.h[0]
    assert "wpe" not in model.transformer and model.lm_head.weight is not model.transformer.wte.weight
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert isinstance(block.ln_1, torch.nn.RMSNorm) and isinstance(model.transformer.ln_f, torch.nn.RMSNorm)
    assert block.attn.c_attn.weight.shape == (32 + 2 * 2 * 8, 32)         # q: 4 heads, k and v: 2 heads of 8
    assert block.mlp.c_gate.weight.shape == block.mlp.c_fc.weight.shape == (48, 32)
    assert block.mlp.c_proj.weight.shape == (32, 48) and model.config.d_mlp == 48


def test_rmsnorm_is_x_over_its_root_mean_square():
    norm = random_model(llama_tiny()).transformer.h[0].ln_2
    x = torch.randn(3, 5, 32)
    reference = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), reference, rtol=0, atol=1e-6)


def test_rotary_turns_pairs_i_and_i_plus_half_by_position_times_frequency():
    theta, T, hs = 500000.0, 7, 8
    x = torch.randn(1, 2, T, hs, dtype=torch.float64)
    out = rotary(x, theta)
    for t in range(T):
        for i in range(hs // 2):
            a = t * theta ** (-2 * i / hs)
            z = torch.complex(x[..., t, i], x[..., t, i + hs // 2]) * torch.exp(torch.tensor(1j * a))
            torch.testing.assert_close(out[..., t, i], z.real, rtol=0, atol=1e-6)
            torch.testing.assert_close(out[..., t, i + hs // 2], z.imag, rtol=0, atol=1e-6)
    # so q·k depends only on the distance between the two positions
    q, k = torch.randn(hs, dtype=torch.float64), torch.randn(hs, dtype=torch.float64)
    rq, rk = rotary(q.expand(1, 1, T, hs), theta)[0, 0], rotary(k.expand(1, 1, T, hs), theta)[0, 0]
    torch.testing.assert_close(rq[5] @ rk[3], rq[4] @ rk[2])


def test_grouped_query_attention_matches_repeated_heads_by_hand():
    config = llama_tiny()
    attn = random_model(config).transformer.h[0].attn
    x = torch.randn(2, 9, 32)
    q, k, v = attn.c_attn(x).split([32, 16, 16], dim=2)
    q = rotary(q.view(2, 9, 4, 8).transpose(1, 2), config.rope_theta)
    k = rotary(k.view(2, 9, 2, 8).transpose(1, 2), config.rope_theta).repeat_interleave(2, dim=1)
    v = v.view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)     # heads 0, 1 share kv head 0
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -float("inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(attn(x), attn.c_proj(y), rtol=0, atol=1e-5)


def test_llama_model_is_causal():
    config = llama_tiny()
    model, idx = random_model(config), tokens(config)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("field, value, message", [
    ("mlp", "swiglu", "unknown mlp 'swiglu'"), ("norm", "batchnorm", "unknown norm"), ("pos", "alibi", "unknown pos"),
    ("n_kv_head", 3, "multiple of n_kv_head"), ("n_head", 5, "multiple of n_head")])
def test_a_bad_config_is_a_one_line_value_error(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        tiny_config(**{field: value})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="even head size"):
        tiny_config(n_head=4, n_embd=36, pos="rotary")


# ---------------------------------------------------------------------------------------------
# hazards: saving a model that holds adapters; a probe that raises

def test_saving_a_model_with_adapters_says_what_is_wrong_and_writes_nothing(tmp_path):
    import nanosteer
    for attach in (lambda m: nanosteer.steer(m, "block_out", "linear", 2), lambda m: nanosteer.lora(m, 2)):
        model = random_model(tiny_config())
        attach(model)
        path = str(tmp_path / "model.pt")
        with pytest.raises(ValueError, match="holds adapters .* adapters.save") as e:
            model.save(path)
        assert "\n" not in str(e.value) and not os.path.exists(path) and not os.path.exists(path + ".tmp")


def test_block_run_empties_the_slot_even_when_the_forward_raises():
    block = random_model(tiny_config()).transformer.h[0]

    def broken(s):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        block.probe(torch.randn(1, 3, 32), "mlp_out", broken)
    slot = block.slots["mlp_out"]
    assert slot.shift is None and slot.recording is False and slot.activation is None


BASE_SHA256 = "65eb2fe77e18ee41e7657d0e5988adb4f7ca987327e09a424e5cdde46fdb0107"


def test_the_committed_base_model_is_the_one_results_md_records(tmp_path):
    """results/base/model.pt, the lessons' base model: its sha256 is the one RESULTS.md gives, and
    GPT.save writes the same bytes again (a save is reproducible: the same tensors, the same file)."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "results", "base", "model.pt")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == BASE_SHA256
    with open(os.path.join(root, "RESULTS.md"), encoding="utf-8") as f:
        assert BASE_SHA256 in f.read()
    GPT.load(path).save(str(tmp_path / "again.pt"))
    assert hashlib.sha256((tmp_path / "again.pt").read_bytes()).hexdigest() == BASE_SHA256
