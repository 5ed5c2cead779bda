"""Memory planned from liveness: on every example, the module's eval-mode activations are the
forward-only figure `check` reports, and its training-mode ones the training figure, at run-time
sizes too, less than every value and its gradient; eval mode runs in shared memory and computes
what training mode computes. Training memory keeps only what each op's backward declares it
reads, and gradients share memory by lifetime: a residual block and a concat still train as
PyTorch does, and a chain of every op computes what it computes with nothing shared."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
import convdsl.lower.plan
from convdsl.compiler import compile_graph, graph_from_file, graph_from_source, networks_in_file
from convdsl.ir import dims as D
from convdsl.lower import memory
from convdsl.lower.memory import lifetimes, live_peak
from convdsl.lower.plan import fusions_of
from convdsl.ops.base import INPUTS, OUTPUT, SAVED, registry
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
def test_module_allocates_what_check_reports(path, network, optimised):
    # (-O3: the module test_examples.py builds, from the run's cache when it came first.)
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
        # fused activation's output is live from its producer on; the pre-activation is never
        # stored, nor, in eval mode's schedule, the input of a batchnorm folded into its producer).
        peak, _ = live_peak(lifetimes(graph, fusions_of(graph, eval_mode=True)), len(graph.nodes), env)
        assert D.evaluate(memory.peak_inference_bytes, env) == D.evaluate(peak, env) * (8 if graph.dtype == "f64" else 4)
        net.train()
        train_out = net.forward(*xs)
        assert net.memory()["activations"] == BATCH * D.evaluate(memory.training_bytes, env)
        # What backward does not read dies, and gradients share memory: less than keeping it all.
        assert D.evaluate(memory.training_bytes, env) < D.evaluate(memory.all_kept_bytes, env)
        if same_in_both_modes:
            for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (eval_out, train_out))):
                assert_close(a, b, what=f"{network}: eval forward in shared memory")


def test_eval_runs_in_shared_memory_and_a_backward_after_it_recomputes_the_forward(backend):
    path = REPO / "examples" / "shufflenet_unit.cnn"          # batchnorm: eval and training differ
    net = convdsl.load(path, backend=backend).Model(seed=0)
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
    other = convdsl.load(path, backend=backend).Model(seed=0)
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


def test_ops_declare_what_their_backward_reads():
    """An activation a producer may fuse reads its output or its input, one value (the fused kernel
    writes it in training: the chain's last value, or the value kept for the stage); a producer
    that fuses one must not read its own output, which is never stored."""
    for name, op in registry().items():
        assert op.saves_for_backward <= {INPUTS, OUTPUT, SAVED}, name
        if op.fuses_as == "activation":
            assert op.saves_for_backward in ({OUTPUT}, {INPUTS}), name
        if any(v.fuses_epilogue for v in op.variants()):
            assert OUTPUT not in op.saves_for_backward, name
    assert registry()["conv"].backward_reads({"frozen": True}) == frozenset()       # no weight gradient
    assert registry()["dense"].backward_reads({"frozen": False}) == {INPUTS}


def test_rendered_kernels_never_allocate():
    """Every example's kernels (the layers and the loss) use planned workspaces only."""
    for path, network in CASES:
        c = compile_graph(graph_from_file(path, network)).source.c
        kernels = c[c.index("/* ---- layers"):c.index("/* ---- parameters")]
        assert not re.search(r"\b(malloc|calloc|realloc|free)\s*\(", kernels), f"{path.name}:{network}"


BRANCHES = """
network Branch {
    input x: [3, 6, 6]
    a = x -> conv(4, kernel=3, pad=same) -> relu
    b = a -> conv(4, kernel=3, pad=same)
    r = add(a, b) -> relu
    c = concat(r, a) -> maxpool(2)
    y = c -> flatten -> dense(3)
    output r, y
    loss softmax_cross_entropy(y)
}
"""


def _branches_in_torch(x, p):
    a = F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1))
    b = F.conv2d(a, p["conv2.weight"], p["conv2.bias"], padding=1)
    r = F.relu(a + b)
    c = F.max_pool2d(torch.cat([r, a], 1), 2)
    return r, F.linear(c.flatten(1), p["dense1.weight"], p["dense1.bias"])


