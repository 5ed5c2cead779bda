"""flatten and dense (§2.4, §2.5, §4) against PyTorch: flatten in C,H,W order for NCHW and H,W,C
order for NHWC (the reference flattens the channel-last tensor itself), dense on flat inputs and
on maps (an implicit flatten first), with and without bias, values and every gradient."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source, module_meta
from opcases import opencl_nhwc_test, opencl_suite, Case, compare_with_torch, compile_cases, run_cases
from reference import assert_close, torch_params


def reference(x, params, *, kind, layout="NCHW"):
    # x arrives channel-first; an NHWC file sees (and flattens) the channel-last tensor.
    seen = x.movedim(1, -1) if layout == "NHWC" and x.dim() > 2 else x
    flat = seen.flatten(1)
    if kind == "flatten":
        return flat
    return F.linear(flat, params["weight"], params.get("bias"))


CASES = (
    Case("flatten-1d-map", (3, 5), "flatten", dict(kind="flatten")),
    Case("flatten-2d-map", (3, 4, 5), "flatten", dict(kind="flatten")),
    Case("flatten-3d-map", (2, 3, 2, 4), "flatten", dict(kind="flatten")),
    Case("flatten-vector", (7,), "flatten", dict(kind="flatten")),
    Case("flatten-1x1-map", (6, 1, 1), "flatten", dict(kind="flatten")),
    Case("dense-flat", (12,), "dense(5)", dict(kind="dense")),
    Case("dense-flat-nobias", (9,), "dense(4, bias=false)", dict(kind="dense")),
    Case("dense-1d-map", (3, 4), "dense(6)", dict(kind="dense")),
    Case("dense-2d-map", (3, 2, 3), "dense(4)", dict(kind="dense")),
    Case("dense-2d-map-nobias", (2, 3, 3), "dense(5, bias=false)", dict(kind="dense")),
    Case("dense-3d-map", (2, 2, 3, 2), "dense(3)", dict(kind="dense")),
    Case("dense-to-one", (5,), "dense(1)", dict(kind="dense")),
    # several GEMM panels in every dimension
    Case("dense-large", (700,), "dense(150)", dict(kind="dense")),
    Case("dense-large-map", (20, 6, 7), "dense(90)", dict(kind="dense")),
)
IDS = [c.id for c in CASES]
# Up to the plan's dot_columns the forward runs as dot products of rows (lib/gemm's
# cdsl_gemm_dot), above it as the packed GEMM: batches on both sides of it.
BATCHES = (1, 3, 7, 11)


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    'flatten-2d-map', 'flatten-vector', 'dense-flat', 'dense-flat-nobias',
    'dense-3d-map',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=29, ids=OPENCL_CASES)


def with_layout(case: Case, layout: str) -> Case:
    return dataclasses.replace(case, ref=dict(case.ref, layout=layout))


# The NHWC network on OpenCL: flatten and dense on a map read the maps in H,W,C order there too
# (their kernels differ from NCHW's, so this is a program of its own: the map cases only — on a
# vector the layout changes nothing).
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(tuple(with_layout(c, "NHWC") for c in CASES), reference,
                                                         seed=1029, ids=("flatten-2d-map", "dense-3d-map"))


@pytest.fixture(scope="module")
def runs():
    module = compile_cases(CASES)
    rng = np.random.default_rng(301)
    net = module.Model(seed=0)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    return {b: run_cases(module, CASES, b, rng, net=net) for b in BATCHES}


@pytest.fixture(scope="module")
def nhwc_run():
    module = compile_cases(CASES, layout="NHWC")
    rng = np.random.default_rng(302)
    net = module.Model(seed=0)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    return run_cases(module, CASES, 2, rng, layout="NHWC", net=net)


@pytest.mark.parametrize("batch", (1, 3, 7))
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_forward_and_gradients_match_torch(runs, index, batch):
    compare_with_torch(runs[batch], index, CASES[index], reference)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_nhwc_layout_flattens_in_h_w_c_order(nhwc_run, index):
    compare_with_torch(nhwc_run, index, with_layout(CASES[index], "NHWC"), reference)


def test_the_batches_run_both_forms_of_the_forward():
    """The lowered program says up to which batch dense's forward runs as dot products; the
    batches above cover both that form and the packed GEMM."""
    from convdsl.compiler import compile_graph
    program = compile_graph(graph_from_source("network D {\n input x: [12]\n y = x -> dense(5)\n output y\n}\n")).program
    (step,) = [s for s in program.forward if s.op == "dense"]
    assert 0 < step.parallel.dot_columns
    assert any(b <= step.parallel.dot_columns for b in BATCHES) and any(b > step.parallel.dot_columns for b in BATCHES)


def test_flatten_orders_on_known_values():
    """Element by element: NCHW [C, H, W] flattens c-major; NHWC [H, W, C] as it is stored."""
    src = "network O {{\n layout {layout}\n input x: {dims}\n y = x -> flatten\n output y\n}}\n"
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)            # [N, C, H, W]
    nchw = convdsl.load_source(src.format(layout="NCHW", dims="[2, 3, 4]")).Model()
    np.testing.assert_array_equal(nchw.forward(x), x.reshape(1, -1))
    nhwc = convdsl.load_source(src.format(layout="NHWC", dims="[3, 4, 2]")).Model()
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))                    # [N, H, W, C]
    np.testing.assert_array_equal(nhwc.forward(x_last), x_last.reshape(1, -1))
    np.testing.assert_array_equal(nhwc.backward(np.arange(24, dtype=np.float32)[None]),
                                  np.arange(24, dtype=np.float32).reshape(1, 3, 4, 2))


def test_dense_on_a_map_is_named_as_one_layer():
    meta = module_meta(graph_from_source(
        "network D {\n input x: [3, 4, 4]\n y = x -> dense(8) -> relu -> dense(2, bias=false)\n output y\n}\n"))
    assert [(n, s, t) for n, s, t in meta["params"]] == [
        ("dense1.weight", (8, 48), True), ("dense1.bias", (8,), True), ("dense2.weight", (2, 8), True)]
    labels = [n.label for n in graph_from_source(
        "network D {\n input x: [3, 4, 4]\n y = x -> dense(8)\n output y\n}\n").nodes]
    assert labels == ["dense1.flatten", "dense1"]


def test_frozen_dense_passes_the_gradient_and_keeps_its_weights(backend):
    net = convdsl.load_source("network Z {\n input x: [6]\n y = x -> dense(4, frozen=true) -> tanh -> dense(3)\n"
                              " output y\n loss mse(y)\n}\n", backend=backend).Model(seed=1)
    assert list(net.grads) == ["dense2.weight", "dense2.bias"]
    rng = np.random.default_rng(303)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = net.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy)
    p = torch_params(net)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = F.linear(torch.tanh(F.linear(xt, p["dense1.weight"], p["dense1.bias"])), p["dense2.weight"],
                  p["dense2.bias"])
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(y, yt.detach().numpy(), what="forward")
    assert_close(dx, xt.grad.numpy(), what="input gradient through the frozen layer")
    before = net.params["dense1.weight"].copy(), net.params["dense1.bias"].copy()
    net.train_step(x, rng.standard_normal((5, 3)), lr=1.0)
    np.testing.assert_array_equal(net.params["dense1.weight"], before[0])
    np.testing.assert_array_equal(net.params["dense1.bias"], before[1])
