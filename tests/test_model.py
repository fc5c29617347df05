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
from model import GPT, GPTConfig, gelu, gelu_prime  # noqa: E402

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
    assert logits.shape == (2, 12, config.vocab_size)
    keep = targets != -1
    reference = -torch.log_softmax(logits, dim=-1)[keep].gather(1, targets[keep][:, None]).mean()
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
def test_save_then_from_pretrained_reproduces_logits(tmp_path, mlp):
    config = tiny_config(mlp=mlp)
    model = random_model(config)
    path = str(tmp_path / "ckpt.pt")
    model.save(path, tokenizer="bytes")
    loaded = GPT.from_pretrained(path).eval()
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
            GPT.from_pretrained(str(tmp_path / f"{name}.pt"))
        assert "\n" not in str(e.value)
