"""The parser's limits and costs: names, integers, long chains, long number lists, files that are
not UTF-8 text, and work that stays linear in the size of the file."""
from __future__ import annotations

import pytest

from convdsl import ConvDSLError
from convdsl.errors import Source
from convdsl.frontend import ast
from convdsl.frontend import parser as parser_module
from convdsl.frontend.parser import parse, parse_file


def one_statement(stmt: str) -> str:
    return f"network A {{\n    input x: [1, 8, 8]\n    {stmt}\n    output y\n}}\n"


def error(text: str) -> ConvDSLError:
    with pytest.raises(ConvDSLError) as info:
        parse(text, "p.cnn")
    return info.value


def test_a_name_longer_than_the_limit_is_refused_at_the_name():
    e = error("network " + "N" * 5000 + " {\n}\n")
    assert (e.span.line, e.span.col) == (1, 9)
    assert e.message == "this name is 5,000 characters long; a name has at most 128"
    parse("network " + "N" * 128 + " {\n}\n")


def test_an_integer_literal_beyond_the_integer_limit_is_refused_at_the_literal():
    e = error(one_statement("y = x -> conv(4611686018427387905, kernel=1)"))
    assert (e.span.line, e.span.col) == (3, 19)
    assert "integers are at most 2**62" in e.message
    e = error("network A {\n    const k = [1, 99999999999999999999]\n}\n")
    assert (e.span.line, e.span.col) == (2, 19)
    parse(one_statement("y = x -> conv(4611686018427387904, kernel=1)"))     # the limit itself parses


def test_a_long_number_list_is_one_token_for_the_parser(monkeypatch):
    # 100,000 numbers: the LALR parser sees a handful of tokens, not 200,000 (one step each).
    fed = []
    post = parser_module._parser().options.postlex
    real = post.process

    def counting(stream):
        for tok in real(stream):
            fed.append(tok.type)
            yield tok
    monkeypatch.setattr(post, "process", counting)
    text = "network A {\n    const k = [" + ", ".join(str(i % 7 - 3) for i in range(100_000)) + "]\n}\n"
    module = parse(text)
    assert len(fed) < 20
    values = module.items[0].body[0].value.items
    assert len(values) == 100_000 and values[4].value == 1 and values[2].value == -1


def test_a_number_list_reads_as_the_list_rule_reads_it():
    fast = parse("network A {\n    const k = [1, -2.5,  # note\n       .5e1, 3,]\n}\n").items[0].body[0].value
    slow = parse("network A {\n    const k = [1, -2.5,  # note\n       .5e1, 3, a]\n}\n").items[0].body[0].value
    assert isinstance(fast, ast.ListLit) and fast.items == slow.items[:4]
    assert [(n.span.line, n.span.col, n.span.end_col) for n in fast.items] == \
        [(n.span.line, n.span.col, n.span.end_col) for n in slow.items[:4]]
    shape = parse("network A {\n    input x: [3, 32, 32]\n}\n").items[0].body[0]
    assert [d.value for d in shape.dims] == [3, 32, 32]


@pytest.mark.parametrize("text", ["[" + "#" * 60,
                                  "network A {\n    const k = [1" + " " * 50_000 + "," + " " * 50_000 + "x\n}\n",
                                  "network A {\n    const k = [" + "- " * 50_000 + "\n}\n",
                                  "network A {\n    const k = [1" + ", 1 #" * 20_000 + "\n}\n"])
def test_a_text_that_is_almost_a_number_list_costs_linear_time(text):
    # `[` and 22 `#` once took 20 s (and 60 forever): the list token's gap `(?:\s|#[^\n]*)*` could
    # split a run of `#` into comments in 2^n ways before it gave up.
    import time
    start = time.perf_counter()
    with pytest.raises(ConvDSLError):
        parse(text, "p.cnn")
    assert time.perf_counter() - start < 2.0


def test_a_source_line_is_quoted_without_resplitting_the_text():
    class CountingText(str):
        splits = 0

        def split(self, *args):
            CountingText.splits += 1
            return super().split(*args)
    source = Source("big.cnn", CountingText("x\n" * 10_000))
    for lineno in range(1, 2001):
        assert source.line(lineno) == "x"
    assert CountingText.splits == 1


def test_a_syntax_error_after_a_long_name_is_found_without_rescanning_it():
    # The hints look at the end of the text before the error; they must not scan it from every start.
    e = error("network A {\n    x = " + "a" * 100_000 + " - )\n}\n")
    assert e.span.line == 2 and e.message.startswith("unexpected `)`")


