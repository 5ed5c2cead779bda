"""A step's batched alternative (lowered program: Step.batched): the plan chooses each layer's
kernel variant for one sample's shape and, where another variant costs clearly less on a batch
(Variant.batch_costs: Winograd's tiles fill its panels across samples, a small map's forward runs
GEMMs over several samples), gives the step that variant too, which a call on at least
`min_batch` samples runs instead. Checked against PyTorch (float64, and float32 at its tolerance)
on one model at batches on both sides of min_batch, in every order: eval mode's forward (a
batchnorm folded into the conv: eval mode's twin of both kernels), the training forward, and the
input, weight and bias gradients (each kernel zeroes or writes its input's gradient its own way,
and keeps its own transformed kernels), NCHW and NHWC."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.errors import ConvDSLError
from convdsl.lower import lower
from convdsl.lower.show import program_text
from reference import assert_close

SRC = """network Batched {{
    dtype {dtype}
    layout {layout}
    input x: {x}
    y = x -> conv({c}, kernel=3, pad=1, bias=false) -> batchnorm -> relu -> conv({c}, kernel=3, pad=1) -> relu
    output y
}}
"""
# (dtype, channels, side): the variant for one sample → the alternative, from min_batch samples
# on (the plan's cost model; test_the_plan_gives_these_layers_a_batched_alternative pins them).
CASES = {("f32", 64, 8): ("broadcast", "winograd2", 2), ("f32", 32, 8): ("im2col", "winograd2", 2),
         ("f32", 16, 16): ("blocked", "winograd4", 2), ("f64", 32, 8): ("winograd2", "winograd4", 4)}
# Both sides of min_batch (2 or 4), each after the other: smaller after larger and back.
BATCHES = (1, 4, 2, 5, 3, 1)


def source(c, side, dtype="f64", layout="NCHW"):
    x = f"[{c}, {side}, {side}]" if layout == "NCHW" else f"[{side}, {side}, {c}]"
    return SRC.format(dtype=dtype, layout=layout, x=x, c=c)


@pytest.mark.parametrize("case", CASES)
def test_the_plan_gives_these_layers_a_batched_alternative(case):
    dtype, c, side = case
    program = lower(graph_from_source(source(c, side, dtype)))
    single, batched, least = CASES[case]
    for steps in (program.forward, program.backward, program.eval_forward):
        convs = [s for s in steps if s.op == "conv"]
        assert len(convs) == 2
        for s in convs:
            assert (s.variant, s.batched.variant, s.batched.min_batch) == (single, batched, least)
            assert s.batched.label == s.label and s.batched.inputs == s.inputs and s.batched.outputs == s.outputs
    # Each keeps its own transformed kernels: no two steps' derived memory overlaps in a region.
    kept = [o for f in program.forward for o in (f.derived, f.batched and f.batched.derived) if o is not None]
    for region in {o.region for o in kept}:
        spans = sorted((o.offset, o.size) for o in kept if o.region == region)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert f"from batch {least}: conv/{batched}" in program_text(program)


def test_the_module_runs_the_alternative_from_min_batch_on():
    """Both variants compute the same, so the numbers below cannot tell which ran: the passes
    of the C source say it. Each conv is called through one test on the batch, in the training
    forward, eval mode's forward (the folded twin for conv1) and the backward."""
    import re
    from convdsl.compiler import compile_graph
    c = compile_graph(graph_from_source(source(64, 8, "f32"))).source.c
    passes = c[c.index("static void cdsl_forward_pass"):c.index("static void cdsl_zero_grads")]
    for fn, kernel in (("cdsl_L0_conv1_eval", "forward"), ("cdsl_L0_conv1", "forward"),
                       ("cdsl_L3_conv2", "forward"), ("cdsl_L3_conv2", "backward"), ("cdsl_L0_conv1", "backward")):
        pattern = (rf"if \(m->batch >= {CASES['f32', 64, 8][2]}\)[^\n]*\n(\s*\{{?\s*\n)?(\s*memset[^\n]*\n)*"
                   rf"\s*{fn}_batched_{kernel}\(")
        assert re.search(pattern, passes), (fn, kernel)
        assert f"{fn}_{kernel}(" in passes
    # The variant each set of kernels was rendered for: Winograd's products in the alternative's
    # forward only.
    def body(fn):
        start = c.index(f"static void {fn}(")
        return c[start:c.index("\n}\n", start)]
    assert "cdsl_wino2_products(" in body("cdsl_L3_conv2_batched_forward")
    assert "cdsl_wino2_products(" not in body("cdsl_L3_conv2_forward")


