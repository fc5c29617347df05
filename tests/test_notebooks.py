"""
Tests of notebooks/: each notebook has the course's shape (10-30 cells, a first markdown cell that
says what it teaches, its lecture mode and how long it runs, exercises at the end), is committed
executed with readable figures and without absolute paths, states numbers that its committed
outputs print (and, where README, results/ or equivalence.py show the same quantity, the same
number), and runs top to bottom; the exercise solutions in notebooks/course.py give what the
exercises promise.

    python -m pytest tests/test_notebooks.py

The committed outputs come from lecture mode (FULL = False, the default), executed from the
repository root on the committed base model results/base/model.pt. The cells run here as plain
Python (no Jupyter needed) in one fresh namespace per notebook, with the working directory a reader
would have (notebooks/), matplotlib's Agg backend, and NANOSTEER_QUICK=1, which the notebooks read
to shrink their budgets further (fewer steps, smaller models). Each notebook ends with a "claims"
cell: rows (claim, measured, ok, holds at any scale). The rows that hold at any scale are asserted
on the quick run; every row is asserted in the committed outputs. Slow tests re-execute each
notebook in lecture mode and compare every number it prints with the committed one, within the
tolerance its first cell states (`close`); and they do it again with torch's CPU kernels forced to
another instruction set, as a student's machine of another CPU family would run them.
"""
import base64
import copy
import json
import linecache
import re
import struct
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]
import course  # noqa: E402  (notebooks/course.py: the notebooks' helpers and exercise solutions)
from experiments import compare  # noqa: E402
import equivalence as eq  # noqa: E402
import nanosteer as ns  # noqa: E402
import tasks  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# torch.func.jvp loads torch's own forward-mode decompositions through torch.jit.script, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4, f"{path.name}: not an nbformat 4 notebook"
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def code_cells(path):
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


def text_output(cell):
    return "".join("".join(out["text"]) for out in cell["outputs"] if out["output_type"] == "stream")


def test_there_are_at_least_three_notebooks():
    assert len(NOTEBOOKS) >= 3, f"found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    nb = cells(path)
    assert 10 <= len(nb) <= 30, f"{path.name} has {len(nb)} cells, the course wants 10-30"
    kind, first = nb[0]
    assert kind == "markdown" and "teaches" in first and "Read alongside" in first, \
        f"{path.name}: the first cell must be markdown saying what it teaches and what to read alongside"
    assert re.search(r"\*\*Time:\*\* about \d+ s on a 2-core CPU", first), f"{path.name}: the first cell states no CPU time"
    assert "**Lecture mode" in first, f"{path.name}: the first cell must say what its lecture mode does"
    kind, last = nb[-1]
    assert kind == "markdown" and "Exercises" in last and "Hint" in last, \
        f"{path.name}: the last cell must be markdown with the exercises and their hints"
    assert 2 <= last.count("*Hint:*") <= 3, f"{path.name}: two or three exercises, each with a hint"
    assert "course.solution_" in last, f"{path.name}: the exercises must point to their solutions"
    for i, (kind, source) in enumerate(nb):
        magic = [line for line in source.splitlines() if kind == "code" and line.lstrip()[:1] in ("%", "!")]
        assert not magic, f"{path.name} cell {i}: IPython magic {magic[0]!r}; the cells must be plain Python"
        assert "equivalence.run" not in source and "eq.run" not in source, f"{path.name} cell {i}: eq.run is Block.probe"


