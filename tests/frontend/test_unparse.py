"""The canonical writer: every example, written back, parses to the same AST (spans aside)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from convdsl.errors import Span
from convdsl.frontend import ast, unparse
from convdsl.frontend.parser import parse, parse_file

REPO = Path(__file__).resolve().parents[2]


def shape(x):
    """The AST without its spans, for comparison."""
    if isinstance(x, Span):
        return None
    if dataclasses.is_dataclass(x):
        return (type(x).__name__, *(shape(getattr(x, f.name)) for f in dataclasses.fields(x)
                                     if f.name not in ("span", "end", "path", "source")))
    if isinstance(x, tuple):
        return tuple(shape(i) for i in x)
    return x


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.cnn")), ids=lambda p: p.name)
def test_examples_round_trip(path):
    module = parse_file(path)
    assert shape(parse(unparse.module(module), str(path))) == shape(module)


def test_precedence_tuples_negatives_and_long_chains():
    src = ("block b(x, k=3) {\n    y = x -> conv((k + 1) * 2 - -1, kernel=(1,), pad=((0, 1),)) -> relu\n"
           "    return add(x -> relu, y)\n}\n"
           "network N {\n    dtype f64\n    layout NHWC\n    input x: [H, W, 4]\n    const K = [[1, -2.5], [0.001, 1e-09]]\n"
           "    layer L = conv(4, kernel=2, init=normal(0.02), frozen=true, weight=K)\n"
           "    repeat 2 {\n        x = x -> b(k=2 // 1) -> leaky_relu(alpha=0.1)\n    }\n"
           "    z = x -> " + " -> ".join(["conv(4, kernel=3, pad=same)"] * 6) + "\n"
           "    output z\n    loss mse(z)\n}\n")
    module = parse(src)
    text = unparse.module(module)
    assert shape(parse(text)) == shape(module)
    assert "(k + 1) * 2 - -1" in text and "kernel=(1,)" in text and "1e-09" in text
    assert all(len(line) <= unparse.WIDTH for line in text.splitlines())
    assert "\n        -> conv(4, kernel=3, pad=same)" in text      # the long chain continues on a new line


def test_a_loss_with_arguments_round_trips():
    for loss in ("softmax_cross_entropy(y, weight=[0.5, 2, 0.001], ignore_index=-100)",
                 "dice(y, activation=sigmoid, eps=0.5)", "smooth_l1(y, 0.25)"):
        src = f"network N {{\n    input x: [3, 4, 4]\n    y = x -> conv(3, kernel=1)\n    output y\n    loss {loss}\n}}\n"
        module = parse(src)
        text = unparse.module(module)
        assert f"loss {loss}" in text
        assert shape(parse(text)) == shape(module)


def test_a_pipe_inside_arithmetic_keeps_its_parentheses():
    call = ast.Call("f", (ast.Name("x", None),), (), None, piped=True)
    assert unparse.expr(ast.BinOp("+", call, ast.Num(1, None), None)) == "(x -> f) + 1"
