"""The ONNX backend node tests (generated at test time, tests/onnx/conformance.py) of every op the
importer reads, through import → compile → run, compared with the expected outputs. A case the
language cannot express must be refused with a ConvDSLError naming the node, never a traceback;
docs/onnx.md lists each one with its reason, and the count of the cases that pass."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

import convdsl
from convdsl.errors import ConvDSLError
from convdsl.onnx.importer import import_model_proto

from conformance import as_import_model, merged, node_cases

DOCS = Path(__file__).resolve().parents[2] / "docs" / "onnx.md"


def documented():
    """(the excluded case names, the documented pass count) from docs/onnx.md."""
    text = DOCS.read_text()
    excluded = set(re.findall(r"^\| `(test_\w+)` \|", text, re.M))
    count = re.search(r"(\d+) of the (\d+) cases pass", text)
    return excluded, (int(count.group(1)), int(count.group(2)))


@pytest.fixture(scope="module")
def classified():
    passing, refused = [], {}
    for op, case in node_cases():
        model, feeds, expected, _ = as_import_model(op, case)
        try:
            import_model_proto(model, "OnnxCase")
        except ConvDSLError as e:
            refused[case.name] = str(e)
            continue
        passing.append((op, case, model, feeds, expected))
    return passing, refused


@pytest.mark.slow
def test_refused_cases_are_the_documented_exclusions(classified):
    passing, refused = classified
    excluded, (count, total) = documented()
    assert set(refused) == excluded
    assert (count, total) == (len(passing), len(passing) + len(refused))
    for name, message in refused.items():
        assert message.startswith("convdsl: error: import: "), (name, message)
        assert "Traceback" not in message


@pytest.mark.slow
def test_supported_cases_compute_the_expected_outputs(classified):
    passing, _ = classified
    # One module per batch size: the importer reads every op the same way in every opset but
    # Softmax (its axis, and what it spans, changed in opset 13), so the older Softmax cases keep
    # a module of their own opset; the others run in a model of their group's newest opset.
    groups = defaultdict(list)
    for item in passing:
        op, case, model, feeds, _ = item
        batch = next(iter(feeds.values())).shape[0]
        opset = model.opset_import[0].version
        groups[(batch, opset if op == "Softmax" and opset < 13 else 0)].append(item)
    checked = 0
    for (batch, _), group in sorted(groups.items()):
        model = merged(group)
        text, weights = import_model_proto(model, f"Conformance{batch}")
        net = convdsl.load_source(text).Model(seed=0)
        assert set(weights) == set(net.state_dict())
        for name, value in weights.items():
            (net.params if name in net.params else net.buffers)[name][...] = value
        net.eval()
        xs = [x for *_, feeds, _ in group for x in feeds.values()]
        ys = net.forward(*xs)
        ys = ys if isinstance(ys, tuple) else (ys,)
        expected = [e for *_, exp in group for e in exp]
        cases = [case for _, case, _, _, exp in group for _ in exp]
        assert len(ys) == len(expected)
        for case, y, e in zip(cases, ys, expected):
            name = case.name
            # The language keeps a pooled [C, 1, 1] where ONNX may squeeze it: the same values.
            assert [d for d in y.shape if d != 1] == [d for d in e.shape if d != 1], (name, y.shape, e.shape)
            scale = max(1.0, float(np.abs(e).max()))
            # Some cases give their expected values to 4 digits: their own tolerance (rtol 1e-3, what ONNX
            # holds backends to) where it is looser than the suite's f32 one.
            np.testing.assert_allclose(y.reshape(e.shape) / scale, e / scale, rtol=max(1e-4, case.rtol),
                                       atol=max(1e-5, case.atol), err_msg=name)
            checked += 1
    assert checked >= len(passing)
