"""Padding modes: the pad op (zeros, reflect, replicate) and conv, depthwise and separable with
pad_mode=reflect / replicate, against F.pad and F.conv1d/2d/3d and against torch.nn.Conv2d's own
padding_mode: values, input and parameter gradients, batch 1 and 3, NHWC, float64 finite
differences; the pad layer in `check`, and errors where reflect cannot pad that much."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from opcases import Case, assert_error_at, layer_stats, opencl_f64_test, opencl_nhwc_test, opencl_suite, standard_suite
from reference import assert_close

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def padded(x, pads, mode):
    flat = []
    for before, after in reversed(pads):
        flat += [before, after]
    return F.pad(x, flat, mode={"zeros": "constant"}.get(mode, mode))


def reference(x, params, *, pads, mode, conv=None, separable=False, **kw):
    x = padded(x, pads, mode)
    if conv is None:
        return x
    if separable:
        dw = CONV[x.dim() - 2](x, params["dw.weight"], None, groups=x.shape[1], **kw)
        return CONV[x.dim() - 2](dw, params["pw.weight"], params["pw.bias"])
    return CONV[x.dim() - 2](x, params["weight"], params.get("bias"), **kw)


CASES = (
    Case("pad-zeros-2d", (3, 4, 5), "pad(1)", dict(pads=((1, 1), (1, 1)), mode="zeros")),
    Case("pad-reflect-2d-pairs", (2, 4, 5), "pad(((1, 3), (4, 0)), mode=reflect)",
         dict(pads=((1, 3), (4, 0)), mode="reflect")),
    Case("pad-replicate-2d", (2, 3, 4), "pad((2, 5), mode=replicate)", dict(pads=((2, 2), (5, 5)), mode="replicate")),
    Case("pad-reflect-1d", (3, 6), "pad(5, mode=reflect)", dict(pads=((5, 5),), mode="reflect")),
    Case("pad-replicate-3d", (2, 3, 2, 4), "pad(((1, 0), (2, 1), (0, 3)), mode=replicate)",
         dict(pads=((1, 0), (2, 1), (0, 3)), mode="replicate")),
    Case("pad-reflect-3d", (2, 3, 3, 4), "pad(2, mode=reflect)", dict(pads=((2, 2),) * 3, mode="reflect")),
    Case("conv-reflect", (3, 7, 6), "conv(4, kernel=3, pad=1, pad_mode=reflect)",
         dict(pads=((1, 1), (1, 1)), mode="reflect", conv=True)),
    Case("conv-replicate-stride-same", (3, 9, 8), "conv(2, kernel=3, stride=2, pad=same, pad_mode=replicate)",
         dict(pads=((1, 1), (0, 1)), mode="replicate", conv=True, stride=2)),
    Case("conv-reflect-1d-dilated", (2, 11), "conv(3, kernel=3, dilation=2, pad=2, pad_mode=reflect, bias=false)",
         dict(pads=((2, 2),), mode="reflect", conv=True, dilation=2)),
    Case("conv-zeros-mode", (2, 5, 5), "conv(2, kernel=3, pad=1, pad_mode=zeros)",
         dict(pads=((1, 1), (1, 1)), mode="zeros", conv=True)),
    Case("depthwise-reflect", (4, 6, 6), "depthwise(3, pad=same, pad_mode=reflect)",
         dict(pads=((1, 1), (1, 1)), mode="reflect", conv=True, groups=4)),
    Case("separable-replicate", (3, 6, 5), "separable(4, kernel=3, pad=1, pad_mode=replicate)",
         dict(pads=((1, 1), (1, 1)), mode="replicate", conv=True, separable=True)),
    Case("conv-reflect-3d", (2, 4, 4, 3), "conv(2, kernel=3, pad=(1, 1, 0), pad_mode=reflect)",
         dict(pads=((1, 1), (1, 1), (0, 0)), mode="reflect", conv=True)),
    Case("pad-replicate-large", (16, 40, 40), "pad(3, mode=replicate)", dict(pads=((3, 3), (3, 3)), mode="replicate")),
    Case("pad-replicate-runtime", (2, 4, 5), "pad(2, mode=replicate)", dict(pads=((2, 2), (2, 2)), mode="replicate"),
         dims=(2, "H", "W"), shape2=(2, 1, 7)),
)

runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \
    standard_suite(CASES, reference, seed=91)

# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite — every mode and
# rank, padding on one side only, a conv's padding mode and run-time sizes.
OPENCL_CASES = (
    'pad-zeros-2d', 'pad-reflect-2d-pairs', 'pad-reflect-1d', 'pad-replicate-3d', 'conv-reflect',
    'pad-replicate-runtime',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=95, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1095, ids=OPENCL_CASES)
test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=2095, ids=(
    "pad-zeros-2d", "pad-reflect-2d-pairs", "pad-replicate-3d", "conv-reflect"))


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_conv_matches_torch_conv2d_padding_mode(mode):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 4, kernel_size=(3, 5), padding=(1, 2), padding_mode=mode, dtype=torch.float64)
    net = convdsl.load_source(f"network C {{\n input x: [3, 6, 7]\n y = x -> conv(4, kernel=(3, 5), pad=(1, 2), "
                              f"pad_mode={mode})\n output y\n}}\n").Model()
    net.params["conv1.weight"][...] = layer.weight.detach().numpy()
    net.params["conv1.bias"][...] = layer.bias.detach().numpy()
    x = np.random.default_rng(92).standard_normal((2, 3, 6, 7)).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = layer(xt)
    assert_close(net.forward(x), ref.detach().numpy(), what=f"Conv2d(padding_mode={mode})")
    dy = np.ones(ref.shape, np.float32)
    ref.sum().backward()
    assert_close(net.backward(dy), xt.grad.numpy(), what="input gradient")
    assert_close(net.grads["conv1.weight"], layer.weight.grad.numpy(), what="weight gradient")


def test_the_pad_layer_shows_in_check_and_keeps_the_conv_s_parameter_names():
    stats = layer_stats("input x: [3, 8, 8]\n y = x -> conv(4, kernel=3, pad=1, pad_mode=reflect)\n output y")
    assert list(stats) == ["conv1.pad", "conv1"]
    assert stats["conv1.pad"].describe == "pad(1, reflect)" and stats["conv1.pad"].shape == "[3, 10, 10]"
    assert stats["conv1"].shape == "[4, 8, 8]" and stats["conv1"].params == 4 * 3 * 9 + 4
    # no padding to fill: no pad layer
    stats = layer_stats("input x: [3, 8, 8]\n y = x -> conv(4, kernel=3, pad_mode=reflect)\n output y")
    assert list(stats) == ["conv1"]


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, 3, 8]\n y = x -> conv(4, kernel=7, pad=3, pad_mode=reflect)\n output y", "3, pad_mode",
     ("reflect padding of 3 on spatial axis 1", "size is 3", "at most size − 1 = 2")),
    ("input x: [3, 8, 8]\n y = x -> pad(((0, 8), (0, 0)), mode=reflect)\n output y", "((0, 8)",
     ("reflect padding of 8 on spatial axis 1",)),
    ("input x: [3, H, W]\n y = x -> pad(1, mode=reflect)\n output y", "1, mode", ("run-time size", "replicate")),
    ("input x: [3, 8, 8]\n y = x -> conv(4, kernel=3, pad=reflect)\n output y", "reflect",
     ("`pad` says how much padding", "pad=1, pad_mode=reflect")),
    ("input x: [3, 8, 8]\n y = x -> conv(4, kernel=3, pad=1, pad_mode=circular)\n output y", "circular",
     ("circular and symmetric padding are not in the language",)),
    ("input x: [3, 8, 8]\n y = x -> conv(4, kernel=3, pad=1, pad_mode=same)\n output y", "same)",
     ("`pad_mode` must be one of zeros, reflect, replicate",)),
    ("input x: [3, 8, 8]\n y = x -> pad(same)\n output y", "same", ("needs a window",)),
    ("input x: [12]\n y = x -> pad(1)\n output y", "pad(1)", ("1-D, 2-D or 3-D feature map",)),
])
def test_errors_point_at_the_padding(body, needle, fragments):
    assert_error_at(body, needle, *fragments)
