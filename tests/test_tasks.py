"""
Tests of tasks.py: the byte-level tokenizer round-trips any text, the built-in tasks are seeded,
keep val/test out of train and have correct answers (checked by an evaluator written here),
pack() targets exactly the completion and its closing <eot>, exact_match agrees with real greedy
generation, and the JSONL loader and pack() fail with one-line messages that name the line.

Run:  python -m pytest tests/test_tasks.py -q
"""
import json
import math
import re

import pytest
import torch

from model import GPT, GPTConfig
from tasks import TASKS, byte_encoding, exact_match, get_tokenizer, load_jsonl, make_splits, pack

torch.set_num_threads(1)  # tensors this small run faster on one thread than on a busy pool

EOT = 256

# ---------------------------------------------------------------------------------------------
# tokenizer

TEXTS = ["", "a", "[MAX 2 [MIN 7 4] 1]=", "  two  spaces\tand a tab\n", "héllo wörld", "naïve café — ✓",
         "日本語のテキスト", "emoji 🙂🚀 and ünïcödé mixed", "<|endoftext|> is just text here"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_encoding_is_utf8_bytes_and_round_trips(text):
    enc = byte_encoding()
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))  # one token per byte, no merges
    assert enc.decode(ids) == text


def test_byte_encoding_has_eot_256_and_257_tokens():
    for enc in (byte_encoding(), get_tokenizer("bytes")):
        assert enc.eot_token == EOT
        assert enc.n_vocab == 257
        assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
        assert enc.decode([104, 105, EOT]) == "hi<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# an evaluator of our own for the built-in tasks' expressions

LIST = re.compile(r"\[(MAX|MIN|MED)((?: \d)+)\]")  # a list with no list inside it


def value_of(op, xs):
    xs = sorted(xs)
    # MED is the lower median: the ceil(n/2)-th smallest
    return {"MAX": xs[-1], "MIN": xs[0], "MED": xs[math.ceil(len(xs) / 2) - 1]}[op]


def reduce_lists(expr):
    """Evaluate a bracketed expression innermost list first. Returns the value of each list in
    the order they were reduced (the last one is the whole expression's value)."""
    values = []
    while "[" in expr:
        m = LIST.search(expr)
        assert m, f"not a list expression: {expr!r}"
        values.append(value_of(m.group(1), [int(d) for d in m.group(2).split()]))
        expr = expr[:m.start()] + str(values[-1]) + expr[m.end():]
    assert expr == str(values[-1]), f"left over after evaluating: {expr!r}"
    return values


def test_our_evaluator_on_hand_worked_examples():
    assert reduce_lists("[MAX 2 [MIN 7 4] 1]") == [4, 4]
    assert reduce_lists("[MIN 2 [MAX 7 4] 1]") == [7, 1]
    assert reduce_lists("[MED 3 7 1]") == [3]
    assert reduce_lists("[MED 3 7 1 9]") == [3]       # lower median of 1 3 7 9
    assert reduce_lists("[MED 5 [MED 8 0] 9 6]") == [0, 5]


def expected_completion(task, prompt):
    """The answer to a built-in task's prompt, worked out from the prompt alone."""
    compare = re.fullmatch(r"(\d+)>(\d+)\?", prompt)
    if task == "pretrain" and compare:
        a, b = map(int, compare.groups())
        return "yes" if a > b else "no"
    if task in ("pretrain", "listops", "arith"):
        assert prompt.endswith("=")
        values = reduce_lists(prompt[:-1])
        assert len(values) == (1 if task == "pretrain" else 2), prompt  # flat, or depth 2
        return f"{values[0]},{values[1]}" if task == "arith" else str(values[-1])
    if task == "boolq":
        m = re.fullmatch(r"(\[.*\])>(\d)\?", prompt)
        values = reduce_lists(m.group(1))
        assert len(values) == 1, prompt
        return "yes" if values[0] > int(m.group(2)) else "no"
    raise AssertionError(f"no evaluator for task {task}")


