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
        fields = {f.name: strip(getattr(node, f.name)) for f in dataclasses.fields(node) if f.name not in ("span", "end", "piped", "source")}
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


def test_newlines_inside_square_brackets_and_crlf():
    one = body("input x: [1, 28, 28]\nconst k = [[1, 0], [0, 1]]")
    two = body("input x: [1,\n          28,\n          28]\nconst k = [[1, 0],   # first row\n\n           [0, 1]]")
    assert strip(one) == strip(two)
    crlf = parse("network T {\r\n    input x: [1, 8, 8]\r\n    y = x\r\n        -> relu\r\n    output y\r\n}\r\n", "c.cnn")
    lf = parse("network T {\n    input x: [1, 8, 8]\n    y = x -> relu\n    output y\n}\n", "c.cnn")
    assert strip(crlf.items) == strip(lf.items)


def test_blank_lines_and_comments_between_statements():
    stmts = body("\n\n  # only a comment\ninput x: [1]   # after a statement\n\n\n# another\noutput x\n# last\n")
    assert [type(s).__name__ for s in stmts] == ["Input", "Output"]
    (net,) = parse("# header\n\n\nnetwork T {   # opening\n\n}   # closing\n# tail", "c.cnn").items
    assert net.name == "T" and net.body == ()


def test_shadowing_reads_the_previous_binding():
    first, second = body("y = x -> relu\ny = y -> sigmoid")
    assert first.name == second.name == "y"
    assert strip(second.value) == strip(expr("sigmoid(y)"))


def test_repeat_body_and_nested_repeat():
    (rep,) = body("repeat 3 {\n    s = s -> relu\n    repeat 2 {\n        s = s -> U\n    }\n}")
    assert rep.count.value == 3
    assert [type(s).__name__ for s in rep.body] == ["Assign", "Repeat"]
    assert rep.body[1].count.value == 2 and rep.body[1].body[0].value.func == "U"


def test_number_kinds():
    assert type(expr("3").value) is int and expr("007").value == 7
    for text, value in (("3.0", 3.0), ("1e3", 1000.0), (".5", 0.5), ("2.", 2.0), ("1E-3", 1e-3), ("2e+2", 200.0)):
        num = expr(text)
        assert type(num.value) is float and num.value == pytest.approx(value), text
    assert expr("-0.5").value == -0.5 and expr("- 3").value == -3


def test_negation_of_names_and_precedence():
    neg = expr("-k")
    assert isinstance(neg, ast.Neg) and neg.operand.id == "k"
    e = expr("a * b + c")
    assert e.op == "+" and e.left.op == "*"
    e = expr("a + b * c")
    assert e.op == "+" and e.right.op == "*"
    e = expr("(a + b) * c")
    assert e.op == "*" and e.left.op == "+"
    e = expr("2 - -1")
    assert e.op == "-" and e.right.value == -1
    e = expr("channels(x) // r + 1")
    assert strip(e) == strip(ast.BinOp("+", ast.BinOp("//", ast.Call("channels", (ast.Name("x", None),), (), None),
                                                      ast.Name("r", None), None), ast.Num(1, None), None))


def test_tuples_lists_and_keyword_values():
    call = expr("conv(x, 8, kernel=(1, 7), pad=((0, 1), (3, 3)), bias=false, init=normal(0.02), weight=K)")
    kw = {k.name: k.value for k in call.kwargs}
    assert [i.value for i in kw["kernel"].items] == [1, 7]
    assert [[i.value for i in pair.items] for pair in kw["pad"].items] == [[0, 1], [3, 3]]
    assert kw["bias"].value is False and kw["init"].func == "normal" and kw["weight"].id == "K"
    assert [i.value for i in expr("(3,)").items] == [3]
    assert strip(expr("(x)")) == strip(expr("x"))              # parentheses alone make no tuple
    nested = expr("[[[1, -2]], [[0.5, 1e-3]]]")
    assert nested.items[1].items[0].items[1].value == pytest.approx(1e-3)
    assert nested.items[0].items[0].items[1].value == -2


def test_trailing_commas():
    assert strip(expr("f(a, b, k=1,)")) == strip(expr("f(a, b, k=1)"))
    assert strip(expr("[1, 2,]")) == strip(expr("[1, 2]"))
    (block,) = parse("block b(x, r=2,) {\n return x\n}\n", "b.cnn").items
    assert [p.name for p in block.params] == ["x", "r"]


def test_chain_continuation_and_arguments_across_lines():
    one = body("s = add(x -> U, s -> softmax -> W) -> relu -> V")
    two = body("s = add(\n    x -> U,\n    s\n      -> softmax\n      -> W\n)\n    -> relu\n    -> V")
    assert strip(one) == strip(two)


def test_spans_of_statements_and_names():
    src = "network N {\n    input x: [3, H, W]\n    layer U = conv(4, kernel=3)\n    output y, x\n}\n"
    (net,) = parse(src, "s.cnn").items
    inp, layer, out = net.body
    assert (net.span.line, net.span.col) == (1, 9)
    assert (inp.span.line, inp.span.col) == (2, 11)
    assert [(d.span.line, d.span.col) for d in inp.dims] == [(2, 15), (2, 18), (2, 21)]
    assert (layer.span.line, layer.span.col) == (3, 11) and (layer.value.span.line, layer.value.span.col) == (3, 15)
    assert [(n.span.line, n.span.col, n.span.end_col) for n in out.names] == [(4, 12, 13), (4, 15, 16)]
    assert all(s.span.path == "s.cnn" for s in net.body)
    (block,) = parse("block b(x, r=16) {\n    return x\n}\n", "b.cnn").items
    assert [(p.span.line, p.span.col) for p in block.params] == [(1, 9), (1, 12)]


def test_a_byte_order_mark_is_not_text():
    (net,) = parse("\ufeffnetwork T {\n    input x: [1]\n    output x\n}\n", "bom.cnn").items
    assert (net.span.line, net.span.col) == (1, 9)


def test_keywords_cannot_be_names_anywhere():
    for text in ("input = x", "y = layer", "y = conv(x, repeat=2)", "layer input = conv(4, kernel=1)",
                 "y = x -> output", "true = 1"):
        with pytest.raises(ConvDSLError, match="keyword"):
            body(text)
    for text in ("block b(x, loss=1) {\n return x\n}\n", "network use {\n}\n"):
        with pytest.raises(ConvDSLError, match="keyword"):
            parse(text, "k.cnn")


def test_a_statement_ends_just_past_its_last_token():
    """So that `convert` knows a statement's extent from the parser, continuation lines and all,
    without lexing the source again; a comment after it is not part of it."""
    stmts = body('input x: [1, 4, 4]   # size\n'
                 'y = x -> conv(2, kernel=3)\n'
                 '      -> relu  # then relu\n'
                 'layer d = dense(3, init=normal(0.5))\n'
                 'return (y)\n'
                 'loss mse(y)')
    # The body starts on line 2 of the wrapped text.
    assert [s.end for s in stmts] == [(2, 19), (4, 14), (5, 37), (6, 11), (7, 12)]
