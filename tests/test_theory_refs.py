"""
Tests of docs/THEORY.md against the rest of the repo:
- every citation "THEORY §n" (and "THEORY.md §n, §m", "THEORY §3–§7") in the Python files, the
  Markdown files and the notebooks (sources and outputs) names a "## §n ..." heading of THEORY.md;
- every code name in the notation table's code column names something in the code;
- one symbol, one row of the table; the paper, the blog and the official code linked;
- the SmolLM2 numbers THEORY quotes are the ones results/smollm2/equivalence.log printed, the
  miniature's the ones of results/equivalence.log and results/real_finetune.log;
- docs/LECTURE.md has its parts, its commands are Python, and the notebook cells its plan names
  (by their headings) exist.

    python -m pytest tests/test_theory_refs.py
"""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "THEORY.md"
LECTURE = ROOT / "docs" / "LECTURE.md"
# "THEORY §4", "THEORY.md §1, §3, §4", "THEORY §4–§5": the word, then a list of sections or ranges
CITATION = re.compile(r"THEORY(?:\.md)?\s*(§\s*\d+(?:\s*[–-]\s*§?\s*\d+)?(?:\s*,\s*§\s*\d+"
                      r"(?:\s*[–-]\s*§?\s*\d+)?)*)")
HEADING = re.compile(r"^## §(\d+) (.+)$", re.MULTILINE)


def cited_sections(text):
    """Every section number the THEORY citations in text name; a range a–b names a..b."""
    found = set()
    for match in CITATION.finditer(text):
        for part in match.group(1).split(","):
            ends = [int(n) for n in re.findall(r"\d+", part)]
            found.update(range(ends[0], ends[-1] + 1))
    return found


def headings(theory_text):
    """{section number: heading text} of a THEORY.md."""
    return {int(n): title for n, title in HEADING.findall(theory_text)}


def notebook_text(path):
    """A notebook's cell sources and its text outputs, one string."""
    parts = []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def code_files(root=ROOT):
    """The Python files of the repo: top level, its folders, notebooks/, docs/, tests/."""
    globs = ("*.py", "formats/*.py", "machinery/*.py", "experiments/*.py", "benchmarks/*.py",
             "notebooks/*.py", "docs/*.py", "tests/*.py")
    return sorted(p for pattern in globs for p in root.glob(pattern) if p.is_file())


def sources(root=ROOT):
    """(path, text) of every file whose citations must resolve: Python, Markdown, notebooks."""
    markdown = [*root.glob("*.md"), *root.glob("docs/*.md")]
    for path in sorted([*code_files(root), *markdown]):
        yield path, path.read_text(encoding="utf-8")
    for path in sorted(root.glob("notebooks/*.ipynb")):
        yield path, notebook_text(path)


def unresolved(theory_text, files):
    """[(file name, section)] for each cited section that has no heading."""
    have = headings(theory_text)
    return [(path.name, n) for path, text in files for n in sorted(cited_sections(text) - set(have))]


def notation_rows(theory_text):
    """[(symbol, meaning, code, paper)] of the table between '## Notation' and the next heading."""
    section = theory_text.split("## Notation", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in rows[1:]]
    return [tuple(row) for row in cells if len(row) == 4]


def code_names(code_cell):
    """The names in backticks of a code cell, each split at dots: `mlp.c_fc` -> mlp, c_fc."""
    return [part for name in re.findall(r"`([^`]+)`", code_cell) for part in name.split(".")]


def missing_code_names(rows, code_text):
    """[(symbol, name)] for each code name that occurs nowhere in code_text as a whole word."""
    return [(symbol, name) for symbol, _, code, _ in rows for name in code_names(code)
            if not re.search(rf"\b{re.escape(name)}\b", code_text)]


def test_every_cited_section_has_a_heading_in_docs_theory():
    theory = THEORY.read_text(encoding="utf-8")
    files = list(sources())
    assert sum(len(cited_sections(text)) for _, text in files) > 20    # the scan finds the citations
    assert unresolved(theory, files) == []


