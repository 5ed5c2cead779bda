"""add, sub, mul, concat and scale (residuals, gates, Inception, SE) and the losses, against PyTorch; a
train_step equals a PyTorch SGD step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from reference import assert_close, to_nchw, to_nhwc

JOINS = """
network J {{
    dtype {dtype}
    layout {layout}
    input a: {a}
    input b: {b}
    input c: {c}
    input v: [4]
    s2 = add(a, b)
    s3 = add(a, b, c)
    cat = concat(a, b -> relu, c)
    sv = scale(a, v)
    g = b -> globalavgpool -> sigmoid
    sg = scale(c, g)
    d = sub(a, b)
    m = mul(a, c)
    sq = mul(b, b)
    z = sub(c, c)
    gate = mul(a, b -> sigmoid)
    output s2, s3, cat, sv, sg, d, m, sq, z, gate
}}
"""
SHAPE = (4, 5, 3)


def joins_module(dtype="f32", layout="NCHW", backend="c"):
    dims = SHAPE if layout == "NCHW" else (*SHAPE[1:], SHAPE[0])
    text = "[" + ", ".join(map(str, dims)) + "]"
    return convdsl.load_source(JOINS.format(dtype=dtype, layout=layout, a=text, b=text, c=text), backend=backend)


def joins_reference(a, b, c, v):
    g = torch.sigmoid(b.mean(dim=(2, 3), keepdim=True))
    return (a + b, a + b + c, torch.cat([a, F.relu(b), c], dim=1), a * v[:, :, None, None], c * g,
            a - b, a * c, b * b, c - c, a * torch.sigmoid(b))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("batch", [1, 3])
def test_joins_match_torch(layout, batch, backend):
    net = joins_module(layout=layout, backend=backend).Model()
    rng = np.random.default_rng(61 + batch)
    xs = [rng.standard_normal((batch, *SHAPE)).astype(np.float32) for _ in range(3)]
    v = rng.standard_normal((batch, 4)).astype(np.float32)
    conv = to_nhwc if layout == "NHWC" else (lambda t: t)
    back = to_nchw if layout == "NHWC" else (lambda t: t)
    ys = [back(y) for y in net.forward(*[conv(x) for x in xs], v)]
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    grads = net.backward(*[conv(d) for d in dys])
    grads = [back(g) for g in grads[:3]] + [grads[3]]
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs + [v]]
    refs = joins_reference(*ts)
    assert len(ys) == len(refs)
    for y, r, name in zip(ys, refs, ["add2", "add3", "concat", "scale-vector", "scale-se",
                                     "sub", "mul", "mul-of-itself", "sub-of-itself", "mul-gate"]):
        assert_close(y, r.detach().numpy(), what=name)
    sum(((r * torch.tensor(d, dtype=torch.float64)).sum() for r, d in zip(refs, dys))).backward()
    for g, t, name in zip(grads, ts, "abcv"):
        assert_close(g, t.grad.numpy(), what=f"gradient of {name}")


def test_joins_finite_differences_float64(backend):
    net = joins_module(dtype="f64", backend=backend).Model()
    rng = np.random.default_rng(64)
    xs = [rng.standard_normal((2, *SHAPE)) for _ in range(3)] + [rng.standard_normal((2, 4))]
    dys = [rng.standard_normal(y.shape) for y in net.forward(*xs)]
    grads = net.backward(*dys)
    for x, g in zip(xs, grads):
        direction = rng.standard_normal(x.shape)
        x += 1e-6 * direction
        up = sum((y * d).sum() for y, d in zip(net.forward(*xs), dys))
        x -= 2e-6 * direction
        down = sum((y * d).sum() for y, d in zip(net.forward(*xs), dys))
        x += 1e-6 * direction
        assert_close(np.array((up - down) / 2e-6), np.array((g * direction).sum()), rtol=1e-6, atol=1e-8)


CLASSIFIER = """
network C {
    input x: [3, 8, 8]
    logits = x -> conv(4, kernel=3, pad=same) -> relu -> maxpool(2) -> flatten -> dense(5)
    output logits
    loss softmax_cross_entropy(logits)
}
"""
SEGMENTER = """
network S {
    layout NHWC
    input x: [6, 5, 2]
    scores = x -> conv(3, kernel=3, pad=same)
    output scores
    loss softmax_cross_entropy(scores)
}
"""
REGRESSOR = """
network R {
    input x: [2, 4, 4]
    y = x -> conv(2, kernel=3, pad=same) -> tanh
    output y
    loss mse(y)
}
"""


def torch_params(net):
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in net.params.items()}


def sgd_check(net, loss_t, params, loss, lr, before):
    loss_t.backward()
    assert_close(np.array(loss), np.array(loss_t.item()), what="loss")
    for name, p in params.items():
        assert_close(net.params[name], before[name] - lr * p.grad.numpy(), what=f"updated {name}")


def test_train_step_is_a_torch_sgd_step_per_sample_labels(backend):
    net = convdsl.load_source(CLASSIFIER, backend=backend).Model(seed=4)
    rng = np.random.default_rng(70)
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    before = {k: v.copy() for k, v in net.params.items()}
    p = torch_params(net)
    h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(x, dtype=torch.float64), p["conv1.weight"], p["conv1.bias"],
                                     padding=1)), 2)
    logits = F.linear(h.flatten(1), p["dense1.weight"], p["dense1.bias"])
    loss = net.train_step(x, labels, lr=0.1)
    sgd_check(net, F.cross_entropy(logits, torch.tensor(labels)), p, loss, 0.1, before)


def test_train_step_per_pixel_labels_nhwc(backend):
    net = convdsl.load_source(SEGMENTER, backend=backend).Model(seed=5)
    rng = np.random.default_rng(71)
    x = rng.standard_normal((2, 6, 5, 2)).astype(np.float32)          # NHWC
    labels = rng.integers(0, 3, size=(2, 6, 5))
    before = {k: v.copy() for k, v in net.params.items()}
    p = torch_params(net)
    scores = F.conv2d(torch.tensor(to_nchw(x), dtype=torch.float64), p["conv1.weight"], p["conv1.bias"], padding=1)
    loss = net.train_step(x, labels, lr=0.5)
    sgd_check(net, F.cross_entropy(scores, torch.tensor(labels)), p, loss, 0.5, before)


def test_mse_train_step_and_loss(backend):
    net = convdsl.load_source(REGRESSOR, backend=backend).Model(seed=6)
    rng = np.random.default_rng(72)
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    target = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    net.forward(x)
    p = torch_params(net)
    y = torch.tanh(F.conv2d(torch.tensor(x, dtype=torch.float64), p["conv1.weight"], p["conv1.bias"], padding=1))
    mse = F.mse_loss(y, torch.tensor(target, dtype=torch.float64))
    assert_close(np.array(net.loss(target)), np.array(mse.item()), what="loss()")
    before = {k: v.copy() for k, v in net.params.items()}
    loss = net.train_step(x, target, lr=0.2)
    sgd_check(net, mse, p, loss, 0.2, before)


def test_labels_are_checked(backend):
    net = convdsl.load_source(CLASSIFIER, backend=backend).Model()
    x = np.zeros((2, 3, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="out of range"):
        net.train_step(x, np.array([0, 5]), lr=0.1)
    with pytest.raises(ValueError, match="out of range"):
        net.train_step(x, np.array([-1, 0]), lr=0.1)
    for narrow in (np.int8, np.int16, np.int32):       # a negative class of every width
        with pytest.raises(ValueError, match=r"class -3 is out of range"):
            net.train_step(x, np.array([0, -3], dtype=narrow), lr=0.1)
    with pytest.raises(ValueError, match="expected shape"):
        net.train_step(x, np.array([0, 1, 2]), lr=0.1)
    with pytest.raises(TypeError, match="whole numbers"):
        net.train_step(x, np.array([0.5, 1.0]), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        net.train_step(x, np.array([0, 1]), lr=float("nan"))
    assert np.isfinite(net.train_step(x, np.array([0.0, 4.0]), lr=0.1))


def test_labels_beyond_int64_are_reported_as_given(backend):
    # Converted to int64 first, 1e20 and 2**64 - 1 would wrap to a negative class.
    net = convdsl.load_source(CLASSIFIER, backend=backend).Model()
    x = np.zeros((2, 3, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"class 100000000000000000000 is out of range \[0, 5\)"):
        net.train_step(x, np.array([0.0, 1e20]), lr=0.1)
    with pytest.raises(ValueError, match=r"class 18446744073709551615 is out of range \[0, 5\)"):
        net.train_step(x, np.array([2 ** 64 - 1, 0], dtype=np.uint64), lr=0.1)
