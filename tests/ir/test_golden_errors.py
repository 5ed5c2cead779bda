"""Every malformed file in tests/golden/error_*.cnn gives exactly the diagnostic in its .txt.

The message is the user's only guide, so the whole text is pinned: location, wording, the
source line and the caret. Regenerate with CONVDSL_REGEN_GOLDEN=1 after reading the diff.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from convdsl import ConvDSLError
from convdsl.compiler import graph_from_file

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
CASES = sorted(GOLDEN.glob("error_*.cnn"))


def diagnostic(path: Path) -> str:
    rel = path.relative_to(REPO)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        graph_from_file(str(rel))
    except ConvDSLError as e:
        return str(e) + "\n"
    finally:
        os.chdir(cwd)
    raise AssertionError(f"{rel} compiled without an error")


def test_there_are_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden_error(path: Path):
    got = diagnostic(path)
    expected_file = path.with_suffix(".txt")
    if os.environ.get("CONVDSL_REGEN_GOLDEN"):
        expected_file.write_text(got)
    assert got == expected_file.read_text()
    first = got.splitlines()[0]
    assert first.startswith(f"tests/golden/{path.name}:") and ": error: " in first


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_no_internal_traceback_text(path: Path):
    got = diagnostic(path)
    for leak in ("Traceback", "lark.", "jinja2", "UnexpectedToken", "__ANON", "internal error"):
        assert leak not in got