def test_the_sections_are_numbered_one_to_nine_in_order_each_once():
    assert [int(n) for n, _ in HEADING.findall(THEORY.read_text(encoding="utf-8"))] == list(range(1, 10))


def test_each_section_is_about_what_the_code_cites_it_for():
    titles = headings(THEORY.read_text(encoding="utf-8"))
    topics = {1: "site", 2: "shift", 3: "weight update", 4: "first order", 5: "post-MLP",
              6: "oracle", 7: "joint", 8: "folding", 9: "paper"}
    for n, word in topics.items():
        assert word.lower() in titles[n].lower(), (n, titles[n])


def test_citation_forms_are_parsed():
    text = "THEORY §4: x; THEORY.md §1, §3, §8 y; THEORY §4–§5; (THEORY.md §3–§7); §2 alone"
    assert cited_sections(text) == {1, 3, 4, 5, 6, 7, 8}


def test_a_missing_section_is_reported(tmp_path):
    theory = "## §1 One block\n## §2 Shifts\n## §4 First order\n"
    (tmp_path / "a.py").write_text("# THEORY §4 and THEORY.md §2, §3\n")
    files = [(tmp_path / "a.py", (tmp_path / "a.py").read_text())]
    assert unresolved(theory, files) == [("a.py", 3)]


def test_a_citation_in_a_notebook_output_is_found(tmp_path):
    cell = {"cell_type": "code", "source": ["print(1)"],
            "outputs": [{"output_type": "stream", "text": ["see THEORY " + "§12\n"]}]}  # (split:
    # this file is scanned too, and has no §12)
    (tmp_path / "n.ipynb").write_text(json.dumps({"cells": [cell]}))
    assert cited_sections(notebook_text(tmp_path / "n.ipynb")) == {12}


def test_the_notation_table_comes_first_and_is_full():
    theory = THEORY.read_text(encoding="utf-8")
    assert theory.index("## Notation") < theory.index("## §1")
    rows = notation_rows(theory)
    assert len(rows) > 30
    assert all(symbol and meaning and code and paper for symbol, meaning, code, paper in rows)


def test_every_code_name_in_the_notation_table_exists_in_the_code():
    code = "\n".join(path.read_text(encoding="utf-8") for path in code_files())
    rows = notation_rows(THEORY.read_text(encoding="utf-8"))
    assert sum(len(code_names(code_cell)) for _, _, code_cell, _ in rows) > 30
    assert missing_code_names(rows, code) == []


def test_a_code_name_the_code_lacks_is_reported():
    rows = [("W_fc", "up projection", "`mlp.c_fc`", "up_proj"), ("Q", "a query", "`c_q`", "q")]
    assert missing_code_names(rows, "self.c_fc = nn.Linear(...)  # mlp") == [("Q", "c_q")]


def test_one_symbol_one_row():
    symbols = [s.strip() for row in notation_rows(THEORY.read_text(encoding="utf-8"))
               for s in row[0].split(",")]
    assert len(symbols) == len(set(symbols)), sorted(s for s in symbols if symbols.count(s) > 1)


def test_the_paper_the_blog_and_the_official_code_are_linked_and_no_history_is_told():
    theory = THEORY.read_text(encoding="utf-8")
    for link in ("https://arxiv.org/abs/2603.00425", "https://github.com/SprocketLab/steerling",
                 "https://sprocketlab.github.io/posts/2025/11/actvweight/"):
        assert f"]({link}" in theory, link
    assert not re.search(r"\brevision\b|\bissue \d+|earlier commit", theory, re.IGNORECASE)


