"""reshape: the values in the layout's order under another shape (the flatten/unflatten of ONNX
graphs), against torch.reshape of the layout-ordered tensor, forward and backward, both layouts,
batch 1 and 3, on C and OpenCL, float64 finite differences; element counts and sizes checked at check time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import convdsl
from opcases import assert_error_at, finite_differences, layer_stats
from reference import assert_close, to_nchw, to_nhwc

# (input shape, written shape) per output, in the layout's order as the file writes them.
RESHAPES = (
    ((48,), (4, 3, 4)),          # unflatten a vector to a map
    ((4, 3, 4), (48,)),          # flatten a map
    ((4, 3, 4), (-1,)),          # flatten with the size inferred
    ((4, 3, 4), (2, 6, 4)),      # a map re-viewed as another map
    ((6, 8), (2, 4, 6)),         # 1-D map to 2-D
    ((2, 2, 3, 4), (-1, 4)),     # 3-D map to 1-D, one size inferred
    ((12,), (12, 1, 1)),         # a vector to a 1×1 map
)

SRC = """network R {{
    dtype {dtype}
    layout {layout}
{body}
}}
"""


def source(dtype="f32", layout="NCHW") -> str:
    lines = []
    for i, (shape, target) in enumerate(RESHAPES):
        lines.append(f"    input x{i}: [{', '.join(map(str, shape))}]")
        lines.append(f"    y{i} = x{i} -> reshape([{', '.join(map(str, target))}])")
    lines.append("    output " + ", ".join(f"y{i}" for i in range(len(RESHAPES))))
    return SRC.format(dtype=dtype, layout=layout, body="\n".join(lines))


_MODULES: dict = {}


def module(dtype="f32", layout="NCHW", backend="c"):
    key = (dtype, layout, backend)
    if key not in _MODULES:
        _MODULES[key] = convdsl.load_source(source(dtype, layout), backend=backend)
    return _MODULES[key]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_reshape_matches_torch_reshape_in_the_layouts_order(layout, batch, backend):
    net = module(layout=layout, backend=backend).Model()
    rng = np.random.default_rng(81 + batch)
    # Arrays as the file's layout has them: torch.reshape of those is the reference.
    xs = [rng.standard_normal((batch, *shape)).astype(np.float32) for shape, _ in RESHAPES]
    ys = net.forward(*xs)
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    dxs = net.backward(*dys)
    for i, ((shape, target), x, y, dy, dx) in enumerate(zip(RESHAPES, xs, ys, dys, dxs)):
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        ref = t.reshape(batch, *target)
        assert_close(y, ref.detach().numpy(), what=f"{layout} reshape {i}: forward")
        ref.backward(torch.tensor(dy, dtype=torch.float64))
        assert_close(dx, t.grad.numpy(), what=f"{layout} reshape {i}: input gradient")


def test_finite_differences_float64(backend):
    class Shaped:                     # what finite_differences reads of a case: its input shape
        def __init__(self, i, shape):
            self.id, self.shape = f"reshape {i}", shape
    cases = [Shaped(i, shape) for i, (shape, _) in enumerate(RESHAPES)]
    finite_differences(module("f64", "NHWC", backend), cases, np.random.default_rng(84))


def test_an_nhwc_reshape_reads_channels_last(backend):
    """[2, 2, 3] written in NHWC is 2×2 positions of 3 channels: the vector's first three values
    are the channels of the first position."""
    net = convdsl.load_source("network N {\n layout NHWC\n input v: [12]\n y = v -> reshape([2, 2, 3])\n"
                              " output y\n}\n", backend=backend).Model()
    v = np.arange(12, dtype=np.float32)[None]
    y = net.forward(v)
    np.testing.assert_array_equal(y, v.reshape(1, 2, 2, 3))
    np.testing.assert_array_equal(to_nchw(y)[0, :, 0, 0], [0, 1, 2])
    assert to_nhwc(to_nchw(y)).shape == (1, 2, 2, 3)


def test_shapes_in_check():
    stats = layer_stats("input v: [48]\n a = v -> reshape([3, 4, 4])\n b = a -> reshape([-1, 2])\n output b")
    assert stats["reshape1"].shape == "[3, 4, 4]" and stats["reshape2"].shape == "[24, 2]"
    assert stats["reshape1"].params == 0 and stats["reshape1"].macs == 0


@pytest.mark.parametrize("body, needle, fragments", [
    ("input v: [48]\n y = v -> reshape([5, 3, 3])\n output y", "[5", ("[5, 3, 3] holds 45 values", "holds 48")),
    ("input v: [48]\n y = v -> reshape([-1, 5])\n output y", "[-1", ("no size for -1",)),
    ("input v: [48]\n y = v -> reshape([-1, -1])\n output y", "[-1", ("one size to be inferred",)),
    ("input v: [48]\n y = v -> reshape([0, 48])\n output y", "[0", ("positive integers",)),
    ("input v: [48]\n y = v -> reshape([1, 2, 2, 2, 6])\n output y", "[1", ("1 to 4 sizes",)),
    ("input v: [48]\n y = v -> reshape(same)\n output y", "same", ("positive integers",)),
    ("input x: [3, H, W]\n y = x -> reshape([-1])\n output y", "reshape", ("fixed size",)),
    ("input v: [48]\n y = v -> reshape\n output y", "reshape", ("needs the argument `shape`",)),
])
def test_errors_point_at_the_shape(body, needle, fragments):
    assert_error_at(body, needle, *fragments)
