"""The machinery the op tests share: several configurations ("cases") of an op compiled into one
network, one input and one output each, so that a test file pays one C compile per dtype and
layout rather than one per case. Runs give forward values, input gradients and parameter
gradients to compare with a PyTorch reference, and float64 networks give directional finite
differences. Nothing here computes an expected value from the code under test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl import ConvDSLError
from convdsl.compiler import compile_graph, graph_from_source
from convdsl.passes.stats import collect
from backends import requires_opencl
from reference import assert_close, to_nchw, to_nhwc
from ccheck import assert_c_compiles_cleanly  # noqa: F401  (the op tests import it from here)

# Central differences in float64: the error is rounding (~1e-16·|L| / eps) plus eps²·L''' — far
# below these bounds for the small, well-scaled tensors used here.
FD_EPS = 1e-6
FD_TOL = dict(rtol=1e-6, atol=1e-8)


@dataclass(frozen=True)
class Case:
    id: str
    shape: tuple                  # one sample's input shape, channel-first
    op: str                       # the op as written in the file: "local(4, kernel=3)"
    ref: dict = field(default_factory=dict, compare=False, hash=False)   # arguments for the reference
    dims: tuple | None = None     # the input's dims as declared (names for run-time sizes); default: shape
    shape2: tuple | None = None   # a second size for the batch-3 run (run-time sizes only)

    def declared(self, layout: str) -> tuple:
        dims = self.dims if self.dims is not None else self.shape
        return dims if layout == "NCHW" or len(dims) == 1 else (*dims[1:], dims[0])


def dsl(value) -> str:
    """A Python value written as a .cnn argument: 3, (1, 2), ((0, 1),), same, true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        inner = ", ".join(dsl(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value)


def source(cases, dtype: str = "f32", layout: str = "NCHW") -> str:
    """One network: input xI → layer LI (the case's op) → output yI, for every case I."""
    lines = ["network T {", f"    dtype {dtype}", f"    layout {layout}"]
    for i, case in enumerate(cases):
        lines.append(f"    input x{i}: [{', '.join(map(str, case.declared(layout)))}]")
        lines.append(f"    layer L{i} = {case.op}")
        lines.append(f"    y{i} = x{i} -> L{i}")
    lines.append("    output " + ", ".join(f"y{i}" for i in range(len(cases))))
    lines.append("}")
    return "\n".join(lines) + "\n"


_MODULES: dict[str, object] = {}


def compile_cases(cases, dtype: str = "f32", layout: str = "NCHW", algo: dict | None = None, backend: str = "c"):
    """The cases' network, compiled once per run; `algo` forces kernel variants (convdsl.load's),
    `backend` is convdsl.load's too."""
    src = source(cases, dtype, layout)
    key = (src, tuple(sorted((algo or {}).items())), backend)
    if key not in _MODULES:
        _MODULES[key] = convdsl.load_source(src, algo=algo, backend=backend)
    return _MODULES[key]


def case_variants(cases, ops: tuple[str, ...], algo: dict | None = None, graph=None) -> list[frozenset[str]]:
    """For every case, the kernel variants the plan runs its `ops` steps with (under `algo`).
    Case I's steps are layer LI and, for ops that expand, LI.<part>. `graph`: the cases' graph,
    when the caller has parsed it already."""
    from convdsl.lower import lower
    program = lower(graph if graph is not None else graph_from_source(source(cases)), algo)
    found: list[set[str]] = [set() for _ in cases]
    for step in program.forward:
        if step.op in ops:
            found[int(step.label.split(".")[0][1:])].add(step.variant)
    return [frozenset(f) for f in found]


@dataclass(frozen=True)
class VariantPlan:
    """Which build runs each (kernel variant, case) pair of an op family: the plan's own choice
    (`auto`) where it picks that variant, otherwise a build that forces the variant and holds
    only the cases of `forced[variant]` (so a variant costs a compile only where it adds one)."""
    ops: tuple[str, ...]
    auto: list                      # per case: the variants the plan picks
    forced: dict                    # variant → indices of the cases a forcing build holds
    pairs: list                     # every (variant, case index) that applies

    def force(self, variant: str) -> dict:
        return {op: variant for op in self.ops}

    def ids(self, case_ids) -> list[str]:
        return [f"{v}-{case_ids[i]}" for v, i in self.pairs]


def variant_plan(cases, ops: tuple[str, ...]) -> VariantPlan:
    from convdsl.ops.base import lookup
    names = list(dict.fromkeys(v.name for op in ops for v in lookup(op).variants()))
    graph = graph_from_source(source(cases))        # parsed once (at collection), lowered per variant
    auto = case_variants(cases, ops, graph=graph)
    forced = {}
    for v in names:
        got = case_variants(cases, ops, {op: v for op in ops}, graph=graph)
        forced[v] = [i for i in range(len(cases)) if v in got[i] and v not in auto[i]]
    pairs = [(v, i) for v in names for i in range(len(cases)) if v in auto[i] or i in forced[v]]
    return VariantPlan(tuple(ops), auto, forced, pairs)


def forced_runs(plan: VariantPlan, cases, seed: int) -> dict:
    """variant → {1: run at batch 1, 3: run at batch 3 (second sizes)} of its forcing build."""
    out = {}
    for variant, indices in plan.forced.items():
        if not indices:
            continue
        subset = [cases[i] for i in indices]
        module = compile_cases(subset, algo=plan.force(variant))
        rng = np.random.default_rng(seed)
        net = module.Model(seed=0)
        randomize(net, rng)
        out[variant] = {1: run_cases(module, subset, 1, rng, net=net),
                        3: run_cases(module, subset, 3, rng, net=net, variant=1)}
    return out


def variant_run(plan: VariantPlan, auto_runs: dict, forced: dict, variant: str, index: int, batch: int):
    """(run, index in that run) for one (variant, case) pair at a batch."""
    if variant in plan.auto[index]:
        return auto_runs[batch], index
    return forced[variant][batch], plan.forced[variant].index(index)


def randomize(net, rng) -> None:
    """Every parameter (biases too, so that their place is tested) drawn from normal(0, 1)."""
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)


