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