def test_the_smollm2_numbers_quoted_are_the_ones_equivalence_printed():
    log = (ROOT / "results" / "smollm2" / "equivalence.log").read_text(encoding="utf-8")
    shares = dict(re.findall(r"(attn_out|mlp_in|mlp_out|block_out) (\d\.\d+)", log))
    oracle = re.search(r"oracle 90% energy in (\d+) directions \(base block output (\d+), noise (\d+)",
                       log).groups()
    theory = THEORY.read_text(encoding="utf-8")
    row = next(line for line in theory.splitlines() if line.startswith("| SmolLM2, random"))
    assert row.split("|")[2:6] == [f" {shares[s]} " for s in ("attn_out", "mlp_in", "mlp_out",
                                                               "block_out")]
    assert f"**{oracle[0]} against {oracle[1]}**, noise {oracle[2]}" in theory
    skip = re.search(r"skip share ⟨δp, δz⟩/‖δz‖² (\d\.\d+)", log)[1]
    assert f"{skip} (SmolLM2" in theory


def span(values, fmt="{}"):
    """'low–high' of numbers, each written with fmt: the way THEORY quotes a range."""
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def test_the_miniature_numbers_quoted_are_the_ones_the_committed_logs_printed():
    """results/equivalence.log and .json (`python equivalence.py`) and results/real_finetune.log
    (`python experiments/real_finetune.py`) against THEORY's miniature numbers."""
    flat = " ".join(THEORY.read_text(encoding="utf-8").split())       # a phrase may wrap a line
    rows = {line.split("|")[1].strip(): line.split("|")[2:6] for line in
            THEORY.read_text(encoding="utf-8").splitlines() if line.startswith("| miniature")}
    sites = ("attn_out", "mlp_in", "mlp_out", "block_out")
    share = r"(attn_out|mlp_in|mlp_out|block_out) (-?\d\.\d+)"

    log = (ROOT / "results" / "equivalence.log").read_text(encoding="utf-8")
    random = {s: float(v) for s, v in re.findall(share, log)}
    assert rows["miniature, random, block 2"] == [f" {random[s]:.3f} " for s in sites]
    assert f"({random['attn_out']:.3f} against {random['mlp_out']:.3f})" in flat
    mlp = re.search(r"MLP share .* per layer: ([\d. ]+)", log)[1].split()
    assert f"*Measured*: {', '.join(mlp)} on the miniature's layers" in flat
    skip = re.search(r"skip share ⟨δp, δz⟩/‖δz‖² (\d\.\d+)", log)[1]
    assert f"{skip} (miniature, block 2" in flat
    rank = re.search(r"in (\d+) directions \(base block output (\d+), noise (\d+)", log).groups()
    assert f"{rank[0]} against {rank[1]}, noise {rank[2]} of 128" in flat
    fold = max(float(v) for v in re.findall(r"§8 fold at \w+: max \|Δlogit\| +\| +([\d.e+-]+)", log))
    assert f"the miniature's by at most {fold:.1e} at all six sites" in flat
    zero = json.loads((ROOT / "results" / "equivalence.json").read_text(encoding="utf-8"))["wproj_zero"]
    assert f"miniature {zero['mlp_out']:.3f} against {zero['block_out']:.3f}" in flat

    real = (ROOT / "results" / "real_finetune.log").read_text(encoding="utf-8")
    blocks = [line for line in real.splitlines() if line.startswith("block ")]
    tuned = [{s: float(v) for s, v in re.findall(share, line)} for line in blocks]
    assert len(tuned) == 4
    assert rows["miniature, real fine-tune, blocks 0–3"] == [
        f" {span([b[s] for b in tuned], '{:.3f}')} " for s in sites]
    later = tuned[1:]                                                  # blocks 1–3
    assert f"blocks 1–3 of the real fine-tune ({span([b['mlp_in'] for b in later], '{:.3f}')})" in flat
    after = [b[s] for b in later for s in ("mlp_out", "block_out")]
    assert (f"(blocks 1–3: {span([b['attn_out'] for b in later], '{:.3f}')} against "
            f"{span(after, '{:.3f}')})") in flat
    gap = max(abs(b["mlp_out"] - b["block_out"]) for b in tuned + [random])
    assert round(gap, 3) <= 0.006 and "within 0.006 of each other in the miniature's rows" in flat
    skips = [re.search(r"within (-?[\d.]+) .*whole model (-?[\d.]+) ", line).groups() for line in blocks]
    assert (f"real fine-tune {span([w for w, _ in skips])} within a block, "
            f"{span([m for _, m in skips])} over the whole model") in flat
    outside = max(int(n) for n in re.findall(r"(\d+) outside", real))
    assert f"at most {outside} of a block's 368 do (block 2, whole model: up to 1.03" in flat
    assert "per token 0.66 to 1.03" in blocks[2]
    zero = re.search(r"best post-MLP (\d\.\d+), linear post-block (\d\.\d+)", real).groups()
    assert f"{zero[0]} against {zero[1]} (results/real_finetune.log)" in flat
    ranks = [tuple(map(int, pair)) for pair in re.findall(r"\((\d+), (\d+)\)", real)]
    noise = re.search(r"noise (\d+)", real)[1]
    assert (f"real fine-tune, {span([o for o, _ in ranks])} against {span([b for _, b in ranks])}, "
            f"noise {noise} of 128") in flat
    fits = re.search(r"rank 4: linear (\d\.\d+), nonlinear from the linear start (\d\.\d+), "
                     r"from random starts ([\d./]+)", real).groups()
    assert f"equals the linear fit ({fits[0]} at rank 4, block 2)" in flat and fits[0] == fits[1]
    assert f"reached {span(fits[2].split('/'))} against the linear {fits[0]}" in flat
    kl = {name: (float(v), [float(x) for x in shares.split()]) for name, v, shares in
          re.findall(r"KL (no steer|linear U·D·z): ([\d.]+) \(shares ([\d. ]+)\)", real)}
    linear = [round(100 * v) for v in kl["linear U·D·z"][1]]
    assert f"linear fits recovering {min(linear)}–{max(linear)}% of each layer's oracle" in flat
    assert f"KL(fine-tuned ‖ steered) of {kl['linear U·D·z'][0]} nats" in flat
    assert f"against {kl['no steer'][0]} with no steer" in flat


