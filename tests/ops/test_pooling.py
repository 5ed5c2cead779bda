"""maxpool, avgpool, globalavgpool, globalmaxpool (§2.2, §4.2) against PyTorch: values and
input gradients in both layouts, batch 1 and 3, and float64 finite differences."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from opcases import (opencl_f64_test, standard_suite, Case, assert_error_at, compile_cases, source,
                     torch_pad)

MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def reference(x, params, *, kind, window=None, stride=None, pads=None):
    rank = x.dim() - 2
    if kind == "globalavg":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if kind == "globalmax":
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)
    if kind == "max":
        # A padded cell never wins: pad with -inf, which no real value loses to.
        padded = torch_pad(x, pads) if pads else x
        if pads:
            padded = torch_pad(x, pads) + torch_pad(torch.zeros_like(x), pads).masked_fill(
                torch_pad(torch.ones_like(x), pads) == 0, float("-inf"))
        return MAX[rank](padded, window, stride)
    # avg: padding is not counted — the sum over real cells divided by how many there are.
    ones = torch.ones_like(x)
    total = AVG[rank](torch_pad(x, pads) if pads else x, window, stride)
    count = AVG[rank](torch_pad(ones, pads) if pads else ones, window, stride)
    return total / count


CASES = (
    Case("max-2", (3, 8, 8), "maxpool(2)", dict(kind="max", window=2, stride=2)),
    Case("max-3s1-same", (2, 7, 6), "maxpool(3, stride=1, pad=same)",
         dict(kind="max", window=3, stride=1, pads=((1, 1), (1, 1)))),
    Case("max-odd", (2, 9, 7), "maxpool((3, 2), stride=(2, 3), pad=((1, 0), (0, 1)))",
         dict(kind="max", window=(3, 2), stride=(2, 3), pads=((1, 0), (0, 1)))),
    Case("max-1d", (3, 11), "maxpool(3, stride=2)", dict(kind="max", window=3, stride=2)),
    Case("max-3d", (2, 4, 6, 5), "maxpool(2, stride=(1, 2, 2))", dict(kind="max", window=2, stride=(1, 2, 2))),
    Case("avg-2", (3, 8, 6), "avgpool(2)", dict(kind="avg", window=2, stride=2)),
    Case("avg-same", (2, 7, 7), "avgpool(3, stride=2, pad=same)",
         dict(kind="avg", window=3, stride=2, pads=((1, 1), (1, 1)))),
    Case("avg-int-pad", (2, 6, 5), "avgpool(3, stride=1, pad=1)",
         dict(kind="avg", window=3, stride=1, pads=((1, 1), (1, 1)))),
    Case("avg-1d", (2, 9), "avgpool(4, stride=3, pad=((2, 1),))", dict(kind="avg", window=4, stride=3, pads=((2, 1),))),
    Case("avg-3d", (2, 4, 4, 6), "avgpool((2, 2, 3))", dict(kind="avg", window=(2, 2, 3), stride=(2, 2, 3))),
    Case("gavg", (4, 5, 7), "globalavgpool", dict(kind="globalavg")),
    Case("gmax", (4, 5, 7), "globalmaxpool", dict(kind="globalmax")),
    Case("gavg-1d", (3, 9), "globalavgpool", dict(kind="globalavg")),
    Case("gmax-3d", (3, 2, 3, 4), "globalmaxpool", dict(kind="globalmax")),
    Case("max-runtime", (3, 9, 7), "maxpool(2)", dict(kind="max", window=2, stride=2), dims=(3, "H", "W"),
         shape2=(3, 6, 11)),
    Case("gavg-runtime", (3, 5, 7), "globalavgpool", dict(kind="globalavg"), dims=(3, "P", "Q"), shape2=(3, 8, 4)),
    Case("max-parallel", (16, 32, 32), "maxpool(2)", dict(kind="max", window=2, stride=2)),
    # 2×2 at stride 2 in vectors of windows (16 at AVX-512, 8 at AVX2): 22 a row, the last vector
    # overlapping the one before it, and an odd width whose last column no window reads
    Case("max-2-vectors-odd", (3, 10, 45), "maxpool(2)", dict(kind="max", window=2, stride=2)),
    # the same window on a 3-D map, slice by slice (odd heights: the last row of each is dropped)
    Case("max-3d-flat-window", (2, 3, 7, 40), "maxpool((1, 2, 2))", dict(kind="max", window=(1, 2, 2), stride=(1, 2, 2))),
    Case("avg-parallel", (16, 32, 32), "avgpool(3, stride=1, pad=1)",
         dict(kind="avg", window=3, stride=1, pads=((1, 1), (1, 1)))),
)


runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=21)

# On OpenCL the f32 runs of these ops are test_pool.py's (its OPENCL_CASES, both layouts); the
# float64 finite differences, which test_pool.py has not, are here: every kind, with padding.
test_opencl_finite_differences_float64 = opencl_f64_test(
    CASES, seed=23, ids=("max-odd", "max-1d", "avg-same", "avg-3d", "gavg-1d", "gmax-3d"))



def test_a_padded_cell_never_wins_the_max():
    module = compile_cases((Case("neg", (1, 2, 2), "maxpool(3, stride=1, pad=same)"),))
    y = module.Model().forward(-np.ones((1, 1, 2, 2), dtype=np.float32))
    np.testing.assert_array_equal(y, -np.ones((1, 1, 2, 2)))


def test_padding_as_large_as_the_window_is_refused():
    assert_error_at(" input x: [1, 8, 8]\n y = x -> maxpool(2, pad=2)\n output y", "2)", "smaller than the window")