@dataclass
class Run:
    xs: list            # channel-first inputs, one per case
    ys: list            # channel-first outputs
    dys: list
    dxs: list
    params: dict        # name → copy
    grads: dict         # name → copy (trainable parameters only)


def as_tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def spoil_gradients(net) -> None:
    """NaN in every parameter gradient: a backward must not read what they held before (it zeroes
    each one before adding into it)."""
    for g in net.grads.values():
        g[...] = np.nan


def run_cases(module, cases, batch: int, rng, layout: str = "NCHW", net=None, variant: int = 0) -> Run:
    """Forward and backward through every case at once; arrays are returned channel-first."""
    if net is None:
        net = module.Model(seed=0)
        randomize(net, rng)
    shapes = [c.shape2 if variant and c.shape2 is not None else c.shape for c in cases]
    dtype = np.float64 if module.META["dtype"] == "f64" else np.float32
    xs = [rng.standard_normal((batch, *s)).astype(dtype) for s in shapes]
    to_file = to_nhwc if layout == "NHWC" else (lambda a: a)
    from_file = to_nchw if layout == "NHWC" else (lambda a: a)
    ys = [from_file(y) for y in as_tuple(net.forward(*[to_file(x) for x in xs]))]
    dys = [rng.standard_normal(y.shape).astype(dtype) for y in ys]
    spoil_gradients(net)
    dxs = [from_file(d) for d in as_tuple(net.backward(*[to_file(d) for d in dys]))]
    return Run(xs, ys, dys, dxs, {k: v.copy() for k, v in net.params.items()},
               {k: v.copy() for k, v in net.grads.items()})


def case_params(run: Run, index: int) -> dict:
    prefix = f"L{index}."
    return {k[len(prefix):]: v for k, v in run.params.items() if k.startswith(prefix)}


