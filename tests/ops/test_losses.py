"""The losses beyond the first two — weighted softmax cross-entropy with an ignore index, sigmoid
cross-entropy, Dice, L1 and smooth L1 — each against PyTorch's value and gradient: the value of
`Model.loss` on the model's own output, and the gradient through `train_step` (a plain SGD step
on a 1×1 conv or a dense layer before the loss, whose update is the loss's gradient at the
output times the layer's input). f32 and f64, NCHW and NHWC, batch 1 and 3, labels per sample
and per pixel; a float64 finite-difference check of each; and what the runtime refuses.

Each case is one compiled network; a case's batches run on the same module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from backends import requires_opencl
from reference import F32, F64, assert_close, to_nchw, to_nhwc

CLASSES = 4
MAP = (CLASSES, 3, 5)          # the loss's output per sample, channel-first
IN_CHANNELS = 6


# ---- PyTorch references, from its primitives ------------------------------------------------

def dice_reference(y, target, activation: str, eps: float):
    """1 − mean over classes of (2 Σ p·t + eps) / (Σ p + Σ t + eps), the sums over the batch and
    every position; p = softmax over the channels and t one-hot labels, or p = sigmoid and t the
    target."""
    if activation == "softmax":
        p = torch.softmax(y, dim=1)
        t = F.one_hot(target, y.shape[1]).movedim(-1, 1).to(y.dtype)
    else:
        p, t = torch.sigmoid(y), target
    axes = [0, *range(2, y.dim())]
    overlap, predicted, present = (p * t).sum(axes), p.sum(axes), t.sum(axes)
    return 1 - ((2 * overlap + eps) / (predicted + present + eps)).mean()


@dataclass(frozen=True)
class Case:
    loss: str                  # as written in the file
    target: str                # labels | values | probabilities
    reference: object          # (y [N, C, *S] float64, target as torch takes it) → loss
    per_sample: bool = False   # the output is a vector [C] (labels [N]) rather than a map
    ignore: int | None = None  # a label drawn now and then that counts for nothing


WEIGHTS = (1.0, 2.5, 0.5, 0.0)
CASES = {
    "cross-entropy-weighted-ignored": Case(
        "softmax_cross_entropy(y, weight=[1.0, 2.5, 0.5, 0.0], ignore_index=255)", "labels",
        lambda y, t: F.cross_entropy(y, t, weight=torch.tensor(WEIGHTS, dtype=y.dtype), ignore_index=255),
        ignore=255),
    "cross-entropy-ignored-negative": Case(
        "softmax_cross_entropy(y, ignore_index=-100)", "labels",
        lambda y, t: F.cross_entropy(y, t, ignore_index=-100), ignore=-100),
    "cross-entropy-weighted-per-sample": Case(
        "softmax_cross_entropy(y, weight=[1.0, 2.5, 0.5, 0.0])", "labels",
        lambda y, t: F.cross_entropy(y, t, weight=torch.tensor(WEIGHTS, dtype=y.dtype)), per_sample=True),
    "cross-entropy-ignore-in-range-per-sample": Case(
        "softmax_cross_entropy(y, ignore_index=2)", "labels",
        lambda y, t: F.cross_entropy(y, t, ignore_index=2), per_sample=True),
    "sigmoid-cross-entropy": Case(
        "sigmoid_cross_entropy(y)", "probabilities", F.binary_cross_entropy_with_logits),
    "dice-softmax": Case(
        "dice(y)", "labels", lambda y, t: dice_reference(y, t, "softmax", 1.0)),
    "dice-softmax-per-sample": Case(
        "dice(y, eps=0.001)", "labels", lambda y, t: dice_reference(y, t, "softmax", 0.001), per_sample=True),
    "dice-sigmoid": Case(
        "dice(y, activation=sigmoid, eps=0.5)", "probabilities", lambda y, t: dice_reference(y, t, "sigmoid", 0.5)),
    "l1": Case("l1(y)", "values", F.l1_loss),
    "smooth-l1": Case("smooth_l1(y, beta=0.5)", "values", lambda y, t: F.smooth_l1_loss(y, t, beta=0.5)),
    "smooth-l1-default": Case("smooth_l1(y)", "values", lambda y, t: F.smooth_l1_loss(y, t, beta=1.0)),
    "smooth-l1-beta-0": Case("smooth_l1(y, 0.0)", "values", lambda y, t: F.smooth_l1_loss(y, t, beta=0.0)),
}
# (case, dtype, layout): each loss in f32 and in f64 with the layouts crossed, so that it meets
# both dtypes and both layouts; a variation of one (another argument, labels per sample) once,
# in f64 for the finite differences. One module per line.
VARIATIONS = {"cross-entropy-ignored-negative": "NHWC", "cross-entropy-ignore-in-range-per-sample": "NCHW",
              "dice-softmax-per-sample": "NHWC", "smooth-l1-default": "NHWC", "smooth-l1-beta-0": "NCHW"}
RUNS = [(name, dtype, layout) for i, name in enumerate(n for n in CASES if n not in VARIATIONS)
        for dtype, layout in ((("f32", "NCHW"), ("f64", "NHWC")) if i % 2 == 0 else (("f32", "NHWC"), ("f64", "NCHW")))]
RUNS += [(name, "f64", layout) for name, layout in VARIATIONS.items()]


def source(case: Case, dtype: str, layout: str) -> str:
    if case.per_sample:
        shape, head = f"[{IN_CHANNELS}]", f"dense({CLASSES})"
    else:
        c, h, w = IN_CHANNELS, *MAP[1:]
        shape = f"[{c}, {h}, {w}]" if layout == "NCHW" else f"[{h}, {w}, {c}]"
        head = f"conv({CLASSES}, kernel=1)"
    return (f"network L {{\n    dtype {dtype}\n    layout {layout}\n    input x: {shape}\n"
            f"    y = x -> {head}\n    output y\n    loss {case.loss}\n}}\n")


def load(name: str, dtype: str, layout: str, backend: str = "c"):
    return convdsl.load_source(source(CASES[name], dtype, layout), backend=backend)


def draw_target(case: Case, rng, batch: int, dtype):
    """(the target as the model takes it, as PyTorch takes it), for outputs [batch, C, *S]."""
    if case.target == "labels":
        labels = rng.integers(0, CLASSES, size=(batch,) if case.per_sample else (batch, *MAP[1:]))
        if case.ignore is not None:
            labels[rng.random(labels.shape) < 0.3] = case.ignore
        labels.flat[0] = 1                      # some label counts (class 3 weighs 0 in WEIGHTS)
        return labels, torch.tensor(labels)
    shape = (batch, CLASSES) if case.per_sample else (batch, *MAP)
    values = rng.random(shape) if case.target == "probabilities" else rng.standard_normal(shape)
    if case.target == "probabilities":
        values[rng.random(shape) < 0.2] = 1.0   # hard labels among the soft ones
        values[rng.random(shape) < 0.2] = 0.0
    values = values.astype(dtype)
    return values, torch.tensor(values.astype(np.float64))


def torch_output(net, x64, case: Case, layout: str, params):
    """The layer before the loss in float64 PyTorch, channel-first."""
    if case.per_sample:
        return F.linear(x64, params["dense1.weight"], params["dense1.bias"])
    xc = x64 if layout == "NCHW" else x64.movedim(-1, 1)
    return F.conv2d(xc, params["conv1.weight"], params["conv1.bias"])


def in_file_layout(a, layout: str, per_sample: bool):
    return to_nhwc(a) if layout == "NHWC" and not per_sample else a


@pytest.mark.parametrize("name,dtype,layout", RUNS)
def test_loss_value_and_gradient_match_torch(name, dtype, layout):
    check_loss_value_and_gradient(name, dtype, layout, "c")


# On OpenCL the loss runs on the host over the output read back (targets/opencl.py): the losses
# with a scratch (dice's per-class sums), a target to turn channel-first and class weights.
OPENCL_RUNS = [("dice-sigmoid", "f32", "NHWC"), ("dice-softmax-per-sample", "f32", "NCHW"),
               ("cross-entropy-weighted-ignored", "f32", "NHWC")]


@requires_opencl
@pytest.mark.parametrize("name,dtype,layout", OPENCL_RUNS)
def test_loss_value_and_gradient_match_torch_on_opencl(name, dtype, layout):
    check_loss_value_and_gradient(name, dtype, layout, "opencl")


def check_loss_value_and_gradient(name, dtype, layout, backend):
    case, tol = CASES[name], (F32 if dtype == "f32" else F64)
    npdtype = np.float32 if dtype == "f32" else np.float64
    net = load(name, dtype, layout, backend).Model(seed=3)
    rng = np.random.default_rng(list(CASES).index(name))
    for batch in (1, 3):
        x = rng.standard_normal((batch, IN_CHANNELS) if case.per_sample else (batch, IN_CHANNELS, *MAP[1:]))
        x = in_file_layout(x, layout, case.per_sample).astype(npdtype)
        target, target_ref = draw_target(case, rng, batch, npdtype)
        target = target if case.target == "labels" else in_file_layout(target, layout, case.per_sample)

        # The value, on the model's own output.
        y = net.forward(x)
        y = y if case.per_sample or layout == "NCHW" else to_nchw(y)
        expected = case.reference(torch.tensor(y.astype(np.float64)), target_ref)
        assert_close(np.array(net.loss(target)), np.array(expected.item()), what=f"{name} loss, batch {batch}", **tol)

        # The gradient, through one SGD step on the layer before the loss.
        params = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in net.params.items()}
        reference = case.reference(torch_output(net, torch.tensor(x.astype(np.float64)), case, layout, params),
                                   target_ref)
        reference.backward()
        before = {k: v.copy() for k, v in net.params.items()}
        loss = net.train_step(x, target, lr=1.0)
        assert_close(np.array(loss), np.array(reference.item()), what=f"{name} train_step loss", **tol)
        for k, p in params.items():
            assert_close(before[k] - net.params[k], p.grad.numpy(), what=f"{name} gradient of {k}, batch {batch}",
                         **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_is_the_finite_difference_float64(name):
    """The gradient train_step applies is the derivative of the loss Model.loss reports."""
    check_finite_difference_float64(name, "c")


# On OpenCL in f64: a per-pixel loss with class weights and a target turned channel-first
# (NHWC), one with a scratch (dice), and a per-sample one after a dense layer.
OPENCL_FD = ("cross-entropy-weighted-ignored", "dice-sigmoid", "cross-entropy-weighted-per-sample")


@requires_opencl
@pytest.mark.parametrize("name", OPENCL_FD)
def test_gradient_is_the_finite_difference_float64_on_opencl(name):
    check_finite_difference_float64(name, "opencl")


def check_finite_difference_float64(name, backend):
    case = CASES[name]
    layout = next(lay for n, d, lay in RUNS if n == name and d == "f64")
    net = load(name, "f64", layout, backend).Model(seed=5)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, IN_CHANNELS) if case.per_sample else (3, IN_CHANNELS, *MAP[1:]))
    x = in_file_layout(x, layout, case.per_sample)
    target, _ = draw_target(case, rng, 3, np.float64)
    target = target if case.target == "labels" else in_file_layout(target, layout, case.per_sample)
    start = {k: v.copy() for k, v in net.params.items()}
    net.train_step(x, target, lr=1.0)
    grads = {k: start[k] - v for k, v in net.params.items()}
    for k, v in start.items():
        net.params[k][...] = v

    def loss_at(step):
        for k in net.params:
            net.params[k][...] = start[k] + step * direction[k]
        net.forward(x)
        return net.loss(target)

    direction = {k: rng.standard_normal(v.shape) for k, v in start.items()}
    h = 1e-6
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    analytic = sum((grads[k] * direction[k]).sum() for k in start)
    assert_close(np.array(numeric), np.array(analytic), rtol=1e-6, atol=1e-8, what=name)


# ---- the cases PyTorch answers with NaN, and the targets the runtime refuses ------------------

def test_no_label_counting_gives_nan_and_leaves_the_parameters():
    """Every label ignored (or of weight 0): PyTorch's loss is 0/0, NaN, and so is ours; the
    gradient is 0 (PyTorch's too when all are ignored), so a step changes nothing."""
    net = load("cross-entropy-weighted-ignored", "f32", "NCHW").Model(seed=1)
    x = np.random.default_rng(2).standard_normal((2, IN_CHANNELS, *MAP[1:])).astype(np.float32)
    for labels in (np.full((2, *MAP[1:]), 255), np.full((2, *MAP[1:]), 3)):     # ignored; class 3 weighs 0
        y = torch.tensor(net.forward(x).astype(np.float64), requires_grad=True)
        expected = F.cross_entropy(y, torch.tensor(labels), weight=torch.tensor(WEIGHTS, dtype=torch.float64),
                                   ignore_index=255)
        assert torch.isnan(expected)
        assert np.isnan(net.loss(labels))
        before = {k: v.copy() for k, v in net.params.items()}
        assert np.isnan(net.train_step(x, labels, lr=1.0))
        for k, v in net.params.items():
            np.testing.assert_array_equal(v, before[k])


def test_labels_are_checked_with_the_ignore_index():
    net = load("cross-entropy-weighted-ignored", "f32", "NCHW").Model()
    x = np.zeros((1, IN_CHANNELS, *MAP[1:]), dtype=np.float32)
    labels = np.zeros((1, *MAP[1:]), dtype=np.int64)
    labels[0, 0, 0] = 255
    assert np.isfinite(net.train_step(x, labels, lr=0.1))
    labels[0, 0, 1] = 254
    with pytest.raises(ValueError, match=r"class 254 is out of range \[0, 4\) and is not the ignore_index, 255"):
        net.train_step(x, labels, lr=0.1)
    labels[0, 0, 1] = -1
    net.forward(x)
    with pytest.raises(ValueError, match=r"class -1 is out of range"):
        net.loss(labels)
    # The negative ignore index of PyTorch's default, in a narrow integer type.
    net = load("cross-entropy-ignored-negative", "f64", "NHWC").Model()
    x = np.zeros((1, *MAP[1:], IN_CHANNELS))
    labels = np.full((1, *MAP[1:]), -100, dtype=np.int8)
    labels[0, 0, 0] = 3
    assert np.isfinite(net.train_step(x, labels, lr=0.1))
    labels[0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"class 4 is out of range \[0, 4\) and is not the ignore_index, -100"):
        net.train_step(x, labels, lr=0.1)


def test_probability_targets_are_checked():
    net = load("sigmoid-cross-entropy", "f32", "NCHW").Model()
    x = np.zeros((2, IN_CHANNELS, *MAP[1:]), dtype=np.float32)
    target = np.full((2, *MAP), 0.5, dtype=np.float32)
    assert np.isfinite(net.train_step(x, target, lr=0.1))
    for bad in (1.5, -0.25, float("nan")):
        target[1, 2, 0, 4] = bad
        with pytest.raises(ValueError, match=r"target: values must be probabilities in \[0, 1\], got"):
            net.train_step(x, target, lr=0.1)
    with pytest.raises(ValueError, match=r"target: expected shape \(2, 4, 3, 5\)"):
        net.train_step(x, target[:, :3], lr=0.1)


def test_dice_labels_are_checked():
    net = load("dice-softmax", "f32", "NCHW").Model()
    x = np.zeros((1, IN_CHANNELS, *MAP[1:]), dtype=np.float32)
    with pytest.raises(ValueError, match=r"class 4 is out of range \[0, 4\)"):
        net.train_step(x, np.full((1, *MAP[1:]), 4), lr=0.1)
    with pytest.raises(ValueError, match=r"labels: expected shape \(1, 3, 5\)"):
        net.train_step(x, np.zeros((1, 3)), lr=0.1)


# Each kernel's branches once: the weights and the ignore index, per pixel and per sample, both
# Dice activations (sigmoid in NHWC: a target turned channel-first and the scratch together).
STRICT_RUNS = [("cross-entropy-weighted-ignored", "f32", "NCHW"), ("cross-entropy-weighted-per-sample", "f64", "NCHW"),
               ("sigmoid-cross-entropy", "f32", "NHWC"), ("dice-softmax", "f32", "NHWC"),
               ("dice-sigmoid", "f64", "NHWC"), ("l1", "f32", "NCHW"), ("smooth-l1", "f64", "NHWC")]


@pytest.mark.slow
def test_every_loss_compiles_without_a_warning(tmp_path):
    """Strict flags at -O3 (tests/ccheck.py) for each loss's kernel and the host glue that
    allocates its scratch and turns its target channel-first."""
    from ccheck import assert_c_compiles_cleanly
    for i, (name, dtype, layout) in enumerate(STRICT_RUNS):
        folder = tmp_path / str(i)
        folder.mkdir()
        assert_c_compiles_cleanly(source(CASES[name], dtype, layout), folder)
