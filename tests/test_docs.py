"""
test_docs.py: the documents speak only of the product, and every number in them has a source.

  (a) no committed file outside tests/ names a path of the machine it was made on, an issue
      number, a "revision N" or an "earlier commit";
  (b) every number in RESULTS.md is in the committed file(s) its section names on a `Source:`
      line, and every number in README.md is in RESULTS.md;
  (c) README.md is a guide: at most 200 lines, with a reading order of at most 3 hours.

Numbers checked: decimals, percentages, numbers with thousands commas and scientific notation.
Plain integers (counts of steps, layers, seeds; section numbers; years) and anything inside
`backticks` or on a command line of a code block are not. A difference written `a − b = c`
(or √2 × a ≈ c) is checked by its arithmetic; a and b must still be in the source.

Run:  python -m pytest -q tests/test_docs.py
"""
import bisect
import glob
import math
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_FILES = (".py", ".md", ".ipynb", ".log", ".txt", ".json", ".csv")

# a path of the machine (not part of a URL or of a relative path), or the project's history
HISTORY = re.compile(r"(?<![\w/.~-])/(?:work|tmp|home|Users|root)/"
                     r"|\bissues? #?\d+|\brevision \d+|\bearlier commit", re.IGNORECASE)

# sample text that equivalence.py runs its models on, kept byte for byte so that its committed
# numbers reproduce: an old opening of THEORY.md whose words are data here, not the project's prose
PROBE_TEXT = "docs/probe_text.txt"

# a number as a document prints it: 1,234 | 0.5 | 73.4% | 1.8e-14 | 3e-4 (not inside a word,
# a path, a version like 2.13.0 or an id like arXiv:2603.00425)
NUMBER = re.compile(r"(?<![\w.:/@#])(\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?%?)(?!\w|\.\d)")
CLOCK = re.compile(r"\b\d+:\d\d\.\d+\b")                 # wall clock as /usr/bin/time prints it
ANY_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
DIFFERENCE = re.compile(r"(\d+(?:\.\d+)?) [−-] (\d+(?:\.\d+)?) = ([−-]?\d+(?:\.\d+)?)")
ROOT2 = re.compile(r"√2 × (\d+(?:\.\d+)?) ≈ (\d+(?:\.\d+)?)")
COMMAND_LINE = re.compile(r"^\s*(\$ |python |pip |torchrun |PYTHONPATH=)")


