"""shuffle (§3.9): ShuffleNet's channel shuffle, view [g, C/g] → transpose → [C/g, g]."""
from __future__ import annotations

import numpy as np
import pytest

from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite, Case,
                     assert_c_compiles_cleanly, assert_error_at, compile_cases, layer_stats, source)


def reference(x, params, *, groups):
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


CASES = (
    Case("2d-g3", (6, 3, 4), "shuffle(3)", dict(groups=3)),
    Case("2d-g2", (6, 3, 4), "shuffle(2)", dict(groups=2)),
    Case("1d-g4", (8, 5), "shuffle(4)", dict(groups=4)),
    Case("flat-vector", (12,), "shuffle(3)", dict(groups=3)),
    Case("3d-g2", (4, 2, 2, 3), "shuffle(2)", dict(groups=2)),
    Case("groups-equal-channels", (4, 3, 3), "shuffle(4)", dict(groups=4)),
    Case("runtime-size", (6, 2, 3), "shuffle(3)", dict(groups=3), dims=(6, "H", "W"), shape2=(6, 5, 1)),
)


runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=51)


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '2d-g3', '1d-g4', 'flat-vector', '3d-g2',
    'runtime-size',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=52, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1052, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2052, ids=("2d-g3", "flat-vector"))


def test_channel_order():
    # Channel c holds the value c: the groups (0 1)(2 3)(4 5) are dealt out one channel each.
    net = compile_cases(CASES).Model(seed=0)
    xs = [np.broadcast_to(np.arange(c.shape[0], dtype=np.float32).reshape(1, -1, *[1] * (len(c.shape) - 1)),
                          (1, *c.shape)) for c in CASES[:1]]
    others = [np.zeros((1, *c.shape), np.float32) for c in CASES[1:]]
    y = net.forward(*xs, *others)[0]
    assert y[0, :, 0, 0].tolist() == [0, 2, 4, 1, 3, 5]


def test_check_row():
    row = layer_stats("input x: [6, 5, 7]\n y = x -> conv(6, kernel=3, groups=3) -> shuffle(3)\n output y")["shuffle1"]
    assert row.shape == "[6, 3, 5]" and row.params == 0 and row.macs == 0 and row.receptive_field == "3×3"
    assert row.describe == "shuffle(3)"


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [6, 4, 4]\n y = x -> shuffle(4)\n output y", "4)", ("groups=4 must divide the input channels",)),
    ("input x: [6, 4, 4]\n y = x -> shuffle(groups=0)\n output y", "0", ("at least 1",)),
    ("input x: [6, 4, 4]\n y = x -> shuffle(groups=(2, 3))\n output y", "(2, 3)", ("integer",)),
], ids=["not-dividing", "zero", "tuple"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
