"""`convdsl check --json` follows its schema on every example; `convdsl graph` draws every example."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from convdsl.compiler import graph_from_file
from convdsl.graphviz import quote, to_dot

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.cnn"))
SCHEMA = json.loads((REPO / "docs" / "check-report.schema.json").read_text())


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "convdsl", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_json_report_matches_the_schema(path):
    proc = cli("check", "--json", str(path.relative_to(REPO)))
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    jsonschema.validate(document, SCHEMA)
    for network in document["networks"]:
        assert len(network["layers"]) == len(graph_from_file(path, network["name"]).nodes)


def test_json_numbers_for_lenet():
    document = json.loads(cli("check", "--json", "examples/lenet5.cnn").stdout)
    (net,) = document["networks"]
    assert net["totals"]["params"] == 61706
    assert net["totals"]["macs_forward"] == 416520
    assert net["totals"]["macs_backward"] == 2 * 416520
    # Forward only, conv1's output and relu1's are the largest pair alive at once: 2 · 6·28·28 floats.
    assert net["totals"]["peak_activation_bytes_forward"] == 2 * 6 * 28 * 28 * 4
    conv1 = net["layers"][0]
    assert (conv1["label"], conv1["params"], conv1["receptive_field"], conv1["inputs"]) == \
        ("conv1", 156, "5×5", ["input:x"])


def test_json_run_time_sizes_are_strings():
    (net,) = json.loads(cli("check", "--json", "examples/refine.cnn").stdout)["networks"]
    assert net["run_time_sizes"] == ["H", "W"]
    assert net["layers"][0]["macs_forward"] == "864*H*W"
    assert net["layers"][3]["shared_weights"] is True          # U's second use


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_dot_has_a_box_per_layer_and_the_data_flow(path):
    for name in _networks(path):
        graph = graph_from_file(path, name)
        dot = to_dot(graph)
        assert dot.startswith(f"digraph {quote(graph.name)} {{") and dot.rstrip().endswith("}")
        boxes = re.findall(r"^\s+n(\d+) \[label=", dot, flags=re.M)
        assert sorted(map(int, boxes)) == [n.id for n in graph.nodes]
        edges = set(re.findall(r"^\s+(\S+) -> (\S+);", dot, flags=re.M))
        for node in graph.nodes:
            for vid in node.inputs:
                v = graph.values[vid]
                src = f"n{v.producer}" if v.producer is not None else quote(
                    "in:" + next(i.name for i in graph.inputs if i.value == vid))
                assert (src, f"n{node.id}") in edges
        for scope in {n.label.rsplit(".", 1)[0] for n in graph.nodes if "." in n.label}:
            assert f"subgraph {quote('cluster_' + scope)}" in dot


def _networks(path):
    from convdsl.compiler import networks_in_file
    return networks_in_file(path)


def test_dot_labels_are_escaped():
    assert quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


def test_graph_command_writes_dot_and_svg(tmp_path):
    proc = cli("graph", str(REPO / "examples" / "inception_se.cnn"), "-o", str(tmp_path / "net.dot"))
    assert proc.returncode == 0, proc.stderr
    assert "cluster_inception1" in (tmp_path / "net.dot").read_text()
    svg = cli("graph", str(REPO / "examples" / "inception_se.cnn"), "-o", str(tmp_path / "net.svg"))
    assert (tmp_path / "net.dot").exists()
    if shutil.which("dot"):
        assert svg.returncode == 0, svg.stderr
        assert (tmp_path / "net.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        assert svg.returncode == 1 and "apt-get install graphviz" in svg.stderr