def compare_with_torch(run: Run, index: int, case: Case, reference) -> None:
    """`reference(x, params, **case.ref)` in float64 PyTorch: values, dX and every trainable grad."""
    x = torch.tensor(run.xs[index], dtype=torch.float64, requires_grad=True)
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in case_params(run, index).items()}
    y = reference(x, params, **case.ref)
    assert_close(run.ys[index], y.detach().numpy(), what=f"{case.id}: forward")
    y.backward(torch.tensor(run.dys[index], dtype=torch.float64))
    assert_close(run.dxs[index], x.grad.numpy(), what=f"{case.id}: input gradient")
    for name, p in params.items():
        full = f"L{index}.{name}"
        if full in run.grads:
            assert_close(run.grads[full], p.grad.numpy(), what=f"{case.id}: gradient of {name}")


def finite_differences(module, cases, rng, batch: int = 2, net=None, label: str = "") -> None:
    """d(Σ y·dy) along a random direction of every input and trainable parameter, numeric vs
    analytic, in a float64 network (a fresh randomised one, or `net` as the caller set it up)."""
    if net is None:
        net = module.Model(seed=0)
        randomize(net, rng)
    xs = [rng.standard_normal((batch, *c.shape)) for c in cases]
    ys = as_tuple(net.forward(*xs))
    dys = [rng.standard_normal(y.shape) for y in ys]
    spoil_gradients(net)
    dxs = as_tuple(net.backward(*dys))
    grads = {k: v.copy() for k, v in net.grads.items()}

    def objective() -> np.ndarray:
        # One sum per output, differenced output by output: the outputs a perturbation does not
        # reach come out the same both times and cancel exactly, where one sum over all of them
        # (a network of many cases) lost the reached one's change to the rounding of the total.
        return np.array([(y * d).sum() for y, d in zip(as_tuple(net.forward(*xs)), dys)])

    tensors = [(f"{c.id}: input", x, dx) for c, x, dx in zip(cases, xs, dxs)]
    tensors += [(name, net.params[name], g) for name, g in grads.items()]
    for what, t, g in tensors:
        v = rng.standard_normal(t.shape)
        t += FD_EPS * v
        up = objective()
        t -= 2 * FD_EPS * v
        down = objective()
        t += FD_EPS * v
        numeric = float(((up - down) / (2 * FD_EPS)).sum())
        assert_close(np.array(numeric), np.array(float((g * v).sum())), what=f"finite differences{label}, {what}",
                     **FD_TOL)


def error_of(body: str) -> ConvDSLError:
    """The error a network with these statements gives (no C is compiled)."""
    with pytest.raises(ConvDSLError) as info:
        graph_from_source("network E {\n" + body + "\n}\n")
    return info.value


def assert_error_at(body: str, needle: str, *fragments: str) -> None:
    """The error's caret sits on the first `needle` of the op's line, and its message says `fragments`."""
    err = error_of(body)
    lines = ("network E {\n" + body).splitlines()
    line = lines[err.span.line - 1]
    assert needle in line, f"the error points at line {err.span.line}: {line!r}\n{err}"
    assert err.span.col == line.index(needle) + 1, f"caret at column {err.span.col}, not on `{needle}`:\n{err}"
    for fragment in fragments:
        assert fragment in err.message, f"{fragment!r} not in: {err.message}"


def layer_stats(body: str) -> dict:
    """label → LayerStats of `check`, for a network with these statements."""
    graph = graph_from_source("network S {\n" + body + "\n}\n")
    return {row.label: row for row in collect(graph).layers}


# ---- PyTorch references shared by several op files --------------------------------------

def torch_pad(x: torch.Tensor, pads) -> torch.Tensor:
    """Zero padding given as ((before, after) per spatial axis), first axis first."""
    flat = []
    for before, after in reversed(pads):
        flat += [before, after]
    return F.pad(x, flat)


