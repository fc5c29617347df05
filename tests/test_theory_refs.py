"""
Tests of the citations "THEORY §n" (and "THEORY.md §n, §m", "THEORY §3–§7") in the repo's Python
files, README.md and notebooks: each cited section is a "## §n ..." heading of docs/THEORY.md.

    python -m pytest tests/test_theory_refs.py
"""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def sources(root=ROOT):
    """(path, text) of every file whose citations must resolve: *.py, README.md, notebooks."""
    paths = [*root.glob("*.py"), *root.glob("tests/*.py"), *root.glob("docs/*.py"), root / "README.md"]
    for path in sorted(p for p in paths if p.is_file()):
        yield path, path.read_text(encoding="utf-8")
    for path in sorted(root.glob("notebooks/*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        yield path, "\n".join("".join(cell["source"]) for cell in cells)


def unresolved(theory_text, files):
    """[(file name, section)] for each cited section that has no heading."""
    have = headings(theory_text)
    return [(path.name, n) for path, text in files for n in sorted(cited_sections(text) - set(have))]


def test_every_cited_section_has_a_heading_in_docs_theory():
    theory = (ROOT / "docs" / "THEORY.md").read_text(encoding="utf-8")
    files = list(sources())
    assert sum(len(cited_sections(text)) for _, text in files) > 20    # the scan finds the citations
    assert unresolved(theory, files) == []


def test_the_sections_are_numbered_one_to_nine_in_order_each_once():
    theory = (ROOT / "docs" / "THEORY.md").read_text(encoding="utf-8")
    assert [int(n) for n, _ in HEADING.findall(theory)] == list(range(1, 10))


def test_each_section_is_about_what_the_code_cites_it_for():
    titles = headings((ROOT / "docs" / "THEORY.md").read_text(encoding="utf-8"))
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
