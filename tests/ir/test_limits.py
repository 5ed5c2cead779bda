"""Resource limits at check time (convdsl/limits.py): sizes that would wrap in C, parameter and
activation budgets, compile work that would hang, floats that would be inf or NaN in C, and
`use` of what is not a readable .cnn file. Every case is a located ConvDSLError, never a hang,
a traceback, or a number that reaches the C compiler wrapped."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from convdsl import ConvDSLError, limits
from convdsl.compiler import graph_from_file, graph_from_source
from convdsl.ir import dims as D
from convdsl.ops.base import OpContext, expect_float

REPO = Path(__file__).resolve().parents[2]


def net(body: str, shape: str = "[1, 2, 2]", header: str = "") -> str:
    return f"{header}network N {{\n    input x: {shape}\n{body}\n    output y\n}}\n"


def error(text: str) -> ConvDSLError:
    with pytest.raises(ConvDSLError) as info:
        graph_from_source(text, "n.cnn")
    first = str(info.value).splitlines()[0]
    assert first.startswith("n.cnn:") and ": error: " in first, first
    return info.value


def where(e: ConvDSLError) -> tuple[int, int]:
    return e.span.line, e.span.col


# ---- sizes that would wrap in int64 ----------------------------------------------------------------

def test_the_run_time_size_cap_is_the_one_the_generated_module_enforces():
    template = (REPO / "templates" / "c" / "module.c.j2").read_text()
    shift = re.search(r"#define CDSL_MAX_SIZE \(\(int64_t\)1 << (\d+)\)", template)
    assert shift and 1 << int(shift.group(1)) == limits.MAX_RUNTIME_SIZE


@pytest.mark.parametrize("op,arg", [
    ("upsample(2147483648)", "factor"),
    ("conv(1, kernel=1, pad=2147483644)", "pad"),
    ("conv(1, kernel=1, pad=((0, 2147483644), 0))", "pad"),
    ("conv(1000000000000, kernel=1)", "out"),
    ("conv(2, kernel=1, groups=4294967296)", "groups"),
    ("conv(1, kernel=1, stride=(1, 4294967296))", "stride"),
    ("maxpool(4294967296)", "window"),
    ("deconv(1, kernel=1, output_pad=4294967296)", "output_pad"),
])
def test_an_attribute_that_becomes_a_size_is_capped_at_its_span(op, arg):
    e = error(net(f"    y = x -> {op}"))
    assert f"`{arg}` must be at most 2**24 = 16,777,216" in e.message
    column = 5 + len("y = x -> ") + op.index(f"{arg}=") + len(arg) + 1 if f"{arg}=" in op else \
        5 + len("y = x -> ") + op.index("(") + 1
    assert where(e) == (3, column)


def test_a_run_time_map_is_bounded_per_dim_and_its_element_count_left_to_prepare():
    # 4096·H · 4096·W could pass int64 with H and W at their largest (2**24), but the module counts
    # a tensor's elements at run time, overflow-checked (tests/e2e/test_size_safety.py): check
    # refuses only a single size that could pass the bound, and a map with three run-time sizes,
    # a 3-D network's ordinary input, is fine.
    graph_from_source(net("    y = x -> relu -> upsample(4096)", "[1, H, W]"))
    graph_from_source(net("    y = x -> relu", "[1, D, H, W]"))
    e = error(net("    c = height(x) * height(x) * height(x)\n    y = x", "[1, H, W]"))
    assert "could reach about 2**72" in e.message


def test_magnitude_bound_bounds_every_value_an_expression_takes():
    h, w = D.Sym.var("H"), D.Sym.var("W")
    rng = random.Random(5)
    for _ in range(300):
        e = rng.choice([h, w, D.add(h, -3)])
        for _ in range(rng.randint(1, 5)):
            other = rng.choice([h, w, rng.randint(-9, 9)])
            e = rng.choice([D.add, D.sub, D.mul, D.maximum])(e, other) if rng.random() < 0.7 else \
                D.floordiv(e, rng.randint(1, 5))
        size = rng.choice([3, 20, 1000])
        bound = D.magnitude_bound(e, size)
        for _ in range(20):
            env = {"H": rng.randint(1, size), "W": rng.randint(1, size)}
            assert abs(D.evaluate(e, env)) <= bound
    assert D.magnitude_bound(D.add(D.mul(h, w), -5), 10) == 105


# ---- parameter and activation budgets ---------------------------------------------------------------

def test_a_layer_over_the_parameter_limit_is_refused_at_the_op_not_in_model():
    e = error(net("    y = x -> dense(16000000) -> dense(200)"))
    assert where(e) == (3, 33)
    assert e.message == ("dense2 would have 3,200,000,200 parameters, beyond the limit of 2**31 = 2,147,483,648 "
                         "per layer")


def test_the_network_total_of_parameters_is_limited_too():
    # 32,000,000 + 1,600,000,100 + 1,616,000,000 parameters: each layer within its limit, not the sum.
    e = error(net("    y = x -> dense(16000000) -> dense(100) -> dense(16000000)", "[1]"))
    assert where(e) == (3, 47)
    assert "with the 1,616,000,000 parameters of dense3 the network would have 3,248,000,100" in e.message


def test_activations_per_sample_are_budgeted():
    e = error(net("    y = x -> conv(1, kernel=1)", "[1, 100000, 100000]"))
    assert where(e) == (3, 14)
    assert "the network's tensors hold 20,000,000,000 elements per sample" in e.message
    e = error(net("    y = x -> conv(4, kernel=1)", "[1, 100000, 100000]"))
    assert "the output of conv1 [4, 100000, 100000] holds 40,000,000,000 elements per sample" in e.message


def test_an_im2col_workspace_over_the_budget_is_refused():
    e = error(net("    y = x -> conv(1, kernel=(4096, 4096), pad=same)", "[1024, 64, 64]"))
    assert "the workspace of conv1" in e.message


def test_a_const_over_the_element_limit_is_refused(monkeypatch):
    monkeypatch.setattr(limits, "MAX_CONST_ELEMENTS", 5)
    e = error("network N {\n    input x: [1, 2, 2]\n    const k = [[1, 2, 3], [4, 5, 6]]\n    y = x\n"
              "    output y\n}\n")
    assert where(e) == (3, 15) and "more than 5 numbers" in e.message


# ---- compile work that would hang ---------------------------------------------------------------------

def test_an_integer_that_grows_without_bound_stops_at_the_expression():
    e = error(net("    c = 2\n    repeat 1000 {\n        c = c * c\n    }\n    y = x"))
    assert where(e) == (5, 15) and "beyond the limit of ±2**62" in e.message


def test_run_time_size_arithmetic_that_grows_stops_too():
    e = error(net("    c = height(x)\n    repeat 100 {\n        c = c // 2 + c // 3\n    }\n    y = x",
                  "[1, H, W]"))
    assert where(e)[0] == 5 and "too complex" in e.message
    e = error(net("    c = height(x) * height(x) * height(x)\n    y = x", "[1, H, W]"))
    assert "could reach about 2**72" in e.message


def test_nested_repeats_that_make_no_layers_count_against_the_statement_budget(monkeypatch):
    monkeypatch.setattr(limits, "MAX_STATEMENTS", 5000)
    e = error(net("    c = 1\n    repeat 1000 {\n        repeat 1000 {\n            repeat 1000 {\n"
                  "            }\n        }\n    }\n    y = x"))
    assert where(e) == (6, 13) and "more than 5,000 statements" in e.message


def test_blocks_that_each_call_the_previous_twice_count_block_calls(monkeypatch):
    # 2**40 calls, and not one layer among them: the layer limit would never stop it.
    monkeypatch.setattr(limits, "MAX_BLOCK_CALLS", 1000)
    blocks = "block b0(x) {\n    return x\n}\n" + "".join(
        f"block b{i}(x) {{\n    return x -> b{i - 1} -> b{i - 1}\n}}\n" for i in range(1, 41))
    e = error(net("    y = x -> b40", header=blocks))
    assert "applies blocks more than 1,000 times" in e.message


def test_nesting_adds_up_across_blocks_and_is_refused_before_the_stack_runs_out():
    blocks = "block b0(x) {\n    return relu(x)\n}\n" + "".join(
        f"block b{i}(x) {{\n    return relu(b{i - 1}(x))\n}}\n" for i in range(1, 200))
    e = error(net("    y = b199(x)", header=blocks))
    assert "expressions nest more than 100 levels deep here (blocks applied inside blocks count too" in e.message


def test_a_long_chain_is_not_nesting():
    g = graph_from_source(net("    y = x" + " -> relu" * 3000))
    assert len(g.nodes) == 3000 and g.nodes[-1].inputs == (g.nodes[-2].output,)
    g = graph_from_source(net("    y = add(x -> relu" + " -> relu" * 999 + ", x)"))
    assert len(g.nodes) == 1001


def test_the_layer_limit_still_holds_once_unrolled(monkeypatch):
    monkeypatch.setattr(limits, "MAX_NODES", 50)
    e = error(net("    y = x\n    repeat 100 {\n        y = y -> relu\n    }"))
    assert where(e) == (5, 18) and "more than 50 layers" in e.message


def test_a_network_wide_limit_is_reported_once_not_for_every_later_statement(monkeypatch):
    # The builder reports several independent errors; a limit on the whole network stops it,
    # since every statement after it would cross the same limit again.
    monkeypatch.setattr(limits, "MAX_NODES", 3)
    e = error(net("    a = x -> relu -> relu -> relu -> relu\n    b = x -> relu\n    c = x -> relu\n    y = x -> relu"))
    assert "more than 3 layers" in e.message
    assert str(e).count("more than 3 layers") == 1


# ---- floats that would be inf or NaN in C ---------------------------------------------------------------

@pytest.mark.parametrize("op", [
    "dropout(0.0 * (1e300 * 1e300))",
    "batchnorm(eps=1e300 * 1e300)",
    "leaky_relu(1e300 * 1e300 - 1e300 * 1e300)",
    "conv(1, kernel=1, init=normal(1e300 * 1e300))",
])
def test_arithmetic_that_overflows_a_float_is_refused_at_the_operator(op):
    e = error(net(f"    y = x -> {op}"))
    assert e.message.startswith("this arithmetic gives inf")
    assert e.span.line == 3 and net(f"    y = x -> {op}").splitlines()[2][e.span.col - 1] == "*"


def test_a_nan_fails_every_range_check():
    ctx = OpContext(None, {}, "NCHW", "f32")
    for bounds in ({"lo": 0.0, "hi": 1.0, "hi_open": True}, {"lo": 0.0}, {}):
        with pytest.raises(ConvDSLError, match="must be a finite f32 number"):
            expect_float(float("nan"), ctx, "p", **bounds)


def test_floats_must_fit_the_network_element_type():
    e = error(net("    y = x -> leaky_relu(1e300)"))
    assert where(e) == (3, 25) and "finite f32 number" in e.message
    graph_from_source(net("    dtype f64\n    y = x -> leaky_relu(1e300)"))
    e = error("network N {\n    input x: [1, 2, 2]\n    const k = [[1, 1e300]]\n    y = x\n    output y\n}\n")
    assert where(e) == (3, 20) and "does not fit in f32" in e.message
    e = error(net("    y = x -> conv(1, kernel=1, init=normal(1e300))"))
    assert where(e) == (3, 37) and "the scale is at most 1e+30" in e.message


# ---- use ---------------------------------------------------------------------------------------------------

def test_files_that_use_the_next_one_twice_are_parsed_once_each(tmp_path, monkeypatch):
    import convdsl.frontend.parser as parser
    import convdsl.ir.build as build
    parsed: list[str] = []
    real_parse = parser.parse

    def counting_parse(text, path="<string>"):
        parsed.append(str(path))
        if len(parsed) > 100:
            raise AssertionError("the same files are parsed again and again")
        return real_parse(text, path)
    monkeypatch.setattr(parser, "parse", counting_parse)
    monkeypatch.setattr(build, "parse", counting_parse, raising=False)
    for i in range(30):
        uses = f'use "f{i + 1}.cnn"\nuse "f{i + 1}.cnn"\n' if i < 29 else ""
        (tmp_path / f"f{i}.cnn").write_text(uses + f"block b{i}(x) {{\n    return x -> relu\n}}\n")
    (tmp_path / "main.cnn").write_text('use "f0.cnn"\n' + net("    y = x -> b29"))
    g = graph_from_file(tmp_path / "main.cnn")
    assert [n.op for n in g.nodes] == ["relu"]
    assert sorted(Path(p).name for p in parsed) == sorted(["main.cnn", *(f"f{i}.cnn" for i in range(30))])


def test_use_of_a_folder_says_it_is_a_folder(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "main.cnn").write_text('use "adir"\n' + net("    y = x"))
    with pytest.raises(ConvDSLError) as info:
        graph_from_file(tmp_path / "main.cnn")
    assert where(info.value) == (1, 5) and "`adir` is a folder" in info.value.message


def test_use_of_a_file_that_is_not_utf8_points_at_the_use_and_the_bad_byte(tmp_path):
    (tmp_path / "latin1.cnn").write_bytes("# caf\u00e9\nblock b(x) {\n    return x\n}\n".encode("latin-1"))
    (tmp_path / "main.cnn").write_text('\nuse "latin1.cnn"\n' + net("    y = x"))
    with pytest.raises(ConvDSLError) as info:
        graph_from_file(tmp_path / "main.cnn")
    assert where(info.value) == (2, 5)
    assert info.value.message == ("`latin1.cnn` is not UTF-8 text: byte 5 (0xE9, line 1, column 6) is not "
                                  "valid UTF-8")


def test_a_long_chain_goes_through_every_stage_that_walks_the_ast(tmp_path):
    from convdsl.frontend.unparse import module as unparse
    from convdsl.frontend.parser import parse
    from convdsl.rewrite.fc_to_conv import fc_to_conv
    path = tmp_path / "long.cnn"
    path.write_text(net("    y = x" + " -> relu" * 1500 + " -> flatten -> dense(10)", "[1, 4, 4]"))
    converted = fc_to_conv(path)
    assert "conv(10, kernel=4)" in converted.text
    assert len(graph_from_source(converted.text).nodes) == 1501
    assert unparse(parse(path.read_text())).count("relu") == 1500