def plan_cells(lecture_text):
    """[(notebook number, heading)] named in the plan's table: nb 2 "The six sites", "..."."""
    named = []
    for line in lecture_text.split("## The plan, minute by minute", 1)[1].split("\n## ")[0].splitlines():
        for number, quoted in re.findall(r"nb (\d) ((?:\"[^\"]+\"(?:, )?)+)", line):
            named += [(int(number), h.rstrip("…")) for h in re.findall(r'"([^"]+)"', quoted)]
    return named


def notebook_headings(path):
    """The '## ' headings of a notebook's markdown cells."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [line[3:] for cell in cells if cell["cell_type"] == "markdown"
            for line in "".join(cell["source"]).splitlines() if line.startswith("## ")]


def test_the_lecture_has_its_parts_and_its_commands_are_python():
    lecture = LECTURE.read_text(encoding="utf-8")
    for part in ("## The plan, minute by minute", "## Misconceptions, where they arise",
                 "## Pen-and-paper problems", "## Expected numbers for the exercises"):
        assert part in lecture, part
    scripts = re.findall(r"python - [^\n]*<<'EOF'[^\n]*\n(.*?)\nEOF", lecture, re.DOTALL)
    assert len(scripts) >= 4
    for script in scripts:
        compile(script, "LECTURE.md", "exec")
    minutes = [int(m) for m in re.findall(r"^\| (\d+)–\d+ \|", lecture, re.MULTILINE)]
    assert minutes[0] == 0 and minutes == sorted(minutes)
    assert re.search(r"^\| \d+–90 \|", lecture, re.MULTILINE)


def test_every_notebook_cell_the_plan_names_exists():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    named = plan_cells(LECTURE.read_text(encoding="utf-8"))
    assert len(named) > 10
    missing = [(n, h) for n, h in named
               if not any(x.startswith(h) for x in notebook_headings(notebooks[n - 1]))]
    assert missing == []


def test_a_cell_the_plan_names_is_parsed():
    text = '## The plan, minute by minute\n| 0–5 | x | §1 | nb 2 "The six sites", "Oracle…" |\n## Next'
    assert plan_cells(text) == [(2, "The six sites"), (2, "Oracle")]