def test_the_alternatives_memory_is_only_taken_by_a_batch_that_runs_them():
    """Their derived memory and their larger workspace are the batched regions: a model that never
    runs a batch of min_batch pays for neither (`from batch 2` here)."""
    from convdsl.lower.program import BATCHED_DERIVED, BATCHED_WORKSPACE, DERIVED, WORKSPACE
    program = lower(graph_from_source(source(64, 8, "f32")))
    assert program.batched_from == 2
    region = {r.name: r.size for r in program.regions}
    assert region[DERIVED] == 2 * 64 and region[BATCHED_DERIVED] > 0   # the eval fold's table; winograd2's kernels
    assert region[WORKSPACE] < region[BATCHED_WORKSPACE]
    assert all(s.batched.derived.region == BATCHED_DERIVED for s in program.forward if s.batched)
    net = convdsl.load_source(source(64, 8, "f32")).Model(seed=0)
    x = np.zeros((1, 64, 8, 8), np.float32)
    net.eval()
    net.forward(x)
    assert net.memory()["workspace"] == region[WORKSPACE] * 4
    net.forward(np.zeros((2, 64, 8, 8), np.float32))
    assert net.memory()["workspace"] == region[BATCHED_WORKSPACE] * 4
    assert lower(graph_from_source(source(64, 8, "f32")), algo={"conv": "broadcast"}).batched_from == 0


def test_a_fixed_variant_has_no_batched_alternative():
    """algo= in the file, a per-run override, or tuning fix the variant for every batch."""
    src = source(64, 8, "f32")
    assert all(s.batched is None for s in lower(graph_from_source(src), algo={"conv": "broadcast"}).forward)
    fixed = src.replace("conv(64, kernel=3, pad=1, bias=false)", "conv(64, kernel=3, pad=1, bias=false, algo=im2col)")
    steps = {s.label: s for s in lower(graph_from_source(fixed)).forward}
    assert steps["conv1"].batched is None and steps["conv2"].batched is not None


def test_a_target_that_does_not_run_alternatives_refuses_them():
    from convdsl.targets import target
    program = lower(graph_from_source(source(64, 8, "f32")))
    opencl = target("opencl")
    assert not opencl.runs_batched_alternatives
    with pytest.raises(ConvDSLError, match="batched alternative"):
        opencl.check_program(program)
    # The plan never makes them for OpenCL: its costs there are per sample.
    program = lower(graph_from_source(source(64, 8, "f32")), lacks=opencl.lacks_variants, backend="opencl")
    assert all(s.batched is None for s in program.steps)


def reference(x, p, b, training, c):
    """PyTorch float64, x channel-first."""
    h = F.conv2d(x, p["conv1.weight"], padding=1)
    h = F.batch_norm(h, b["batchnorm1.running_mean"].clone(), b["batchnorm1.running_var"].clone(),
                     p["batchnorm1.weight"], p["batchnorm1.bias"], training=training)
    return F.relu(F.conv2d(F.relu(h), p["conv2.weight"], p["conv2.bias"], padding=1))


_MODULES: dict = {}


def model(shape, dtype, layout):
    key = (shape, dtype, layout)
    if key not in _MODULES:
        _MODULES[key] = convdsl.load_source(source(*shape, dtype=dtype, layout=layout))
    net = _MODULES[key].Model(seed=1)
    rng = np.random.default_rng(5)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape) * (0.5 if p.ndim == 1 else 1 / np.sqrt(p[0].size))
    net.buffers["batchnorm1.running_mean"][...] = rng.standard_normal(shape[0]) * 0.1
    net.buffers["batchnorm1.running_var"][...] = rng.uniform(0.5, 2.0, shape[0])
    return net


# Every case NCHW; NHWC on one (the boundary's transpose is the same for every variant).
RUNS = [(*case, "NCHW") for case in CASES] + [("f32", 64, 8, "NHWC")]


@pytest.mark.parametrize("dtype,c,side,layout", RUNS)
def test_each_batch_computes_what_pytorch_does(dtype, c, side, layout):
    shape = (c, side)
    net = model(shape, dtype, layout)
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == "f64" else dict(rtol=1e-4, atol=1e-5)
    np_type = np.float64 if dtype == "f64" else np.float32
    rng = np.random.default_rng(9)
    for batch in BATCHES:
        x = rng.standard_normal((batch, c, side, side))
        dy = rng.standard_normal((batch, c, side, side))
        edge = (lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))) if layout == "NHWC" else (lambda a: a)
        what = f"{shape} {dtype} {layout} batch {batch}"
        for training in (False, True):
            # The model's own parameters and running statistics (a training forward moves the
            # statistics: the next reference starts from them, as the model does).
            p = {k: torch.tensor(np.array(v), dtype=torch.float64, requires_grad=True) for k, v in net.params.items()}
            b = {k: torch.tensor(np.array(v), dtype=torch.float64) for k, v in net.buffers.items()}
            tx = torch.tensor(x, requires_grad=True)
            ref = reference(tx, p, b, training, c)
            net.train() if training else net.eval()
            y = net.forward(edge(x.astype(np_type)))
            assert_close(y, edge(ref.detach().numpy()), **tol, what=f"{what}: {'training' if training else 'eval'} y")
            if not training:
                continue
            ref.backward(torch.tensor(dy))
            dx = net.backward(edge(dy.astype(np_type)))
            assert_close(dx, edge(tx.grad.numpy()), **tol, what=f"{what}: dx")
            for name, g in net.grads.items():
                assert_close(g, p[name].grad.numpy(), **tol, what=f"{what}: d{name}")
