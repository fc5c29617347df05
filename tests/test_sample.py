"""
Sampling: GPT.generate with temperature and top-k draws from the distribution it claims (counted
over many draws with a fixed seed: top-k samples exactly the k most likely tokens, all of them;
the frequencies follow softmax(logits / T)), and sample.py continues a prompt greedily as the
model does, with the adapters of a file in place, prints a single sample as it comes (whole
characters only) and its speed, and fails on bad input with a one-line error.

Run:  python -m pytest tests/test_sample.py -q
"""
import io

import pytest
import torch
import torch.nn.functional as F

from formats import adapters, chat
import nanosteer
import sample
from conftest import run_script
from model import GPT, GPTConfig
from tasks import byte_encoding

torch.set_num_threads(1)

CONFIG = GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32)
PROMPT = torch.tensor([[3, 14, 15, 9, 26]])


@pytest.fixture(scope="module")
def peaked():
    """A random model whose next-token logits spread over several units, so that temperature and
    top-k change the distribution by far more than the sampling noise of the tests below."""
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(5)          # tied: also scales the output head
        logits = model(PROMPT)[0][0, -1]
    return model, logits


def draw(model, n, seed=0, **kw):
    """n next tokens after PROMPT, drawn independently (one batch of n identical rows)."""
    torch.manual_seed(seed)
    return model.generate(PROMPT.repeat(n, 1), max_new_tokens=1, **kw)[:, -1]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_samples_exactly_the_k_most_likely_tokens(peaked, k):
    model, logits = peaked
    top = set(torch.topk(logits, k).indices.tolist())
    assert torch.softmax(logits, -1)[list(top)].sum() < 0.99    # without top-k others would appear
    drawn = draw(model, 4000, temperature=1.0, top_k=k)
    assert set(drawn.tolist()) == top                           # never another token, and every one of the k
    # and in the proportions of the softmax over those k alone
    counts = torch.bincount(drawn, minlength=CONFIG.vocab_size).float() / len(drawn)
    renormalised = torch.zeros_like(counts)
    renormalised[list(top)] = torch.softmax(logits[list(top)], -1)
    assert (counts - renormalised).abs().max() < 0.03


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_temperature_samples_softmax_of_logits_over_T(peaked, T):
    model, logits = peaked
    expected, untempered = F.softmax(logits / T, -1), F.softmax(logits, -1)
    counts = torch.bincount(draw(model, 20000, temperature=T), minlength=CONFIG.vocab_size).float() / 20000
    assert (counts - expected).abs().max() < 0.015              # ~5 standard deviations of a count
    assert (counts - untempered).abs().max() > 0.05             # the temperature did matter


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others(peaked):
    model, _ = peaked
    a, b, c = draw(model, 64, seed=1, temperature=1.0), draw(model, 64, seed=1, temperature=1.0), \
        draw(model, 64, seed=2, temperature=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# sample.py


@pytest.fixture(scope="module")
def adapter_file(tiny_base, tmp_path_factory):
    """An adapter file for tiny_base: a block_out shift with random U and a LoRA with random B."""
    model = nanosteer.freeze(GPT.load(str(tiny_base)))
    torch.manual_seed(1)
    with torch.no_grad():
        for shift in nanosteer.steer(model, "block_out", "linear", rank=4):
            shift.U.normal_(std=2.0)
        for layer in nanosteer.lora(model, rank=2, targets=("mlp.c_proj",)):
            layer.lora_B.normal_(std=2.0)
    path = tmp_path_factory.mktemp("adapters") / "adapters.pt"
    adapters.save(model, str(path))
    return path


def greedy_by_hand(model, text, n):
    """<eot> + text, n greedy tokens with repeated argmax, cut at the first <eot>, decoded."""
    enc = byte_encoding()
    idx = torch.tensor([[enc.eot_token] + enc.encode_ordinary(text)])
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    new = idx[0, len(text) + 1:].tolist()
    return enc.decode(new[:new.index(enc.eot_token)] if enc.eot_token in new else new)


def test_greedy_sample_py_continues_as_the_model_does_with_and_without_adapters(tiny_base, adapter_file):
    prompt = "[MIN 8 5 9]>4?"
    argv = ["--init", str(tiny_base), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
            "--device", "cpu"]
    base = GPT.load(str(tiny_base)).eval()
    adapted = adapters.load(GPT.load(str(tiny_base)), str(adapter_file)).eval()
    plain, steered = sample.sample(sample.parse_args(argv)), sample.sample(sample.parse_args(
        argv + ["--adapters", str(adapter_file)]))
    assert plain == [greedy_by_hand(base, prompt, 12)] and steered == [greedy_by_hand(adapted, prompt, 12)]
    assert plain != steered                                    # the adapters do act


def test_sampled_text_is_seeded(tiny_base):
    argv = ["--init", str(tiny_base), "--prompt", "ab", "--temperature", "1.5", "--top-k", "20",
            "--num-samples", "3", "--max-new-tokens", "8", "--device", "cpu"]
    one, again = (sample.sample(sample.parse_args(argv + ["--seed", "4"])) for _ in range(2))
    other = sample.sample(sample.parse_args(argv + ["--seed", "5"]))
    assert len(one) == 3 and one == again and one != other


def test_sample_py_prints_prompt_and_continuation(tiny_base, adapter_file):
    argv = ["--init", tiny_base, "--adapters", adapter_file, "--prompt", "[MAX 1 2]=", "--temperature", "0",
            "--max-new-tokens", "6", "--device", "cpu"]
    proc = run_script("sample.py", *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (expected,) = sample.sample(sample.parse_args([str(a) for a in argv]))
    assert proc.stdout == "[MAX 1 2]=" + expected + "\n"
    assert proc.stderr.startswith("sample.py: 6 tokens in ") and proc.stderr.endswith(" tokens/s (the prompt's pass included)\n")


class Recorder(io.StringIO):
    """A file that keeps each piece written to it."""
    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)
        return super().write(text)


@pytest.mark.parametrize("text, cut, whole", [("é→ok 🙂", 0, ["é", "→", "🙂"]), ("a🙂", 2, ["a"])])
def test_a_single_sample_streams_whole_characters_only(tiny_base, monkeypatch, capsys, text, cut, whole):
    """The byte tokenizer's tokens are single bytes, so 'é' comes as 2 tokens, '🙂' as 4: each is
    printed once complete; a character cut off by the last token ends as U+FFFD, as decode gives."""
    ids = list(text.encode())[:len(text.encode()) - cut]

    def stream(model, idx, *args):
        for token in ids:
            yield torch.tensor([[token]])
    monkeypatch.setattr(GPT, "stream", stream)
    out = Recorder()
    argv = ["--init", str(tiny_base), "--prompt", "ab", "--temperature", "0", "--device", "cpu"]
    (returned,) = sample.sample(sample.parse_args(argv), out)
    assert returned == byte_encoding().decode(ids) and out.getvalue() == "ab" + returned + "\n"
    pieces = [piece for piece in out.pieces if piece]             # print writes text and end apart
    assert "\ufffd" not in "".join(pieces[:-2])                   # no half character before the end
    assert all(character in pieces for character in whole)        # each printed in one piece
    assert f"sample.py: {len(ids)} tokens in " in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "--temperature a finite number ≥ 0"),
    (["--temperature", "nan"], "--temperature a finite number ≥ 0"),
    (["--temperature", "inf"], "--temperature a finite number ≥ 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be ≥ 0"),
    (["--top-k", "0"], "--top-k must be positive"),
    (["--num-samples", "0"], "--num-samples must be positive"),
    (["--adapters", "missing.pt"], "adapter file missing.pt does not exist"),
    (["--init", "missing.pt"], "missing.pt does not exist"),
    (["--max-new-tokens", "1000"], "exceed the model's context of 128 tokens: use --max-new-tokens ≤ 126"),
    (["--max-new-tokens", "100000000"], "--max-new-tokens 100000000 is out of range: it must be at most 100,000"),
    (["--num-samples", "100000000"], "--num-samples 100000000 is out of range: it must be at most 1,000"),
    (["--chat"], "carries no chat template"),
])
def test_bad_input_is_a_one_line_error(tiny_base, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--init", str(tiny_base), "--prompt", "x", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("sample.py: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_arguments_are_refused_before_the_model_is_loaded(monkeypatch, capsys):
    def never(*args):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(sample.checkpoints, "load", never)
    for bad in (["--temperature", "nan"], ["--num-samples", "-3"], ["--max-new-tokens", "-1"]):
        with pytest.raises(SystemExit) as e:
            sample.main(["--prompt", "x", *bad])
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1

# ---------------------------------------------------------------------------------------------
# where generation ends: the model's own end-of-text / end-of-turn tokens


def continuation(model, prompt, n, stop=(), seed=3):
    torch.manual_seed(seed)                 # the same draws with and without stop, up to the stop
    return model.generate(prompt, n, temperature=2.0, stop=stop)[:, prompt.shape[1]:]


def test_generate_stops_at_a_stop_token_and_ended_rows_repeat_it(peaked):
    model, _ = peaked
    free = continuation(model, PROMPT, 12)[0].tolist()
    k = next(k for k in range(1, 12) if free[k] not in free[:k])      # first appears at k ≥ 1
    assert continuation(model, PROMPT, 12, stop=[free[k]])[0].tolist() == free[:k + 1]
    # two rows, greedy: alone, the first repeats 9 and the second 33 (checked), so with stop [9]
    # the first ends at once and repeats its 9 while the second runs on; with [9, 33] both end
    rows = torch.tensor([[3, 14, 15, 9], [1, 2, 40, 33]])
    assert model.generate(rows, 3, temperature=0)[:, 4:].tolist() == [[9, 9, 9], [33, 33, 33]]
    out = model.generate(rows, 6, temperature=0, stop=[9])[:, 4:]
    assert out.shape[1] == 6 and out[0].tolist() == [9] * 6 and 9 not in out[1].tolist()
    assert model.generate(rows, 6, temperature=0, stop=[9, 33])[:, 4:].shape[1] == 1


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    """A tiny GGUF with <|im_start|>, <|im_end|> and a ChatML template; its first greedy token after
    a prompt is declared its eos_token_id, so a generation that stops there stops at once."""
    pytest.importorskip("gguf")
    from test_checkpoints import llama_config, tiny_vocab, write_gguf
    from test_model import random_model
    folder = tmp_path_factory.mktemp("chat")
    model = random_model(llama_config(vocab_size=len(tiny_vocab()) + 2))
    plain = write_gguf(folder / "plain.gguf", model)
    argv = ["--init", plain, "--prompt", "the", "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu"]
    enc = sample.checkpoints.load(plain)[1]
    first = enc.encode_ordinary(sample.sample(sample.parse_args(argv))[0])[0]
    template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
                "'<|im_start|>system\nBe brief<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + "
                "'\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    path = write_gguf(folder / "chat.gguf", model,
                      extra=lambda w: (w.add_eos_token_id(first), w.add_chat_template(template)))
    return plain, path, argv


