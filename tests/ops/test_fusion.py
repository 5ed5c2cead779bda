"""Epilogue fusion: a conv (every variant), deconv or dense followed by activations, a residual
add and a scale, each the only reader of the value before it, runs as one kernel (bias and the
fused ops applied as it writes, in the network's order), forward and backward matching PyTorch,
at batch 1 and 3, in training and eval mode. Not fused: an activation with other
readers or a network output before it, an add whose other addend is made later, a scale whose
factors (not its x) the conv makes."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.lower import lower
from convdsl.lower.show import program_text
from backends import requires_opencl
from ccheck import assert_c_compiles_cleanly
from reference import assert_close

REPO = Path(__file__).resolve().parents[2]

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
    # Two activations in a row run in one kernel too; training keeps the first one's output, which
    # its backward reads.
    relu2 = next(n.output for n in graph_from_source(SRC).nodes if n.label == "relu2")
    assert epilogues["conv3"] == f"bias+relu (relu2 fused, v{relu2} kept in training)+relu (relu3 fused)"
    assert not {"relu1", "relu2", "relu3"} & set(epilogues)


# OpenCL has one kernel for every C conv variant: the plan's own choice there (these small layers
# keep it); its own `tiled` kernels apply the same epilogues as they write (RESIDUAL_ALGOS).
ALGOS = [pytest.param(None, "c", id="auto"), pytest.param({"conv": "im2col"}, "c", id="im2col"),
         pytest.param(None, "opencl", id="opencl", marks=requires_opencl)]


@pytest.mark.parametrize("algo,backend", ALGOS)
def test_fused_kernels_match_torch_forward_and_backward(algo, backend):
    net = convdsl.load_source(SRC, algo=algo, backend=backend).Model(seed=0)
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


# ---- residual add and scale in the epilogue ---------------------------------------------------

RESIDUAL_SRC = """network R {
    input x: [3, 6, 5]
    input r: [4, 6, 5]
    input s: [4]
    input v: [10]
    input w: [6]
    input z: [3, 1, 1]
    a = x -> conv(4, kernel=3, pad=same) -> add(r) -> relu
    b = x -> conv(4, kernel=1) -> relu -> add(r)
    c = v -> dense(6) -> add(w)
    d = x -> conv(4, kernel=3, pad=same, bias=false) -> scale(s)
    t = x -> conv(4, kernel=1, bias=false)
    e = add(t, r)
    f = t -> sigmoid
    g = scale(r, z -> conv(4, kernel=1))
    p = x -> conv(4, kernel=3, pad=same)
    q = x -> conv(4, kernel=1)
    h = add(p, q)
    k = v -> dense(6) -> sigmoid -> scale(w)
    output a, b, c, d, e, f, g, h, k
}
"""
# Inputs are values 0 … 5 in the order declared: x, r, s, v, w, z.
X, R, S, V, W, Z = range(6)


def residual_reference(x, r, s, v, w, z, p):
    a = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), p["conv1.weight"], p["conv1.bias"]) + r)
    b = F.relu(F.conv2d(x, p["conv2.weight"], p["conv2.bias"])) + r
    c = F.linear(v, p["dense1.weight"], p["dense1.bias"]) + w
    d = F.conv2d(F.pad(x, (1, 1, 1, 1)), p["conv3.weight"]) * s[:, :, None, None]
    t = F.conv2d(x, p["conv4.weight"])
    g = r * F.conv2d(z, p["conv5.weight"], p["conv5.bias"])
    h = F.conv2d(F.pad(x, (1, 1, 1, 1)), p["conv6.weight"], p["conv6.bias"]) + \
        F.conv2d(x, p["conv7.weight"], p["conv7.bias"])
    k = torch.sigmoid(F.linear(v, p["dense2.weight"], p["dense2.bias"])) * w
    return a, b, c, d, t + r, torch.sigmoid(t), g, h, k


def test_residual_adds_and_scales_fuse_in_the_order_the_network_has():
    graph = graph_from_source(RESIDUAL_SRC)
    program = lower(graph)
    forward = {s.label: s for s in program.forward}
    text = {label: s.epilogue.text() for label, s in forward.items()}
    value = {n.label: n.output for n in graph.nodes}
    assert text["conv1"] == f"bias+add(v{R}) (add1 fused)+relu (relu1 fused)"          # conv → add → relu
    # conv → relu → add: relu's backward reads its output, which training keeps.
    assert text["conv2"] == f"bias+relu (relu2 fused, v{value['relu2']} kept in training)+add(v{R}) (add2 fused)"
    assert text["dense1"] == f"bias+add(v{W}) (add3 fused)"
    # conv → scale: the scale's backward reads its x (ds = Σ dy·x), the conv's output.
    assert text["conv3"] == f"(v{value['conv3']} kept in training)+scale(v{S}) (scale1 fused)"
    assert forward["conv1"].outputs[0].value == value["relu1"]
    # Not fused: the conv's output has a second reader; the conv makes the factors the scale
    # broadcasts, not its x; the addend of add5 is made after conv6, so conv7 takes the add.
    assert text["conv4"] == "-" and {"add4", "sigmoid1", "scale2"} <= set(forward)
    assert text["conv5"] == "bias"
    assert text["conv6"] == "bias" and text["conv7"] == f"bias+add(v{value['conv6']}) (add5 fused)"
    assert text["dense2"] == f"bias+sigmoid (sigmoid2 fused, v{value['sigmoid2']} kept in training)+scale(v{W}) " \
                             "(scale3 fused)"
    fused = {label for label in value if label not in forward}
    assert fused == {"add1", "relu1", "relu2", "add2", "add3", "scale1", "add5", "sigmoid2", "scale3"}
    line = next(ln for ln in program_text(program).splitlines() if " conv2 (line" in ln and "forward" in ln)
    assert "residual=act[" in line and "kept=act[" in line


def test_resnet_blocks_run_each_add_and_the_relu_after_it_in_a_conv_kernel():
    program = lower(graph_from_source((REPO / "examples" / "resnet_block.cnn").read_text(), "resnet_block.cnn"))
    assert not [s.label for s in program.forward if s.op == "add"]
    chains = [s.epilogue.text() for s in program.forward if any(st.op == "add" for st in s.epilogue.stages)]
    assert len(chains) == 4 and all(re.fullmatch(r"bias\+add\(v\d+\) \(\S+\.add1 fused\)\+relu \(\S+\.relu2 fused\)", t)
                                    for t in chains), chains


def check_against_reference(net, reference, shapes, batch, seed, outputs, inputs):
    """Random parameters and inputs (per-sample `shapes`), then the model's training forward,
    backward (input and parameter gradients) and eval forward against `reference(*inputs,
    params)` in float64 torch; `outputs` / `inputs` name them in messages."""
    rng = np.random.default_rng(seed)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    xs = [rng.standard_normal((batch, *s)).astype(np.float32) for s in shapes]
    ys = net.forward(*xs)
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    grads = net.backward(*dys)
    tin = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in xs]
    tp = {k: torch.tensor(a, dtype=torch.float64, requires_grad=True) for k, a in net.params.items()}
    refs = reference(*tin, tp)
    for name, y, r in zip(outputs, ys, refs):
        assert_close(y, r.detach().numpy(), what=f"forward {name}")
    sum((r * torch.tensor(dy, dtype=torch.float64)).sum() for r, dy in zip(refs, dys)).backward()
    for name, g, t in zip(inputs, grads, tin):
        assert_close(g, t.grad.numpy(), what=f"d{name}")
    for k, g in net.grads.items():
        assert_close(g, tp[k].grad.numpy(), what=f"grad {k}")
    net.eval()
    for name, y, r in zip(outputs, net.forward(*xs), refs):
        assert_close(y, r.detach().numpy(), what=f"eval forward {name}")


_RESIDUAL_MODULES: dict = {}
# And OpenCL's tiled conv kernels, forced: relu, add and scale stages in their stores.
RESIDUAL_ALGOS = ALGOS + [pytest.param({"conv": "tiled"}, "opencl", id="opencl-tiled", marks=requires_opencl)]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("algo,backend", RESIDUAL_ALGOS)
def test_fused_residuals_and_scales_match_torch_forward_and_backward(algo, backend, batch):
    key = (repr(algo), backend)
    if key not in _RESIDUAL_MODULES:
        _RESIDUAL_MODULES[key] = convdsl.load_source(RESIDUAL_SRC, algo=algo, backend=backend)
    net = _RESIDUAL_MODULES[key].Model(seed=0)
    check_against_reference(net, residual_reference, [(3, 6, 5), (4, 6, 5), (4,), (10,), (6,), (3, 1, 1)],
                            batch, seed=5 + batch, outputs="abcdefghk", inputs="xrsvwz")


def test_the_fused_kernels_compile_without_warnings(tmp_path):
    assert_c_compiles_cleanly(RESIDUAL_SRC, tmp_path)


def test_every_op_that_fuses_as_an_activation_has_its_formula_template():
    from convdsl.targets import C, OPENCL
    from convdsl.ops.base import registry
    activations = [op for op in registry().values() if op.fuses_as == "activation"]
    assert {op.name for op in activations} >= {"relu", "leaky_relu", "sigmoid", "tanh"}
    for target in (C, OPENCL):
        for op in activations:
            assert target.has_template(target.kernel_template(f"{op.template or op.name}_epilogue")), \
                (target.name, op.name)


# ---- deconv and the direct depthwise loop fuse like conv ------------------------------------

UPSAMPLE_SRC = """network U {
    input x: [4, 3, 4]
    input r: [6, 7, 8]
    input s: [6]
    input u: [3, 6, 5]
    a = x -> deconv(6, kernel=(3, 2), stride=2) -> relu
    b = x -> deconv(6, kernel=(3, 2), stride=2, groups=2) -> add(r) -> relu
    c = x -> deconv(6, kernel=(3, 2), stride=2, bias=false) -> scale(s)
    d = u -> depthwise(kernel=3, multiplier=2, stride=2, pad=1, algo=direct) -> relu
    e = u -> depthwise(kernel=3, pad=same, algo=direct) -> add(u)
    f = u -> depthwise(kernel=(1, 3), pad=same, bias=false, algo=direct) -> relu -> add(u)
    output a, b, c, d, e, f
}
"""
# Inputs are values 0 … 3 in the order declared: x, r, s, u.
UX, UR, US, UU = range(4)


def upsample_reference(x, r, s, u, p):
    def deconv(name, bias=True, groups=1):
        return F.conv_transpose2d(x, p[f"{name}.weight"], p[f"{name}.bias"] if bias else None, stride=2,
                                  groups=groups)

    def depthwise(name, pad, stride=1, bias=True):
        return F.conv2d(F.pad(u, pad), p[f"{name}.weight"], p[f"{name}.bias"] if bias else None, stride=stride,
                        groups=3)

    a = F.relu(deconv("deconv1"))
    b = F.relu(deconv("deconv2", groups=2) + r)
    c = deconv("deconv3", bias=False) * s[:, :, None, None]
    d = F.relu(depthwise("depthwise1", (1, 1, 1, 1), stride=2))
    e = depthwise("depthwise2", (1, 1, 1, 1)) + u
    f = F.relu(depthwise("depthwise3", (1, 1, 0, 0), bias=False)) + u
    return a, b, c, d, e, f


def test_deconv_and_the_direct_depthwise_loop_fuse_their_epilogues():
    graph = graph_from_source(UPSAMPLE_SRC)
    program = lower(graph)
    forward = {s.label: s for s in program.forward}
    text = {label: s.epilogue.text() for label, s in forward.items()}
    value = {n.label: n.output for n in graph.nodes}
    assert text["deconv1"] == "bias+relu (relu1 fused)"
    assert text["deconv2"] == f"bias+add(v{UR}) (add1 fused)+relu (relu2 fused)"
    # The scale's backward reads its x, the deconv's output: training keeps it.
    assert text["deconv3"] == f"(v{value['deconv3']} kept in training)+scale(v{US}) (scale1 fused)"
    assert {forward[f"depthwise{i}"].variant for i in (1, 2, 3)} == {"direct"}
    assert text["depthwise1"] == "bias+relu (relu3 fused)"
    assert text["depthwise2"] == f"bias+add(v{UU}) (add2 fused)"
    assert text["depthwise3"] == f"relu (relu4 fused, v{value['relu4']} kept in training)+add(v{UU}) (add3 fused)"
    assert {label for label in value if label not in forward} == \
        {"relu1", "add1", "relu2", "scale1", "relu3", "add2", "relu4", "add3"}
    assert forward["deconv2"].outputs[0].value == value["relu2"]
    # `convdsl plan` shows each fusion, with the tensors the stages read and keep.
    lines = {label: next(ln for ln in program_text(program).splitlines() if f" {label} (line" in ln and "forward" in ln)
             for label in ("deconv2", "deconv3", "depthwise3")}
    assert "residual=act[" in lines["deconv2"] and "epilogue bias+add(" in lines["deconv2"]
    assert "factors=act[" in lines["deconv3"] and "kept=act[" in lines["deconv3"]
    assert "depthwise/direct" in lines["depthwise3"] and "kept=act[" in lines["depthwise3"]


_UPSAMPLE_MODULES: dict = {}


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_deconv_and_direct_depthwise_match_torch_forward_and_backward(batch, backend):
    if backend not in _UPSAMPLE_MODULES:
        _UPSAMPLE_MODULES[backend] = convdsl.load_source(UPSAMPLE_SRC, backend=backend)
    net = _UPSAMPLE_MODULES[backend].Model(seed=0)
    check_against_reference(net, upsample_reference, [(4, 3, 4), (6, 7, 8), (6,), (3, 6, 5)],
                            batch, seed=11 + batch, outputs="abcdef", inputs="xrsu")


def test_the_fused_deconv_and_depthwise_kernels_compile_without_warnings(tmp_path):
    assert_c_compiles_cleanly(UPSAMPLE_SRC, tmp_path)


# ---- the newer activations fuse too, those that read their input included ---------------------

NEWER_SRC = """network V {
    input x: [3, 7, 6]
    input v: [10]
    a = x -> conv(4, kernel=3, pad=same) -> relu6
    b = x -> conv(4, kernel=1) -> hardswish -> hardsigmoid
    c = x -> conv(3, kernel=3) -> silu -> clip(-0.3, 0.4)
    d = v -> dense(6) -> gelu -> elu(0.7)
    e = x -> depthwise(3, pad=same) -> silu -> gelu
    f = x -> deconv(2, kernel=2, stride=2) -> hardswish
    output a, b, c, d, e, f
}
"""


def newer_reference(x, v, p):
    def conv(name, t, **kw):
        return F.conv2d(t, p[f"{name}.weight"], p[f"{name}.bias"], **kw)
    a = F.relu6(conv("conv1", x, padding=1))
    b = F.hardsigmoid(F.hardswish(conv("conv2", x)))
    c = F.hardtanh(F.silu(conv("conv3", x)), -0.3, 0.4)
    d = F.elu(F.gelu(F.linear(v, p["dense1.weight"], p["dense1.bias"])), 0.7)
    e = F.gelu(F.silu(conv("depthwise1", x, padding=1, groups=3)))
    f = F.hardswish(F.conv_transpose2d(x, p["deconv1.weight"], p["deconv1.bias"], stride=2))
    return a, b, c, d, e, f


def test_the_newer_activations_fuse_into_their_producers():
    program = lower(graph_from_source(NEWER_SRC))
    epilogues = {s.label: s.epilogue.text() for s in program.forward}
    assert set(epilogues) == {"conv1", "conv2", "conv3", "dense1", "depthwise1", "deconv1"}
    assert epilogues["conv1"] == "bias+relu6 (relu61 fused)"
    # hardswish reads its input in backward: training keeps the conv's output for it.
    conv2 = next(n.output for n in graph_from_source(NEWER_SRC).nodes if n.label == "conv2")
    assert epilogues["conv2"] == f"bias (v{conv2} kept in training)+hardswish (hardswish1 fused)+" \
                                 "hardsigmoid (hardsigmoid1 fused)"
    assert "gelu (gelu1 fused" in epilogues["dense1"] and "elu(0.7) (elu1 fused)" in epilogues["dense1"]


_NEWER_MODULES: dict = {}


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_newer_activations_match_torch_forward_and_backward(batch, backend):
    if backend not in _NEWER_MODULES:
        _NEWER_MODULES[backend] = convdsl.load_source(NEWER_SRC, backend=backend)
    net = _NEWER_MODULES[backend].Model(seed=0)
    check_against_reference(net, newer_reference, [(3, 7, 6), (10,)], batch, seed=11 + batch, outputs="abcdef",
                            inputs="xv")


def test_the_fused_newer_activations_compile_without_warnings(tmp_path):
    assert_c_compiles_cleanly(NEWER_SRC, tmp_path)


# ---- batchnorm as the producer: the ops after it in its kernel, both modes ------------------

BN_SRC = """network B {{
    dtype {dtype}
    input x: [3, 5, 4]
    input r: [3, 5, 4]
    a = x -> batchnorm -> relu
    b = x -> conv(3, kernel=1, bias=false) -> batchnorm -> add(r) -> relu
    c = x -> batchnorm(momentum=0.3) -> sigmoid -> relu
    output a, b, c
}}
"""
BN_MOMENTUM = {"batchnorm1": 0.1, "batchnorm2": 0.1, "batchnorm3": 0.3}


def bn_reference(x, r, p, running, training):
    """F.batch_norm in float64; `running` (name → [mean, var] tensors) moves as PyTorch moves it."""
    def bn(t, name):
        mean, var = running[name]
        return F.batch_norm(t, mean, var, p[f"{name}.weight"], p[f"{name}.bias"], training=training,
                            momentum=BN_MOMENTUM[name], eps=1e-5)
    a = F.relu(bn(x, "batchnorm1"))
    b = F.relu(bn(F.conv2d(x, p["conv1.weight"]), "batchnorm2") + r)
    c = F.relu(torch.sigmoid(bn(x, "batchnorm3")))
    return a, b, c


def test_batchnorm_runs_the_activations_and_adds_after_it_in_its_kernel():
    """On the C target batchnorm's `fusing` variant applies the chain after it as it writes; a
    target whose batchnorm kernel applies no epilogue (OpenCL) keeps each op a step of its own."""
    from convdsl.targets import target
    graph = graph_from_source(BN_SRC.format(dtype="f32"))
    program = lower(graph)
    steps = {s.label: s for s in program.forward}
    assert not {"relu1", "relu2", "relu3", "add1", "sigmoid1"} & set(steps)
    assert {steps[f"batchnorm{i}"].variant for i in (1, 2, 3)} == {"fusing"}
    assert steps["batchnorm1"].epilogue.text().endswith("relu (relu1 fused)")
    assert re.search(r"add\(v\d+\) \(add1 fused\)\+relu \(relu2 fused\)$", steps["batchnorm2"].epilogue.text())
    sigmoid = next(n.output for n in graph.nodes if n.label == "sigmoid1")
    assert steps["batchnorm3"].epilogue.text().endswith(f"sigmoid (sigmoid1 fused, v{sigmoid} kept in training)"
                                                        "+relu (relu3 fused)")
    opencl = target("opencl")
    plain = lower(graph, lacks=opencl.lacks_variants, backend=opencl.name)
    assert {s.variant for s in plain.forward if s.op == "batchnorm"} == {"default"}
    assert {"relu1", "relu2", "relu3", "add1", "sigmoid1"} <= {s.label for s in plain.forward}


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_batchnorm_matches_torch_in_training_and_eval_mode(batch):
    net = convdsl.load_source(BN_SRC.format(dtype="f32")).Model(seed=0)
    rng = np.random.default_rng(40 + batch)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    for name in BN_MOMENTUM:            # statistics away from 0 / 1, so that eval mode tells them apart
        net.buffers[f"{name}.running_mean"][...] = rng.standard_normal(3)
        net.buffers[f"{name}.running_var"][...] = rng.uniform(0.5, 2.0, 3)
    running = {name: [torch.tensor(net.buffers[f"{name}.running_mean"], dtype=torch.float64),
                      torch.tensor(net.buffers[f"{name}.running_var"], dtype=torch.float64)] for name in BN_MOMENTUM}
    x = (1.0 + 2.0 * rng.standard_normal((batch, 3, 5, 4))).astype(np.float32)
    r = rng.standard_normal((batch, 3, 5, 4)).astype(np.float32)
    ys = net.forward(x, r)
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    dx, dr = net.backward(*dys)
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tr = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    tp = {k: torch.tensor(a, dtype=torch.float64, requires_grad=True) for k, a in net.params.items()}
    refs = bn_reference(tx, tr, tp, running, training=True)
    for name, y, ref in zip("abc", ys, refs):
        assert_close(y, ref.detach().numpy(), what=f"training forward {name}")
    sum((ref * torch.tensor(dy, dtype=torch.float64)).sum() for ref, dy in zip(refs, dys)).backward()
    assert_close(dx, tx.grad.numpy(), what="dx")
    assert_close(dr, tr.grad.numpy(), what="dr")
    for k, g in net.grads.items():
        assert_close(g, tp[k].grad.numpy(), what=f"grad {k}")
    for name, (mean, var) in running.items():
        assert_close(net.buffers[f"{name}.running_mean"], mean.numpy(), what=f"{name}.running_mean")
        assert_close(net.buffers[f"{name}.running_var"], var.numpy(), what=f"{name}.running_var")
    net.eval()
    with torch.no_grad():
        evals = bn_reference(tx, tr, tp, running, training=False)
    for name, y, ref in zip("abc", net.forward(x, r), evals):
        assert_close(y, ref.numpy(), what=f"eval forward {name}")


def test_fused_batchnorm_gradients_match_finite_differences_in_float64_both_modes():
    from opcases import FD_EPS, FD_TOL
    module = convdsl.load_source(BN_SRC.format(dtype="f64"))
    rng = np.random.default_rng(44)
    for training in (True, False):
        net = module.Model(seed=0)
        for p in net.params.values():
            p[...] = rng.standard_normal(p.shape)
        for name in BN_MOMENTUM:
            net.buffers[f"{name}.running_var"][...] = rng.uniform(0.5, 2.0, 3)
        if not training:
            net.eval()
        xs = [rng.standard_normal((3, 3, 5, 4)) for _ in range(2)]
        ys = net.forward(*xs)
        dys = [rng.standard_normal(y.shape) for y in ys]
        dxs = net.backward(*dys)
        grads = {k: v.copy() for k, v in net.grads.items()}

        def objective() -> float:
            return float(sum((y * d).sum() for y, d in zip(net.forward(*xs), dys)))

        for what, t, g in [("x", xs[0], dxs[0]), ("r", xs[1], dxs[1])] + [(k, net.params[k], g) for k, g in grads.items()]:
            v = rng.standard_normal(t.shape)
            t += FD_EPS * v
            up = objective()
            t -= 2 * FD_EPS * v
            down = objective()
            t += FD_EPS * v
            assert_close(np.array((up - down) / (2 * FD_EPS)), np.array(float((g * v).sum())),
                         what=f"finite differences ({'training' if training else 'eval'}), {what}", **FD_TOL)


def test_the_fused_batchnorm_kernels_compile_without_warnings(tmp_path):
    assert_c_compiles_cleanly(BN_SRC.format(dtype="f32"), tmp_path)
