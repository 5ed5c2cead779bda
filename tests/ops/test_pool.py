"""maxpool, avgpool, globalavgpool and globalmaxpool (§2.2, §4.2) against PyTorch, 1-D to 3-D:
windows, strides, pad=same (the odd zero at the end), int, per-axis and (before, after) padding;
values and input gradients at batch 1 and 3 and in both layouts.

The language's rules, checked against PyTorch's own: a padded cell never wins a max (padding is
-inf; where PyTorch pads symmetrically its max_pool does the same) and is never counted in an
average (count_include_pad=False; asymmetric padding: the sum over the window divided by the
number of real cells in it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from opcases import opencl_nhwc_test, opencl_suite, Case, compare_with_torch, compile_cases, run_cases
from reference import assert_close, pad_pairs, pad_spatial

MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def dsl(value) -> str:
    if isinstance(value, tuple):
        inner = ", ".join(dsl(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value)


def pool_case(id, shape, kind, window=None, *, dims=None, shape2=None, **kw) -> Case:
    if kind in ("globalavg", "globalmax"):
        return Case(id, shape, f"{kind}pool", dict(kind=kind), dims=dims, shape2=shape2)
    args = [dsl(window)] + [f"{k}={dsl(v)}" for k, v in kw.items()]
    return Case(id, shape, f"{kind}pool({', '.join(args)})", dict(kind=kind, window=window, **kw), dims=dims,
                shape2=shape2)


def reference(x, params, *, kind, window=None, stride=None, pad="valid"):
    rank = x.dim() - 2
    spatial = tuple(range(2, x.dim()))
    if kind == "globalavg":
        return x.mean(dim=spatial, keepdim=True)
    if kind == "globalmax":
        return x.amax(dim=spatial, keepdim=True)
    stride = window if stride is None else stride
    pairs = pad_pairs(pad, tuple(x.shape[2:]), window, stride)
    windows = window if isinstance(window, tuple) else (window,) * rank
    symmetric = all(b == a and 2 * b <= k for (b, a), k in zip(pairs, windows))
    if kind == "max":
        if symmetric:
            return MAX[rank](x, window, stride, padding=tuple(b for b, _ in pairs))
        return MAX[rank](pad_spatial(x, pairs, value=float("-inf")), window, stride)
    if symmetric:
        return AVG[rank](x, window, stride, padding=tuple(b for b, _ in pairs), count_include_pad=False)
    total = AVG[rank](pad_spatial(x, pairs), window, stride)
    count = AVG[rank](pad_spatial(torch.ones_like(x), pairs), window, stride)    # the real cells' share
    return total / count


CASES = (
    pool_case("max-2d-default-stride", (3, 8, 7), "max", 2),
    pool_case("max-2d-overlap-same", (2, 7, 6), "max", 3, stride=1, pad="same"),
    pool_case("max-2d-same-odd-total", (2, 7, 9), "max", (2, 4), stride=(2, 3), pad="same"),   # (0,1), (1,2)
    pool_case("max-2d-int-pad", (2, 6, 5), "max", 3, stride=2, pad=1),
    pool_case("max-2d-pairs", (3, 9, 7), "max", (3, 2), stride=(2, 3), pad=((2, 0), (0, 1))),
    pool_case("max-2d-stride-beyond-window", (2, 11, 10), "max", 2, stride=(4, 3)),
    pool_case("max-1d-same", (3, 11), "max", 4, stride=3, pad="same"),
    pool_case("max-1d-tuple-pad", (2, 9), "max", 3, stride=2, pad=(1,)),
    pool_case("max-3d", (2, 4, 6, 5), "max", 2, stride=(1, 2, 2)),
    pool_case("max-3d-pad", (2, 3, 5, 4), "max", (2, 3, 2), stride=2, pad=((1, 0), 1, (0, 1))),
    pool_case("avg-2d-default-stride", (3, 8, 6), "avg", 2),
    pool_case("avg-2d-same-stride", (2, 7, 7), "avg", 3, stride=2, pad="same"),
    pool_case("avg-2d-same-even-window", (2, 5, 6), "avg", 2, stride=1, pad="same"),          # (0, 1) each axis
    pool_case("avg-2d-int-pad", (2, 6, 5), "avg", 3, stride=1, pad=1),
    pool_case("avg-2d-pairs", (2, 8, 7), "avg", (3, 3), stride=(2, 2), pad=((2, 1), (0, 2))),
    pool_case("avg-1d-pairs", (2, 9), "avg", 4, stride=3, pad=((2, 1),)),
    pool_case("avg-1d-same", (3, 10), "avg", 3, stride=2, pad="same"),
    pool_case("avg-3d", (2, 4, 4, 6), "avg", (2, 2, 3)),
    pool_case("avg-3d-same", (2, 3, 5, 4), "avg", 2, stride=(1, 2, 2), pad="same"),
    pool_case("globalavg-2d", (4, 5, 7), "globalavg"),
    pool_case("globalmax-2d", (4, 5, 7), "globalmax"),
    pool_case("globalavg-1d", (3, 9), "globalavg"),
    pool_case("globalmax-1d", (3, 9), "globalmax"),
    pool_case("globalavg-3d", (3, 2, 3, 4), "globalavg"),
    pool_case("globalmax-3d", (3, 2, 3, 4), "globalmax"),
    pool_case("max-large", (16, 34, 33), "max", 3, stride=2, pad="same"),          # the threaded loops
    pool_case("avg-large", (16, 32, 33), "avg", 3, stride=1, pad=1),
    pool_case("max-runtime", (3, 9, 7), "max", 2, dims=(3, "H", "W"), shape2=(3, 6, 11)),
    pool_case("avg-runtime-same", (2, 7, 5), "avg", 3, stride=2, pad="same", dims=(2, "U", "V"), shape2=(2, 8, 10)),
    pool_case("globalmax-runtime", (3, 5, 7), "globalmax", dims=(3, "P", "Q"), shape2=(3, 2, 9)),
)
IDS = [c.id for c in CASES]


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    'max-2d-overlap-same', 'max-2d-pairs', 'max-3d-pad', 'avg-2d-same-stride',
    'avg-1d-pairs', 'avg-3d-same', 'globalavg-2d', 'globalmax-1d',
    'max-runtime', 'avg-runtime-same', 'globalmax-runtime',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=63, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1063, ids=OPENCL_CASES)


@pytest.fixture(scope="module")
def runs():
    module = compile_cases(CASES)
    rng = np.random.default_rng(201)
    net = module.Model(seed=0)
    return {1: run_cases(module, CASES, 1, rng, net=net), 3: run_cases(module, CASES, 3, rng, net=net, variant=1)}


@pytest.fixture(scope="module")
def nhwc_run():
    return run_cases(compile_cases(CASES, layout="NHWC"), CASES, 2, np.random.default_rng(202), layout="NHWC")


@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_forward_and_input_gradient_match_torch(runs, index, batch):
    compare_with_torch(runs[batch], index, CASES[index], reference)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_nhwc_layout_matches_torch(nhwc_run, index):
    compare_with_torch(nhwc_run, index, CASES[index], reference)


def test_output_shapes(runs):
    shapes = {c.id: y.shape[1:] for c, y in zip(CASES, runs[1].ys)}
    assert shapes["max-2d-same-odd-total"] == (2, 4, 3)          # ceil(7/2), ceil(9/3)
    assert shapes["max-1d-same"] == (3, 4)
    assert shapes["avg-2d-same-even-window"] == (2, 5, 6)
    assert shapes["globalavg-1d"] == (3, 1)
    assert shapes["globalmax-3d"] == (3, 1, 1, 1)


EDGES = """
network E {
    input x: [1, 3, 4]
    input v: [2, 5]
    a = x -> maxpool(3, stride=1, pad=same)
    b = x -> maxpool(2, stride=2, pad=((1, 1), (1, 1)))
    c = x -> avgpool(3, stride=1, pad=same)
    d = x -> avgpool(2, pad=((1, 0), (1, 1)))
    e = v -> maxpool(3, stride=1, pad=((2, 2),))
    output a, b, c, d, e
}
"""


def test_padding_never_wins_a_max_and_is_never_counted_in_a_mean(backend):
    net = convdsl.load_source(EDGES, backend=backend).Model()
    x = -np.arange(1, 13, dtype=np.float32).reshape(1, 1, 3, 4) - 100        # every value negative
    v = -np.ones((1, 2, 5), dtype=np.float32) * 7
    a, b, c, d, e = net.forward(x, v)
    xt = torch.tensor(x, dtype=torch.float64)
    assert_close(a, F.max_pool2d(xt, 3, 1, padding=1).numpy(), what="max with same padding")
    assert np.all(a <= -101) and np.all(b <= -101), "a padded zero won a max"
    assert_close(b, F.max_pool2d(xt, 2, 2, padding=1).numpy(), what="max with padding on both sides")
    assert_close(c, F.avg_pool2d(xt, 3, 1, padding=1, count_include_pad=False).numpy(), what="avg, same")
    # d: windows [pad, x00], [x01, x02], [x03, pad] in the first row; the top row of windows holds one real row
    first_row = np.array([x[0, 0, 0, 0], (x[0, 0, 0, 1] + x[0, 0, 0, 2]) / 2, x[0, 0, 0, 3]])
    np.testing.assert_allclose(d[0, 0, 0], first_row, rtol=1e-6)
    np.testing.assert_array_equal(e, np.full((1, 2, 7), -7, dtype=np.float32))
    ones = net.forward(np.ones_like(x), np.ones_like(v))
    np.testing.assert_array_equal(ones[2], np.ones((1, 1, 3, 4)))
    np.testing.assert_array_equal(ones[3], np.ones((1, 1, 2, 3)))


NANS = """
network N {
    input x: [2, 4, 6]
    inside = x -> maxpool(2)
    overlapping = x -> maxpool(3, stride=1)
    padded = x -> maxpool(2, pad=((1, 1), (1, 1)))
    output inside, overlapping, padded
}
"""


def test_a_nan_wins_a_max_with_and_without_padding():
    # Without padding the forward reads each window with no bounds checks (templates/c/ops/
    # maxpool.c.j2); with padding it scans as the backward does. Both give a NaN where PyTorch does:
    # in any cell of the window, the first or a later one.
    net = convdsl.load_source(NANS).Model()
    x = np.random.default_rng(5).standard_normal((3, 2, 4, 6)).astype(np.float32)
    x[0, 0, 0, 0] = x[1, 1, 3, 5] = x[2, 0, 1, 2] = x[2, 1, 2, 1] = np.nan
    xt = torch.tensor(x, dtype=torch.float64)
    inside, overlapping, padded = net.forward(x)
    for got, want, what in ((inside, F.max_pool2d(xt, 2), "no padding"),
                            (overlapping, F.max_pool2d(xt, 3, 1), "overlapping windows"),
                            (padded, F.max_pool2d(xt, 2, 2, padding=1), "padding")):
        want = want.numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
        assert np.isnan(want).sum() >= 4, what
        np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-6, err_msg=what)


def test_a_nan_takes_its_windows_gradient_as_in_torch():
    # 2×2 at stride 2 runs in vectors of windows (maxpool.c.j2, k.pairs): its masks must pick
    # the cell PyTorch's backward picks, the first maximum, or the last NaN of the window
    # (two in one window here), in the vectors and in the overlapping last one of a row.
    net = convdsl.load_source("network P {\n input x: [2, 4, 70]\n y = x -> maxpool(2)\n output y\n}").Model()
    net.train()
    x = np.random.default_rng(8).standard_normal((2, 2, 4, 70)).astype(np.float32)
    x[0, 0, 0, 0] = x[0, 0, 1, 1] = x[1, 1, 2, 69] = x[1, 0, 3, 40] = x[0, 1, 0, 66] = np.nan
    x[1, 1, 0, 10] = x[1, 1, 1, 10] = x[1, 1, 1, 11] = 3.0     # a tie: the first in scan order wins
    y = net.forward(x)
    dy = np.random.default_rng(9).standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want = F.max_pool2d(xt, 2)
    want.backward(torch.tensor(dy, dtype=torch.float64))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want.detach().numpy()))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=0)
