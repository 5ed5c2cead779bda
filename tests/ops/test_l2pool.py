"""l2pool (§2.2): sqrt of the sum of squares in each window, against sqrt(avg_pool(x²) · window size)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite, Case,
                     assert_c_compiles_cleanly, assert_error_at, layer_stats, source, torch_pad)

AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def reference(x, params, *, window, stride, pads):
    # Zero padding first, so every window averages over its full size: padded cells add 0.
    squares = torch_pad(x * x, pads)
    return torch.sqrt(AVG_POOL[x.dim() - 2](squares, window, stride) * math.prod(window))


CASES = (
    Case("2d-2", (3, 8, 8), "l2pool(2)", dict(window=(2, 2), stride=(2, 2), pads=((0, 0), (0, 0)))),
    # same: H out 3, total 1 → (0, 1); W out 5, total 2 → (1, 1)
    Case("2d-odd-same", (2, 6, 9), "l2pool(3, stride=2, pad=same)",
         dict(window=(3, 3), stride=(2, 2), pads=((0, 1), (1, 1)))),
    Case("2d-pairs", (2, 5, 6), "l2pool((2, 3), stride=(1, 2), pad=((1, 0), (0, 2)))",
         dict(window=(2, 3), stride=(1, 2), pads=((1, 0), (0, 2)))),
    Case("1d", (2, 10), "l2pool(3, stride=2, pad=1)", dict(window=(3,), stride=(2,), pads=((1, 1),))),
    Case("3d", (2, 4, 5, 4), "l2pool((2, 3, 2), stride=(2, 1, 2))",
         dict(window=(2, 3, 2), stride=(2, 1, 2), pads=((0, 0), (0, 0), (0, 0)))),
    # same pads both sizes, 7×5 and 9×3, with (0, 1) on each axis
    Case("runtime-size", (2, 7, 5), "l2pool(2, pad=same)", dict(window=(2, 2), stride=(2, 2), pads=((0, 1), (0, 1))),
         dims=(2, "H", "W"), shape2=(2, 9, 3)),
    # big enough that batch 3 takes the OpenMP path (N·C·outputs > 16384)
    Case("parallel", (16, 32, 32), "l2pool(2, stride=1)", dict(window=(2, 2), stride=(1, 1), pads=((0, 0), (0, 0)))),
)


runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=31)


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '2d-odd-same', '2d-pairs', '1d', '3d',
    'runtime-size',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=32, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1032, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2032, ids=("2d-odd-same", "3d"))


def test_gradient_at_a_zero_output_is_zero():
    net = convdsl.load_source("network Z {\n dtype f64\n input x: [1, 4, 4]\n y = x -> l2pool(2)\n output y\n}\n")
    model = net.Model(seed=0)
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, :2, :2] = [[3.0, 0.0], [0.0, -4.0]]           # one window is non-zero, the other three are 0
    y = model.forward(x)
    assert y[0, 0].tolist() == [[5.0, 0.0], [0.0, 0.0]]
    dx = model.backward(np.ones_like(y))
    assert np.isfinite(dx).all()
    expected = np.zeros((4, 4))
    expected[:2, :2] = [[0.6, 0.0], [0.0, -0.8]]            # x / y in the non-zero window, 0 elsewhere
    np.testing.assert_allclose(dx[0, 0], expected, rtol=1e-12, atol=0)


def test_check_reports_macs_and_receptive_field():
    stats = layer_stats("input x: [3, 9, 9]\n y = x -> conv(4, kernel=3) -> l2pool(3, stride=2)\n output y")
    row = stats["l2pool1"]
    assert row.shape == "[4, 3, 3]" and row.params == 0
    assert row.macs == 4 * 3 * 3 * 9                        # one multiply-add (a square) per window cell
    assert row.receptive_field == "5×5" and row.describe == "l2pool(3×3, s=2×2)"


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, 8, 8]\n y = x -> l2pool(2, pad=2)\n output y", "2)", ("smaller than the window",)),
    ("input x: [3, 8, 8]\n y = x -> l2pool(0)\n output y", "0", ("at least 1",)),
    ("input x: [3, 2, 2]\n y = x -> l2pool(3)\n output y", "l2pool(", ("output would be 0×0",)),
    ("input x: [12]\n y = x -> l2pool(2)\n output y", "l2pool(", ("feature map",)),
], ids=["pad-too-big", "window-0", "too-small", "flat-input"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
