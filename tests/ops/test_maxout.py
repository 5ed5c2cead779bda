"""maxout (§5.2): the max over each group of k consecutive channels, C → C/k."""
from __future__ import annotations

import numpy as np
import pytest

import convdsl
from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite, Case,
                     assert_c_compiles_cleanly, assert_error_at, layer_stats, source)


def reference(x, params, *, k):
    n, c = x.shape[:2]
    return x.reshape(n, c // k, k, *x.shape[2:]).max(dim=2).values


CASES = (
    Case("2d-k3", (6, 5, 7), "maxout(3)", dict(k=3)),
    Case("1d-k2", (4, 9), "maxout(2)", dict(k=2)),
    Case("flat-vector", (12,), "maxout(4)", dict(k=4)),       # the classic maxout unit after a dense layer
    Case("3d-k4", (4, 2, 3, 2), "maxout(4)", dict(k=4)),
    Case("k1-identity", (3, 4, 4), "maxout(1)", dict(k=1)),
    Case("runtime-size", (6, 3, 5), "maxout(2)", dict(k=2), dims=(6, "H", "W"), shape2=(6, 4, 2)),
    Case("parallel", (32, 32, 32), "maxout(4)", dict(k=4)),   # batch 3 takes the OpenMP path
)


runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=41)


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '2d-k3', '1d-k2', 'flat-vector', '3d-k4',
    'runtime-size',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=42, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1042, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2042, ids=("2d-k3", "flat-vector"))


def test_ties_send_the_gradient_to_the_first_channel():
    net = convdsl.load_source("network M {\n dtype f64\n input x: [4, 2]\n y = x -> maxout(2)\n output y\n}\n").Model()
    x = np.array([[[1.0, 5.0], [1.0, 2.0], [7.0, 3.0], [7.0, 3.0]]])
    assert net.forward(x).tolist() == [[[1.0, 5.0], [7.0, 3.0]]]
    dx = net.backward(np.array([[[10.0, 20.0], [30.0, 40.0]]]))
    assert dx.tolist() == [[[10.0, 20.0], [0.0, 0.0], [30.0, 40.0], [0.0, 0.0]]]


def test_check_row():
    row = layer_stats("input x: [6, 5, 7]\n y = x -> conv(8, kernel=3) -> maxout(4)\n output y")["maxout1"]
    assert row.shape == "[2, 3, 5]" and row.params == 0 and row.macs == 0 and row.receptive_field == "3×3"
    assert row.describe == "maxout(4)"
    assert layer_stats("layout NHWC\n input x: [5, 7, 6]\n y = x -> maxout(3)\n output y")["maxout1"].shape == \
        "[5, 7, 2]"


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [6, 4, 4]\n y = x -> maxout(4)\n output y", "4)", ("k=4 must divide the input channels", "6 channels")),
    ("input x: [6, 4, 4]\n y = x -> maxout(0)\n output y", "0", ("at least 1",)),
    ("input x: [6, 4, 4]\n y = x -> maxout(k=1.5)\n output y", "1.5", ("integer",)),
    ("input x: [6, 4, 4]\n y = x -> maxout\n output y", "maxout", ("needs the argument `k`",)),
], ids=["not-dividing", "zero", "float", "missing"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
