"""
tasks.py: text in, token batches out. The tokenizer, the built-in tasks, a JSONL loader, scoring.

The built-in data is procedural and seeded, so nothing is downloaded. It is built on ListOps
(Nangia & Bowman, 2018), one of the tasks of Adila et al., 2026: bracketed lists of digits under
MAX, MIN and MED (the lower median). The base model is pretrained on flat lists and on comparing
two numbers; each downstream task re-uses those skills in a new way, as the paper's tasks re-use
a pretrained LLM's skills.
"""
import json
import os
import random
import sys

import tiktoken
import torch

# ---------------------------------------------------------------------------------------------
# tokenizer


def byte_encoding():
    """A tiktoken Encoding with one token per byte (ids 0..255) and <|endoftext|> = 256. It has
    no merges, so it needs no files: every text is its UTF-8 bytes."""
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def get_tokenizer(name):
    if name == "bytes":
        return byte_encoding()
    try:
        return tiktoken.get_encoding(name)  # downloads its vocabulary on first use
    except Exception as e:
        raise ValueError(f"could not load tiktoken's {name!r} encoding ({type(e).__name__}); it is "
                         "downloaded on first use, so run once with network access") from None

# ---------------------------------------------------------------------------------------------
# built-in tasks: each maps a random.Random to one (prompt, completion) pair

OPS = ("MAX", "MIN", "MED")


def apply(op, xs):
    return max(xs) if op == "MAX" else min(xs) if op == "MIN" else sorted(xs)[(len(xs) - 1) // 2]


def flat_list(rng):
    """'[MED 3 7 1]' and its value 3."""
    op, xs = rng.choice(OPS), [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]
    return f"[{op} {' '.join(map(str, xs))}]", apply(op, xs)


def nested_list(rng):
    """A flat list with one digit replaced by another flat list: '[MAX 2 [MIN 7 4] 1]', value 4,
    and the inner list's value, 4."""
    inner, inner_value = flat_list(rng)
    op, xs = rng.choice(OPS), [rng.randint(0, 9) for _ in range(rng.randint(1, 4))]
    at = rng.randint(0, len(xs))
    items = list(map(str, xs[:at])) + [inner] + list(map(str, xs[at:]))
    value = apply(op, xs[:at] + [inner_value] + xs[at:])
    return f"[{op} {' '.join(items)}]", value, inner_value


def compare(rng):
    """Is one number (0..99) larger than another?  37>52?  ->  no"""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}>{b}?", "yes" if a > b else "no"


def pretrain(rng):
    """The base model's corpus: flat lists, and one example in five a comparison of two numbers.
                                                  [MED 3 7 1]=  ->  3        37>5?  ->  yes"""
    if rng.random() < 0.2:
        return compare(rng)
    expr, value = flat_list(rng)
    return f"{expr}=", str(value)


def listops(rng):
    """ListOps, depth 2: one answer digit.        [MAX 2 [MIN 7 4] 1]=  ->  4"""
    expr, value, _ = nested_list(rng)
    return f"{expr}=", str(value)


def arith(rng):
    """Two steps with the working shown, in the spirit of GSM8K's worked solutions: first the
    inner list's value, then the whole.          [MAX 2 [MIN 7 4] 1]=  ->  4,4"""
    expr, value, inner_value = nested_list(rng)
    return f"{expr}=", f"{inner_value},{value}"


def boolq(rng):
    """A yes/no question about a result, in the spirit of BoolQ: the two pretrained skills in
    one question.                                 [MIN 8 5 9]>4?  ->  yes"""
    expr, value = flat_list(rng)
    threshold = rng.randint(0, 9)
    return f"{expr}>{threshold}?", "yes" if value > threshold else "no"


TASKS = {"pretrain": pretrain, "listops": listops, "arith": arith, "boolq": boolq}


