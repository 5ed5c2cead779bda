"""`convdsl check` (the table, --json against its schema) and `convdsl graph` on every example."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from convdsl.cli import main
from convdsl.compiler import graph_from_file, graph_from_source, networks_in_file
from convdsl.graphviz import quote, to_dot
from convdsl.passes.memory import plan_memory

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.cnn"))
SCHEMA = json.loads((REPO / "docs" / "check-report.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    """`convdsl ARGS` run in this process (convdsl.cli.main, its streams captured): a Python
    process per call cost half a second each. The installed command itself runs in
    test_cli_help.py and test_cli_compile.py."""
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:         # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["convdsl", *args], code, out.getvalue(), err.getvalue())


def test_the_schema_is_a_draft_2020_12_schema():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_json_report_of_every_example_matches_the_schema(path):
    proc = cli("check", "--json", str(path.relative_to(REPO)))
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    VALIDATOR.validate(document)
    assert [n["name"] for n in document["networks"]] == list(networks_in_file(path))
    for network in document["networks"]:
        graph = graph_from_file(path, network["name"])
        assert [layer["label"] for layer in network["layers"]] == [n.label for n in graph.nodes]
    assert sum(len(n["diagnostics"]) for n in document["networks"]) == proc.stderr.count(": warning: ")


def test_json_numbers_for_lenet():
    document = json.loads(cli("check", "--json", "examples/lenet5.cnn").stdout)
    (net,) = document["networks"]
    assert net["totals"]["params"] == 61706
    assert net["totals"]["macs_forward"] == 416520
    assert net["totals"]["macs_backward"] == 2 * 416520          # every layer with MACs has trainable weights
    # Forward only, conv1 + bias + relu1 is one kernel writing relu1's output (conv1's own output is
    # never stored), so the largest set alive at once is relu1's output and maxpool1's.
    assert net["totals"]["peak_activation_bytes_forward"] == (6 * 28 * 28 + 6 * 14 * 14) * 4
    assert net["totals"]["peak_activation_layer"] == "maxpool1"
    # Training keeps what a backward reads until the backward ends: the input, the outputs of relu1
    # (read by maxpool1's and relu1's backwards), maxpool1 (conv2's), relu2, flatten (dense1's),
    # relu3, relu4 and the logits; maxpool2's output dies at flatten, whose backward needs dy only.
    # The gradients, sharing memory by lifetime, peak at relu1's backward: its dy and dx, 6×28×28 each.
    kept = 28 * 28 + 6 * 28 * 28 + 6 * 14 * 14 + 16 * 10 * 10 + 400 + 120 + 84 + 10
    assert net["totals"]["activation_bytes_training"] == (kept + 2 * 6 * 28 * 28) * 4
    conv1 = net["layers"][0]
    assert (conv1["label"], conv1["params"], conv1["receptive_field"], conv1["inputs"]) == \
        ("conv1", 156, "5×5", ["input:x"])
    assert net["layers"][1]["inputs"] == [0]
    assert net["diagnostics"] == [] and document["errors"] == []


def test_backward_macs_by_kind():
    # Frozen weights: only the input gradient. Dropout keeps its mask for training.
    (net,) = json.loads(cli("check", "--json", "examples/random_features.cnn").stdout)["networks"]
    layers = {layer["label"]: layer for layer in net["layers"]}
    assert layers["conv1"]["macs_backward"] == layers["conv1"]["macs_forward"] > 0
    assert layers["dense1"]["macs_backward"] == 2 * layers["dense1"]["macs_forward"] > 0
    graph = graph_from_source("network D {\n input x: [100]\n y = x -> dense(50) -> dropout(0.5)\n output y\n}\n")
    # Kept through the backward: x, y and the mask (dropout's backward reads nothing else, so
    # dense's output dies at the dropout); at dense's backward its dy (50) and dx (100) are live.
    assert plan_memory(graph).training_bytes == ((100 + 50 + 50) + (50 + 100)) * 4
    assert plan_memory(graph).all_kept_bytes == (2 * (100 + 50 + 50) + 50) * 4


def test_forward_peak_frees_values_after_their_last_reader():
    graph = graph_from_source("""network P {
    input x: [1, 8, 8]
    a = x -> conv(4, kernel=1)
    b = a -> conv(2, kernel=1)
    c = b -> conv(8, kernel=1)
    output c
}
""")
    plan = plan_memory(graph)
    # x lives until conv1 has read it; at conv3, b (2·64) and c (8·64) are alive.
    assert [d // 4 for d in plan.per_node_live_bytes] == [64 + 256, 256 + 128, 128 + 512]
    assert plan.peak_inference_bytes == (128 + 512) * 4 and graph.nodes[plan.peak_node].label == "conv3"


def test_json_run_time_sizes_are_strings():
    (net,) = json.loads(cli("check", "--json", "examples/refine.cnn").stdout)["networks"]
    assert net["run_time_sizes"] == ["H", "W"]
    assert net["layers"][0]["macs_forward"] == "864*H*W"
    assert net["layers"][3]["shared_weights"] is True          # U's second use


def test_json_warnings_and_errors():
    proc = cli("check", "--json", "--werror", "tests/golden/lint_even_same.cnn")
    document = json.loads(proc.stdout)
    VALIDATOR.validate(document)
    (diag,) = document["networks"][0]["diagnostics"]
    assert proc.returncode == 1
    assert (diag["severity"], diag["code"], diag["line"], diag["column"]) == ("error", "W107", 3, 14)
    proc = cli("check", "--json", "tests/golden/error_unknown_op.cnn")
    document = json.loads(proc.stdout)
    VALIDATOR.validate(document)
    assert proc.returncode == 1 and document["networks"] == []
    (error,) = document["errors"]
    assert (error["severity"], error["code"], error["line"], error["column"]) == ("error", None, 3, 43)
    assert "did you mean `maxpool`?" in error["message"] and "error:" in proc.stderr


def test_json_lists_several_errors_with_their_notes():
    proc = cli("check", "--json", "tests/golden/error_three_errors.cnn")
    document = json.loads(proc.stdout)
    VALIDATOR.validate(document)
    assert proc.returncode == 1 and document["networks"] == []
    assert [(e["line"], e["column"], e["notes"]) for e in document["errors"]] == [(5, 46, []), (7, 30, []), (8, 41, [])]
    assert proc.stderr.count(": error: ") == 3
    (error,) = json.loads(cli("check", "--json", "tests/golden/error_block_note.cnn").stdout)["errors"]
    assert error["notes"] == [
        {"message": "in block `unit` called at tests/golden/error_block_note.cnn:7:17",
         "file": "tests/golden/error_block_note.cnn", "line": 7, "column": 17},
        {"message": "in block `stage` called at tests/golden/error_block_note.cnn:12:14",
         "file": "tests/golden/error_block_note.cnn", "line": 12, "column": 14}]


def test_json_warnings_carry_their_notes():
    proc = cli("check", "--json", "tests/golden/lint_in_block.cnn")
    document = json.loads(proc.stdout)
    VALIDATOR.validate(document)
    (warning,) = document["networks"][0]["diagnostics"]
    assert [(n["line"], n["column"]) for n in warning["notes"]] == [(6, 49), (10, 14)]
    (warning,) = json.loads(cli("check", "--json", "tests/golden/lint_double_softmax.cnn").stdout)["networks"][0][
        "diagnostics"]
    assert warning["code"] == "W111"
    assert warning["notes"] == [{"message": "the loss is at tests/golden/lint_double_softmax.cnn:6:10",
                                 "file": "tests/golden/lint_double_softmax.cnn", "line": 6, "column": 10}]


def test_a_note_that_points_nowhere_has_no_place():
    from convdsl.report import json_note
    assert json_note("note: 2 layers made from this line warn alike") == {
        "message": "2 layers made from this line warn alike", "file": None, "line": None, "column": None}
    VALIDATOR.validate({"convdsl_check": 1, "networks": [], "errors": [
        {"severity": "error", "code": None, "message": "m", "file": None, "line": None, "column": None,
         "notes": [json_note("note: n")]}]})


def test_text_report_has_both_directions_and_the_memory():
    out = cli("check", "examples/lenet5.cnn").stdout
    assert re.search(r"^layer\s+op\s+output\s+params\s+MACs\s+backward MACs\s+FLOPs\s+RF\s+line$", out, flags=re.M)
    assert "MACs:        416,520 forward (833,040 FLOPs), 833,040 backward, per sample" in out
    assert "activations: 22.97 KiB per sample at the peak running forward only (at maxpool1); " in out


# ---- convdsl graph ----------------------------------------------------------------------------

def dot_nodes(dot: str) -> list[int]:
    return sorted(int(n) for n in re.findall(r"^\s+n(\d+) \[label=", dot, flags=re.M))


def dot_edges(dot: str) -> set[tuple[str, str]]:
    return set(re.findall(r"^\s+(\S+) -> (\S+);", dot, flags=re.M))


def clusters(dot: str) -> dict[str, list[int]]:
    """cluster name → the node ids directly inside it."""
    found, stack = {}, []
    for line in dot.splitlines():
        m = re.match(r'\s+subgraph "cluster_([^"]+)" \{', line)
        if m:
            stack.append(m.group(1))
            found[m.group(1)] = []
        elif line.strip() == "}" and stack:
            stack.pop()
        elif stack and (m := re.match(r"\s+n(\d+) \[", line)):
            found[stack[-1]].append(int(m.group(1)))
    return found


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_dot_has_a_box_per_layer_and_the_data_flow(path):
    for name in networks_in_file(path):
        graph = graph_from_file(path, name)
        dot = to_dot(graph)
        assert dot.startswith(f"digraph {quote(graph.name)} {{") and dot.rstrip().endswith("}")
        assert dot.count("{") == dot.count("}")
        assert dot_nodes(dot) == [n.id for n in graph.nodes]
        edges = dot_edges(dot)
        expected = set()
        for node in graph.nodes:
            for vid in node.inputs:
                v = graph.values[vid]
                src = f"n{v.producer}" if v.producer is not None else quote(
                    "in:" + next(i.name for i in graph.inputs if i.value == vid))
                expected.add((src, f"n{node.id}"))
        for o in graph.outputs:
            v = graph.values[o.value]
            src = f"n{v.producer}" if v.producer is not None else quote(
                "in:" + next(i.name for i in graph.inputs if i.value == o.value))
            expected.add((src, quote("out:" + o.name)))
        assert edges == expected
        for i in graph.inputs:
            assert f'{quote("in:" + i.name)} [shape=ellipse' in dot
        inside = clusters(dot)
        for node in graph.nodes:
            instance = node.label.split(".")[0]
            if node.scope and re.fullmatch(re.escape(node.scope[0]) + r"\d+", instance):
                assert any(node.id in ids for ids in inside.values()), node.label


def test_dot_nests_block_instances_and_leaves_shared_layers_outside():
    graph = graph_from_source("""