# ---------------------------------------------------------------------------------------------
# built-in tasks


def test_the_four_built_in_tasks_exist():
    assert set(TASKS) == {"pretrain", "listops", "arith", "boolq"}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_completions_are_correct(task):
    splits = make_splits(task, seed=0, n_train=400, n_eval=100)
    examples = splits["train"] + splits["val"] + splits["test"]
    for prompt, completion in examples:
        assert completion == expected_completion(task, prompt), prompt
    completions = {c for _, c in examples}
    if task in ("pretrain", "boolq"):  # both answers occur, so "always no" would have failed above
        assert {"yes", "no"} <= completions
    if task != "boolq":
        ops = {op for p, _ in examples for op in re.findall(r"MAX|MIN|MED", p)}
        assert ops == {"MAX", "MIN", "MED"}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_splits_are_seeded(task):
    a = make_splits(task, seed=0, n_train=300, n_eval=50)
    b = make_splits(task, seed=0, n_train=300, n_eval=50)
    c = make_splits(task, seed=1, n_train=300, n_eval=50)
    assert [len(a[k]) for k in ("train", "val", "test")] == [300, 50, 50]
    assert a == b
    for k in ("train", "val", "test"):
        assert a[k] != c[k], k


@pytest.mark.parametrize("task", sorted(TASKS))
def test_val_and_test_prompts_never_appear_in_train(task):
    splits = make_splits(task, seed=0, n_train=2000, n_eval=200)
    train = {p for p, _ in splits["train"]}
    val, test = [p for p, _ in splits["val"]], [p for p, _ in splits["test"]]
    assert len(set(val)) == len(val) and len(set(test)) == len(test)
    assert not set(val) & set(test)
    assert not train & set(val)
    assert not train & set(test)
    if task in ("pretrain", "boolq"):
        # the test has teeth: these prompt spaces are small enough that another seed's held-out
        # prompts do land in this train set, so the split must be removing them on purpose
        other = make_splits(task, seed=1, n_train=2000, n_eval=200)
        assert train & {p for p, _ in other["val"] + other["test"]}


def test_unknown_task_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown task 'sudoku'") as e:
        make_splits("sudoku", seed=0)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# pack: prompt and padding masked, completion + closing <eot> targeted


def test_pack_targets_exactly_the_completion_and_its_eot():
    enc = byte_encoding()
    examples = [("[MIN 8 5 9]>4?", "yes"), ("37>52?", "no"), ("é=", "ü,ß"), ("[MED 3 7 1]=", ""), ("1=", "1")]
    x, y = pack(examples, enc, block_size=32)
    width = max(2 + len(p.encode()) + len(c.encode()) for p, c in examples)
    assert x.shape == y.shape == (len(examples), width)
    assert x.dtype == y.dtype == torch.long
    for r, (prompt, completion) in enumerate(examples):
        p, c = list(prompt.encode()), list(completion.encode())
        row = [EOT] + p + c + [EOT]
        assert x[r].tolist() == row + [EOT] * (width - len(row))       # padded with <eot>
        # position t predicts x[t+1]: the first completion token is predicted at t = len(p)
        expected_y = [-1] * len(p) + c + [EOT] + [-1] * (width - len(row) + 1)
        assert y[r].tolist() == expected_y
        targeted = (y[r] != -1).nonzero().flatten()
        assert targeted.tolist() == list(range(len(p), len(p) + len(c) + 1))
        assert torch.equal(y[r, targeted], x[r, targeted + 1])          # targets are the next tokens


def test_pack_accepts_an_example_of_exactly_the_block_size():
    enc = byte_encoding()
    x, y = pack([("abcd", "ef")], enc, block_size=8)   # <eot> abcd ef <eot> = 8 tokens
    assert x.shape == (1, 8)
    with pytest.raises(ValueError):
        pack([("abcd", "efg")], enc, block_size=8)


