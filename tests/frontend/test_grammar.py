"""The grammar and the AST: every statement form, chain desugaring, the newline rules, spans."""
from __future__ import annotations

import dataclasses

import pytest

from convdsl import ConvDSLError
from convdsl.frontend import ast
from convdsl.frontend.parser import parse


def strip(node):
    """The AST without spans (and without the `piped` note of how a call was written)."""
    if isinstance(node, tuple):
        return tuple(strip(n) for n in node)
    if dataclasses.is_dataclass(node):
        fields = {f.name: strip(getattr(node, f.name)) for f in dataclasses.fields(node) if f.name not in ("span", "piped")}
        return (type(node).__name__, tuple(sorted(fields.items())))
    return node


def body(text: str):
    (net,) = parse(f"network T {{\n{text}\n}}\n", "t.cnn").items
    return net.body


def expr(text: str):
    (stmt,) = body(f"y = {text}")
    return stmt.value


def test_chain_desugars_into_calls():
    assert strip(expr("a -> f(b, k=3)")) == strip(expr("f(a, b, k=3)"))
    assert strip(expr("a -> relu")) == strip(expr("relu(a)"))
    assert strip(expr("x -> conv(16, kernel=3) -> relu")) == strip(expr("relu(conv(x, 16, kernel=3))"))
    assert expr("a -> relu").piped and not expr("relu(a)").piped


def test_chain_as_an_argument():
    call = expr("add(x -> U, y -> W)")
    assert [a.func for a in call.args] == ["U", "W"]


def test_continuation_lines_and_brackets():
    one = body("f = x -> conv(6, kernel=5) -> relu -> maxpool(2)")
    two = body("f = x -> conv(6,\n      kernel=5)\n      -> relu\n\n  # a comment\n      -> maxpool(2)")
    assert strip(one) == strip(two)


def test_every_statement_form():
    stmts = body("""
    layout NHWC
    dtype f64
    input x: [3, H, W]
    layer U = conv(8, kernel=(3, 3), pad=((1, 1), (0, 2)))
    const k = [[1, 0], [0, -1.5e-3]]
    y = x -> U
    y = y -> relu
    repeat 2 {
        y = y -> U
    }
    output y, x
    loss mse(y)
""")
    kinds = [type(s).__name__ for s in stmts]
    assert kinds == ["Layout", "DType", "Input", "LayerDecl", "ConstDecl", "Assign", "Assign", "Repeat",
                     "Output", "Loss"]
    assert stmts[0].value == "NHWC" and stmts[1].value == "f64"
    assert [type(d).__name__ for d in stmts[2].dims] == ["Num", "Name", "Name"]
    const = stmts[4].value
    assert const.items[1].items[1].value == pytest.approx(-1.5e-3)
    assert [n.id for n in stmts[8].names] == ["y", "x"]
    assert stmts[9].call.func == "mse"


def test_block_with_defaults_and_return():
    (block,) = parse("block se(x, r=16) {\n s = x -> relu\n return scale(x, s)\n}\n", "b.cnn").items
    assert [p.name for p in block.params] == ["x", "r"]
    assert block.params[0].default is None and block.params[1].default.value == 16
    assert isinstance(block.body[-1], ast.Return)


def test_use_and_several_networks():
    items = parse('use "lib.cnn"\nnetwork A {\n input x: [1]\n output x\n}\nnetwork B {\n input x: [1]\n output x\n}\n',
                  "m.cnn").items
    assert [type(i).__name__ for i in items] == ["Use", "Network", "Network"]
    assert items[0].path == "lib.cnn"


def test_integer_arithmetic_and_literals():
    e = expr("channels(x) // r + 1 - 2 * 3")
    assert e.op == "-" and e.left.op == "+" and e.left.left.op == "//"
    assert expr("true").value is True and expr("false").value is False
    assert expr("-3").value == -3 and expr("1e-3").value == pytest.approx(1e-3) and expr("0.01").value == 0.01
    assert [i.value for i in expr("(1, 7)").items] == [1, 7]


def test_spans_point_at_names():
    stmts = body("input x: [1, 8, 8]\n    y = x -> conv(6, kernel=5)")
    assign = stmts[1]
    assert (assign.span.line, assign.span.col) == (3, 5)
    assert (assign.value.span.line, assign.value.span.col) == (3, 14)
    assert (assign.value.kwargs[0].span.line, assign.value.kwargs[0].span.col) == (3, 22)


def test_names_may_contain_keywords_but_not_be_them():
    assert body("inputs = x\n output inputs")[0].name == "inputs"
    with pytest.raises(ConvDSLError, match="keyword"):
        body("network = x")


def test_empty_file_and_empty_network():
    assert parse("", "e.cnn").items == ()
    (net,) = parse("network E {}\n", "e.cnn").items
    assert net.body == ()
