"""Epilogue fusion: a conv or dense followed by an activation that is its only reader runs as one
kernel (bias and activation applied as it writes), forward and backward matching PyTorch, in
every conv variant that fuses; an activation with other readers, or a network output, is not fused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.lower import lower
from reference import assert_close

SRC = """network F {
    input x: [3, 9, 8]
    input v: [10]
    a = x -> conv(4, kernel=3, pad=same) -> relu
    b = x -> conv(5, kernel=1, bias=false) -> leaky_relu(0.2)
    c = v -> dense(6) -> sigmoid
    d = v -> dense(7, bias=false) -> tanh
    e = x -> conv(2, kernel=(2, 3), stride=2) -> relu -> relu
    output a, b, c, d, e
}
"""
ACT = {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def reference(x, v, p):
    a = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), p["conv1.weight"], p["conv1.bias"]))
    b = F.leaky_relu(F.conv2d(x, p["conv2.weight"]), 0.2)
    c = torch.sigmoid(F.linear(v, p["dense1.weight"], p["dense1.bias"]))
    d = torch.tanh(F.linear(v, p["dense2.weight"]))
    e = F.relu(F.relu(F.conv2d(x, p["conv3.weight"], p["conv3.bias"], stride=2)))
    return a, b, c, d, e


def test_the_program_fuses_each_activation_into_its_producer():
    program = lower(graph_from_source(SRC))
    epilogues = {s.label: s.epilogue.text() for s in program.forward}
    assert epilogues["conv1"] == "bias+relu (relu1 fused)"
    assert epilogues["conv2"] == "leaky_relu(0.2) (leaky_relu1 fused)"
    assert epilogues["dense1"] == "bias+sigmoid (sigmoid1 fused)"
    assert epilogues["dense2"] == "tanh (tanh1 fused)"
    assert epilogues["conv3"] == "bias+relu (relu2 fused)"
    assert epilogues["relu3"] == "-"          # its input is an activation, not a conv or dense
    assert "relu1" not in epilogues and "relu3" in epilogues


@pytest.mark.parametrize("algo", [None, {"conv": "im2col"}], ids=["auto", "im2col"])
def test_fused_kernels_match_torch_forward_and_backward(algo):
    net = convdsl.load_source(SRC, algo=algo).Model(seed=0)
    rng = np.random.default_rng(4)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    x = rng.standard_normal((3, 3, 9, 8)).astype(np.float32)
    v = rng.standard_normal((3, 10)).astype(np.float32)
    ys = net.forward(x, v)
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    dx, dv = net.backward(*dys)
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tv = torch.tensor(v, dtype=torch.float64, requires_grad=True)
    tp = {k: torch.tensor(a, dtype=torch.float64, requires_grad=True) for k, a in net.params.items()}
    refs = reference(tx, tv, tp)
    for name, y, r in zip("abcde", ys, refs):
        assert_close(y, r.detach().numpy(), what=f"forward {name}")
    sum((r * torch.tensor(dy, dtype=torch.float64)).sum() for r, dy in zip(refs, dys)).backward()
    assert_close(dx, tx.grad.numpy(), what="dx")
    assert_close(dv, tv.grad.numpy(), what="dv")
    for k, g in net.grads.items():
        assert_close(g, tp[k].grad.numpy(), what=f"grad {k}")
    net.eval()
    for name, y, r in zip("abcde", net.forward(x, v), refs):
        assert_close(y, r.detach().numpy(), what=f"eval forward {name}")