def unshared_reference(x, params, *, kernel, stride, pads, tile=None):
    """§3.1/§3.2 from F.unfold: Z[o, j, k] = Σ cols[(c, m, n), (j, k)] · W[o, j mod t, k mod t, c, m, n].
    1-D maps get a size-1 height. `tile` None means local (one kernel set per position)."""
    w, b = params["weight"], params.get("bias")
    rank = x.dim() - 2
    if rank == 1:
        x, kernel, stride, pads = x.unsqueeze(2), (1, *kernel), (1, *stride), ((0, 0), *pads)
        w = w.unsqueeze(1)
        b = b.unsqueeze(1) if b is not None else None
        tile = (1, *tile) if tile is not None else None
    cols = F.unfold(torch_pad(x, pads), kernel, stride=stride)            # [N, C·kh·kw, L]
    n, out = x.shape[0], w.shape[0]
    oh = (x.shape[2] + sum(pads[0]) - kernel[0]) // stride[0] + 1
    ow = (x.shape[3] + sum(pads[1]) - kernel[1]) // stride[1] + 1
    if tile is not None:
        rows = torch.arange(oh) % tile[0]
        cols_idx = torch.arange(ow) % tile[1]
        w = w[:, rows][:, :, cols_idx]                                      # [out, oh, ow, in, kh, kw]
        if b is not None:
            b = b[:, rows][:, :, cols_idx]
    y = torch.einsum("ncl,olc->nol", cols, w.reshape(out, oh * ow, -1)).reshape(n, out, oh, ow)
    if b is not None:
        y = y + b
    return y.squeeze(2) if rank == 1 else y


def standard_suite(cases, reference, seed: int):
    """The tests every op file runs, as (fixture, tests…) to bind at module level:

        runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64 = \\
            standard_suite(CASES, reference, seed=31)

    values and every gradient against `reference` at batch 1 and 3 (batch 3 at each case's second
    size, with the same weights), the NHWC layout at batch 2, and float64 finite differences."""
    ids = [c.id for c in cases]

    @pytest.fixture(scope="module")
    def runs():
        module = compile_cases(cases)
        rng = np.random.default_rng(seed)
        net = module.Model(seed=0)
        randomize(net, rng)
        return {1: run_cases(module, cases, 1, rng, net=net), 3: run_cases(module, cases, 3, rng, net=net, variant=1)}

    @pytest.mark.parametrize("batch", (1, 3))
    @pytest.mark.parametrize("index", range(len(cases)), ids=ids)
    def test_forward_and_gradients_match_torch(runs, index, batch):
        compare_with_torch(runs[batch], index, cases[index], reference)

    @pytest.mark.parametrize("index", range(len(cases)), ids=ids)
    def test_nhwc_layout(index):
        module = compile_cases(cases, layout="NHWC")
        run = run_cases(module, cases, 2, np.random.default_rng(seed + 1), layout="NHWC")
        compare_with_torch(run, index, cases[index], reference)

    def test_finite_differences_float64():
        finite_differences(compile_cases(cases, dtype="f64"), cases, np.random.default_rng(seed + 2))

    return runs, test_forward_and_gradients_match_torch, test_nhwc_layout, test_finite_differences_float64


def _chosen(cases, ids) -> list:
    """The cases named `ids`, in that order (an OpenCL selection)."""
    by_id = {c.id: c for c in cases}
    missing = [i for i in ids if i not in by_id]
    assert not missing, f"no such cases: {missing}"
    return [by_id[i] for i in ids]


