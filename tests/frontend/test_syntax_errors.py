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
from convdsl.frontend import ast
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


def one_statement(stmt: str) -> str:
    return f"network A {{\n    input x: [1, 8, 8]\n    {stmt}\n    output y\n}}\n"


@pytest.mark.parametrize("text,message", [
    (one_statement("y = x -> conv(" + "1" * 5000 + ", kernel=3)"), "number too long (5000 digits)"),
    (one_statement("y = x -> leaky_relu(alpha=1e999)"), "too large for a float"),
    (one_statement("y = " + "relu(" * 1000 + "x" + ")" * 1000), "nests more than 100 levels deep"),
    (one_statement("y = x -> add(" * 200 + "x" + ")" * 200), "nests more than 100 levels deep"),
    (one_statement("y = " + "-" * 1000 + "1"), "nests more than 100 levels deep"),
    (one_statement("const k = " + "[" * 1000 + "1" + "]" * 1000), "nests more than 100 levels deep"),
    (one_statement("y = conv(x, " + "1 + " * 1000 + "1)"), "nests more than 100 levels deep"),
    (one_statement("y = x -> maxpool(\u0662)"), "U+0662 ARABIC-INDIC DIGIT TWO"),
    (one_statement("y = x\x00"), "U+0000"),
    (one_statement("y = x\u202e"), "U+202E RIGHT-TO-LEFT OVERRIDE"),
    (one_statement("y\u200b= x"), "U+200B ZERO WIDTH SPACE"),
    ('use \u201cblocks.cnn\u201d\n', "U+201C LEFT DOUBLE QUOTATION MARK"),
    (one_statement("y = x \x1b[31m"), "U+001B"),
    ("network A {\n    input x: [1, 8, 8]\n    y = x -> conv(4,\n", "the `(` opened at line 3, column 18 is never closed"),
    ("network A {\n    input x: [1,\n", "the `[` opened at line 2, column 14 is never closed"),
    ("network A {\n    output x\n}\n}\n", "no `{` is open here"),
    ("hello\n", "a file holds `network`, `block` and `use` items"),
    (one_statement("y = x.y"), "a name cannot contain `.`"),
    (one_statement("y = x -> maxpool(2.0.0)"), "malformed number `2.0.0`"),
    (one_statement("y = x -> conv(8, kernel=5x5)"), "a size is written `(5, 5)` or just `5`"),
    (one_statement("y = x -> conv(0x10, kernel=3)"), "malformed number `0x10`; numbers are decimal"),
    ("network A\n{\n}\n", "expected `{` at the end of this line, as in `network A {`"),
    (one_statement("repeat 2\n    {\n        y = x\n    }"), "as in `repeat 2 {`"),
])
def test_pathological_input_gives_a_located_error(text, message):
    with pytest.raises(ConvDSLError) as info:
        parse(text, "bad.cnn")
    first = str(info.value).splitlines()[0]
    assert first.startswith("bad.cnn:") and ": error: " in first, first
    assert message in first


def test_the_deepest_accepted_nesting_goes_through():
    parse(one_statement("y = " + "relu(" * 95 + "x" + ")" * 95), "deep.cnn")


def test_a_chain_is_not_nesting_however_long():
    module = parse(one_statement("y = x" + " -> relu" * 5000), "long.cnn")
    depth, e = 0, module.items[0].body[1].value
    while isinstance(e, ast.Call):
        depth, e = depth + 1, e.args[0]
    assert depth == 5000


def test_odd_but_valid_text_parses():
    for text in ("", "\n\n\n", "# only a comment", "\ufeff", "\ufeff# bom then comment\n",
                 "network A {}", "network A {\n}", "# é ü “quotes” in a comment: fine\nnetwork A {}\n",
                 "network A {\n    input x: [1]\n    output x\n}"):          # no newline at the end
        parse(text, "ok.cnn")


def damage(text: str, rng: random.Random) -> str:
    """Random edits drawn from what real typos and bad pastes look like."""
    pieces = ["(", ")", "[", "]", "{", "}", "=", ",", ":", "->", "-", ">", "#", '"', "\n", " ", "\t", "\r",
              "0", "9", ".", "e", "x", "_", ";", "@", "$", "\\", "'", "//", "/", "*", "+",
              "input", "layer", "repeat", "network", "true", "1e999", "3x3", "\u00a0", "\u201c", "\u0663", "é",
              "\u202e", "\ufeff", "\x00", "9" * 30]
    chars = list(text)
    for _ in range(rng.randint(1, 5)):
        pos = rng.randrange(len(chars) + 1)
        action = rng.random()
        if action < 0.35 and pos < len(chars):
            del chars[pos:pos + rng.randint(1, 3)]
        elif action < 0.85:
            chars.insert(pos, rng.choice(pieces))
        elif pos < len(chars):
            chars[pos] = rng.choice(pieces)
    return "".join(chars)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.cnn")), ids=lambda p: p.stem)
def test_damaged_examples_give_only_convdsl_errors(path: Path):
    rng = random.Random(path.stem)
    valid = path.read_text()
    errors = 0
    for _ in range(40):
        text = damage(valid, rng)
        try:
            parse(text, "damaged.cnn")
        except ConvDSLError as e:
            rendered = str(e)
            first = rendered.splitlines()[0]
            assert first.startswith("damaged.cnn:") and ": error: " in first, first
            for leak in ("__ANON", "Token(", "Tree(", "lark", "$END", "_NL"):
                assert leak not in first, first
            errors += 1
    assert errors >= 20


@pytest.mark.parametrize("odd_break", ["\r", "\x0c", "\x0b", "\x85", "\u2028"])
def test_the_quoted_line_is_the_reported_line_whatever_the_line_breaks(odd_break):
    text = f"# a comment{odd_break}with an odd line break in it\nnetwork A {{\n    y = x @\n}}\n"
    with pytest.raises(ConvDSLError) as info:
        parse(text, "odd.cnn")
    head, quoted = str(info.value).splitlines()[:2]
    assert head.startswith("odd.cnn:3:11:") and quoted.strip() == "y = x @"
