"""upsample: nearest and (bi/tri)linear up-sampling by integer factors, against F.interpolate."""
from __future__ import annotations

import pytest
import torch.nn.functional as F

from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite, Case,
                     assert_c_compiles_cleanly, assert_error_at, layer_stats, source)


def reference(x, params, *, factor, mode="nearest"):
    scale = tuple(float(f) for f in factor)
    if mode == "nearest":
        return F.interpolate(x, scale_factor=scale, mode=mode)
    return F.interpolate(x, scale_factor=scale, mode=mode, align_corners=False)


CASES = (
    Case("2d-nearest", (3, 4, 5), "upsample(2)", dict(factor=(2, 2))),
    Case("2d-nearest-per-axis", (2, 3, 4), "upsample((2, 3))", dict(factor=(2, 3))),
    Case("1d-nearest", (2, 5), "upsample(3)", dict(factor=(3,))),
    Case("3d-nearest", (2, 2, 3, 2), "upsample((2, 1, 3))", dict(factor=(2, 1, 3))),
    Case("2d-bilinear", (3, 4, 5), "upsample(2, mode=bilinear)", dict(factor=(2, 2), mode="bilinear")),
    Case("2d-bilinear-odd", (2, 3, 5), "upsample((3, 2), mode=bilinear)", dict(factor=(3, 2), mode="bilinear")),
    Case("2d-bilinear-one-axis", (2, 5, 4), "upsample((1, 2), mode=bilinear)", dict(factor=(1, 2), mode="bilinear")),
    Case("1d-linear", (2, 6), "upsample(3, mode=linear)", dict(factor=(3,), mode="linear")),
    Case("3d-trilinear", (2, 2, 3, 3), "upsample((2, 2, 3), mode=trilinear)",
         dict(factor=(2, 2, 3), mode="trilinear")),
    Case("1-pixel-bilinear", (2, 1, 1), "upsample(4, mode=bilinear)", dict(factor=(4, 4), mode="bilinear")),
    Case("runtime-size", (2, 3, 4), "upsample(2, mode=bilinear)", dict(factor=(2, 2), mode="bilinear"),
         dims=(2, "H", "W"), shape2=(2, 5, 2)),
    # big enough that batch 3 takes the OpenMP path (N·C·outputs > 65536)
    Case("parallel-nearest", (16, 24, 24), "upsample(2)", dict(factor=(2, 2))),
    Case("parallel-bilinear", (16, 24, 24), "upsample(2, mode=bilinear)", dict(factor=(2, 2), mode="bilinear")),
)


runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=61)


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '2d-nearest-per-axis', '1d-nearest', '3d-nearest', '2d-bilinear-odd',
    '2d-bilinear-one-axis', '1d-linear', '3d-trilinear', '1-pixel-bilinear',
    'runtime-size',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=62, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1062, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2062, ids=(
    "2d-nearest-per-axis", "2d-bilinear-odd", "1d-linear", "3d-trilinear", "1-pixel-bilinear"))


def test_check_rows():
    stats = layer_stats("input x: [3, 8, 8]\n y = x -> maxpool(2) -> upsample(2, mode=bilinear) -> upsample((1, 2))"
                        " -> conv(1, kernel=3)\n output y")
    bilinear, nearest = stats["upsample1"], stats["upsample2"]
    assert bilinear.shape == "[3, 8, 8]" and bilinear.params == 0
    assert bilinear.macs == 3 * 8 * 8 * 4                   # 4 input cells blended per output value
    assert bilinear.receptive_field == "4×4"                # 2 + (2 − 1)·2: two neighbours on the coarse grid
    assert nearest.shape == "[3, 8, 16]" and nearest.macs == 0 and nearest.receptive_field == "4×4"
    assert nearest.describe == "upsample(1×2)" and bilinear.describe == "upsample(2×2, bilinear)"
    assert stats["conv1"].receptive_field == "6×5"          # steps of 1 and 1/2 input cell after them


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, 8]\n y = x -> upsample(2, mode=bilinear)\n output y", "bilinear",
     ("mode=bilinear does not fit a 1-D map", "mode=linear")),
    ("input x: [3, 4, 8, 8]\n y = x -> upsample(2, mode=bilinear)\n output y", "bilinear", ("mode=trilinear",)),
    ("input x: [3, 8, 8]\n y = x -> upsample(2, mode=linear)\n output y", "linear", ("mode=bilinear",)),
    ("input x: [3, 8, 8]\n y = x -> upsample(2, mode=same)\n output y", "same",
     ("`mode` must be one of nearest, linear, bilinear, trilinear",)),
    ("input x: [3, 8, 8]\n y = x -> upsample(0)\n output y", "0", ("at least 1",)),
    ("input x: [3, 8, 8]\n y = x -> upsample(1.5)\n output y", "1.5", ("integer",)),
    ("input x: [3, 8, 8]\n y = x -> upsample((2, 2, 2))\n output y", "(2, 2, 2)", ("2 spatial axes",)),
    ("input x: [12]\n y = x -> upsample(2)\n output y", "upsample(", ("feature map",)),
], ids=["bilinear-1d", "bilinear-3d", "linear-2d", "unknown-mode", "factor-0", "factor-float", "factor-rank",
        "flat-input"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