def committed_files():
    """git ls-files of the repository, or a skip when this is not a git checkout."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: the committed files are unknown")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


def read(path, root=ROOT):
    with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
        return f.read()


# ---- the numbers a document prints --------------------------------------------------------
def prose(text):
    """The text whose numbers are checked: no inline code, no links, no command lines."""
    kept = []
    in_fence = False
    for line in text.split("\n"):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if (in_fence and COMMAND_LINE.match(line)) or line.startswith(("Command:", "Source:")):
            continue
        line = re.sub(r"`[^`]*`", " ", line)                  # inline code: commands, paths
        line = re.sub(r"\]\([^)]*\)", "]", line)              # link targets
        line = re.sub(r"https?://\S+", " ", line)
        kept.append(line)
    return "\n".join(kept)


def checked_numbers(text):
    """The numbers of `text` a reader takes as results (see the module docstring)."""
    numbers = [t for t in NUMBER.findall(text) if re.search(r"[.,%e]", t)]
    return numbers + CLOCK.findall(text)


def value_and_tolerance(token):
    """The value a printed number stands for, and half a unit of its last printed digit."""
    plain = token.rstrip("%").replace(",", "")
    mantissa, _, exponent = plain.partition("e")
    decimals = len(mantissa.partition(".")[2])
    scale = 10.0 ** int(exponent) if exponent else 1.0
    return float(plain), 0.5 * 10.0 ** -decimals * scale * (1 + 1e-9)


class Source:
    """The numbers of one or more committed files: the tokens as printed, and their values."""

    def __init__(self, texts):
        joined = "\n".join(texts)
        self.tokens = set(ANY_NUMBER.findall(joined)) | set(CLOCK.findall(joined))
        self.values = sorted(float(t.replace(",", "")) for t in ANY_NUMBER.findall(joined))

    def _near(self, low, high):
        i = bisect.bisect_left(self.values, low)
        return i < len(self.values) and self.values[i] <= high

    def holds(self, token):
        """Printed as is, or the same value rounded as printed (a fraction may print as a %)."""
        if token.rstrip("%") in self.tokens:
            return True
        if ":" in token:                                       # a clock: as printed only
            return False
        if "," in token and "." not in token:                  # a count: exactly this value
            return float(token.replace(",", "")) in self.values
        value, tol = value_and_tolerance(token)
        return self._near(value - tol, value + tol) or self._near((value - tol) / 100,
                                                                  (value + tol) / 100)


def arithmetic_errors(text):
    """The `a − b = c` and `√2 × a ≈ c` of text that are wrong as printed, and text without c."""
    errors = []
    for a, b, c in DIFFERENCE.findall(text):
        _, tol = value_and_tolerance(c.lstrip("−-"))
        if abs(float(a) - float(b) - float(c.replace("−", "-"))) > tol + 1e-9:
            errors.append(f"{a} − {b} = {c}")
    for a, c in ROOT2.findall(text):
        _, tol = value_and_tolerance(c)
        if abs(math.sqrt(2) * float(a) - float(c)) > tol:
            errors.append(f"√2 × {a} ≈ {c}")
    text = DIFFERENCE.sub(lambda m: f"{m.group(1)} − {m.group(2)} =", text)
    text = ROOT2.sub(lambda m: f"√2 × {m.group(1)} ≈", text)
    return errors, text


def sections(text):
    """(title, body) per `## ` section; the part before the first one is titled 'preamble'."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    out = [("preamble", parts[0])]
    for part in parts[1:]:
        title, _, body = part.partition("\n")
        out.append((title.strip(), body))
    return out


def source_files(body, root):
    """The committed files a section's `Source:` line names (globs allowed), or None."""
    lines = [line for line in body.split("\n") if line.startswith("Source:")]
    if not lines:
        return None
    files = []
    for pattern in re.findall(r"`([^`]+)`", " ".join(lines)):
        matched = sorted(glob.glob(os.path.join(root, pattern)))
        if not matched:
            files.append(pattern)                               # reported as missing
        files += [os.path.relpath(path, root) for path in matched]
    return files


def row_key(line):
    cells = line.split("|")
    return cells[1].strip(), len(cells)


def copied_wrong(body, texts):
    """Code-block lines not in a source verbatim, and table rows with numbers that differ from
    the source's row of the same name and width: a copied transcript or table is a true copy."""
    lines = {line.rstrip() for text in texts for line in text.split("\n")}
    rows = {}                             # a row's name and its number of cells -> the rows
    for line in lines:
        if line.startswith("|"):
            rows.setdefault(row_key(line), set()).add(line)
    wrong = []
    in_fence = False
    for line in body.split("\n"):
        line = line.rstrip()
        if line.startswith("```"):
            in_fence = not in_fence
        elif in_fence and line and line != "⋮" and not COMMAND_LINE.match(line):
            wrong += [] if line in lines else [line]
        elif line.startswith("|") and row_key(line) in rows and checked_numbers(line):
            wrong += [] if line in rows[row_key(line)] else [line]
    return wrong


def unsourced_numbers(text, root):
    """Every problem of a results document: 'section: what is wrong'."""
    problems = []
    for title, body in sections(text):
        errors, body_checked = arithmetic_errors(prose(body))
        problems += [f"{title}: wrong arithmetic {e}" for e in errors]
        numbers = checked_numbers(body_checked)
        files = source_files(body, root)
        if files is None:
            problems += [f"{title}: {n} (the section names no Source:)" for n in numbers]
            continue
        missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
        problems += [f"{title}: source {f} is not a file" for f in missing]
        texts = [read(f, root) for f in files if f not in missing]
        source = Source(texts)
        problems += [f"{title}: not as in the source: {line}" for line in copied_wrong(body, texts)]
        problems += [f"{title}: {n} is not in {', '.join(files)}" for n in numbers
                     if not source.holds(n)]
    return problems


