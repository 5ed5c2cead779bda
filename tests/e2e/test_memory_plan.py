"""Memory planned from liveness: on every example, the module's eval-mode activations are the
forward-only figure `check` reports, and its training-mode ones the training figure, at run-time
sizes too; eval mode runs in shared memory and computes what training mode computes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl.compiler import graph_from_file, networks_in_file
from convdsl.ir import dims as D
from convdsl.lower.memory import lifetimes, live_peak
from convdsl.lower.plan import fusions_of
from convdsl.passes.memory import plan_memory
from reference import assert_close

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.cnn"))
CASES = [(path, name) for path in EXAMPLES for name in networks_in_file(path)]
SIZES = (12, 20)          # values given to every named dim of an input, one per run
BATCH = 3


def inputs(graph, size, rng):
    dtype = np.float64 if graph.dtype == "f64" else np.float32
    shape = lambda dims: (BATCH, *(d if isinstance(d, int) else size for d in dims))  # noqa: E731
    return [rng.standard_normal(shape(i.dims)).astype(dtype) for i in graph.inputs]


@pytest.mark.parametrize("path,network", CASES, ids=[f"{p.stem}:{n}" for p, n in CASES])
def test_module_allocates_what_check_reports(path, network):
    graph = graph_from_file(path, network)
    memory = plan_memory(graph)
    net = convdsl.load(path, network).Model(seed=0)
    # Without batchnorm or dropout both modes compute the same: eval's shared memory must not change it.
    same_in_both_modes = not {n.op for n in graph.nodes} & {"batchnorm", "dropout"}
    rng = np.random.default_rng(1)
    for size in SIZES if graph.sym_dims else SIZES[:1]:
        env = {name: size for name in graph.sym_dims}
        xs = inputs(graph, size, rng)
        net.eval()
        eval_out = net.forward(*xs)
        assert net.memory()["activations"] == BATCH * D.evaluate(memory.peak_inference_bytes, env)
        # The placement reaches the least any placement can: the most bytes live at one node (a
        # fused activation's output is live from its producer on; the pre-activation is never stored).
        peak, _ = live_peak(lifetimes(graph, fusions_of(graph)), len(graph.nodes), env)
        assert D.evaluate(memory.peak_inference_bytes, env) == D.evaluate(peak, env) * (8 if graph.dtype == "f64" else 4)
        net.train()
        train_out = net.forward(*xs)
        assert net.memory()["activations"] == BATCH * D.evaluate(memory.training_bytes, env)
        if same_in_both_modes:
            for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (eval_out, train_out))):
                assert_close(a, b, what=f"{network}: eval forward in shared memory")


def test_eval_runs_in_shared_memory_and_a_backward_after_it_recomputes_the_forward():
    path = REPO / "examples" / "shufflenet_unit.cnn"          # batchnorm: eval and training differ
    net = convdsl.load(path).Model(seed=0)
    rng = np.random.default_rng(2)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    for b in net.buffers.values():
        b[...] = rng.uniform(0.5, 1.5, b.shape)
    x = inputs(graph_from_file(path), 12, rng)[0]
    net.eval()
    y = net.forward(x)
    shared = net.memory()["activations"]
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy)                        # recomputed with its activations kept
    kept = net.memory()["activations"]
    assert kept > shared
    grads = {k: v.copy() for k, v in net.grads.items()}
    # The same through a C API model that keeps eval-mode activations from the start.
    other = convdsl.load(path).Model(seed=0)
    for k, v in net.state_dict().items():
        (other.params if k in other.params else other.buffers)[k][...] = v
    other.eval()
    other._call("set_keep_for_backward", other._m, 1)
    assert_close(other.forward(x), y, what="eval forward, shared or kept")
    assert_close(other.backward(dy), dx, what="eval-mode input gradient")
    for k in grads:
        assert_close(other.grads[k], grads[k], what=k)
    net.forward(x)
    assert net.memory()["activations"] == shared        # back in shared memory
