"""deconv (§3.11): transposed convolution against F.conv_transpose1d/2d/3d."""
from __future__ import annotations

import pytest
import torch.nn.functional as F

from opcases import (opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite, Case,
                     assert_c_compiles_cleanly, assert_error_at, compile_cases, layer_stats, source)

CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def reference(x, params, **kw):
    return CONV_TRANSPOSE[x.dim() - 2](x, params["weight"], params.get("bias"), **kw)


CASES = (
    Case("2d-up2", (3, 4, 4), "deconv(2, kernel=2, stride=2)", dict(stride=2)),
    Case("2d-everything", (4, 5, 6),
         "deconv(6, kernel=(3, 4), stride=(2, 3), pad=(1, 2), output_pad=(1, 0), groups=2, dilation=(1, 2))",
         dict(stride=(2, 3), padding=(1, 2), output_padding=(1, 0), groups=2, dilation=(1, 2))),
    Case("1d-nobias", (2, 7), "deconv(3, kernel=5, stride=3, pad=2, output_pad=2, bias=false)",
         dict(stride=3, padding=2, output_padding=2)),
    Case("3d", (2, 3, 4, 3), "deconv(2, kernel=(2, 3, 2), stride=(1, 2, 2), pad=(0, 1, 0), output_pad=(0, 1, 1))",
         dict(stride=(1, 2, 2), padding=(0, 1, 0), output_padding=(0, 1, 1))),
    # output_pad may reach the dilation when it is larger than the stride (PyTorch's rule)
    Case("output-pad-below-dilation", (2, 5, 5), "deconv(2, kernel=3, dilation=2, output_pad=1)",
         dict(dilation=2, output_padding=1)),
    Case("frozen-groups", (4, 3, 3), "deconv(6, kernel=3, groups=2, frozen=true)", dict(groups=2)),
    Case("runtime-size", (3, 4, 5), "deconv(2, kernel=3, stride=2, pad=1, output_pad=1)",
         dict(stride=2, padding=1, output_padding=1), dims=(3, "H", "W"), shape2=(3, 6, 3)),
    # big enough for the threaded GEMM and col2im/im2col (C·KK·P > 65536)
    Case("parallel", (16, 16, 16), "deconv(16, kernel=5, stride=2, pad=2, output_pad=1)",
         dict(stride=2, padding=2, output_padding=1)),
)


runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=21)


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '2d-everything', '1d-nobias', '3d', 'output-pad-below-dilation',
    'frozen-groups', 'runtime-size',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=22, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1022, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2022, ids=(
    "2d-everything", "1d-nobias", "frozen-groups"))


def test_parameter_shapes_and_frozen():
    net = compile_cases(CASES).Model(seed=0)
    shapes = {k: v.shape for k, v in net.params.items()}
    assert shapes["L1.weight"] == (4, 3, 3, 4) and shapes["L1.bias"] == (6,)       # [in, out/groups, *k]
    assert shapes["L2.weight"] == (2, 3, 5) and "L2.bias" not in shapes
    assert shapes["L3.weight"] == (2, 2, 2, 3, 2)
    assert "L5.weight" not in net.grads and "L5.bias" not in net.grads and "L0.weight" in net.grads


def test_check_reports_shape_params_macs_and_receptive_field():
    stats = layer_stats("input x: [4, 5, 6]\n y = x -> deconv(6, kernel=(3, 4), stride=(2, 3), pad=(1, 2),"
                        " output_pad=(1, 0), groups=2)\n output y")
    row = stats["deconv1"]
    assert row.shape == "[6, 10, 15]"        # (in − 1)·s − 2·pad + (k − 1) + output_pad + 1
    assert row.params == 4 * 3 * 3 * 4 + 6
    assert row.macs == 4 * 3 * 3 * 4 * 5 * 6               # in · out/groups · kernel · input positions
    assert row.describe == "deconv(6, k=3×4, s=2×3, pad=1×2, output_pad=1×0, g=2)"
    # Down by 4 then up by 2 twice: an output cell of a stride-2 kernel-2 deconv comes from one
    # cell of its input, and the following 3×3 conv steps on the original grid again.
    stats = layer_stats("input x: [1, 16, 16]\n y = x -> maxpool(2) -> maxpool(2) -> deconv(1, kernel=2, stride=2)"
                        " -> deconv(1, kernel=4, stride=2, pad=1) -> conv(1, kernel=3, pad=same)\n output y")
    assert stats["maxpool2"].receptive_field == "4×4"
    assert stats["deconv1"].receptive_field == "4×4"       # span 1 cell, jump 4 → 2
    assert stats["deconv2"].receptive_field == "6×6"       # span ceil(4/2) = 2 cells of jump 2 → jump 1
    assert stats["conv1"].receptive_field == "8×8"         # 6 + (3 − 1)·1


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, 8, 8]\n y = x -> deconv(4, kernel=3, stride=2, output_pad=2)\n output y", "2)",
     ("`output_pad` must be smaller than the stride or the dilation",)),
    ("input x: [3, 8, 8]\n y = x -> deconv(4, kernel=3, output_pad=(0, 1))\n output y", "(0, 1)",
     ("`output_pad` must be smaller",)),
    ("input x: [3, 2, 2]\n y = x -> deconv(4, kernel=1, pad=1)\n output y", "1)",
     ("output would be 0×0", "use a smaller pad")),
    ("input x: [3, 8, 8]\n y = x -> deconv(4, kernel=3, pad=same)\n output y", "same",
     ("integer or a tuple", "ConvTranspose")),
    ("input x: [3, 8, 8]\n y = x -> deconv(4, kernel=3, groups=2)\n output y", "2)",
     ("groups=2 must divide both the input channels (3)",)),
    ("input x: [3, 8, 8]\n y = x -> deconv(4, kernel=3, pad=-1)\n output y", "-1", ("at least 0",)),
    ("input x: [12]\n y = x -> deconv(4, kernel=3)\n output y", "deconv(", ("feature map",)),
], ids=["output-pad-stride", "output-pad-tuple", "too-small", "pad-same", "groups", "pad-negative", "flat-input"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
