"""The design warnings (§5): each fires at the right line and column with the chapter's numbers,
stays silent on a correct counterpart, and can be allowed per line or per run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from convdsl.compiler import graph_from_file, networks_in_file
from convdsl.passes.lints import CODES, lint

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
FIRING = sorted(p for p in GOLDEN.glob("lint_*.cnn") if not p.stem.endswith("_ok"))
SILENT = sorted(GOLDEN.glob("lint_*_ok.cnn"))


def warnings_of(path: Path) -> str:
    rel = path.relative_to(REPO)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return "".join(d.render() + "\n" for d in lint(graph_from_file(str(rel))))
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("path", FIRING, ids=lambda p: p.stem)
def test_warning_text(path: Path):
    got = warnings_of(path)
    expected = path.with_suffix(".txt")
    if os.environ.get("CONVDSL_REGEN_GOLDEN"):
        expected.write_text(got)
    assert got == expected.read_text()


@pytest.mark.parametrize("path", SILENT, ids=lambda p: p.stem)
def test_silent_on_the_correct_counterpart(path: Path):
    assert warnings_of(path) == ""


def test_every_code_has_a_golden_that_shows_it():
    shown = {line.rsplit("[", 1)[1].rstrip("]") for p in FIRING for line in p.with_suffix(".txt").read_text().splitlines()
             if ": warning: " in line}
    assert shown == set(CODES)
    assert all((GOLDEN / f"{p.stem}_ok.cnn").exists() for p in FIRING
               if p.stem not in ("lint_allowed_on_line", "lint_dilation_order", "lint_dilation_holes"))


# The examples are quiet unless they are about what a warning says.
EXPECTED_IN_EXAMPLES = {
    "digits_fc.cnn": {"W109"},          # its dense head is what convert --fc-to-conv is for
    "local_faces.cnn": {"W110"},        # the locally connected head is the point of the example
}


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.cnn")), ids=lambda p: p.name)
def test_examples_are_quiet_unless_about_it(path: Path):
    codes = {d.code for n in networks_in_file(path) for d in lint(graph_from_file(path, n))}
    assert codes == EXPECTED_IN_EXAMPLES.get(path.name, set())


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "convdsl", "check", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_allow_and_werror_on_the_command_line():
    path = "tests/golden/lint_even_same.cnn"
    plain = run_check(path)
    assert plain.returncode == 0 and "warning: an even 4×4 kernel" in plain.stderr
    strict = run_check(path, "--werror")
    assert strict.returncode == 1 and ": error: an even 4×4 kernel" in strict.stderr
    allowed = run_check(path, "--werror", "--allow", "W107")
    assert allowed.returncode == 0 and allowed.stderr == ""
    unknown = run_check(path, "--allow", "W999")
    assert unknown.returncode == 1 and "unknown warning code" in unknown.stderr
