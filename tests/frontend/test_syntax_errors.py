"""Syntax errors read like a compiler's: location, what was wrong, the line and a caret.

Each tests/golden/syntax_*.cnn is parsed and its diagnostic compared with the .txt beside
it (regenerate with CONVDSL_REGEN_GOLDEN=1 after reading the difference). Random damage to
a valid file must give a ConvDSLError or a parse, never another exception.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from convdsl import ConvDSLError
from convdsl.frontend.parser import parse

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
CASES = sorted(GOLDEN.glob("syntax_*.cnn"))
VALID = (REPO / "examples" / "inception_se.cnn").read_text()


def diagnostic(path: Path) -> str:
    rel = path.relative_to(REPO).as_posix()
    try:
        parse(path.read_text(), rel)
    except ConvDSLError as e:
        return str(e) + "\n"
    raise AssertionError(f"{rel} parsed without an error")


def test_there_are_enough_cases():
    assert len(CASES) >= 12


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden_syntax_error(path: Path):
    got = diagnostic(path)
    expected_file = path.with_suffix(".txt")
    if os.environ.get("CONVDSL_REGEN_GOLDEN"):
        expected_file.write_text(got)
    assert got == expected_file.read_text()
    for leak in ("__ANON", "Token(", "lark", "LPAR", "RSQB", "_NL"):
        assert leak not in got


def mutations(text: str, count: int, seed: int):
    rng = random.Random(seed)
    alphabet = "(){}[]=,:->#\"\n 0123456789.abcxyz_;@$"
    for _ in range(count):
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.4:
                del chars[pos]
            elif action < 0.8:
                chars.insert(pos, rng.choice(alphabet))
            else:
                chars[pos] = rng.choice(alphabet)
        yield "".join(chars)


def test_damaged_files_give_only_convdsl_errors():
    outcomes = {"parsed": 0, "error": 0}
    for text in mutations(VALID, 300, seed=7):
        try:
            parse(text, "damaged.cnn")
            outcomes["parsed"] += 1
        except ConvDSLError as e:
            first = str(e).splitlines()[0]
            assert first.startswith("damaged.cnn:") and ": error: " in first, first
            outcomes["error"] += 1
    assert outcomes["error"] > 100        # the damage really breaks most files