# ---- (a) no machine paths, no history ---------------------------------------------------
def test_no_machine_paths_or_history_outside_tests():
    offenders = []
    for path in committed_files():
        if not path.endswith(TEXT_FILES) or path.startswith("tests/") or path == PROBE_TEXT:
            continue
        if not os.path.isfile(os.path.join(ROOT, path)):
            continue                                          # deleted in the work tree
        for number, line in enumerate(read(path).split("\n"), 1):
            match = HISTORY.search(line)
            if match:
                offenders.append(f"{path}:{number}: {match.group(0)!r}")
    assert not offenders, (f"{len(offenders)} lines name a machine path or the project's "
                           "history:\n" + "\n".join(offenders[:60]))


def test_history_pattern_catches_what_it_should():
    for bad in ["wrote /work/runs/a/results.json", '"/tmp/x/model.pt"', "see issue 11",
                "issue #3", "issues 10 and 11", "revision 2 of", "an earlier commit's output"]:
        assert HISTORY.search(bad), bad
    for fine in ["https://github.com/SprocketLab/steerling", "out/base/model.pt",
                 "docs/work/x.md", "a known issue", "the revised table"]:
        assert not HISTORY.search(fine), fine


# ---- (b) every number traced to a committed file ------------------------------------------
def test_every_results_number_is_in_its_source():
    problems = unsourced_numbers(read("RESULTS.md"), ROOT)
    assert not problems, f"{len(problems)} problems in RESULTS.md:\n" + \
        "\n".join(problems)


def test_every_readme_number_is_in_results():
    results = set(checked_numbers(arithmetic_errors(prose(read("RESULTS.md")))[1]))
    results |= {n.rstrip("%") for n in results}
    readme = checked_numbers(prose(read("README.md")))
    missing = sorted({n for n in readme if n not in results and n.rstrip("%") not in results})
    assert not missing, f"numbers in README.md that RESULTS.md does not carry: {missing}"


def test_the_checker_finds_a_wrong_number(tmp_path):
    (tmp_path / "run.log").write_text("accuracy 0.0% -> 73.4% | 276,480 params\n"
                                      '{"accuracy": 0.7639999985694885}\n5:09.29 wall\n')
    good = ("# r\n\n## run\nSource: `run.log`\n73.4%, 76.4%, 276,480, 5:09.29; "
            "76.4 − 73.4 = 3.0 `--lr 9.99`\n")
    assert unsourced_numbers(good, str(tmp_path)) == []
    assert len(unsourced_numbers(good.replace("73.4%,", "73.5%,"), str(tmp_path))) == 1
    assert len(unsourced_numbers(good.replace("276,480", "276,481"), str(tmp_path))) == 1
    assert len(unsourced_numbers(good.replace("= 3.0", "= 3.1"), str(tmp_path))) == 1
    assert len(unsourced_numbers(good.replace("run.log", "gone.log"), str(tmp_path))) == 7
    assert len(unsourced_numbers(good.replace("Source: `run.log`\n", ""), str(tmp_path))) == 6
    log = (tmp_path / "run.log").read_text()
    block = "```\naccuracy 0.0% -> 73.4% | 276,480 params\n```\n"
    assert copied_wrong(block, [log]) == []
    assert copied_wrong(block.replace("276,480", "276,481"), [log]) != []
    table = "| a | 1.0 |\n|---|---|\n"
    assert copied_wrong(table.replace("1.0", "2.0"), [table]) == ["| a | 2.0 |"]


# ---- (c) the README is a guide ------------------------------------------------------------
def test_readme_is_a_short_guide_with_a_timed_reading_order():
    text = read("README.md")
    assert len(text.rstrip("\n").split("\n")) <= 200, "README.md is over 200 lines"
    bodies = [body for title, body in sections(text) if title.lower().startswith("reading order")]
    assert bodies, "README.md has no '## Reading order' section"
    minutes = [int(m) for m in re.findall(r"(\d+) min\b", bodies[0])]
    assert minutes, "the reading order gives no minutes"
    assert sum(minutes) <= 180, f"the reading order takes {sum(minutes)} min, over 3 hours"