def test_pack_too_long_is_a_one_line_error_naming_the_line():
    enc = byte_encoding()
    examples = [("1=", "1", 3), ("x" * 40 + "=", "y", 7)]           # as load_jsonl returns them
    with pytest.raises(ValueError, match=r"^line 7 .*block size 16") as e:
        pack(examples, enc, block_size=16)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^example 1 ") as e:        # built-in examples: the index
        pack([(p, c) for p, c, _ in examples], enc, block_size=16)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# exact_match: teacher-forced argmax at every target == greedy generation reproduces the answer


def test_exact_match_ignores_masked_positions():
    logits = torch.full((2, 4, 5), -1.0)
    logits[:, :, 0] = 1.0                                  # argmax is token 0 everywhere
    y = torch.tensor([[-1, 0, 0, -1], [-1, 0, 3, -1]])
    assert exact_match(logits, y).tolist() == [True, False]
    assert exact_match(logits[y != -1], y).tolist() == [True, False]   # the head at targets only


@pytest.fixture(scope="module")
def small_trained_model():
    """A tiny model trained for a few dozen steps on the pretraining corpus: it has learned the
    format (an answer, then <eot>) and gets some answers right and some wrong."""
    torch.manual_seed(0)
    enc = byte_encoding()
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    x, y = pack(make_splits("pretrain", seed=0, n_train=2000, n_eval=10)["train"], enc, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(0)
    for _ in range(60):
        rows = torch.randint(len(x), (32,), generator=batches)
        _, loss = model(x[rows], y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def greedy(model, enc, prompt, n):
    idx = torch.tensor([[EOT] + enc.encode_ordinary(prompt)])
    return model.generate(idx, n, temperature=0)[0, idx.shape[1]:].tolist()


@pytest.mark.slow
def test_exact_match_agrees_with_greedy_generation(small_trained_model):
    model, enc = small_trained_model, byte_encoding()
    gold = make_splits("pretrain", seed=3, n_train=10, n_eval=24)["test"]
    examples = list(gold)
    for prompt, _ in gold[:8]:
        # the model's own greedy answer (a match by construction), and two near misses: one token
        # too many, and the answer without its last token (the closing <eot> must be predicted)
        out = greedy(model, enc, prompt, 6)
        own = enc.decode(out[:out.index(EOT)]) if EOT in out else None
        if own is not None and own.encode() == bytes(out[:out.index(EOT)]):
            examples += [(prompt, own), (prompt, own + "x")] + ([(prompt, own[:-1])] if own else [])
    x, y = pack(examples, enc, block_size=32)
    with torch.no_grad():
        hits = exact_match(model(x)[0], y).tolist()
        assert exact_match(model(x, y)[0], y).tolist() == hits         # as train.prompt_hits calls it
    for (prompt, completion), hit in zip(examples, hits):
        want = enc.encode_ordinary(completion) + [EOT]
        assert hit == (greedy(model, enc, prompt, len(want)) == want), (prompt, completion)
    assert any(hits) and not all(hits)                    # both outcomes occur: not vacuous
    assert len(examples) >= len(gold) + 16                # the model's own answers were usable


# ---------------------------------------------------------------------------------------------
# load_jsonl


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rows(n, start=0):
    return [json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}, ensure_ascii=False)
            for i in range(start, start + n)]


