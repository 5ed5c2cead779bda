"""relu, sigmoid, tanh, leaky_relu, softmax over channels, flatten (both layouts' orders) and
dense against PyTorch: values, input and parameter gradients, finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opcases import (opencl_f64_test, Case, compare_with_torch, compile_cases, finite_differences,
                     run_cases, source)


def reference(x, params, *, kind, alpha=None, nhwc_flatten=False):
    if kind == "relu":
        return F.relu(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "tanh":
        return torch.tanh(x)
    if kind == "leaky":
        return F.leaky_relu(x, alpha)
    if kind == "softmax":
        return F.softmax(x, dim=1)
    flat = x.movedim(1, -1).flatten(1) if nhwc_flatten else x.flatten(1)
    if kind == "flatten":
        return flat
    return F.linear(flat, params["weight"], params.get("bias"))      # dense


CASES = (
    Case("relu", (3, 5, 4), "relu", dict(kind="relu")),
    Case("sigmoid", (3, 5, 4), "sigmoid", dict(kind="sigmoid")),
    Case("tanh-1d", (2, 7), "tanh", dict(kind="tanh")),
    Case("leaky", (3, 4, 4), "leaky_relu(0.2)", dict(kind="leaky", alpha=0.2)),
    Case("leaky-default", (6,), "leaky_relu", dict(kind="leaky", alpha=0.01)),
    Case("softmax-vector", (10,), "softmax", dict(kind="softmax")),
    Case("softmax-map", (5, 3, 4), "softmax", dict(kind="softmax")),
    Case("softmax-3d", (4, 2, 3, 2), "softmax", dict(kind="softmax")),
    Case("dense-flat", (12,), "dense(5)", dict(kind="dense")),
    Case("dense-nobias", (9,), "dense(4, bias=false)", dict(kind="dense")),
    Case("relu-runtime", (3, 4, 6), "relu", dict(kind="relu"), dims=(3, "H", "W"), shape2=(3, 7, 2)),
    Case("relu-parallel", (32, 48, 48), "relu", dict(kind="relu")),
)
# flatten and dense on a map: their order depends on the layout (C,H,W vs H,W,C)
MAP_CASES = (
    Case("flatten", (3, 4, 5), "flatten", dict(kind="flatten")),
    Case("dense-map", (3, 2, 3), "dense(4)", dict(kind="dense")),
    Case("flatten-1x1", (6, 1, 1), "flatten", dict(kind="flatten")),
)
IDS = [c.id for c in CASES]

# On OpenCL the f32 runs of these ops (both layouts) are test_activation.py's and test_dense.py's;
# the float64 finite differences of flatten and dense, which those files have not, are here (the
# activations' are in test_activation.py).
test_opencl_finite_differences_float64 = opencl_f64_test(CASES + MAP_CASES, seed=54,
                                                         ids=("dense-flat", "dense-nobias", "flatten", "dense-map"))


@pytest.fixture(scope="module")
def runs():
    module = compile_cases(CASES + MAP_CASES)
    rng = np.random.default_rng(51)
    return {1: run_cases(module, CASES + MAP_CASES, 1, rng), 3: run_cases(module, CASES + MAP_CASES, 3, rng, variant=1)}


@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("index", range(len(CASES + MAP_CASES)), ids=IDS + [c.id for c in MAP_CASES])
def test_forward_and_gradients_match_torch(runs, index, batch):
    compare_with_torch(runs[batch], index, (CASES + MAP_CASES)[index], reference)


@pytest.mark.parametrize("index", range(len(CASES + MAP_CASES)), ids=IDS + [c.id for c in MAP_CASES])
def test_nhwc_layout(index):
    cases = CASES + MAP_CASES
    module = compile_cases(cases, layout="NHWC")
    run = run_cases(module, cases, 2, np.random.default_rng(52), layout="NHWC")
    case = cases[index]
    if case in MAP_CASES:           # NHWC flattens in H, W, C order (§4: "in the layout's order")
        case = Case(case.id, case.shape, case.op, dict(case.ref, nhwc_flatten=True))
    compare_with_torch(run, index, case, reference)


def test_finite_differences_float64():
    cases = tuple(c for c in CASES + MAP_CASES if c.id != "relu-parallel")
    finite_differences(compile_cases(cases, dtype="f64"), cases, np.random.default_rng(53))