def test_sample_py_stops_at_the_models_own_end_of_turn(chat_gguf):
    plain, path, argv = chat_gguf
    (runs_on,) = sample.sample(sample.parse_args(argv))
    (stopped,) = sample.sample(sample.parse_args(argv[:1] + [path] + argv[2:]))
    assert len(runs_on) > 0 and stopped == ""                     # its eos came first


def test_chat_renders_the_chatml_turns_with_the_templates_system_message(chat_gguf):
    _, path, _ = chat_gguf
    enc = sample.checkpoints.load(path)[1]
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")
    ids = chat.chat_prompt(enc, "hi <|im_end|>", path)
    assert ids == ([start] + enc.encode_ordinary("system\nBe brief") + [end] + enc.encode_ordinary("\n")
                   + [start] + enc.encode_ordinary("user\nhi <|im_end|>") + [end] + enc.encode_ordinary("\n")
                   + [start] + enc.encode_ordinary("assistant\n"))   # the prompt's '<|im_end|>' stays text

# ---------------------------------------------------------------------------------------------
# GPT.forward on bad ids and on a batch without targets; exact_match on a row without targets


def test_token_ids_outside_the_vocabulary_are_a_one_line_error(peaked):
    model, _ = peaked
    for bad in (CONFIG.vocab_size, -1):
        with pytest.raises(ValueError, match=r"token ids must lie in 0\.\.60") as e:
            model(torch.tensor([[1, 2, bad]]))
        assert "\n" not in str(e.value)


def test_a_batch_whose_targets_are_all_masked_has_loss_zero_and_no_match(peaked):
    from tasks import exact_match
    model, _ = peaked
    model = GPT(CONFIG)
    y = torch.full_like(PROMPT, -1)
    logits, loss = model(PROMPT, y)
    assert loss.item() == 0.0
    loss.backward()                                               # a graph, with zero gradients
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    y2 = torch.cat([y, PROMPT])                                   # row 0 no target, row 1 all right?
    logits2 = model(torch.cat([PROMPT, PROMPT]))[0].detach()
    y2[1] = logits2[1].argmax(-1)
    assert exact_match(logits2, y2).tolist() == [False, True]
