"""The backends a test can build models for, and whether this machine has an OpenCL platform.

A test that builds models on both takes the `backend` fixture (tests/conftest.py); one that
needs OpenCL is marked `requires_opencl`, which skips it — with the reason — only where the
ICD loader finds no platform (CI installs PoCL, and .ci/run fails without it)."""
from __future__ import annotations

import pytest


def _opencl_platforms() -> tuple[int, str]:
    """How many OpenCL platforms the ICD loader finds, and if none, why (for the skip reason)."""
    import ctypes
    try:
        lib = ctypes.CDLL("libOpenCL.so.1")
    except OSError:
        return 0, "no OpenCL ICD loader (libOpenCL.so.1): install ocl-icd-libopencl1 and a driver (pocl-opencl-icd)"
    count = ctypes.c_uint(0)
    status = lib.clGetPlatformIDs(0, None, ctypes.byref(count))
    if status != 0 or count.value == 0:
        return 0, f"no OpenCL platform (clGetPlatformIDs: {status}): install a driver, e.g. pocl-opencl-icd"
    return count.value, ""


OPENCL_PLATFORMS, NO_OPENCL = _opencl_platforms()
requires_opencl = pytest.mark.skipif(OPENCL_PLATFORMS == 0, reason=NO_OPENCL or "OpenCL is there")
# The backends a test that builds models runs on (the `backend` fixture).
BACKENDS = ("c", pytest.param("opencl", marks=requires_opencl))

