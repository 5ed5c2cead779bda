"""tiled (§3.2): kernel set (j mod t, k mod t) at output position (j, k); tile = 1 is conv and
tile = the output size is local."""
from __future__ import annotations

import numpy as np
import pytest

import convdsl
from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite, Case,
                     assert_c_compiles_cleanly, assert_error_at, compile_cases, layer_stats, source,
                     unshared_reference)
from reference import F64, assert_close

CASES = (
    Case("2d-t2", (3, 8, 8), "tiled(4, kernel=3, tile=2)",
         dict(kernel=(3, 3), stride=(1, 1), pads=((0, 0), (0, 0)), tile=(2, 2))),
    # same: H out 5, total 1 → (0, 1); W out 7, total 2 → (1, 1). 5 rows is not a whole number of tiles.
    Case("2d-odd-same", (2, 9, 7), "tiled(3, kernel=(2, 3), tile=(3, 2), stride=(2, 1), pad=same)",
         dict(kernel=(2, 3), stride=(2, 1), pads=((0, 1), (1, 1)), tile=(3, 2))),
    Case("1d-nobias", (2, 12), "tiled(2, kernel=3, tile=3, stride=2, pad=1, bias=false)",
         dict(kernel=(3,), stride=(2,), pads=((1, 1),), tile=(3,))),
    Case("frozen", (2, 6, 6), "tiled(2, kernel=3, tile=2, frozen=true)",
         dict(kernel=(3, 3), stride=(1, 1), pads=((0, 0), (0, 0)), tile=(2, 2))),
    # The weights do not depend on the map size, so tiled takes run-time sizes (local cannot).
    Case("runtime-size", (2, 7, 6), "tiled(3, kernel=3, tile=2, pad=same)",
         dict(kernel=(3, 3), stride=(1, 1), pads=((1, 1), (1, 1)), tile=(2, 2)), dims=(2, "H", "W"),
         shape2=(2, 5, 9)),
    # big enough that batch 3 takes the OpenMP paths (N·CO·P·CI·KK > 65536)
    Case("parallel", (4, 12, 12), "tiled(8, kernel=3, tile=3)",
         dict(kernel=(3, 3), stride=(1, 1), pads=((0, 0), (0, 0)), tile=(3, 3))),
)


runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, unshared_reference, seed=11)


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '2d-t2', '2d-odd-same', '1d-nobias', 'frozen',
    'runtime-size',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, unshared_reference, seed=12, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, unshared_reference, seed=1012, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2012, ids=("2d-t2", "1d-nobias", "frozen"))


EQUIVALENCE = """
network Eq {
    dtype f64
    input x1: [3, 7, 6]
    input x2: [3, 7, 6]
    input x3: [3, 7, 6]
    input x4: [3, 7, 6]
    a = x1 -> tiled(4, kernel=3, tile=1, stride=2, pad=same)
    b = x2 -> conv(4, kernel=3, stride=2, pad=same)
    c = x3 -> tiled(4, kernel=(2, 3), tile=(6, 4))
    d = x4 -> local(4, kernel=(2, 3))
    output a, b, c, d
}
"""


