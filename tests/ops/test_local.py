"""local (§3.1): locally connected layer with unshared weights, against F.unfold + einsum."""
from __future__ import annotations

import math

import numpy as np
import pytest

from convdsl.cli import main as convdsl_main
from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, Case, assert_c_compiles_cleanly,
                     assert_error_at, compare_with_torch, compile_cases, finite_differences, layer_stats,
                     run_cases, source, unshared_reference)

CASES = (
    Case("2d-k3", (3, 8, 8), "local(4, kernel=3)",
         dict(kernel=(3, 3), stride=(1, 1), pads=((0, 0), (0, 0)))),
    # same: out = ceil(in / s); H total 2 → (1, 1), W total 1 → (0, 1): the odd zero goes at the end
    Case("2d-odd-stride2-same", (2, 7, 9), "local(3, kernel=(3, 2), stride=2, pad=same)",
         dict(kernel=(3, 2), stride=(2, 2), pads=((1, 1), (0, 1)))),
    Case("2d-pairs-nobias", (3, 6, 5), "local(2, kernel=2, stride=(1, 2), pad=((1, 0), (0, 1)), bias=false)",
         dict(kernel=(2, 2), stride=(1, 2), pads=((1, 0), (0, 1)))),
    Case("2d-full", (1, 4, 3), "local(2, kernel=(2, 3), pad=full)",
         dict(kernel=(2, 3), stride=(1, 1), pads=((1, 1), (2, 2)))),
    Case("1d", (2, 11), "local(3, kernel=4, stride=3, pad=1)",
         dict(kernel=(4,), stride=(3,), pads=((1, 1),))),
    Case("frozen", (2, 5, 5), "local(2, kernel=3, frozen=true)",
         dict(kernel=(3, 3), stride=(1, 1), pads=((0, 0), (0, 0)))),
    # big enough that batch 3 takes the OpenMP paths (N·CO·P·CI·KK > 65536)
    Case("parallel", (4, 12, 12), "local(8, kernel=3)", dict(kernel=(3, 3), stride=(1, 1), pads=((0, 0), (0, 0)))),
)
IDS = [c.id for c in CASES]


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '2d-odd-stride2-same', '2d-pairs-nobias', '1d', 'frozen',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, unshared_reference, seed=4, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, unshared_reference, seed=1004, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2004, ids=(
    "2d-odd-stride2-same", "2d-pairs-nobias", "frozen"))


@pytest.fixture(scope="module")
def runs():
    module = compile_cases(CASES)
    rng = np.random.default_rng(1)
    return {batch: run_cases(module, CASES, batch, rng) for batch in (1, 3)}


@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_forward_and_gradients_match_torch(runs, index, batch):
    compare_with_torch(runs[batch], index, CASES[index], unshared_reference)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_nhwc_layout(index):
    module = compile_cases(CASES, layout="NHWC")
    run = run_cases(module, CASES, 2, np.random.default_rng(2), layout="NHWC")
    compare_with_torch(run, index, CASES[index], unshared_reference)


def test_finite_differences_float64():
    finite_differences(compile_cases(CASES, dtype="f64"), CASES, np.random.default_rng(3))


def test_parameter_shapes_and_frozen():
    net = compile_cases(CASES).Model(seed=0)
    shapes = {k: v.shape for k, v in net.params.items()}
    assert shapes["L0.weight"] == (4, 6, 6, 3, 3, 3) and shapes["L0.bias"] == (4, 6, 6)
    assert shapes["L1.weight"] == (3, 4, 5, 2, 3, 2) and shapes["L1.bias"] == (3, 4, 5)
    assert "L2.bias" not in shapes
    assert shapes["L4.weight"] == (3, 4, 2, 4) and shapes["L4.bias"] == (3, 4)       # 1-D: [out, ol, in, kl]
    assert "L5.weight" in net.params and "L5.weight" not in net.grads and "L5.bias" not in net.grads
    assert "L0.weight" in net.grads


def test_he_initialisation():
    net = compile_cases(CASES).Model(seed=0)
    w = net.params["L0.weight"]
    assert abs(w.std() / math.sqrt(2 / 27) - 1) < 0.1       # fan_in = in · kh · kw = 27
    assert not net.params["L0.bias"].any()


def test_check_reports_params_and_macs(tmp_path, capsys):
    stats = layer_stats("input x: [3, 8, 8]\n y = x -> local(4, kernel=3)\n output y")
    row = stats["local1"]
    assert row.params == 4 * 6 * 6 * 3 * 3 * 3 + 4 * 6 * 6
    assert row.macs == 4 * 6 * 6 * 3 * 3 * 3
    assert row.receptive_field == "3×3"
    stats = layer_stats("input x: [2, 11]\n y = x -> local(3, kernel=4, stride=3, bias=false) -> local(1, kernel=2)"
                        "\n output y")
    assert stats["local1"].params == 3 * 3 * 2 * 4 and stats["local1"].macs == 3 * 3 * 2 * 4
    assert stats["local2"].receptive_field == "7"            # 4 + (2 − 1)·3
    path = tmp_path / "net.cnn"
    path.write_text("network N {\n input x: [3, 8, 8]\n y = x -> local(4, kernel=3)\n output y\n}\n")
    assert convdsl_main(["check", str(path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("local1"))
    assert "local(4, k=3×3)" in line and "4,032" in line and "3,888" in line and "7,776" in line


def test_shared_layer_needs_one_input_size():
    assert_error_at("input x: [3, 8, 8]\n input z: [3, 9, 9]\n layer L = local(2, kernel=3)\n"
                    " a = x -> L\n b = z -> L\n output a, b", "L", "shares its weights")


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, H, W]\n y = x -> local(4, kernel=3)\n output y", "local(",
     ("local needs a fixed-size input", "`x` is [3, H, W]", "use tiled or conv")),
    ("input x: [3, 4, 4]\n y = x -> local(4, kernel=5)\n output y", "local(",
     ("output would be 0×0", "input 4×4, kernel 5")),
    ("input x: [3, 2, 4, 4]\n y = x -> local(4, kernel=1)\n output y", "local(", ("1-D and 2-D",)),
    ("input x: [3, 8, 8]\n y = x -> local(0, kernel=3)\n output y", "0", ("`out` must be at least 1",)),
    ("input x: [3, 8, 8]\n y = x -> local(4, kernel=(3, 3, 3))\n output y", "(3, 3, 3)", ("2 spatial axes",)),
    ("input x: [3, 8, 8]\n y = x -> local(4, kernel=3, dilation=2)\n output y", "2)",
     ("no argument `dilation`",)),
    ("input x: [3, 8, 8]\n y = x -> local(4, kernel=3, init=sobel)\n output y", "sobel", ("undefined name",)),
], ids=["runtime-size", "too-small", "3d", "out-0", "kernel-rank", "no-dilation", "bad-init"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
