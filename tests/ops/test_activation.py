"""relu, sigmoid, tanh, leaky_relu(alpha), softmax over channels (§4), and relu6, clip(min, max),
hardsigmoid, hardswish, silu, gelu and elu(alpha) against PyTorch: values and input gradients on
vectors and 1-D/2-D/3-D maps, in both layouts, at batch 1 and 3, float64 finite differences; exact
zeros (the kinks) and large magnitudes (overflow of exp) included."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, Case, compare_with_torch, compile_cases,
                     finite_differences, run_cases)
from reference import assert_close


def reference(x, params, *, kind, alpha=None, lo=None, hi=None):
    if kind == "relu":
        return F.relu(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "tanh":
        return torch.tanh(x)
    if kind == "leaky_relu":
        return F.leaky_relu(x, alpha)
    if kind == "softmax":
        return F.softmax(x, dim=1)          # over channels, at every position
    if kind == "relu6":
        return F.relu6(x)
    if kind == "clip":
        return F.hardtanh(x, lo, hi)
    if kind == "hardsigmoid":
        return F.hardsigmoid(x)
    if kind == "hardswish":
        return F.hardswish(x)
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x)                    # exact, with erf
    if kind == "elu":
        return F.elu(x, alpha)
    raise AssertionError(kind)


CASES = (
    Case("relu-2d", (3, 5, 4), "relu", dict(kind="relu")),
    Case("relu-vector", (9,), "relu", dict(kind="relu")),
    Case("sigmoid-2d", (3, 5, 4), "sigmoid", dict(kind="sigmoid")),
    Case("sigmoid-1d", (2, 7), "sigmoid", dict(kind="sigmoid")),
    Case("tanh-3d", (2, 3, 2, 4), "tanh", dict(kind="tanh")),
    Case("tanh-vector", (6,), "tanh", dict(kind="tanh")),
    Case("leaky-0.2", (3, 4, 4), "leaky_relu(0.2)", dict(kind="leaky_relu", alpha=0.2)),
    Case("leaky-alpha-keyword", (2, 6), "leaky_relu(alpha=0.5)", dict(kind="leaky_relu", alpha=0.5)),
    Case("leaky-default", (8,), "leaky_relu", dict(kind="leaky_relu", alpha=0.01)),
    Case("softmax-vector", (10,), "softmax", dict(kind="softmax")),
    Case("softmax-two-classes", (2,), "softmax", dict(kind="softmax")),
    Case("softmax-1d-map", (4, 6), "softmax", dict(kind="softmax")),
    Case("softmax-2d-map", (5, 3, 4), "softmax", dict(kind="softmax")),
    Case("softmax-3d-map", (4, 2, 3, 2), "softmax", dict(kind="softmax")),
    Case("softmax-one-channel", (1, 3, 3), "softmax", dict(kind="softmax")),
    # threaded loops (more than 65536 elements in a batch of 3)
    Case("sigmoid-large", (16, 40, 40), "sigmoid", dict(kind="sigmoid")),
    Case("softmax-large-map", (8, 60, 50), "softmax", dict(kind="softmax")),
    Case("relu-runtime", (3, 4, 6), "relu", dict(kind="relu"), dims=(3, "H", "W"), shape2=(3, 7, 2)),
    Case("softmax-runtime", (4, 5), "softmax", dict(kind="softmax"), dims=(4, "L"), shape2=(4, 9)),
    # the activations of MobileNet, EfficientNet and transformers (the edges beyond ±3 and 6:
    # test_kinks_and_large_values_match_torch)
    Case("relu6-2d", (3, 5, 4), "relu6", dict(kind="relu6")),
    Case("clip-vector", (12,), "clip(-0.5, 1.5)", dict(kind="clip", lo=-0.5, hi=1.5)),
    Case("clip-keywords-1d", (2, 9), "clip(min=-2, max=0.25)", dict(kind="clip", lo=-2.0, hi=0.25)),
    Case("hardsigmoid-2d", (3, 4, 5), "hardsigmoid", dict(kind="hardsigmoid")),
    Case("hardswish-3d", (2, 3, 2, 4), "hardswish", dict(kind="hardswish")),
    Case("hardswish-vector", (16,), "hardswish", dict(kind="hardswish")),
    Case("silu-2d", (3, 5, 4), "silu", dict(kind="silu")),
    Case("silu-vector", (7,), "silu", dict(kind="silu")),
    Case("gelu-1d", (4, 6), "gelu", dict(kind="gelu")),
    Case("elu-default", (3, 4, 4), "elu", dict(kind="elu", alpha=1.0)),
    Case("elu-0.3-vector", (10,), "elu(0.3)", dict(kind="elu", alpha=0.3)),
    Case("gelu-large", (16, 40, 40), "gelu", dict(kind="gelu")),
    Case("hardswish-runtime", (3, 4, 6), "hardswish", dict(kind="hardswish"), dims=(3, "H", "W"), shape2=(3, 7, 2)),
)
NEW = tuple(c for c in CASES if c.ref["kind"] in ("relu6", "clip", "hardsigmoid", "hardswish", "silu", "gelu", "elu")
            and "large" not in c.id and "runtime" not in c.id)
IDS = [c.id for c in CASES]


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    'relu-2d', 'sigmoid-1d', 'tanh-3d', 'leaky-0.2',
    'softmax-2d-map', 'softmax-vector', 'relu-runtime', 'softmax-runtime',
    'relu6-2d', 'clip-keywords-1d', 'hardsigmoid-2d', 'hardswish-3d', 'silu-vector', 'gelu-1d',
    'elu-0.3-vector', 'hardswish-runtime',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=405, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1405, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2405, ids=(
    "sigmoid-1d", "tanh-3d", "softmax-2d-map", "relu6-2d", "clip-keywords-1d", "hardsigmoid-2d",
    "hardswish-3d", "silu-vector", "gelu-1d", "elu-0.3-vector"))


@pytest.fixture(scope="module")
def runs():
    module = compile_cases(CASES)
    rng = np.random.default_rng(401)
    net = module.Model(seed=0)
    return {1: run_cases(module, CASES, 1, rng, net=net), 3: run_cases(module, CASES, 3, rng, net=net, variant=1)}


@pytest.fixture(scope="module")
def nhwc_run():
    return run_cases(compile_cases(CASES, layout="NHWC"), CASES, 2, np.random.default_rng(402), layout="NHWC")


@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_forward_and_input_gradient_match_torch(runs, index, batch):
    compare_with_torch(runs[batch], index, CASES[index], reference)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_nhwc_layout_matches_torch(nhwc_run, index):
    compare_with_torch(nhwc_run, index, CASES[index], reference)


def test_finite_differences_float64_of_the_newer_activations():
    finite_differences(compile_cases(NEW, dtype="f64"), NEW, np.random.default_rng(405))


EDGES = """
network A {
    input x: [3, 4]
    r = x -> relu
    l = x -> leaky_relu(0.1)
    s = x -> sigmoid
    t = x -> tanh
    m = x -> softmax
    r6 = x -> relu6
    c = x -> clip(-3, 3)
    hs = x -> hardsigmoid
    hw = x -> hardswish
    si = x -> silu
    g = x -> gelu
    e = x -> elu
    output r, l, s, t, m, r6, c, hs, hw, si, g, e
}
"""


def edge_input() -> np.ndarray:
    """Exact zeros (the kinks of relu and leaky_relu), ±3 (those of hardswish, hardsigmoid and
    clip(-3, 3)), values past 6 (relu6), and magnitudes where a naive exp overflows."""
    return np.array([[[0.0, -0.0, 1.5, -2.0], [90.0, -90.0, 0.0, 3.0], [-95.0, 100.0, 0.0, -3.0]],
                     [[0.0, 0.0, 0.0, 0.0], [1000.0, 1000.0, -1000.0, 20.0], [999.0, -1000.0, 5.0, 20.0]]],
                    dtype=np.float32)


def test_kinks_and_large_values_match_torch(backend):
    net = convdsl.load_source(EDGES, backend=backend).Model()
    x = edge_input()
    ys = net.forward(x)
    rng = np.random.default_rng(403)
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    dx = net.backward(*dys)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    refs = (F.relu(xt), F.leaky_relu(xt, 0.1), torch.sigmoid(xt), torch.tanh(xt), F.softmax(xt, dim=1),
            F.relu6(xt), F.hardtanh(xt, -3.0, 3.0), F.hardsigmoid(xt), F.hardswish(xt), F.silu(xt), F.gelu(xt),
            F.elu(xt))
    names = ("relu", "leaky_relu", "sigmoid", "tanh", "softmax", "relu6", "clip", "hardsigmoid", "hardswish",
             "silu", "gelu", "elu")
    assert len(ys) == len(refs) == len(names)
    for y, r, name in zip(ys, refs, names):
        assert np.all(np.isfinite(y)), name
        assert_close(y, r.detach().numpy(), what=name)
    sum((r * torch.tensor(d, dtype=torch.float64)).sum() for r, d in zip(refs, dys)).backward()
    assert np.all(np.isfinite(dx))
    assert_close(dx, xt.grad.numpy(), what="input gradient of all of them")


def test_softmax_columns_sum_to_one_per_pixel(backend):
    net = convdsl.load_source("network S {\n layout NHWC\n input x: [3, 5, 7]\n y = x -> softmax\n output y\n}\n",
                              backend=backend).Model()
    x = np.random.default_rng(404).standard_normal((2, 3, 5, 7)).astype(np.float32) * 10
    y = net.forward(x)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-5)            # channels are last in NHWC
    assert_close(y, F.softmax(torch.tensor(x, dtype=torch.float64), dim=-1).numpy(), what="NHWC softmax")