def test_load_jsonl_splits_every_example_once_with_its_line_number(tmp_path):
    lines = rows(10) + [""] + rows(9, start=10) + [json.dumps({"prompt": "ünï→", "completion": "✓"})]
    path = write_lines(tmp_path / "mine.jsonl", lines)
    splits = load_jsonl(str(path), seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [16, 2, 2]
    everything = splits["train"] + splits["val"] + splits["test"]
    by_line = {n: (p, c) for p, c, n in everything}
    assert len(by_line) == 20
    for n, line in enumerate(lines, start=1):
        if line:
            row = json.loads(line)
            assert by_line[n] == (row["prompt"], row["completion"])
    assert load_jsonl(str(path), seed=0) == splits
    assert load_jsonl(str(path), seed=1) != splits


def test_load_jsonl_keeps_each_prompt_once_so_no_prompt_is_in_two_splits(tmp_path, capsys):
    repeats = [json.dumps({"prompt": f"{i}+1=", "completion": "other"}) for i in (0, 3, 3, 7, 9)]
    path = write_lines(tmp_path / "dups.jsonl", rows(10) + repeats)
    splits = load_jsonl(str(path), seed=0)
    prompts = {k: [p for p, _, _ in splits[k]] for k in ("train", "val", "test")}
    everything = sum(prompts.values(), [])
    assert len(everything) == len(set(everything)) == 10                  # each prompt once
    assert {n for k in splits for _, _, n in splits[k]} == set(range(1, 11))  # the first line of each
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dropped 5 examples" in err and str(path) in err
    load_jsonl(str(write_lines(tmp_path / "clean.jsonl", rows(10))), seed=0)
    assert capsys.readouterr().err == ""                                  # no repeats: no warning


def test_load_jsonl_three_examples_is_enough(tmp_path):
    splits = load_jsonl(str(write_lines(tmp_path / "three.jsonl", rows(3))), seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [1, 1, 1]


def test_load_jsonl_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="does not exist") as e:
        load_jsonl(str(path), seed=0)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_jsonl_given_a_folder_says_so(tmp_path):
    with pytest.raises(ValueError, match="is a folder: give the JSONL file inside it") as e:
        load_jsonl(str(tmp_path), seed=0)
    assert "\n" not in str(e.value)


BAD_LINES = ['{"prompt": "1+1=", "completion": "2"', '{"prompt": "1+1="}', '{"completion": "2"}',
             '{"prompt": "", "completion": "2"}', '{"prompt": 1, "completion": "2"}',
             '{"prompt": "1+1=", "completion": 2}', '["1+1=", "2"]', "null", '"just a string"', "7"]


@pytest.mark.parametrize("bad", BAD_LINES)
def test_load_jsonl_malformed_line_names_file_and_line(tmp_path, bad):
    path = write_lines(tmp_path / "broken.jsonl", rows(3) + [""] + [bad] + rows(3, start=3))
    with pytest.raises(ValueError) as e:
        load_jsonl(str(path), seed=0)
    message = str(e.value)
    assert str(path) in message and "line 5" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_load_jsonl_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="has 0 examples") as e:
        load_jsonl(str(path), seed=0)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_jsonl_fewer_than_three_examples(tmp_path):
    path = write_lines(tmp_path / "two.jsonl", rows(2))
    with pytest.raises(ValueError, match="has 2 examples; it needs at least 3") as e:
        load_jsonl(str(path), seed=0)
    assert "\n" not in str(e.value)


def test_load_jsonl_then_pack_names_the_file_line_that_is_too_long(tmp_path):
    long_line = json.dumps({"prompt": "x" * 200, "completion": "y"})
    path = write_lines(tmp_path / "long.jsonl", rows(4) + [long_line] + rows(4, start=4))
    splits = load_jsonl(str(path), seed=0)
    examples = splits["train"] + splits["val"] + splits["test"]
    with pytest.raises(ValueError, match=r"^line 5 is 203 tokens long") as e:
        pack(examples, byte_encoding(), block_size=128)
    assert "\n" not in str(e.value)


def test_load_jsonl_accepts_a_byte_order_mark_at_the_start_only(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark (EF BB BF) in front of line 1."""
    lines = rows(5)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(line + "\n" for line in lines).encode("utf-8"))
    plain = load_jsonl(str(write_lines(tmp_path / "plain.jsonl", lines)), seed=0)
    assert load_jsonl(str(path), seed=0) == plain
    path.write_bytes("".join(line + "\n" for line in lines[:2] + ["\ufeff" + lines[2]] + lines[3:]).encode("utf-8"))
    with pytest.raises(ValueError, match="line 3: expected a UTF-8 JSON object"):
        load_jsonl(str(path), seed=0)              # a mark inside the file is not a byte-order mark
