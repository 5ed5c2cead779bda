"""Central code asks ops for their traits (ops/base.py), never for their names: adding a layer
kind touches its op file, its templates and its tests only. This test reads the central modules'
Python and refuses any string constant that is an op's or a loss's name (docstrings aside)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from convdsl.ops.base import registry
from convdsl.ops.losses import LOSSES

PACKAGE = Path(__file__).resolve().parents[2] / "convdsl"
CENTRAL = ["passes/lints.py", "passes/stats.py", "passes/memory.py", "passes/schedule.py", "rewrite/fc_to_conv.py",
           "lower/plan.py", "lower/memory.py", "lower/show.py", "ir/build.py", "graphviz.py", "report.py",
           *sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "runtime").glob("*.py"))]


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def op_names_in(path: Path) -> list[str]:
    names = set(registry()) | set(LOSSES)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    return [f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and id(node) not in skip and node.value in names]


@pytest.mark.parametrize("module", CENTRAL)
def test_central_code_names_no_op(module):
    assert op_names_in(PACKAGE / module) == []


def test_the_traits_say_what_the_name_lists_said():
    ops = registry()
    elementwise = {n for n, op in ops.items() if op.max_inputs == 1 and op.locality in ("value", "channel")}
    assert elementwise == {"relu", "sigmoid", "tanh", "leaky_relu", "batchnorm", "dropout", "relu6", "clip",
                           "hardsigmoid", "hardswish", "silu", "gelu", "elu", "prelu"}
    positionwise = {n for n, op in ops.items() if op.max_inputs == 1 and op.locality is not None}
    assert positionwise == elementwise | {"softmax", "shuffle", "maxout", "layernorm"}
    assert {n for n, op in ops.items() if op.window_pool} == {"maxpool", "avgpool", "l2pool"}
    assert {n for n, op in ops.items() if op.convolution} == {"conv", "depthwise"}
    assert {n for n, op in ops.items() if op.map_form} == {"dense"}
    assert {n for n, op in ops.items() if op.unshared} == {"local", "tiled"}
