"""
Tests of notebooks/: each notebook has the course's shape (10-30 cells, a first markdown cell that
says what it teaches, exercises at the end), is committed executed, and its code cells run top to
bottom without error.

    python -m pytest tests/test_notebooks.py

The cells run as plain Python (no Jupyter needed) in one fresh namespace per notebook, with the
working directory a reader would have (notebooks/), matplotlib's Agg backend, and
NANOSTEER_QUICK=1, which the notebooks read to shrink their budgets (fewer steps, smaller models).
"""
import json
import linecache
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

# torch.func.jvp loads torch's own forward-mode decompositions through torch.jit.script, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4, f"{path.name}: not an nbformat 4 notebook"
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def test_there_are_at_least_three_notebooks():
    assert len(NOTEBOOKS) >= 3, f"found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    nb = cells(path)
    assert 10 <= len(nb) <= 30, f"{path.name} has {len(nb)} cells, the course wants 10-30"
    kind, first = nb[0]
    assert kind == "markdown" and "teaches" in first and "Read alongside" in first, \
        f"{path.name}: the first cell must be markdown saying what it teaches and what to read alongside"
    kind, last = nb[-1]
    assert kind == "markdown" and "Exercises" in last and "Hint" in last, \
        f"{path.name}: the last cell must be markdown with the exercises and their hints"
    assert 2 <= last.count("*Hint:*") <= 3, f"{path.name}: two or three exercises, each with a hint"
    for i, (kind, source) in enumerate(nb):
        magic = [line for line in source.splitlines() if kind == "code" and line.lstrip()[:1] in ("%", "!")]
        assert not magic, f"{path.name} cell {i}: IPython magic {magic[0]!r}; the cells must be plain Python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path):
    """The committed file carries its outputs, from one top-to-bottom run, so it reads without running."""
    code = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name}: execute it top to bottom in a fresh kernel before committing"
    assert any("image/png" in out.get("data", {}) for c in code for out in c["outputs"]), f"{path.name}: no figure"
    assert not any(out["output_type"] == "error" for c in code for out in c["outputs"]), f"{path.name}: an error output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    """Exec every code cell in order; any exception fails the test and names the cell."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("NANOSTEER_QUICK", "1")
    monkeypatch.chdir(path.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))        # the notebook's sys.path.insert is undone after
    threads = torch.get_num_threads()
    namespace = {"__name__": "__main__"}
    try:
        for i, (kind, source) in enumerate(cells(path)):
            if kind == "code":
                name = f"{path.name}, cell {i}"
                linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # for tracebacks
                exec(compile(source, name, "exec"), namespace)
    finally:
        namespace.clear()                                    # also deletes the notebook's temporary folders
        plt.close("all")
        torch.set_num_threads(threads)
