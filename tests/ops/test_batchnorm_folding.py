"""Eval mode's own schedule (lowered program: eval_forward): with no batch statistics to compute,
a batchnorm is a scale and shift per channel, and where the kernel before it applies epilogues
(every conv variant, depthwise, deconv, dense, another batchnorm) that kernel applies it as it
writes, after a fold step that makes the (scale, shift) pairs from the weights and running
statistics on every call. Checked here against PyTorch in float64: each producer kind and each
conv variant forced, batch 1 and 3, NCHW and NHWC; the batchnorms that must not fold (on an
input, after a pool, one whose chain adds a tensor made after the producer); and that weights
and statistics written between calls, a training step in between and an eval-mode backward all
give what PyTorch gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.lower import lower
from convdsl.lower.program import AFFINE
from ccheck import assert_c_compiles_cleanly
from reference import assert_close

SRC = """network Fold {{
    layout {layout}
    input x: {x}
    input v: [12]
    a = x -> conv(6, kernel=3, pad=same) -> batchnorm -> relu
    b = x -> depthwise(kernel=3, pad=same, bias=false) -> batchnorm(eps=0.01)
    c = x -> deconv(3, kernel=2, stride=2) -> batchnorm -> relu
    d = v -> dense(5) -> batchnorm -> sigmoid
    e = x -> conv(4, kernel=1) -> relu -> batchnorm -> batchnorm
    output a, b, c, d, e
}}
"""
SHAPES = {"NCHW": "[4, 9, 8]", "NHWC": "[9, 8, 4]"}
BATCHNORMS = {"batchnorm1": 1e-5, "batchnorm2": 0.01, "batchnorm3": 1e-5, "batchnorm4": 1e-5, "batchnorm5": 1e-5,
              "batchnorm6": 1e-5}


def reference(x, v, p, b):
    """float64 PyTorch, eval mode, x channel-first."""
    def bn(t, name):
        return F.batch_norm(t, b[f"{name}.running_mean"], b[f"{name}.running_var"], p[f"{name}.weight"],
                            p[f"{name}.bias"], training=False, eps=BATCHNORMS[name])
    a = F.relu(bn(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1), "batchnorm1"))
    bb = bn(F.conv2d(x, p["depthwise1.weight"], padding=1, groups=4), "batchnorm2")
    c = F.relu(bn(F.conv_transpose2d(x, p["deconv1.weight"], p["deconv1.bias"], stride=2), "batchnorm3"))
    d = torch.sigmoid(bn(F.linear(v, p["dense1.weight"], p["dense1.bias"]), "batchnorm4"))
    e = bn(bn(F.relu(F.conv2d(x, p["conv2.weight"], p["conv2.bias"])), "batchnorm5"), "batchnorm6")
    return a, bb, c, d, e


def randomize(net, rng):
    """Weights, and running statistics away from 0 and 1, so that a fold that read the wrong
    channel, statistic or epsilon shows."""
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    for name in BATCHNORMS:
        net.buffers[f"{name}.running_mean"][...] = rng.standard_normal(net.buffers[f"{name}.running_mean"].shape)
        net.buffers[f"{name}.running_var"][...] = rng.uniform(0.3, 3.0, net.buffers[f"{name}.running_var"].shape)


def torch_state(net):
    as64 = lambda a: torch.tensor(np.array(a), dtype=torch.float64)  # noqa: E731
    return ({k: as64(a) for k, a in net.params.items()}, {k: as64(a) for k, a in net.buffers.items()})


def eval_check(net, rng, batch, layout, what):
    x = rng.standard_normal((batch, 9, 8, 4) if layout == "NHWC" else (batch, 4, 9, 8)).astype(np.float32)
    v = rng.standard_normal((batch, 12)).astype(np.float32)
    p, b = torch_state(net)
    tx = torch.tensor(x, dtype=torch.float64)
    if layout == "NHWC":
        tx = tx.permute(0, 3, 1, 2)
    refs = reference(tx, torch.tensor(v, dtype=torch.float64), p, b)
    for name, y, r in zip("abcde", net.forward(x, v), refs):
        r = r.numpy()
        if layout == "NHWC" and r.ndim == 4:
            r = r.transpose(0, 2, 3, 1)
        assert_close(y, r, what=f"{what}: eval forward {name}")


def test_each_batchnorm_after_a_kernel_with_an_epilogue_folds_into_it_in_eval_mode():
    program = lower(graph_from_source(SRC.format(layout="NCHW", x=SHAPES["NCHW"])))
    # The training forward keeps every batchnorm a step of its own (batch statistics).
    assert sum(s.op == "batchnorm" for s in program.forward) == 6
    folds = [s for s in program.eval_forward if s.folds_into is not None]
    assert sorted(s.label for s in folds) == sorted(BATCHNORMS)
    runs = {s.label: s for s in program.eval_forward if s.folds_into is None}
    assert set(runs) == {"conv1", "depthwise1", "deconv1", "dense1", "conv2"}
    texts = {label: s.epilogue.text() for label, s in runs.items()}
    assert texts["conv1"] == "bias+batchnorm (batchnorm1 fused)+relu (relu1 fused)"
    assert texts["depthwise1"] == "batchnorm(eps=0.01) (batchnorm2 fused)"
    assert texts["deconv1"] == "bias+batchnorm (batchnorm3 fused)+relu (relu2 fused)"
    assert texts["dense1"] == "bias+batchnorm (batchnorm4 fused)+sigmoid (sigmoid1 fused)"
    assert texts["conv2"] == "bias+relu (relu3 fused)+batchnorm (batchnorm5 fused)+batchnorm (batchnorm6 fused)"
    # Each fold step comes before the kernel that reads its table, and each table is its own.
    order = [s.label for s in program.eval_forward]
    for fold in folds:
        producer = next(s for s in program.eval_forward if s.node == fold.folds_into)
        assert order.index(fold.label) < order.index(producer.label)
        stage = next(st for st in producer.epilogue.stages if st.label == fold.label)
        assert stage.kind == AFFINE and stage.operand == fold.derived
    tables = sorted((f.derived.offset, f.derived.size) for f in folds)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(tables, tables[1:]))
    # The values the folded kernels never write get no eval-mode memory.
    conv1_out = next(s.outputs[0].value for s in program.forward if s.label == "conv1")
    assert program.inference[conv1_out].size != 0      # (an operand's size; the placement's:)
    from convdsl.lower.memory import lifetimes
    from convdsl.lower.plan import fusions_of
    g = graph_from_source(SRC.format(layout="NCHW", x=SHAPES["NCHW"]))
    assert lifetimes(g, fusions_of(g, eval_mode=True)).size[conv1_out] == 0
    assert lifetimes(g, fusions_of(g)).size[conv1_out] != 0


_MODULES: dict = {}


def module(layout, algo=None):
    key = (layout, repr(algo))
    if key not in _MODULES:
        _MODULES[key] = convdsl.load_source(SRC.format(layout=layout, x=SHAPES[layout]), algo=algo)
    return _MODULES[key]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_folded_batchnorms_match_torch_in_eval_mode(layout, batch):
    net = module(layout).Model(seed=0)
    net.eval()
    rng = np.random.default_rng(7 + batch)
    randomize(net, rng)
    eval_check(net, rng, batch, layout, f"{layout} batch {batch}")


# Every conv variant that applies to conv1 (3×3, stride 1) or conv2 (1×1), forced: each applies
# the folded batchnorm in its own epilogue code.
CONV_VARIANTS = ["im2col", "pointwise", "broadcast", "narrow", "blocked", "winograd2", "winograd4", "fft", "dot"]


@pytest.mark.parametrize("variant", CONV_VARIANTS)
def test_every_conv_variant_applies_a_folded_batchnorm(variant):
    mod = module("NCHW", {"conv": variant})
    chosen = {s.label: s.variant for s in mod.program.eval_forward if s.op == "conv"}
    assert variant in chosen.values(), chosen
    net = mod.Model(seed=0)
    net.eval()
    rng = np.random.default_rng(11)
    randomize(net, rng)
    eval_check(net, rng, 2, "NCHW", f"conv={variant}")


def test_weights_and_statistics_are_folded_again_on_every_call():
    net = module("NCHW").Model(seed=0)
    rng = np.random.default_rng(21)
    randomize(net, rng)
    net.eval()
    eval_check(net, rng, 2, "NCHW", "first")
    # Written through net.params / net.buffers between calls.
    net.params["batchnorm1.weight"][...] *= -2.0
    net.buffers["batchnorm5.running_var"][...] = 4.0
    net.buffers["batchnorm4.running_mean"][...] += 1.5
    eval_check(net, rng, 2, "NCHW", "after writing weights and statistics")
    # A training forward moves the running statistics; eval mode then folds the new ones.
    net.train()
    net.forward(rng.standard_normal((3, 4, 9, 8)).astype(np.float32), rng.standard_normal((3, 12)).astype(np.float32))
    net.eval()
    eval_check(net, rng, 2, "NCHW", "after a training forward")


def test_an_eval_mode_backward_runs_the_unfolded_schedule_and_matches_torch():
    net = module("NCHW").Model(seed=0)
    rng = np.random.default_rng(31)
    randomize(net, rng)
    net.eval()
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    v = rng.standard_normal((2, 12)).astype(np.float32)
    ys = net.forward(x, v)
    dys = [rng.standard_normal(y.shape).astype(np.float32) for y in ys]
    dx, dv = net.backward(*dys)
    p, b = torch_state(net)
    for t in p.values():
        t.requires_grad_(True)
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tv = torch.tensor(v, dtype=torch.float64, requires_grad=True)
    refs = reference(tx, tv, p, b)
    for name, y, r in zip("abcde", ys, refs):
        assert_close(y, r.detach().numpy(), what=f"forward {name}")
    sum((r * torch.tensor(dy, dtype=torch.float64)).sum() for r, dy in zip(refs, dys)).backward()
    assert_close(dx, tx.grad.numpy(), what="dx")
    assert_close(dv, tv.grad.numpy(), what="dv")
    for k, g in net.grads.items():
        assert_close(g, p[k].grad.numpy(), what=f"grad {k}")
    # And a plain eval forward after it (the folded schedule again) still agrees.
    eval_check(net, rng, 2, "NCHW", "after the backward")


UNFOLDED = """network Kept {
    input x: [3, 6, 6]
    a = x -> batchnorm -> relu
    p = x -> maxpool(2) -> batchnorm
    c = x -> conv(3, kernel=3, pad=same)
    late = x -> conv(3, kernel=1)
    d = c -> batchnorm -> add(late) -> relu
    output a, p, d
}
"""


def test_batchnorms_without_a_kernel_to_fold_into_keep_their_own_step():
    """On an input and after a pool there is no epilogue to apply it; after conv c, the add in
    its chain reads a tensor made after c runs, so it could not run in c's kernel and the whole
    batchnorm stays a step (it fuses that add in both modes)."""
    program = lower(graph_from_source(UNFOLDED))
    assert not [s for s in program.eval_forward if s.folds_into is not None]
    assert not program.eval_forward          # nothing differs: eval mode runs the training forward
    net = convdsl.load_source(UNFOLDED).Model(seed=0)
    rng = np.random.default_rng(41)
    for prm in net.params.values():
        prm[...] = rng.standard_normal(prm.shape)
    for name in ("batchnorm1", "batchnorm2", "batchnorm3"):
        net.buffers[f"{name}.running_mean"][...] = rng.standard_normal(3)
        net.buffers[f"{name}.running_var"][...] = rng.uniform(0.3, 3.0, 3)
    net.eval()
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    p, b = torch_state(net)
    tx = torch.tensor(x, dtype=torch.float64)

    def bn(t, name):
        return F.batch_norm(t, b[f"{name}.running_mean"], b[f"{name}.running_var"], p[f"{name}.weight"],
                            p[f"{name}.bias"], training=False, eps=1e-5)
    refs = (F.relu(bn(tx, "batchnorm1")), bn(F.max_pool2d(tx, 2), "batchnorm2"),
            F.relu(bn(F.conv2d(tx, p["conv1.weight"], p["conv1.bias"], padding=1), "batchnorm3")
                   + F.conv2d(tx, p["conv2.weight"], p["conv2.bias"])))
    for name, y, r in zip("apd", net.forward(x), refs):
        assert_close(y, r.numpy(), what=f"eval forward {name}")


def test_the_folded_kernels_compile_without_warnings(tmp_path):
    assert_c_compiles_cleanly(SRC.format(layout="NCHW", x=SHAPES["NCHW"]), tmp_path)