def opencl_suite(cases, reference, seed: int, ids: tuple[str, ...], algo: dict | None = None,
                 name: str = "opencl_runs"):
    """The OpenCL backend's test of an op file, as (fixture, test) to bind at module level:

        opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=31, ids=(...))

    values and every gradient against `reference` at batch 1 and 3 (batch 3 at each case's second
    size), on the cases `ids`: a selection that covers each kernel's paths (every rank, padding
    form, flag and run-time sizes the file has), not every case — PoCL compiles each kernel
    through LLVM, about half a second each, and every case adds kernels. The variants of the C
    backend are one kernel there, so no variant is forced; `algo` forces one that OpenCL has of
    its own (conv's `tiled`), in a second suite of the file whose fixture is called `name`."""
    chosen = _chosen(cases, ids)

    @pytest.fixture(scope="module", name=name)
    def opencl_runs():
        module = compile_cases(chosen, algo=algo, backend="opencl")
        rng = np.random.default_rng(seed)
        net = module.Model(seed=0)
        randomize(net, rng)
        return {1: run_cases(module, chosen, 1, rng, net=net), 3: run_cases(module, chosen, 3, rng, net=net, variant=1)}

    @requires_opencl
    @pytest.mark.parametrize("batch", (1, 3))
    @pytest.mark.parametrize("index", range(len(chosen)), ids=list(ids))
    def test_opencl_matches_torch(request, index, batch):
        compare_with_torch(request.getfixturevalue(name)[batch], index, chosen[index], reference)

    return opencl_runs, test_opencl_matches_torch


def opencl_variants(cases, algo: dict | None = None) -> list[frozenset[str]]:
    """For every case, the kernel variants its steps run with in the OpenCL build of `cases`
    under `algo` (the very lowering convdsl.load makes for it)."""
    program = compile_graph(graph_from_source(source(cases)), algo, backend="opencl").program
    found: list[set[str]] = [set() for _ in cases]
    for step in program.forward:
        found[int(step.label.split(".")[0][1:])].add(step.variant)
    return [frozenset(f) for f in found]


def opencl_nhwc_test(cases, reference, seed: int, ids: tuple[str, ...]):
    """The OpenCL twin of an op file's NHWC run, as a test to bind at module level:

        test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=32, ids=OPENCL_CASES)

    the cases `ids` in one NHWC network at batch 2 against `reference`, values and every
    gradient, as the C runs do. OpenCL buffers are channel-first inside, whatever the file's
    layout: the host converts inputs, outputs and their gradients at the boundary, and only the
    layout-dependent kernels (flatten, reshape, dense on a map) read the layout. So the cases of
    `opencl_suite` serve here too (every rank, run-time sizes), and their program is the NCHW
    network's, which the device-binary cache then already holds."""
    chosen = _chosen(cases, ids)
    run = {}

    @requires_opencl
    @pytest.mark.parametrize("index", range(len(chosen)), ids=list(ids))
    def test_opencl_nhwc_layout_matches_torch(index):
        if "nhwc" not in run:
            module = compile_cases(chosen, layout="NHWC", backend="opencl")
            run["nhwc"] = run_cases(module, chosen, 2, np.random.default_rng(seed), layout="NHWC")
        compare_with_torch(run["nhwc"], index, chosen[index], reference)

    return test_opencl_nhwc_layout_matches_torch


def opencl_f64_test(cases, seed: int, ids: tuple[str, ...], batch: int = 2):
    """The OpenCL twin of an op file's float64 finite-difference check, as a test to bind at
    module level:

        test_opencl_finite_differences_float64 = opencl_f64_test(CASES, seed=33, ids=OPENCL_CASES)

    the cases `ids` in one f64 network (PoCL on a CPU has cl_khr_fp64), every input and trainable
    parameter along a random direction, at the C runs' tolerance (`finite_differences`). The f64
    program is one of its own, which PoCL compiles anew, kernel by kernel; so `ids` is smaller
    than `opencl_suite`'s: each op kind and flag (bias or not, frozen, a padding mode) once —
    what double precision changes is the kernels' arithmetic, not their indexing, which the
    f32 selection covers in every rank and at run-time sizes."""
    chosen = _chosen(cases, ids)

    @requires_opencl
    def test_opencl_finite_differences_float64():
        finite_differences(compile_cases(chosen, dtype="f64", backend="opencl"), chosen,
                           np.random.default_rng(seed), batch=batch)

    return test_opencl_finite_differences_float64