block inner(x) {
    return x -> conv(4, kernel=3, pad=same) -> relu
}
block outer(x) {
    return x -> inner -> conv(4, kernel=1) -> inner
}
network N {
    input x: [4, 8, 8]
    y = x -> outer -> outer
    output y, x
}
""")
    dot = to_dot(graph)
    inside = clusters(dot)
    assert set(inside) == {"outer1", "outer1.inner1", "outer1.inner2", "outer2", "outer2.inner1", "outer2.inner2"}
    by_label = {n.label: n.id for n in graph.nodes}
    assert inside["outer1"] == [by_label["outer1.conv1"]]
    assert inside["outer2.inner2"] == [by_label["outer2.inner2.conv1"], by_label["outer2.inner2.relu1"]]
    assert 'label="outer1.inner2 (block inner)"' in dot
    # An input that is also an output is drawn from the input.
    assert (quote("in:x"), quote("out:x")) in dot_edges(dot)


def test_dot_draws_a_layer_shared_by_block_instances_outside_them():
    graph = graph_from_source("""
block outer(x, L) {
    return x -> L -> relu
}
network N {
    input x: [4, 8, 8]
    layer S = conv(4, kernel=1)
    y = x -> outer(S) -> outer(S)
    output y
}
""")
    dot = to_dot(graph)
    inside = clusters(dot)
    assert inside == {"outer1": [1], "outer2": [3]}
    assert dot_nodes(dot) == [0, 1, 2, 3]


def test_dot_labels_are_escaped():
    assert quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    graph = graph_from_file(REPO / "examples" / "lenet5.cnn")
    dot = to_dot(graph)
    assert 'n0 [label="conv1\\nconv(6, k=5×5, pad=same)\\n[6, 28, 28]"];' in dot


def test_graph_command_writes_dot_and_svg(tmp_path):
    proc = cli("graph", str(REPO / "examples" / "inception_se.cnn"), "-o", str(tmp_path / "net.dot"))
    assert proc.returncode == 0, proc.stderr
    assert "cluster_inception1" in (tmp_path / "net.dot").read_text()
    svg = cli("graph", str(REPO / "examples" / "inception_se.cnn"), "-o", str(tmp_path / "pic.svg"))
    assert (tmp_path / "pic.dot").exists()
    if shutil.which("dot"):
        assert svg.returncode == 0, svg.stderr
        assert (tmp_path / "pic.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        assert svg.returncode == 1 and "apt-get install graphviz" in svg.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_graph_command_on_every_example(path, tmp_path):
    proc = cli("graph", str(path), "-o", str(tmp_path / "net.dot"))
    assert proc.returncode == 0, proc.stderr
    names = networks_in_file(path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == (["net.dot"] if len(names) == 1 else sorted(f"net-{n}.dot" for n in names))