def make_splits(task, seed, n_train=20000, n_eval=500):
    """Seeded train / val / test lists of (prompt, completion); val and test prompts never appear
    in train, so accuracy is measured on unseen questions."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)} or pass --data FILE.jsonl")
    rng = random.Random(f"{task}-{seed}")
    held_out = {}
    while len(held_out) < 2 * n_eval:
        prompt, completion = TASKS[task](rng)
        held_out[prompt] = completion
    held = list(held_out.items())
    train = []
    while len(train) < n_train:
        prompt, completion = TASKS[task](rng)
        if prompt not in held_out:
            train.append((prompt, completion))
    return dict(train=train, val=held[:n_eval], test=held[n_eval:])


def first_of_each_prompt(examples, path):
    """Keep the first example of each prompt: a prompt repeated in train and test would be scored
    on an answer the model was trained on. Says on stderr how many were dropped."""
    seen, kept = set(), []
    for example in examples:
        if example[0] not in seen:
            seen.add(example[0])
            kept.append(example)
    if len(kept) < len(examples):
        dropped = len(examples) - len(kept)
        print(f"warning: {path}: dropped {dropped} examples whose prompt appears on an earlier line "
              "(each prompt is kept once, so it lands in one split only)", file=sys.stderr)
    return kept


def load_jsonl(path, seed):
    """A user's task: one {"prompt": ..., "completion": ...} object a line, each prompt once (a
    repeat is dropped, with a warning). Split by a seeded shuffle into 80% train, 10% val, 10%
    test (at least one example each)."""
    if os.path.isdir(path):
        raise ValueError(f"data file {path} is a folder: give the JSONL file inside it")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path} does not exist")
    examples = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))  # a BOM may open line 1
                good = isinstance(row["prompt"], str) and row["prompt"] != "" and isinstance(row["completion"], str)
            except (ValueError, KeyError, TypeError, RecursionError):   # (brackets nested too deep)
                good = False
            if not good:
                raise ValueError(f"{path} line {n}: expected a UTF-8 JSON object with string fields "
                                 "'prompt' (not empty) and 'completion'")
            examples.append((row["prompt"], row["completion"], n))
    examples = first_of_each_prompt(examples, path)
    if len(examples) < 3:
        raise ValueError(f"{path} has {len(examples)} examples; it needs at least 3 (train, val, test)")
    random.Random(seed).shuffle(examples)
    k = max(1, len(examples) // 10)
    return dict(test=examples[:k], val=examples[k:2 * k], train=examples[2 * k:])

# ---------------------------------------------------------------------------------------------
# token batches and scoring


def pack(examples, enc, block_size):
    """Token rows x (N, T) and targets y (N, T), one example a row: <eot> prompt completion <eot>,
    padded with <eot> up to the longest row. y[t] = x[t+1] where x[t+1] is a completion token or
    the <eot> that ends it, else -1: the loss is on completions only, prompt and padding masked.
    (Every row starts at position 0, exactly as at evaluation time.)"""
    eot = enc.eot_token
    rows = []
    for i, (prompt, completion, *line) in enumerate(examples):
        p, c = enc.encode_ordinary(prompt), enc.encode_ordinary(completion) + [eot]
        if 1 + len(p) + len(c) > block_size:
            where = f"line {line[0]}" if line else f"example {i}"
            raise ValueError(f"{where} is {1 + len(p) + len(c)} tokens long with <eot>s, longer than "
                             f"the block size {block_size}: shorten it or use a model with a larger block_size")
        rows.append(([eot] + p + c, [-1] * len(p) + c + [-1]))
    width = max(len(row_x) for row_x, _ in rows)
    x = torch.full((len(rows), width), eot, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (row_x, row_y) in enumerate(rows):
        x[r, :len(row_x)], y[r, :len(row_y)] = torch.tensor(row_x), torch.tensor(row_y)
    return x, y


def exact_match(logits, y):
    """Per row: is the argmax right at every target position? With one example per row this is
    exactly 'greedy generation reproduces the completion and then stops': greedy decoding emits
    the gold tokens one after another iff each is the argmax given the gold prefix before it.
    logits: (B, T, vocab), or (N, vocab) at y's targets only, as GPT.forward(x, y) returns them."""
    keep = y != -1
    wrong = (logits[keep] if logits.dim() == 3 else logits).argmax(dim=-1) != y[keep]
    rows = keep.nonzero()[:, 0]                                 # the row of each target
    n_wrong = torch.zeros(len(y), device=y.device).index_add(0, rows, wrong.float())
    return (n_wrong == 0) & keep.any(dim=1)           # a row with no target answered nothing
