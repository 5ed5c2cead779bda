"""Helpers for comparing generated modules with PyTorch: compile a snippet, copy weights, compare.

References always come from PyTorch; nothing here calls the code under test to make an
expected value.
"""
from __future__ import annotations

import numpy as np

import convdsl

F32 = dict(rtol=1e-4, atol=1e-5)
F64 = dict(rtol=1e-7, atol=1e-9)


def compile_net(body: str, *, input_shape=None, name: str = "T", header: str = ""):
    """Compile a one-network source. `body` holds the statements inside `network T { … }`."""
    src = f"{header}\nnetwork {name} {{\n{body}\n}}\n"
    return convdsl.load_source(src)


def assert_close(actual, expected, *, scale: float | None = None, rtol=1e-4, atol=1e-5, what=""):
    """Compare after dividing both by a sensible scale (the reference's largest magnitude)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    s = scale if scale is not None else max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual / s, expected / s, rtol=rtol, atol=atol, err_msg=what)


def to_nhwc(a: np.ndarray) -> np.ndarray:
    """[N, C, *S] → [N, *S, C]"""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def to_nchw(a: np.ndarray) -> np.ndarray:
    """[N, *S, C] → [N, C, *S]"""
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


# ---- padding as the language defines it, built for a PyTorch reference ------------------

def same_pairs(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow / ONNX SAME_UPPER: output ceil(size / stride); an odd total puts the extra
    zero at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def pad_pairs(spec, sizes, kernel, stride=1, dilation=1) -> tuple[tuple[int, int], ...]:
    """(before, after) zeros per spatial axis for a `pad=` value written as in a .cnn file:
    "valid", "same", "full", an int, a tuple of ints, or a tuple of (before, after) pairs.
    Kernel, stride and dilation are an int or one value per axis."""
    rank = len(sizes)

    def axes(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank

    kernel, stride, dilation = axes(kernel), axes(stride), axes(dilation)
    if spec == "valid":
        return ((0, 0),) * rank
    if spec == "same":
        return tuple(same_pairs(n, k, s, r) for n, k, s, r in zip(sizes, kernel, stride, dilation))
    if spec == "full":
        return tuple((r * (k - 1), r * (k - 1)) for k, r in zip(kernel, dilation))
    if isinstance(spec, int):
        return ((spec, spec),) * rank
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in spec)


def pad_spatial(x, pairs, value: float = 0.0):
    """F.pad with (before, after) per spatial axis, first spatial axis first."""
    import torch.nn.functional as F
    flat = []
    for before, after in reversed(tuple(pairs)):
        flat += [before, after]
    return F.pad(x, flat, value=value)


def torch_params(net, names=None) -> dict:
    """The model's parameters as float64 leaf tensors that collect gradients."""
    import torch
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for k, v in net.params.items() if names is None or k in names}
