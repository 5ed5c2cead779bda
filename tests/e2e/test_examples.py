"""Every examples/*.cnn is checked, compiled and run: forward, backward and (with a loss) a
training step that lowers the loss on a fixed batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import convdsl
from backends import requires_opencl
from convdsl.compiler import graph_from_file, networks_in_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.cnn"))
CASES = [(path, name) for path in EXAMPLES for name in networks_in_file(path)]
RUN_TIME_SIZE = 12        # value given to every named dim (H, W, …) of an input


def concrete_shape(dims, batch):
    return (batch, *(d if isinstance(d, int) else RUN_TIME_SIZE for d in dims))


# On OpenCL too: these examples (each OpenCL program costs PoCL 2-10 s of CPU the first time;
# every example passed there when this list was chosen): the main example's network, a residual
# block with batchnorm, an inception block with concat and squeeze-excitation scaling, and
# run-time sizes with a layer shared across a repeat (refine). Every op has its own op tests on
# OpenCL.
OPENCL_EXAMPLES = ("digits_lenet", "inception_se", "resnet_block", "refine")
RUNS = [pytest.param(path, name, "c", id=f"{path.stem}:{name}") for path, name in CASES] + \
       [pytest.param(path, name, "opencl", id=f"{path.stem}:{name}:opencl", marks=requires_opencl)
        for path, name in CASES if path.stem in OPENCL_EXAMPLES]


@pytest.mark.slow
@pytest.mark.parametrize("path,network,backend", RUNS)
def test_example_checks_compiles_and_runs(path, network, backend, request):
    if backend == "c":
        # As users build them. On OpenCL the kernels are PoCL's to compile, and the library's C
        # (host glue, the loss and the optimizers, which the C target's tests build at -O3) stays
        # at the suite's -O0.
        request.getfixturevalue("optimised")
    graph = graph_from_file(path, network)
    module = convdsl.load(path, network, backend=backend)
    net = module.Model(seed=0)
    rng = np.random.default_rng(0)
    dtype = np.float64 if graph.dtype == "f64" else np.float32
    xs = [rng.standard_normal(concrete_shape(i.dims, 2)).astype(dtype) for i in graph.inputs]
    ys = net.forward(*xs)
    ys = ys if isinstance(ys, tuple) else (ys,)
    assert len(ys) == len(graph.outputs)
    for y in ys:
        assert np.all(np.isfinite(y))
    dxs = net.backward(*[np.ones_like(y) for y in ys])
    dxs = dxs if isinstance(dxs, tuple) else (dxs,)
    for x, dx in zip(xs, dxs):
        assert dx.shape == x.shape and np.all(np.isfinite(dx))
    if graph.loss is None:
        return
    out = ys[graph.loss.output_index]
    if graph.loss.kind == "softmax_cross_entropy":
        channel_axis = -1 if graph.layout == "NHWC" and out.ndim > 2 else 1
        label_shape = tuple(s for a, s in enumerate(out.shape) if a != channel_axis % out.ndim)
        if all(s == 1 for s in label_shape[1:]):
            label_shape = label_shape[:1]
        target = rng.integers(0, out.shape[channel_axis], size=label_shape)
    else:
        target = rng.standard_normal(out.shape).astype(dtype)
    first = net.train_step(*xs, target, lr=0.01)
    for _ in range(5):
        last = net.train_step(*xs, target, lr=0.01)
    assert np.isfinite(first) and last < first, (first, last)


def test_every_issue2_example_is_present():
    names = {p.name for p in EXAMPLES}
    assert {"lenet5.cnn", "inception_se.cnn", "refine.cnn", "sobel.cnn", "resnet_block.cnn"} <= names
