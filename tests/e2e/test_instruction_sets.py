"""The kernels' narrower forms, tested on whatever machine runs the suite: the same source built
for AVX2 (`CONVDSL_MARCH=x86-64-v3`: 32-byte vectors, 16 registers) and for SSE2 (`x86-64`:
16-byte vectors), as on machines without AVX-512, against PyTorch — forward, input gradient and
every parameter gradient, float32 — for each conv variant whose code the vector width changes
(im2col's packed GEMM and micro-kernel, dot's register tiles, blocked's, Winograd's, broadcast's,
the direct depthwise loop's grids: `conv=direct` reaches the depthwise layer, the others keep the
plan's choice) and dense at batch 1 (dot's one-column tiles) and at batch 5 (its tiles of four
columns and the rest); and maxpool's 2×2 vectors of windows."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from reference import assert_close, torch_params

NET = """network Isa {
    input x: [5, 9, 9]
    a = x -> conv(13, kernel=3, pad=1) -> relu
    b = a -> conv(13, kernel=3, pad=1, groups=13)
    y = b -> conv(17, kernel=3, stride=2) -> flatten -> dense(11) -> tanh -> dense(3)
    output y
}
"""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _runs_here(march: str) -> bool:
    if platform.machine() != "x86_64":
        return False
    return march == "x86-64" or {"avx2", "fma", "bmi2"} <= _cpu_flags()


def reference(p, x):
    a = torch.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1))
    b = F.conv2d(a, p["conv2.weight"], p["conv2.bias"], padding=1, groups=13)
    c = F.conv2d(b, p["conv3.weight"], p["conv3.bias"], stride=2).flatten(1)
    h = torch.tanh(F.linear(c, p["dense1.weight"], p["dense1.bias"]))
    return F.linear(h, p["dense2.weight"], p["dense2.bias"])


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
@pytest.mark.parametrize("algo", ["conv=im2col", "conv=dot", "conv=blocked", "conv=winograd4", "conv=winograd2",
                                  "conv=broadcast", "conv=narrow", "conv=direct"])
def test_the_narrower_vector_forms_match_torch(march, algo, monkeypatch):
    if not _runs_here(march):
        pytest.skip(f"this machine ({platform.machine()}) cannot run code built with -march={march}")
    monkeypatch.setenv("CONVDSL_MARCH", march)
    net = convdsl.load_source(NET, algo=algo).Model(seed=3)
    assert set(net.params) == {f"{l}.{r}" for l in ("conv1", "conv2", "conv3", "dense1", "dense2")
                               for r in ("weight", "bias")}
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 5, 9, 9)).astype(np.float32)
        dy = rng.standard_normal((batch, 3)).astype(np.float32)
        y = net.forward(x)
        dx = net.backward(dy)
        params = torch_params(net)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        yt = reference(params, xt)
        yt.backward(torch.tensor(dy, dtype=torch.float64))
        assert_close(y, yt.detach().numpy(), what=f"{march} {algo} N={batch}: y")
        assert_close(dx, xt.grad.numpy(), what=f"{march} {algo} N={batch}: dx")
        for name, t in params.items():
            assert_close(net.grads[name], t.grad.numpy(), what=f"{march} {algo} N={batch}: d{name}")


def test_a_bad_instruction_set_name_is_refused(monkeypatch):
    monkeypatch.setenv("CONVDSL_MARCH", "native -fplugin=x")
    with pytest.raises(convdsl.ConvDSLError, match="CONVDSL_MARCH"):
        convdsl.load_source(NET)


POOL = """network Pool {
    input x: [3, 6, 45]
    y = x -> maxpool(2)
    output y
}
"""


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_maxpool_vectors_of_windows_in_the_narrower_forms(march, monkeypatch):
    # 22 windows a row: vectors of 8 (AVX2) or 4 (SSE2) windows, the last one overlapping.
    if not _runs_here(march):
        pytest.skip(f"this machine ({platform.machine()}) cannot run code built with -march={march}")
    monkeypatch.setenv("CONVDSL_MARCH", march)
    net = convdsl.load_source(POOL).Model()
    net.train()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 6, 45)).astype(np.float32)
    y = net.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = F.max_pool2d(xt, 2)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(y, yt.detach().numpy(), what=f"{march}: y")
    assert_close(dx, xt.grad.numpy(), what=f"{march}: dx")
