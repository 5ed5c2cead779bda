"""AST → IR: names, labels, shared layers, repeat, blocks, consts, layouts and run-time sizes."""
from __future__ import annotations

import pytest

from convdsl import ConvDSLError
from convdsl.compiler import graph_from_source
from convdsl.ir import dims as D


def graph(body: str, header: str = "", network: str | None = None):
    return graph_from_source(f"{header}\nnetwork T {{\n{body}\n}}\n", "t.cnn", network)


def shapes(g):
    return [(n.label, g.values[n.output].type.text(g.layout)) for n in g.nodes]


def param_names(g):
    return [f"{layer.name}.{p.name}" for layer in g.layers for p in layer.params]


def test_inline_ops_are_labelled_per_kind_in_order():
    g = graph("input x: [1, 8, 8]\n y = x -> conv(2, kernel=3) -> relu -> conv(4, kernel=3) -> relu\n output y")
    assert [n.label for n in g.nodes] == ["conv1", "relu1", "conv2", "relu2"]
    assert param_names(g) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]


def test_chain_and_call_forms_build_the_same_graph():
    a = graph("input x: [3, 8, 8]\n y = x -> conv(4, kernel=3, pad=same) -> relu\n output y")
    b = graph("input x: [3, 8, 8]\n y = relu(conv(x, 4, kernel=3, pad=same))\n output y")
    assert shapes(a) == shapes(b) and param_names(a) == param_names(b)


def test_a_layer_shares_weights_and_is_listed_where_declared():
    g = graph("input x: [4, 8, 8]\n y = x -> conv(4, kernel=1)\n layer U = conv(4, kernel=3, pad=same)\n"
              " z = y -> U -> relu -> U\n output z")
    assert [n.layer for n in g.nodes if n.op == "conv"] == ["conv1", "U", "U"]
    assert param_names(g) == ["conv1.weight", "conv1.bias", "U.weight", "U.bias"]


def test_layer_declared_before_an_inline_op_keeps_its_place():
    g = graph("input x: [4, 8, 8]\n layer U = conv(4, kernel=1)\n y = x -> conv(4, kernel=1) -> U\n output y")
    assert param_names(g) == ["U.weight", "U.bias", "conv1.weight", "conv1.bias"]


def test_repeat_unrolls_and_names_carry_between_rounds():
    g = graph("input x: [2, 8, 8]\n layer U = conv(2, kernel=3, pad=same)\n"
              " repeat 3 {\n  x = x -> U -> relu -> conv(2, kernel=1)\n }\n output x")
    assert [n.label for n in g.nodes] == ["U", "relu1", "conv1", "U", "relu2", "conv2", "U", "relu3", "conv3"]
    assert g.nodes[3].inputs == (g.nodes[2].output,)      # round 2 reads round 1's result
    assert param_names(g)[:2] == ["U.weight", "U.bias"] and len(param_names(g)) == 8


def test_blocks_prefix_labels_and_see_their_parameters():
    src = """
block se(x, r=16) {
    s = x -> globalavgpool -> dense(channels(x) // r) -> relu -> dense(channels(x)) -> sigmoid
    return scale(x, s)
}
network T {
    input x: [32, 8, 8]
    y = x -> se(r=8) -> se
    output y
}
"""
    g = graph_from_source(src, "t.cnn")
    dense = [n for n in g.nodes if n.op == "dense"]
    assert [n.label for n in dense] == ["se1.dense1", "se1.dense2", "se2.dense1", "se2.dense2"]
    assert [n.attrs["out"] for n in dense] == [4, 32, 2, 32]
    assert dense[0].scope == ("se",)
    assert "se1.dense1.weight" in param_names(g)


def test_shadowing_rebinds_from_that_line_on():
    g = graph("input x: [1, 8, 8]\n y = x -> relu\n y = y -> sigmoid\n output y")
    assert g.outputs[0].value == g.nodes[1].output


def test_const_expands_into_the_weight():
    g = graph("input x: [1, 5, 5]\n const k = [[[[0, 1], [2, 3]]]]\n"
              " y = x -> conv(1, kernel=2, weight=k, bias=false, frozen=true)\n output y")
    (layer,) = g.layers
    (weight,) = layer.params
    assert weight.shape == (1, 1, 2, 2) and weight.const_values == (0.0, 1.0, 2.0, 3.0)
    assert weight.init.kind == "const" and not weight.trainable


def test_named_dims_stay_symbolic():
    g = graph("input x: [3, H, W]\n y = x -> conv(8, kernel=3, stride=2, pad=same) -> maxpool(2)\n output y")
    t = g.values[g.outputs[0].value].type
    assert t.text() == "[8, (H + 1)//4, (W + 1)//4]"      # pad=same: ceil(H / 2), then halved
    for h in range(1, 40):
        assert D.evaluate(t.shape[1], {"H": h}) == ((h + 1) // 2 - 2) // 2 + 1
    assert g.sym_dims == ("H", "W")


def test_nhwc_inputs_are_written_channel_last():
    g = graph("layout NHWC\n input x: [28, 28, 3]\n y = x -> conv(8, kernel=3)\n output y")
    assert g.values[g.inputs[0].value].type.shape == (3, 28, 28)
    assert shapes(g) == [("conv1", "[26, 26, 8]")]


def test_builtins_read_sizes():
    g = graph("input x: [3, 10, 12]\n y = x -> conv(width(x) + height(x) * 2 - channels(x), kernel=1)\n output y")
    assert g.nodes[0].attrs["out"] == 12 + 20 - 3


def test_separable_expands_into_depthwise_and_pointwise():
    g = graph("input x: [4, 8, 8]\n y = x -> separable(6, kernel=3, pad=same)\n output y")
    assert [(n.label, n.op) for n in g.nodes] == [("separable1.dw", "depthwise"), ("separable1.pw", "conv")]
    assert param_names(g) == ["separable1.dw.weight", "separable1.pw.weight", "separable1.pw.bias"]


def test_dense_on_a_map_flattens_first():
    g = graph("input x: [4, 2, 2]\n y = x -> globalavgpool -> dense(3)\n output y")
    assert [n.op for n in g.nodes] == ["globalavgpool", "flatten", "dense"]


def test_use_brings_blocks_from_another_file(tmp_path):
    (tmp_path / "lib.cnn").write_text("block twice(x) {\n return x -> relu -> relu\n}\n")
    main = tmp_path / "main.cnn"
    main.write_text('use "lib.cnn"\nnetwork M {\n input x: [1, 4, 4]\n y = x -> twice\n output y\n}\n')
    from convdsl.compiler import graph_from_file
    g = graph_from_file(main)
    assert [n.label for n in g.nodes] == ["twice1.relu1", "twice1.relu2"]


def test_use_cycles_are_errors(tmp_path):
    (tmp_path / "a.cnn").write_text('use "b.cnn"\n')
    (tmp_path / "b.cnn").write_text('use "a.cnn"\n')
    from convdsl.compiler import graph_from_file
    with pytest.raises(ConvDSLError, match="cycle"):
        graph_from_file(tmp_path / "a.cnn")


def test_the_graph_is_frozen():
    g = graph("input x: [1, 4, 4]\n y = x -> relu\n output y")
    with pytest.raises(Exception):
        g.nodes[0].attrs["x"] = 1
    with pytest.raises(Exception):
        g.name = "other"