def test_tile_1_is_conv_and_tile_output_size_is_local():
    net = convdsl.load_source(EQUIVALENCE).Model(seed=0)
    rng = np.random.default_rng(14)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    p = net.params
    assert p["tiled1.weight"].shape == (4, 1, 1, 3, 3, 3) and p["tiled2.weight"].shape == p["local1.weight"].shape
    p["conv1.weight"][...] = p["tiled1.weight"].reshape(4, 3, 3, 3)
    p["conv1.bias"][...] = p["tiled1.bias"].reshape(4)
    p["local1.weight"][...] = p["tiled2.weight"]
    p["local1.bias"][...] = p["tiled2.bias"]
    x = rng.standard_normal((2, 3, 7, 6))
    a, b, c, d = net.forward(x, x, x, x)
    assert_close(a, b, what="tile=1 vs conv", **F64)
    assert_close(c, d, what="tile=output size vs local", **F64)
    dy_ab, dy_cd = rng.standard_normal(a.shape), rng.standard_normal(c.shape)
    dx1, dx2, dx3, dx4 = net.backward(dy_ab, dy_ab, dy_cd, dy_cd)
    g = net.grads
    assert_close(dx1, dx2, what="dX, tile=1 vs conv", **F64)
    assert_close(g["tiled1.weight"].reshape(4, 3, 3, 3), g["conv1.weight"], what="dW, tile=1 vs conv", **F64)
    assert_close(g["tiled1.bias"].reshape(4), g["conv1.bias"], what="db, tile=1 vs conv", **F64)
    assert_close(dx3, dx4, what="dX, tiled vs local", **F64)
    assert_close(g["tiled2.weight"], g["local1.weight"], what="dW, tiled vs local", **F64)
    assert_close(g["tiled2.bias"], g["local1.bias"], what="db, tiled vs local", **F64)


def test_parameter_shapes():
    shapes = {k: v.shape for k, v in compile_cases(CASES).Model(seed=0).params.items()}
    assert shapes["L0.weight"] == (4, 2, 2, 3, 3, 3) and shapes["L0.bias"] == (4, 2, 2)
    assert shapes["L1.weight"] == (3, 3, 2, 2, 2, 3) and shapes["L1.bias"] == (3, 3, 2)
    assert shapes["L2.weight"] == (2, 3, 2, 3) and "L2.bias" not in shapes
    assert shapes["L4.weight"] == (3, 2, 2, 2, 3, 3)


def test_check_reports_params_and_macs():
    stats = layer_stats("input x: [3, 8, 8]\n y = x -> tiled(4, kernel=3, tile=2) -> tiled(2, kernel=2, tile=(1, 3),"
                        " stride=2)\n output y")
    first, second = stats["tiled1"], stats["tiled2"]
    assert first.params == 4 * 2 * 2 * 3 * 3 * 3 + 4 * 2 * 2          # out·t·t·in·kh·kw + out·t·t
    assert first.macs == 4 * 6 * 6 * 3 * 3 * 3                        # out·oh·ow·in·kh·kw, as local
    assert first.describe == "tiled(4, k=3×3, t=2×2)" and first.receptive_field == "3×3"
    assert second.params == 2 * 1 * 3 * 4 * 2 * 2 + 2 * 1 * 3
    assert second.macs == 2 * 3 * 3 * 4 * 2 * 2 and second.receptive_field == "4×4"
    runtime = layer_stats("input x: [3, H, W]\n y = x -> tiled(4, kernel=3, tile=2)\n output y")["tiled1"]
    assert runtime.params == 448 and "H" in str(runtime.macs)


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, 8, 8]\n y = x -> tiled(4, kernel=3, tile=0)\n output y", "0)", ("`tile` must be at least 1",)),
    ("input x: [3, 8, 8]\n y = x -> tiled(4, kernel=3, tile=(2, 7))\n output y", "(2, 7)",
     ("tile 2×7 is larger than the output (6×6)", "`local`")),
    ("input x: [3, 8, 8]\n y = x -> tiled(4, kernel=3, tile=(2, 2, 2))\n output y", "(2, 2, 2)",
     ("2 spatial axes",)),
    ("input x: [3, 8, 8]\n y = x -> tiled(4, kernel=3)\n output y", "tiled(", ("needs the argument `tile`",)),
    ("input x: [3, 8, 8]\n y = x -> tiled(4, kernel=3, tile=2.5)\n output y", "2.5", ("integer",)),
    ("input x: [3, 2, 8, 8]\n y = x -> tiled(4, kernel=3, tile=2)\n output y", "tiled(", ("1-D and 2-D",)),
], ids=["tile-0", "tile-too-big", "tile-rank", "tile-missing", "tile-float", "3d"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