def test_a_residual_block_and_a_concat_train_as_in_pytorch(backend):
    """`a` feeds conv2, the residual add and the concat, and `r` is an output that the concat reads
    too: their gradients gather shares from several backward steps (and, for `r`, the caller's)
    while the gradients before them reuse memory; each is zeroed before the first step adds to it."""
    net = convdsl.load_source(BRANCHES, backend=backend).Model(seed=3)
    graph = graph_from_source(BRANCHES)
    assert plan_memory(graph).training_bytes < plan_memory(graph).all_kept_bytes
    rng = np.random.default_rng(4)
    x = rng.standard_normal((BATCH, 3, 6, 6)).astype(np.float32)
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in net.params.items()}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    r_ref, y_ref = _branches_in_torch(xt, params)
    r, y = net.forward(x)
    assert_close(r, r_ref.detach().numpy(), what="r")
    assert_close(y, y_ref.detach().numpy(), what="y")
    dr = rng.standard_normal(r.shape).astype(np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = torch.autograd.grad((r_ref * torch.tensor(dr, dtype=torch.float64)).sum()
                                + (y_ref * torch.tensor(dy, dtype=torch.float64)).sum(), [xt, *params.values()])
    for _ in range(2):                      # a backward reads nothing that a backward overwrote
        dx = net.backward(dr, dy)
        assert_close(dx, grads[0].numpy(), what="dx")
        for name, g in zip(params, grads[1:]):
            assert_close(net.grads[name], g.numpy(), what=f"d {name}")
    labels = rng.integers(0, 3, size=BATCH)
    loss_ref = F.cross_entropy(_branches_in_torch(xt, params)[1], torch.tensor(labels))
    step = torch.autograd.grad(loss_ref, list(params.values()))
    loss = net.train_step(x, labels, lr=0.1)
    assert_close(loss, loss_ref.item(), what="loss")
    for (name, p), g in zip(params.items(), step):
        assert_close(net.params[name], (p - 0.1 * g).detach().numpy(), what=f"{name} after the step")


# Every op between frozen 1×1 convs (whose backward reads nothing), so that every value an op's
# backward does not declare dies before that backward, and its memory holds another tensor then.
EVERY_OP = """
network Chain {
    input x: [4, 8, 8]
    a = x -> conv(4, kernel=1, frozen=true)
    b = a -> maxpool(3, stride=1, pad=same) -> conv(4, kernel=1, frozen=true)
    c = b -> avgpool(3, stride=1, pad=same) -> conv(4, kernel=1, frozen=true)
    d = c -> l2pool(3, stride=1, pad=same) -> conv(4, kernel=1, frozen=true)
    e = d -> batchnorm -> conv(4, kernel=1, frozen=true)
    f = e -> dropout(0.3) -> conv(4, kernel=1, frozen=true)
    g = f -> maxout(2) -> conv(4, kernel=1, frozen=true)
    h = g -> shuffle(2) -> conv(4, kernel=1, frozen=true)
    i = h -> softmax -> conv(4, kernel=1, frozen=true)
    j = add(i, h) -> relu -> conv(4, kernel=1, frozen=true)
    k = add(j, i) -> sigmoid -> conv(4, kernel=1, frozen=true)
    l = add(k, j) -> tanh -> conv(4, kernel=1, frozen=true)
    m = add(l, k) -> leaky_relu(0.1) -> conv(4, kernel=1, frozen=true)
    n = concat(m, l) -> conv(4, kernel=1, frozen=true)
    s = n -> globalavgpool -> dense(4) -> sigmoid
    o = scale(n, s) -> conv(4, kernel=1, frozen=true)
    p = o -> upsample(2) -> conv(4, kernel=3, stride=2, pad=same) -> relu
    q = p -> depthwise(3, pad=same) -> deconv(4, kernel=2, stride=2) -> local(2, kernel=3, stride=2) -> conv(4, kernel=1, frozen=true)
    t = q -> tiled(4, kernel=3, tile=2, pad=same) -> conv(4, kernel=1, frozen=true)
    u1 = sub(t, q) -> relu6 -> conv(4, kernel=1, frozen=true)
    u2 = mul(u1, t) -> clip(-1, 1) -> conv(4, kernel=1, frozen=true)
    u3 = sub(u2, u1) -> hardsigmoid -> conv(4, kernel=1, frozen=true)
    u4 = mul(u3, u2) -> hardswish -> conv(4, kernel=1, frozen=true)
    u5 = sub(u4, u3) -> silu -> conv(4, kernel=1, frozen=true)
    u6 = sub(u5, u4) -> gelu -> conv(4, kernel=1, frozen=true)
    u7 = sub(u6, u5) -> elu(0.5) -> conv(4, kernel=1, frozen=true)
    u8 = u7 -> prelu -> conv(4, kernel=1, frozen=true)
    u9 = u8 -> layernorm -> conv(4, kernel=1, frozen=true)
    v1 = u9 -> groupnorm(2) -> conv(4, kernel=1, frozen=true)
    v2 = v1 -> instancenorm -> conv(4, kernel=1, frozen=true)
    v3 = v2 -> pad(1, mode=reflect) -> conv(4, kernel=3, frozen=true)
    v4 = v3 -> conv(4, kernel=3, pad=1, pad_mode=replicate, frozen=true)
    v5 = v4 -> reshape([4, 49]) -> conv(4, kernel=1, frozen=true) -> reshape([4, 7, 7])
    r = v5 -> globalmaxpool -> flatten -> dense(3)
    output r
    loss softmax_cross_entropy(r)
}
"""


def _nothing_shared(g, fusions=None, guard=0):
    """The training layout with the same lifetimes (and zeroing) but every tensor apart."""
    layout = memory.training_placement(g, fusions)
    offsets, total = memory.place_apart(layout.life)
    nv = len(g.values)
    saved = {nid: (offsets[2 * nv + k], elems) for k, (nid, (_, elems)) in enumerate(layout.saved.items())}
    return dataclasses.replace(layout, activation=offsets[:nv], gradient=offsets[nv:2 * nv], saved=saved, total=total)


def _clobbered_before_backward(graph):
    """(op, value) for every value an op's backward does not declare that a later tensor overwrites
    before that backward runs: where an undeclared read would see the wrong numbers."""
    layout = memory.training_placement(graph, fusions_of(graph))
    life = layout.life
    offsets = list(layout.activation) + list(layout.gradient) + [o for o, _ in layout.saved.values()]
    found = set()
    for node in graph.nodes:
        reads = registry()[node.op].backward_reads(node.attrs)
        for u in ([] if INPUTS in reads else list(node.inputs)) + ([] if OUTPUT in reads else [node.output]):
            lo, hi = offsets[u], offsets[u] + life.size[u]
            if any(life.size[w] and offsets[w] < hi and lo < offsets[w] + life.size[w]
                   and life.last[u] < life.first[w] <= layout.timeline.backward[node.id] for w in range(len(offsets))):
                found.add((node.op, u))
    return found


@pytest.mark.slow
def test_every_op_reads_in_backward_only_what_it_declares(monkeypatch):
    """The chain computes, in training, exactly what it computes with nothing shared; each op that
    leaves something undeclared has it overwritten before its backward, so the comparison can fail."""
    graph = graph_from_source(EVERY_OP)
    # Every op is in the chain (separable is depthwise then a 1×1 conv): a new op belongs there.
    assert {n.op for n in graph.nodes} == set(registry()) - {"separable"}
    undeclared = {op for op, _ in _clobbered_before_backward(graph)}
    assert undeclared >= {"maxpool", "avgpool", "batchnorm", "dropout", "maxout", "shuffle", "softmax", "add",
                          "relu", "sigmoid", "tanh", "leaky_relu", "concat", "globalavgpool", "scale", "upsample",
                          "local", "tiled", "globalmaxpool", "flatten", "conv", "sub", "relu6", "clip",
                          "hardsigmoid", "elu", "pad", "reshape"}
    shared = convdsl.load_source(EVERY_OP).Model(seed=5)
    monkeypatch.setattr(convdsl.lower.plan, "training_placement", _nothing_shared)
    apart = convdsl.load_source(EVERY_OP).Model(seed=5)
    assert plan_memory(graph).training_bytes < plan_memory(graph).all_kept_bytes
    rng = np.random.default_rng(6)
    x = rng.standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    y = shared.forward(x)
    assert_close(y, apart.forward(x), what="forward")
    assert apart.memory()["activations"] > shared.memory()["activations"]
    dy = rng.standard_normal(y.shape).astype(np.float32)
    for _ in range(2):
        assert_close(shared.backward(dy), apart.backward(dy), what="dx")
        for name in shared.grads:
            assert_close(shared.grads[name], apart.grads[name], what=f"d {name}")
    labels = rng.integers(0, 3, size=BATCH)
    for _ in range(2):
        assert_close(shared.train_step(x, labels, lr=0.05), apart.train_step(x, labels, lr=0.05), what="loss")
    for name in shared.params:
        assert_close(shared.params[name], apart.params[name], what=f"{name} after two steps")
