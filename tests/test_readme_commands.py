"""
Every command the READMEs show still runs: README.md and each folder's README name scripts and
flags, and a move or a renamed flag must not leave a dead command in the guide. Each script named
is run with -h (a full run can take hours), and every --flag a command passes must be one its help
lists; `python -m pytest` and `pip` lines are the suite itself and the set-up.

    python -m pytest -q tests/test_readme_commands.py
"""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "*", "README.md")))


def commands(text):
    """The `python ...` and `torchrun ...` commands of a README: code-block lines and inline code."""
    found, in_fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif in_fence and line.strip().startswith(("python ", "torchrun ")):
            found.append(line.strip())
        elif not in_fence:
            found += re.findall(r"`((?:python|torchrun) [^`]+)`", line)
    return [re.split(r"\s+(?:#|>)\s", c)[0].strip() for c in found]     # no comment, no redirect


def script_and_flags(command):
    """-> (the script it runs, the --flags it passes); None for pytest and pip lines."""
    words = command.split()
    if words[0] == "torchrun":
        words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc") and w != "--standalone"]
    if words[1] == "-m":
        return None
    return words[1], [w.strip("[]").split("=")[0] for w in words[2:] if w.strip("[]").startswith("--")]


ALL = sorted({(readme, c) for readme in READMES
              for c in commands(open(os.path.join(ROOT, readme), encoding="utf-8").read())})
HELP = {}


def help_text(script):
    if script not in HELP:
        proc = subprocess.run([sys.executable, script, "-h"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"python {script} -h failed: {proc.stderr[-500:]}"
        assert proc.stdout.startswith("usage:"), f"python {script} -h ran instead of printing its usage"
        HELP[script] = proc.stdout
    return HELP[script]


def test_the_readmes_show_commands():
    assert len(ALL) >= 20 and any(readme != "README.md" for readme, _ in ALL)
    assert commands("```\npython a.py --x 1   # comment\n```\nrun `python b.py --y` > out") == \
        ["python a.py --x 1", "python b.py --y"]


@pytest.mark.parametrize("readme, command", ALL, ids=[f"{r}: {c}" for r, c in ALL])
def test_a_readme_command_names_a_script_and_flags_that_exist(readme, command):
    parsed = script_and_flags(command)
    if parsed is None:
        return
    script, flags = parsed
    assert os.path.isfile(os.path.join(ROOT, script)), f"{readme}: {script} does not exist"
    text = help_text(script)
    missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", text)]
    assert not missing, f"{readme}: `{command}`: {script} -h lists no {missing}"
