"""`convdsl graph` on deep networks: position-wise ops folded into the box before them, block
instances collapsed to one box, another direction, and pictures that shrink accordingly."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convdsl.compiler import graph_from_source
from convdsl.graphviz import quote, to_dot, write_graph
from convdsl.ops.base import registry

REPO = Path(__file__).resolve().parents[2]

# U-Net: 7 double_conv instances of 6 ops (42), 3 maxpools, 3 deconvs, 3 concats and the 1×1
# scoring conv: 52 ops. Folded, a double_conv is 2 boxes (conv + batchnorm + relu twice): 14 + 10
# = 24 boxes. Collapsed: 7 block boxes + 10 = 17.
UNET = """
block double_conv(x, c) {
    return x -> conv(c, kernel=3, pad=same) -> batchnorm -> relu
             -> conv(c, kernel=3, pad=same) -> batchnorm -> relu
}

network UNetLike {
    input x: [3, 32, 32]
    e1 = x -> double_conv(16)                                       # [16, 32, 32]
    e2 = e1 -> maxpool(2) -> double_conv(32)                        # [32, 16, 16]
    e3 = e2 -> maxpool(2) -> double_conv(64)                        # [64, 8, 8]
    b = e3 -> maxpool(2) -> double_conv(128)                        # [128, 4, 4]
    d3 = concat(b -> deconv(64, kernel=2, stride=2), e3) -> double_conv(64)
    d2 = concat(d3 -> deconv(32, kernel=2, stride=2), e2) -> double_conv(32)
    d1 = concat(d2 -> deconv(16, kernel=2, stride=2), e1) -> double_conv(16)
    scores = d1 -> conv(2, kernel=1)
    output scores
}
"""
UNET_COUNTS = {"ops": 52, "folded": 24, "collapsed": 17}

# MobileNetV2's inverted residuals: the stem and the head are conv + batchnorm + relu (3 ops,
# 1 box each); an expand_project is 8 ops in 3 boxes, an inverted_residual 9 ops (the add too)
# in 4 boxes; globalavgpool, dense's flatten and dense are 3 more. 3 + 3·8 + 3·9 + 3 + 3 = 60
# ops; folded 1 + 3·3 + 3·4 + 1 + 3 = 26 boxes; collapsed 1 + 6 + 1 + 3 = 11.
MOBILENET = """
block expand_project(x, t, c, s) {
    return x -> conv(channels(x) * t, kernel=1, bias=false) -> batchnorm -> relu
             -> depthwise(kernel=3, stride=s, pad=same, bias=false) -> batchnorm -> relu
             -> conv(c, kernel=1, bias=false) -> batchnorm
}

block inverted_residual(x, t) {
    y = x -> conv(channels(x) * t, kernel=1, bias=false) -> batchnorm -> relu
          -> depthwise(kernel=3, pad=same, bias=false) -> batchnorm -> relu
          -> conv(channels(x), kernel=1, bias=false) -> batchnorm
    return add(x, y)
}

network MobileNetV2Like {
    input x: [3, 32, 32]
    f = x -> conv(32, kernel=3, stride=2, pad=same, bias=false) -> batchnorm -> relu
          -> expand_project(1, 16, 1)
          -> expand_project(6, 24, 2) -> inverted_residual(6) -> inverted_residual(6)
          -> expand_project(6, 32, 2) -> inverted_residual(6)
          -> conv(128, kernel=1, bias=false) -> batchnorm -> relu
    logits = f -> globalavgpool -> dense(10)
    output logits
}
"""
MOBILENET_COUNTS = {"ops": 60, "folded": 26, "collapsed": 11}
NETWORKS = {"unet": (UNET, UNET_COUNTS), "mobilenet": (MOBILENET, MOBILENET_COUNTS)}


def drawn_boxes(dot: str) -> list[str]:
    """The DOT ids of the boxes drawn for layers and blocks (not the input/output ellipses)."""
    return re.findall(r'^\s+(n\d+|"block:[^"]+") \[', dot, flags=re.M)


def edges(dot: str) -> list[tuple[str, str]]:
    return re.findall(r"^\s+(\S+) -> (\S+);", dot, flags=re.M)


def label_of(dot: str, node_id: str) -> str:
    m = re.search(r"^\s+" + re.escape(node_id) + r' \[.*?label="((?:[^"\\]|\\.)*)"', dot, flags=re.M)
    assert m, node_id
    return m.group(1).replace("\\n", "\n")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "convdsl", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_positionwise_is_a_trait_of_the_ops_that_map_each_position_on_its_own():
    marked = {name for name, op in registry().items() if op.positionwise}
    assert marked == {"relu", "sigmoid", "tanh", "leaky_relu", "softmax", "batchnorm", "dropout", "shuffle",
                      "relu6", "clip", "hardsigmoid", "hardswish", "silu", "gelu", "elu", "prelu", "layernorm"}


@pytest.mark.parametrize("name", NETWORKS)
def test_box_counts_folded_and_collapsed(name):
    source, counts = NETWORKS[name]
    graph = graph_from_source(source)
    assert len(graph.nodes) == counts["ops"]
    assert len(drawn_boxes(to_dot(graph))) == counts["ops"]
    assert len(drawn_boxes(to_dot(graph, fold=True))) == counts["folded"]
    collapsed = to_dot(graph, fold=True, collapse=True)
    assert len(drawn_boxes(collapsed)) == counts["collapsed"]
    assert "subgraph" not in collapsed          # no cluster is left: every instance is one box


def test_folded_boxes_name_every_op_and_keep_the_data_flow():
    graph = graph_from_source(UNET)
    dot = to_dot(graph, fold=True)
    by_label = {n.label: n.id for n in graph.nodes}
    first = f"n{by_label['double_conv1.conv1']}"
    assert label_of(dot, first) == "double_conv1.conv1\nconv(16, k=3×3, pad=same) + batchnorm + relu\n[16, 32, 32]"
    # e1 (the second conv's box) goes on to the first maxpool and to the last concat.
    second = f"n{by_label['double_conv1.conv2']}"
    assert {dst for src, dst in edges(dot) if src == second} == {
        f"n{by_label['maxpool1']}", f"n{by_label['concat3']}"}
    assert (quote("in:x"), first) in edges(dot)
    assert (f"n{by_label['conv1']}", quote("out:scores")) in edges(dot)
    # The folded ops have no box and no edge of their own.
    for label in ("double_conv1.batchnorm1", "double_conv1.relu1"):
        assert f"n{by_label[label]} " not in dot and f"n{by_label[label]};" not in dot


def test_collapsed_blocks_show_their_shapes_and_their_connections():
    graph = graph_from_source(UNET)
    dot = to_dot(graph, fold=True, collapse=True)
    by_label = {n.label: n.id for n in graph.nodes}
    assert label_of(dot, quote("block:double_conv5")) == "double_conv5\nblock double_conv\n[128, 8, 8] → [64, 8, 8]"
    into_concat1 = {src for src, dst in edges(dot) if dst == f"n{by_label['concat1']}"}
    assert into_concat1 == {f"n{by_label['deconv1']}", quote("block:double_conv3")}     # the skip from e3
    out_of_e1 = {dst for src, dst in edges(dot) if src == quote("block:double_conv1")}
    assert out_of_e1 == {f"n{by_label['maxpool1']}", f"n{by_label['concat3']}"}
    assert len(edges(dot)) == len(set(edges(dot)))       # one edge per value, not one per op reading it


def test_a_positionwise_op_stays_a_box_where_folding_would_hide_a_value():
    graph = graph_from_source("""
