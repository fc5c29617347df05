"""
The layout shows the afternoon: the top level holds the six files a student reads whole, within
their line budget; everything a first read skips lives in a folder that opens with a short README;
the core imports nothing from the experiments and no module imports itself in a circle.

    python -m pytest -q tests/test_layout.py
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["model.py", "nanosteer.py", "train.py", "equivalence.py", "tasks.py", "sample.py"]
FOLDERS = ["formats", "machinery", "experiments", "benchmarks", "notebooks"]


def lines(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read().rstrip("\n").split("\n")


def test_the_top_level_is_the_six_core_files_within_1800_lines():
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    assert top == sorted(CORE), f"top-level Python files: {top}"
    total = sum(len(lines(f)) for f in CORE)
    assert total <= 1800, f"the top level has {total} lines, over its budget of 1,800"


def test_every_core_function_fits_on_a_screen():
    long = []
    for path in CORE:
        tree = ast.parse("\n".join(lines(path)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over 60 lines: {long}"


def test_each_folder_opens_with_a_short_readme_and_holds_short_files():
    for folder in FOLDERS:
        readme = os.path.join(folder, "README.md")
        assert os.path.isfile(os.path.join(ROOT, readme)), f"{folder}/ has no README.md"
        assert len(lines(readme)) <= 20, f"{readme} has {len(lines(readme))} lines, over 20"
        for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
            n = len(lines(path))
            assert n <= 300, f"{os.path.relpath(path, ROOT)} has {n} lines, over 300"


def module_of(path):
    return os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")


def imports(path):
    """The repository's modules that `path` imports at module level (what a circle is made of)."""
    tree = ast.parse("\n".join(lines(path)))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph():
    paths = CORE + [os.path.relpath(p, ROOT) for f in FOLDERS for p in glob.glob(os.path.join(ROOT, f, "*.py"))]
    names = {module_of(p) for p in paths} | {"course"}
    return {module_of(p).replace("notebooks.", ""): {m for m in imports(p) if m in names} for p in paths}


def test_the_core_imports_nothing_from_the_experiments_or_benchmarks():
    edges = graph()
    for core in (f[:-3] for f in CORE):
        bad = [m for m in edges[core] if m.startswith(("experiments", "benchmarks", "course"))]
        assert not bad, f"{core}.py imports {bad}"


def find_circle(edges):
    """An import circle of the graph {module: modules it imports} as a list, or None."""
    done, stack = set(), []

    def visit(node):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            circle = visit(nxt)
            if circle:
                return circle
        stack.pop()
        done.add(node)
        return None
    return next((c for c in map(visit, sorted(edges)) if c), None)


def test_no_import_circles():
    edges = graph()
    assert {"formats.checkpoints", "machinery.runtime", "nanosteer"} <= edges["train"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    assert find_circle(edges) is None, " -> ".join(find_circle(edges))