def png_width(data):
    return struct.unpack(">I", base64.b64decode(data)[16:20])[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path):
    """The committed file carries its outputs, from one top-to-bottom run, so it reads without running."""
    code = code_cells(path)
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name}: execute it top to bottom in a fresh kernel before committing"
    images = [out["data"]["image/png"] for c in code for out in c["outputs"] if "image/png" in out.get("data", {})]
    assert images, f"{path.name}: no figure"
    assert min(map(png_width, images)) >= 700, f"{path.name}: a figure narrower than 700 px: draw it at 150 dpi"
    assert not any(out["output_type"] == "error" for c in code for out in c["outputs"]), f"{path.name}: an error output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_claims_hold_and_time_is_stated(path):
    """The last code cell checks the narrative's claims against the run's numbers: all ok in the committed
    run; and the first cell's CPU time is the one that run printed (±25%, +10 s)."""
    claims = code_cells(path)[-1]
    assert "".join(claims["source"]).startswith("claims") or "claims = [" in "".join(claims["source"])
    out = text_output(claims)
    rows = [line for line in out.splitlines() if re.search(r"\| (ok|NO)( {2}\(measured\))?$", line)]
    assert len(rows) >= 4, f"{path.name}: the claims cell printed {len(rows)} rows"
    failed = [row for row in rows if "| NO" in row]
    assert not failed, f"{path.name}: claims that the committed run does not bear out: {failed}"
    ran = float(re.search(r"this notebook ran in (\d+) s", out).group(1))
    stated = float(re.search(r"\*\*Time:\*\* about (\d+) s", cells(path)[0][1]).group(1))
    assert 0.75 * ran - 10 <= stated <= 1.25 * ran + 10, f"{path.name}: first cell says {stated} s, the run took {ran} s"
    assert ran <= 60 and stated <= 60, f"{path.name}: lecture mode must run in 60 s or less on 2 cores ({ran} s)"
    assert "lecture mode" in text_output(code_cells(path)[0]) or path.name.startswith("01"), \
        f"{path.name}: the committed outputs must come from lecture mode"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_its_scale_free_claims_hold(path, monkeypatch):
    """Exec every code cell in order (quick mode); any exception fails the test and names the cell. Then the
    claims that hold at any scale must hold in this run too; figures are drawn at 150 dpi or more."""
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
        assert plt.rcParams["figure.dpi"] >= 150, f"{path.name}: figures below 150 dpi"
        failed = [(claim, measured) for claim, measured, ok, anywhere in namespace["claims"] if anywhere and not ok]
        assert not failed, f"{path.name}: claims that must hold at any scale failed in the quick run: {failed}"
    finally:
        namespace.clear()                                    # also deletes the notebook's temporary folders
        plt.close("all")
        torch.set_num_threads(threads)

ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|Users|var|private|mnt|opt)/")