block blk(x) {
    return x -> conv(4, kernel=1)
}
network N {
    input x: [4, 8, 8]
    a = x -> relu                            # reads the network input
    b = a -> conv(4, kernel=1)
    c = add(b, b -> sigmoid)                 # b is read twice: the sigmoid keeps its box
    d = c -> conv(4, kernel=1)
    output d
    e = d -> tanh                            # d is an output: the tanh keeps its box
    f = e -> blk -> relu                     # the block's last conv sits in the block, the relu not
    output f
}
""")
    dot = to_dot(graph, fold=True)
    boxes = {label_of(dot, box).split("\n")[0] for box in drawn_boxes(dot)}
    assert boxes == {n.label for n in graph.nodes}


def test_rankdir():
    graph = graph_from_source(MOBILENET)
    assert "    rankdir=TB;" in to_dot(graph)
    for direction in ("LR", "BT", "RL"):
        assert f"    rankdir={direction};" in to_dot(graph, rankdir=direction)


def test_graph_command_options(tmp_path):
    path = tmp_path / "unet.cnn"
    path.write_text(UNET)
    proc = cli("graph", str(path), "-o", str(tmp_path / "folded.dot"))
    assert proc.returncode == 0, proc.stderr
    folded = (tmp_path / "folded.dot").read_text()
    assert "rankdir=TB;" in folded and len(drawn_boxes(folded)) == UNET_COUNTS["folded"]
    proc = cli("graph", str(path), "-o", str(tmp_path / "every.dot"), "--no-fold")
    assert proc.returncode == 0, proc.stderr
    assert len(drawn_boxes((tmp_path / "every.dot").read_text())) == UNET_COUNTS["ops"]
    proc = cli("graph", str(path), "-o", str(tmp_path / "small.dot"), "--collapse", "--rankdir", "LR")
    assert proc.returncode == 0, proc.stderr
    small = (tmp_path / "small.dot").read_text()
    assert "rankdir=LR;" in small and len(drawn_boxes(small)) == UNET_COUNTS["collapsed"]
    proc = cli("graph", str(path), "-o", str(tmp_path / "bad.dot"), "--rankdir", "sideways")
    assert proc.returncode == 2 and "invalid choice: 'sideways'" in proc.stderr
    assert not (tmp_path / "bad.dot").exists()


def svg_size(path: Path) -> tuple[float, float]:
    m = re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', path.read_text())
    assert m, path
    return float(m.group(1)), float(m.group(2))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
@pytest.mark.parametrize("name", NETWORKS)
def test_pictures_shrink(name, tmp_path):
    graph = graph_from_source(NETWORKS[name][0])
    styles = {"every op": {}, "folded": {"fold": True}, "collapsed": {"fold": True, "collapse": True},
              "folded LR": {"fold": True, "rankdir": "LR"}}
    sizes = {}
    for style, options in styles.items():
        target = tmp_path / f"{style.replace(' ', '_')}.svg"
        write_graph([graph], target, **options)
        sizes[style] = svg_size(target)
    heights = {style: h for style, (_, h) in sizes.items()}
    assert heights["folded"] < 0.7 * heights["every op"], sizes
    assert heights["collapsed"] < 0.8 * heights["folded"], sizes
    assert heights["folded LR"] < 0.25 * heights["folded"], sizes
