"""Sizes never wrap around in the generated C (issue 7, item 1): integer literals are 64-bit,
prepare computes every run-time size and every buffer's element count with overflow checks and
refuses what does not fit, so the memory check can never pass on a wrapped value and a kernel
never writes past the arena. Crashes would take pytest down, so those runs are subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl import ConvDSLError
from convdsl.targets.c import c_int, checked_c
from convdsl.compiler import compile_graph, graph_from_source
from convdsl.ir import dims as D
from ccheck import assert_c_compiles_cleanly

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_integers_are_written_as_64_bit_literals():
    assert c_int(7) == "7" and c_int(-3) == "-3" and c_int(2 ** 31 - 1) == "2147483647"
    assert c_int(2 ** 31) == "INT64_C(2147483648)"
    assert c_int(-(2 ** 40)) == "INT64_C(-1099511627776)"
    assert c_int(2 ** 63 - 1) == "INT64_C(9223372036854775807)"
    for too_large in (2 ** 63, -(2 ** 63), 10 ** 30):
        with pytest.raises(ConvDSLError, match="below 2\\^63"):
            c_int(too_large)
    with pytest.raises(ConvDSLError):
        c_int(True)


def test_run_time_sizes_are_computed_with_checked_arithmetic():
    H, W = D.Sym.var("H"), D.Sym.var("W")
    var = {"H": "h", "W": "w"}.get
    assert checked_c(H, var) == "h"
    assert checked_c(H * 3 + 1, var) == "cdsl_add(&overflow, cdsl_mul(&overflow, 3, h), 1)"
    assert checked_c(H - W, var) in ("cdsl_sub(&overflow, h, w)", "cdsl_add(&overflow, cdsl_mul(&overflow, -1, w), h)")
    # (H - 3)//2 is kept as (H + 1)//2 - 2
    assert checked_c(D.floordiv(H - 3, 2), var) == "cdsl_sub(&overflow, cdsl_floordiv(cdsl_add(&overflow, h, 1), 2), 2)"
    # floor division through the C target's helper (C's `/` truncates toward zero)
    assert checked_c(D.ceildiv(H, 2), var) == "cdsl_floordiv(cdsl_add(&overflow, h, 1), 2)"
    assert checked_c(H * W * (2 ** 40), var) == "cdsl_mul(&overflow, INT64_C(1099511627776), cdsl_mul(&overflow, h, w))"


def test_a_static_size_beyond_int64_is_refused_at_compile_time():
    """[1, 2, 2] upsampled by 2^31 has 2^64 elements: the C once held it as a wrapped literal."""
    src = "network Up {\n    input x: [1, 2, 2]\n    y = x -> upsample(2147483648)\n    output y\n}\n"
    with pytest.raises(ConvDSLError) as info:
        convdsl.load_source(src)
    assert info.value.span is not None and info.value.span.line == 3, str(info.value)


# The front end refuses all of these sizes at check time (tests/ir/test_limits.py). The tests here
# lift its limits so that what they test is the generated C's own line of defence: prepare's
# overflow-checked sizes and its memory check, which must hold even if a size got past check —
# on both backends (the OpenCL library's prepare is its own, in templates/opencl/module.cl.j2).
LIFT_CHECK_LIMITS = """
from convdsl import limits
limits.SIZE_BOUND = limits.MAX_ACTIVATION_ELEMENTS = 2 ** 300
limits.MAX_ATTRIBUTE = 2 ** 40
"""


def test_sizes_beyond_int_range_compile_cleanly_and_hit_the_memory_limit(tmp_path, monkeypatch):
    """6.4e11 elements per sample: 64-bit literals in the C (no warning), and prepare's memory
    check refuses the batch with the true size."""
    from convdsl import limits
    monkeypatch.setattr(limits, "SIZE_BOUND", 2 ** 300)
    monkeypatch.setattr(limits, "MAX_ACTIVATION_ELEMENTS", 2 ** 300)
    monkeypatch.setattr(limits, "MAX_ATTRIBUTE", 2 ** 40)
    src = "network Wide {\n    input x: [1, 2, 2]\n    y = x -> upsample(400000)\n    output y\n}\n"
    code = compile_graph(graph_from_source(src)).source.c
    assert "INT64_C(640000000000)" in code
    assert_c_compiles_cleanly(src, tmp_path)
    net = convdsl.load_source(src).Model(seed=0)
    with pytest.raises(ValueError, match=r"would need 5\.12e\+03 GB of activations, more than the limit"):
        net.forward(np.ones((1, 1, 2, 2), np.float32))


RUN_TIME_OVERFLOW = LIFT_CHECK_LIMITS + """
import numpy as np, convdsl
src = '''network Big {
    input x: [1, D, H, W]
    y = x -> upsample(65536) -> globalavgpool
    output y
}
'''
net = convdsl.load_source(src, backend=BACKEND).Model(seed=0)
try:
    net.forward(np.ones((1, 1, 16, 64, 64), np.float32))
except ValueError as e:
    print("refused:", e)
"""


def test_run_time_sizes_whose_tensor_overflows_int64_are_refused_by_prepare(backend):
    """With D·H·W = 2^16 the upsampled tensor has 2^48 · 2^16 = 2^64 elements, which wrapped to 0:
    the memory check passed and the upsample wrote past the arena (a segmentation fault)."""
    proc = run_python(f"BACKEND = {backend!r}\n" + RUN_TIME_OVERFLOW)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "refused: the sizes D = 16, H = 64, W = 64 make a tensor of more than 2^63 elements" in proc.stdout


CHANNELS_OVERFLOW = LIFT_CHECK_LIMITS + """
import numpy as np, convdsl
src = '''network Many {
    input x: [1, H, W]
    y = x -> conv(1048576, kernel=1, bias=false) -> upsample(1048576) -> globalmaxpool
    output y
}
'''
net = convdsl.load_source(src, backend=BACKEND).Model(seed=0)
try:
    net.forward(np.ones((1, 1, 4, 4), np.float32))
except ValueError as e:
    print("refused:", e)
"""


def test_many_channels_times_run_time_sizes_are_refused_by_prepare(backend):
    """2^20 channels upsampled 2^20 × 2^20 on a 4×4 input: 2^60 · 16 = 2^64 elements, wrapped to 0."""
    proc = run_python(f"BACKEND = {backend!r}\n" + CHANNELS_OVERFLOW)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "refused: the sizes H = 4, W = 4 make a tensor of more than 2^63 elements" in proc.stdout


BYTES_OVERFLOW = LIFT_CHECK_LIMITS + """
import numpy as np, convdsl
src = "network Two {\\n input x: [1, H, W]\\n y = x -> upsample(1048576) -> globalmaxpool\\n output y\\n}\\n"
net = convdsl.load_source(src, backend=BACKEND).Model(seed=0)
net._call("set_memory_limit", net._m, 1e300)     # the C API: no limit, only the 64-bit check stands
try:
    net.forward(np.ones((3, 1, 2048, 1024), np.float32))
except ValueError as e:
    print("refused:", e)
"""


def test_a_batch_whose_byte_count_overflows_is_refused(backend):
    """2^61 elements per sample fit int64; three samples, values and gradients do not (and the
    old floating-point total turned into a wrapped allocation size)."""
    proc = run_python(f"BACKEND = {backend!r}\n" + BYTES_OVERFLOW)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "refused: this batch would need" in proc.stdout and "more than 64-bit sizes can count" in proc.stdout