def all_outputs(path):
    """Every text a committed notebook shows as output: streams, plain-text results, errors."""
    texts = []
    for cell in code_cells(path):
        for out in cell["outputs"]:
            texts.append("".join(out.get("text", "")))
            texts.append("".join(out.get("data", {}).get("text/plain", "")))
            texts.extend(out.get("traceback", []))
    return "\n".join(texts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_absolute_path_in_committed_outputs(path):
    found = ABSOLUTE.findall(all_outputs(path)) + [str(ROOT)] * (str(ROOT) in all_outputs(path))
    assert not found, f"{path.name}: an absolute path in a committed output: {found[:3]}"


def test_the_absolute_path_check_finds_one():
    assert ABSOLUTE.search("wrote /tmp/nanosteer-nb2-6paplxza/results.json") and ABSOLUTE.search("/work/wt/out")
    assert not ABSOLUTE.search("‖Δθ‖ / ‖θ‖ = 0.112 | out/base/model.pt")


# Numbers the narrative (markdown) of each committed notebook states: each must also be printed by one of its
# code cells. Numbers that README, results/ or equivalence.py also show are checked against those below.
NARRATIVE = {
    "01_weight_update_is_activation_shift.ipynb": [],
    "02_where_to_steer.ipynb": ["0.889", "0.888", "0.945", "0.983", "0.908", "0.836", "0.872", "0.895", "0.802",
                                "−0.01", "0.10", "0.03", "0.86", "0.90", "0.46", "0.948", "0.648", "0.967", "0.93",
                                "0.68", "0.69", "0.592", "0.912", "77", "0.841", "0.980", "0.840", "0.977", "3.463",
                                "1.697", "0.966", "0.981", "0.575"],
    "03_joint_adaptation.ipynb": ["81.0", "81.8", "74.2", "54.0", "99.5 ± 0.2", "98.7 ± 0.3", "99.3 ± 0.4", "98.6 ± 0.7",
                                  "84.8 ± 2.6", "85.3 ± 0.8", "47.5 ± 0.5", "78.1 ± 2.7", "0.177", "0.74", "0.82"],
}


def markdown_text(path):
    return "\n".join(source for kind, source in cells(path) if kind == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_narrative_states_the_numbers_its_cells_print(path):
    text, printed = markdown_text(path), all_outputs(path).replace("-", "−")
    for number in NARRATIVE[path.name]:
        assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text), f"{path.name}: the text no longer says {number}"
        assert re.search(rf"(?<![\d.]){re.escape(number)}", printed), f"{path.name}: the text says {number}, no cell prints it"


def test_notebook_2_quotes_smollm2_as_its_log_has_it():
    """SmolLM2's numbers in notebook 2's text are the ones of results/smollm2/equivalence.log; the
    equivalence.py setting is computed by the same functions equivalence.py calls."""
    path = ROOT / "notebooks" / "02_where_to_steer.ipynb"
    text = markdown_text(path)
    log = (ROOT / "results" / "smollm2" / "equivalence.log").read_text(encoding="utf-8")
    for number in ("attn_out 0.535", "mlp_in 0.313", "mlp_out 0.525", "block_out 0.525", "in 84 directions",
                   "base block output 1,", "noise 175"):
        assert number in log, number
    for number in ("0.535", "0.525", "0.313", "84 directions", "only 1", "175"):
        assert number in text, number
    source = "\n".join(src for kind, src in cells(path) if kind == "code")
    assert "eq.skip_share(blocks[mid], x_prose, eq_update)" in source and "eq.mlp_share(base, idx)" in source


# ---------------------------------------------------------------------------------------------
# a fresh run prints the committed numbers, within the tolerance the notebooks state

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
SECONDS = re.compile(r"\d+(?:\.\d+)? ?s\b")          # run times: they differ from run to run


def close(quoted, fresh):
    """The notebooks' stated tolerance: a number below 1e-6 is round-off (it stays below 1e-6);
    any other stays within 0.01 + 1% of the one quoted."""
    if abs(quoted) < 1e-6:
        return abs(fresh) < 1e-6
    return abs(fresh - quoted) <= 0.01 + 0.01 * abs(quoted)


def words(text):
    """A printout without its numbers and its column padding (a number of other digits widens it)."""
    return " ".join(NUMBER.sub("#", text).split())


def differences(committed, fresh):
    """Where fresh output departs from committed output: its words (numbers left out) differ, or a
    number is outside the tolerance. -> a list of (committed, fresh) pairs."""
    committed, fresh = (SECONDS.sub("<time>", t.replace("−", "-")) for t in (committed, fresh))
    if words(committed) != words(fresh):
        return [(committed, fresh)]
    pairs = zip(NUMBER.findall(committed), NUMBER.findall(fresh))
    return [(a, b) for a, b in pairs if not close(float(a), float(b))]


def test_close_and_differences_follow_the_stated_tolerance():
    assert close(2.2e-16, -8.6e-19) and not close(2.2e-16, 3e-6)
    assert close(0.908, 0.911) and close(81.0, 81.8) and not close(81.0, 82.0) and not close(0.5, 0.52)
    assert differences("x 0.908 | ok\nran in 6 s", "x 0.911 | ok\nran in 31 s") == []
    assert differences("x 0.908 | ok", "x 0.908 | NO") != []
    assert differences("x 0.908 | ok", "x 0.95 | ok") == [("0.908", "0.95")]
    assert differences("| 5.05e-16 | ok\n|   3.6 s", "|  5.912e-16 | ok\n|  12.0 s") == []


@pytest.mark.slow
def test_equivalence_py_prints_what_notebook_2_says_it_prints(tmp_path, capsys):
    """Notebook 2: "`python equivalence.py` prints the same number (skip share 0.46), as it prints the
    same linear shares". Run it on the committed base model (about 15 s) and compare every number
    with its committed log, results/equivalence.log, within the notebooks' tolerance."""
    text = markdown_text(ROOT / "notebooks" / "02_where_to_steer.ipynb")
    assert "skip share ⟨δp, δz⟩/‖δz‖² 0.46" in text
    assert "(attn_out 0.948, mlp_in 0.648, mlp_out 0.967, block_out 0.967)" in text
    log = (ROOT / "results" / "equivalence.log").read_text(encoding="utf-8")
    assert "skip share ⟨δp, δz⟩/‖δz‖² 0.46" in log
    assert "attn_out 0.948, mlp_in 0.648, mlp_out 0.967, block_out 0.967" in log
    threads = torch.get_num_threads()
    try:
        assert eq.main(["--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    committed = log.splitlines()
    assert len(printed) == len(committed)
    assert printed[-1].startswith("results/base/model.pt | block 2 | cpu float64")
    for was, now in zip(committed[:-1], printed[:-1]):
        assert not differences(was, now), (was, now)


def test_notebook_3_prints_the_committed_comparison():
    """Notebook 3's lecture mode reads the accuracy table from results/compare/results.json: recompute the
    rows from that file and find them in the committed output and in RESULTS.md's table."""
    path = ROOT / "notebooks" / "03_joint_adaptation.ipynb"
    compare_results = json.loads((ROOT / "results" / "compare" / "results.json").read_text(encoding="utf-8"))
    printed, readme = all_outputs(path), (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    for key in ("full", "lora", "linear_block_out", "joint", "joint_no_ortho"):
        mean, std = compare_results["summary"][key]["boolq"]
        cell = f"{100 * mean:5.1f} ± {100 * std:3.1f}"
        assert cell in printed, (key, cell)
        assert cell.strip() in readme, (key, cell)


def execute_lecture_mode(path):
    """Run a notebook's cells in lecture mode from the repository root (as the committed run was)
    and return what each code cell printed."""
    import contextlib
    import io
    namespace, printed = {"__name__": "__main__"}, []
    try:
        for i, (kind, source) in enumerate(cells(path)):
            if kind == "code":
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(source, f"{path.name}, cell {i}", "exec"), namespace)
                printed.append(out.getvalue())
    finally:
        namespace.clear()
    return printed


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lecture_mode_rerun_prints_the_committed_numbers(path, monkeypatch):
    """Re-execute in lecture mode (under a minute each) and compare every code cell's printout
    with the committed one: the same words, every number within the stated tolerance (`close`),
    so the numbers the text quotes from the committed outputs hold for this run too."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.delenv("NANOSTEER_QUICK", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    threads = torch.get_num_threads()
    try:
        fresh = execute_lecture_mode(path)
    finally:
        plt.close("all")
        torch.set_num_threads(threads)
    committed = [text_output(cell) for cell in code_cells(path)]
    assert len(fresh) == len(committed)
    for i, (was, now) in enumerate(zip(committed, fresh)):
        assert not differences(was, now), f"{path.name}, code cell {i}: {differences(was, now)[:3]}"


OTHER_KERNELS = {"AVX512": dict(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2"),
                 "AVX2": dict(ATEN_CPU_CAPABILITY="default", MKL_ENABLE_INSTRUCTIONS="SSE4_2")}
PROBE = ("import hashlib, torch; torch.manual_seed(0); a = torch.randn(257, 129); "
         "print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256((torch.softmax(a, -1) @ "
         "torch.randn(129, 63)).numpy().tobytes()).hexdigest())")


@pytest.mark.slow
def test_the_lessons_rerun_the_same_with_another_cpus_kernels():
    """A student's CPU may be of another family than the one the committed outputs came from.
    Force torch's and MKL's kernels one instruction set down (AVX-512 -> AVX2, AVX2 -> the
    baseline), check with a probe that this changes the numbers, then run the rerun tests above
    in that setting: they must pass there too (about 2 minutes)."""
    import os
    import subprocess
    native = torch.backends.cpu.get_cpu_capability()
    if native not in OTHER_KERNELS:
        pytest.skip(f"no other instruction set to force below {native}")
    env = {**os.environ, **OTHER_KERNELS[native]}
    run = [sys.executable, "-c", PROBE]
    before = subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()
    after = subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout.split()
    assert before[0] != after[0] and before[1] != after[1], f"forcing {OTHER_KERNELS[native]} changed nothing"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "lecture_mode_rerun or prints_what_notebook_2"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"\b4 passed", proc.stdout), proc.stdout[-500:]


FIGURES = sorted((ROOT / "docs").glob("*.png"))


@pytest.mark.parametrize("path", FIGURES, ids=lambda p: p.name)
def test_committed_figures_are_slide_size(path):
    """Readable on a 1280-px projector: saved at 150 dpi or more, at most ~8.5 in wide (12-pt text then
    stays 12 pt when shown at native size), at least 700 px."""
    from PIL import Image
    with Image.open(path) as image:
        width, dpi = image.size[0], image.info.get("dpi", (0, 0))[0]
    assert dpi >= 149 and 700 <= width <= 1280, f"{path.name}: {width} px at {dpi:.0f} dpi"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_figures_fit_a_projector(path):
    code = code_cells(path)
    images = [out["data"]["image/png"] for c in code for out in c["outputs"] if "image/png" in out.get("data", {})]
    assert max(map(png_width, images)) <= 1280, f"{path.name}: a figure wider than 1280 px"
    setup = "".join(code[0]["source"])
    assert re.search(r'"font.size": (1[2-9]|[2-9]\d)', setup), f"{path.name}: figures need 12-pt text"
    assert not re.search(r"fontsize=([0-9]|1[01])\b|labelsize=([0-9]|1[01])\b",
                         "".join("".join(c["source"]) for c in code)), f"{path.name}: text below 12 pt"


def test_claims_figure_verdicts_and_redraw(tmp_path):
    """experiments/claims_figure.py: the verdict words follow the interval; the committed results redraw."""
    from experiments import claims_figure as cf
    assert cf.verdict("ahead", 1.0, 5.0) == "holds" and cf.verdict("ahead", -5.0, -1.0) == "does not hold"
    assert cf.verdict("within", -46.1, -41.7) == "does not hold"       # the miniature's post-block − full
    assert cf.combined(["holds", "cannot tell at ±2.0 points"]) == "cannot tell"
    results = {"budget": {"n_eval": 500, "tasks": ["boolq"]},
               "runs": [{"phase": "final", "method": m, "seed": s, "accuracy": a}
                        for m, s, a in (("a", 0, 0.8), ("a", 1, 0.9), ("b", 0, 0.7), ("b", 1, 0.7), ("a", 2, 0.5))]}
    diff, low, high = cf.difference(results, "a", "b")        # seed 2 has no b: left out
    assert diff == pytest.approx(15.0) and high - diff == pytest.approx(diff - low) and high > diff
    as_compare_writes_it = dict(runs=results["runs"], config=results.pop("budget"))
    assert cf.difference(as_compare_writes_it, "a", "b") == (diff, low, high)
    saved = {"boolq/a/seed0": "1100", "boolq/b/seed0": "1000", "boolq/a/seed1": "1110",
             "boolq/b/seed1": "1010"}                              # a is right on 1 more prompt a seed
    paired = cf.difference(as_compare_writes_it, "a", "b", saved)
    assert paired == cf.paired_interval([("1100", "1000"), ("1110", "1010")]) and paired[0] == 25.0
    committed = json.loads((ROOT / "results" / "compare" / "results.json").read_text(encoding="utf-8"))
    rows, words = cf.verdicts(committed)
    assert [r[1] for r in rows][:2] == ["post-block − full fine-tuning", "post-block − post-MLP"]
    assert words[rows[0][0]] == "does not hold" and len(words) == 3
    cf.main(["--out", str(tmp_path / "claims.png")])
    assert (tmp_path / "claims.png").stat().st_size > 10_000


def test_output_redraws_a_committed_equivalence_json(tmp_path):
    from experiments import redraw_figures as output
    output.main(["results/smollm2/equivalence.json" if Path.cwd() == ROOT else
                 str(ROOT / "results" / "smollm2" / "equivalence.json"), str(tmp_path), "--suffix", "_x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first_order_x.png", "mlp_share_x.png", "sites_x.png"]
    with pytest.raises(ValueError, match="out .*README.md is a file, not a folder"):     # before drawing
        output.main([str(ROOT / "results" / "smollm2" / "equivalence.json"), str(ROOT / "README.md")])


# ---------------------------------------------------------------------------------------------
# the exercise solutions (notebooks/course.py), on tiny models: each gives what its exercise promises


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is fastest, and does not thrash a busy CPU (as in equivalence.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """A random 2-block GPT (d = 32) in float64, 8 boolq prompts, the stream entering block 1."""
    torch.manual_seed(0)
    model = ns.freeze(GPT(GPTConfig(n_layer=2, n_embd=32)).double().eval())
    idx, _ = tasks.pack(tasks.make_splits("boolq", 0, n_train=0)["test"][:8], tasks.get_tokenizer("bytes"), 128)
    with ns.capture(model, ["block_out"]) as acts:
        model(idx)
    return model, idx, acts["block_out"][0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("nb-solutions") / "base.pt"
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_embd=32)).save(str(path), tokenizer="bytes")
    return str(path)


def test_solution_1_1_a_wrong_derivative_shows_slope_1_at_small_eps(tiny):
    model, _, x = tiny
    block = model.transformer.h[1]
    with torch.no_grad():                       # pre-activations of order 1, where the two GELUs differ
        big = eq.with_update(block, {"mlp.c_fc.weight": 20 * block.mlp.c_fc.weight})
    r = course.solution_1_1(big, x, eq.random_update(big.mlp, seed=2))
    assert 1e-4 < r["mismatch"] < 1e-2
    assert abs(r["slope_small"] - 1) < 0.15 and r["slope_large"] > r["slope_small"] + 0.3, r


def test_solution_1_2_mlp_in_imitates_a_w_fc_update_better_than_a_w_proj_update(tiny):
    model, _, x = tiny
    block = model.transformer.h[1]
    r = course.solution_1_2(block, x, eq.random_update(block.mlp, seed=2))
    assert r["W_fc only (term 2)"]["mlp_in"] > r["W_proj only (term 1)"]["mlp_in"], r
    assert all(0 < share <= 1 for sites in r.values() for share in sites.values()), r


def test_solution_1_3_lora_on_c_fc_is_rank_4_before_gelu_and_not_after(tiny):
    model, idx, _ = tiny
    r = course.solution_1_3(model, idx, layer=1)
    assert r["u"] == 4 and r["m"] > 4 * 4, r


def test_solution_2_1_leaving_out_one_oracle_breaks_the_stream_from_there_on(tiny):
    model, idx, _ = tiny
    tuned = eq.with_update(model, {f"transformer.h.{i}.{n}": d for i, b in enumerate(model.transformer.h)
                               for n, d in eq.random_update(b, i).items()})
    gaps = course.solution_2_1(model, tuned, idx, leave_out=1)
    assert gaps[0] < 1e-10 < 1e-3 < gaps[1], gaps
    assert max(course.solution_2_1(model, tuned, idx, leave_out=None)) < 1e-10


def test_solution_2_2_a_lora_fine_tune_changes_each_weight_by_rank_at_most_4(tiny, tiny_checkpoint, tmp_path):
    model = ns.freeze(GPT.load(tiny_checkpoint).double().eval())
    r = course.solution_2_2(model, tiny_checkpoint, str(tmp_path), steps=3, batch=8)
    assert all(0 < rank <= 4 for block in r["ranks"] for rank in block.values()), r["ranks"]
    assert len(r["fitted"]) == 2 and all(-1 < s["block_out"]["linear"] <= 1 for s, _ in r["fitted"])


def test_solution_3_1_equal_budgets_have_equal_parameter_counts(tiny_checkpoint, tmp_path):
    r = course.solution_3_1(tiny_checkpoint, str(tmp_path), steps=2, batch=8, n_train=100)
    counts = {name: x["trainable_params"] for name, x in r.items()}
    assert len(set(counts.values())) == 1 and 2 * 16 * 32 in counts.values(), counts


def test_solution_3_2_and_3_3_the_constraint_zeroes_the_overlap_right_after_each_projection(tiny_checkpoint):
    argv = ["--mode", "joint", "--task", "boolq", "--init", tiny_checkpoint, "--steps", "20", "--batch-size", "8",
            "--n-train", "100", "--lr", "3e-2", "--lora-lr", "3e-2"]
    logs = course.solution_3_2(argv, everies=(1, 10, 0), every=5)
    assert max(max(read) for read in logs[1]["read"]) < 1e-5
    projected = [max(read) for step, read in zip(logs[10]["steps"], logs[10]["read"]) if step % 10 == 0]
    between = [max(read) for step, read in zip(logs[10]["steps"], logs[10]["read"]) if step % 10 != 0]
    assert max(projected) < 1e-5 < min(between), logs[10]
    assert min(max(read) for read in logs[0]["read"]) > 1e-3
    writes = course.solution_3_3(argv, every=5)
    assert max(max(read) for read in writes["read"]) < 1e-5 and max(max(w) for w in writes["write"]) < 1e-5


def test_train_watching_repeats_train_py_step_for_step(tiny_checkpoint, tmp_path):
    argv = ["--mode", "joint", "--task", "boolq", "--init", tiny_checkpoint, "--steps", "6", "--batch-size", "8",
            "--n-train", "100"]
    reference = course.train_quietly([*argv, "--out-dir", str(tmp_path)])
    assert course.train_watching(argv, every=3)["losses"] == pytest.approx(reference["losses"], rel=1e-6)


def test_majority_baseline_is_compares_row_and_the_notebooks_number():
    answer, share = course.majority_baseline("boolq")
    assert (answer, share) == compare.stats.majority_baseline(tasks.make_splits("boolq", 0))
    assert answer == "no" and share == pytest.approx(0.54)        # notebook 3: 'no', 54.0% of the test split


# ---------------------------------------------------------------------------------------------
# misuse of the course's helpers: one line, before any work


def test_the_joint_helpers_on_a_model_without_lora_are_one_line_value_errors(tiny, tiny_checkpoint):
    model, _, _ = tiny
    steered = copy.deepcopy(model)
    ns.steer(steered, "block_out", "linear", rank=2)                      # a steer, but no LoRA
    for candidate in (model, steered):
        for helper in (course.overlaps, course.project_steer_writes):
            with pytest.raises(ValueError, match="not a joint model") as e:
                helper(candidate)
            assert "\n" not in str(e.value)
    argv = ["--mode", "activation", "--task", "boolq", "--init", tiny_checkpoint, "--steps", "3",
            "--batch-size", "4", "--n-train", "20", "--out-dir", "unused"]
    with pytest.raises(ValueError, match="not a joint model"):
        course.train_watching(argv)


def test_fit_oracle_of_an_unknown_kind_is_a_one_line_value_error():
    s, delta = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown kind 'bogus': choose one of .*nonlinear random") as e:
        course.fit_oracle(s, delta, "bogus", rank=2)
    assert "\n" not in str(e.value)