def test_the_command_line_reads_a_file_of_many_networks_once(tmp_path, monkeypatch):
    import convdsl.cli as cli
    calls = []
    real = parser_module.parse
    monkeypatch.setattr(parser_module, "parse", lambda text, path="<string>": calls.append(path) or real(text, path))
    path = tmp_path / "many.cnn"
    path.write_text("".join(f"network N{i} {{\n    input x: [1, 4, 4]\n    y = x -> relu\n    output y\n}}\n"
                            for i in range(5)))
    graphs = cli._graphs(str(path), None)
    assert [g.name for g in graphs] == [f"N{i}" for i in range(5)] and len(calls) == 1


def test_a_file_that_is_not_utf8_is_pointed_at_where_it_goes_wrong(tmp_path):
    path = tmp_path / "latin1.cnn"
    path.write_bytes("network A {\n    # caf\u00e9\n}\n".encode("latin-1"))
    with pytest.raises(ConvDSLError) as info:
        parse_file(path)
    e = info.value
    assert (e.span.line, e.span.col) == (2, 10)
    assert e.message == "this file is not UTF-8 text: byte 21 (0xE9) is not valid UTF-8; save it as UTF-8"
    assert str(e).splitlines()[2] == "             ^"


def test_a_folder_is_not_read_as_a_file(tmp_path):
    with pytest.raises(ConvDSLError, match="is a folder, not a .cnn file"):
        parse_file(tmp_path)


@pytest.mark.parametrize("tail", ["\n\n\n", "\n    \n\t\n", "\n    # the end\n\n", "   # trailing\n"])
def test_end_of_file_points_after_the_last_token_whatever_follows_it(tail):
    e = error("network A {\n    input x: [1, 8, 8]" + tail)
    assert (e.span.line, e.span.col) == (2, 23)
    quoted, caret = str(e).splitlines()[1:]
    assert quoted.startswith("        input x: [1, 8, 8]") and caret == " " * 26 + "^"


def residual_network(blocks: int) -> str:
    """A ResNet of `blocks` bottleneck blocks (10 layers each: three convs, three batchnorms,
    three relus and an add), trained with a loss: ResNet-152 is about 50 blocks."""
    lines = ["block bottleneck(x, c) {",
             "    y = x -> conv(c // 4, kernel=1) -> batchnorm -> relu",
             "          -> conv(c // 4, kernel=3, pad=same) -> batchnorm -> relu",
             "          -> conv(c, kernel=1) -> batchnorm",
             "    return add(x, y) -> relu",
             "}",
             "network R {",
             "    input x: [3, 32, 32]",
             "    f = x -> conv(16, kernel=3, pad=same) -> relu"]
    lines += ["          -> bottleneck(16)"] * blocks
    lines += ["    logits = f -> globalavgpool -> dense(10)", "    output logits",
              "    loss softmax_cross_entropy(logits)", "}"]
    return "\n".join(lines) + "\n"


def test_text_to_c_grows_about_linearly_with_the_layers():
    # Placement once scanned every value for every value, and rendering every parameter slot for
    # every layer: 100 blocks (1,005 layers) took 3.6 s of CPU, 22 times what 12 blocks (125)
    # take, where linear is 8 times. The CPU time of this process, so that other work on the
    # machine changes little; placements are cached by lifetimes, so each text is compiled once.
    import time
    from convdsl.compiler import compile_graph, graph_from_source

    def seconds(blocks: int) -> float:
        text = residual_network(blocks)
        start = time.process_time()
        compiled = compile_graph(graph_from_source(text))
        assert len(compiled.graph.nodes) == 10 * blocks + 5
        return time.process_time() - start

    seconds(1)                                       # the grammar and the templates, compiled once
    # The fastest of a few runs: beside the rest of the suite on two busy cores one run of the
    # large text once took twice its time alone (0.98 s against 0.5), so the ratio read 16; with
    # eval mode's twins of the folded convs (0.8 s alone) two runs of it were once both slowed
    # so (1.61 s, 18.5 times), hence three.
    small, large = min(seconds(12) for _ in range(5)), min(seconds(100) for _ in range(3))
    assert large < 2.5, f"1,005 layers took {large:.2f} s from text to C"
    assert large < 14 * small, f"8 times the layers took {large / small:.1f} times as long ({small:.2f} s, {large:.2f} s)"
