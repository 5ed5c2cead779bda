"""conv, depthwise and separable (§1.2, §3.8, §4) against F.conv1d/2d/3d: values, input, weight
and bias gradients for every padding form, strides, dilation, groups, flip, odd sizes, batch 1
and 3, both layouts; frozen layers, const weights, initialisers and parameter names.

Each case's op text and its reference are made from the same Python values, so that the two
cannot drift apart; the reference turns `pad=` into (before, after) zeros itself (F.pad), with
TensorFlow/ONNX SAME_UPPER for `same`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from backends import requires_opencl
from convdsl.compiler import compile_graph, graph_from_source, module_meta
from opcases import (dsl, opencl_nhwc_test, opencl_suite, opencl_variants, Case, compare_with_torch, compile_cases,
                     finite_differences, forced_runs, run_cases, source, spoil_gradients, variant_plan, variant_run)
from reference import assert_close, pad_pairs, pad_spatial, torch_params

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_case(id, shape, out, kernel, *, kind="conv", dims=None, shape2=None, **kw) -> Case:
    """One conv/depthwise/separable case: the op as written, and the same values for the reference."""
    args = [dsl(kernel)] if kind == "depthwise" else [str(out), f"kernel={dsl(kernel)}"]
    args += [f"{k}={dsl(v)}" for k, v in kw.items()]
    return Case(id, shape, f"{kind}({', '.join(args)})", dict(kind=kind, kernel=kernel, **kw), dims=dims,
                shape2=shape2)


def reference(x, params, *, kind, kernel, stride=1, pad="valid", dilation=1, groups=1, flip=False, bias=True,
              multiplier=1, frozen=False, layout="NCHW"):
    """PyTorch's conv on the input padded with F.pad; depthwise is groups = channels; separable is
    a bias-free depthwise conv then a 1×1 conv with the bias."""
    rank = x.dim() - 2
    pairs = pad_pairs(pad, tuple(x.shape[2:]), kernel, stride, dilation)
    xp = pad_spatial(x, pairs)
    if kind == "separable":
        h = CONV[rank](xp, params["dw.weight"], None, stride=stride, dilation=dilation, groups=x.shape[1])
        return CONV[rank](h, params["pw.weight"], params.get("pw.bias"))
    w = params["weight"]
    if flip:
        w = torch.flip(w, dims=tuple(range(2, w.dim())))     # the mathematical convolution (§1.1.1)
    if kind == "depthwise":
        groups = x.shape[1]
    return CONV[rank](xp, w, params.get("bias"), stride=stride, dilation=dilation, groups=groups)


CASES = (
    # 1-D
    conv_case("1d-stride", (3, 12), 4, 3, stride=2),
    conv_case("1d-same-odd-total", (2, 10), 3, 4, stride=3, pad="same"),         # total 3 → (1, 2)
    conv_case("1d-full-dilated", (2, 7), 2, 3, dilation=2, pad="full"),
    conv_case("1d-groups-nobias-tuple", (4, 9), 6, 2, groups=2, bias=False, pad=(1,)),
    conv_case("1d-pairs-flip", (3, 8), 2, 3, pad=((2, 0),), flip=True),
    # 2-D: every padding form
    conv_case("2d-valid", (3, 7, 6), 4, 3),
    conv_case("2d-same-odd-both-axes", (3, 8, 10), 4, (2, 3), stride=(1, 2), pad="same"),   # (0, 1), (0, 1)
    conv_case("2d-same-dilated-strided", (2, 11, 9), 3, 3, stride=2, dilation=2, pad="same"),
    conv_case("2d-same-even-kernel", (2, 5, 6), 3, 4, pad="same"),                        # (1, 2) on both axes
    conv_case("2d-int-pad-stride", (3, 7, 7), 5, 3, stride=2, pad=2),
    conv_case("2d-per-axis", (2, 6, 9), 3, (3, 1), stride=(1, 3), pad=(1, 0)),
    conv_case("2d-pairs-wider-than-kernel", (2, 5, 6), 3, 2, pad=((0, 2), (3, 1))),
    conv_case("2d-full", (3, 4, 5), 2, (3, 2), pad="full"),
    conv_case("2d-dilation", (2, 10, 9), 4, 2, dilation=(3, 4)),
    conv_case("2d-groups-dilation-stride", (6, 11, 10), 9, 3, groups=3, stride=2, dilation=2, pad="same",
              bias=False),
    # 3×3 dilated at stride 1: Winograd on each phase of the map (a phase of 5 rows against 4 of
    # 9 at dilation 2; dilations apart per axis, pads asymmetric and wider than the reach on one
    # side, groups, flip)
    conv_case("2d-3x3-dilated-same", (3, 9, 11), 5, 3, dilation=2, pad="same"),
    conv_case("2d-3x3-dilated-pairs-groups-flip", (4, 10, 13), 6, 3, dilation=(3, 2), groups=2, flip=True,
              pad=((4, 1), (0, 2))),
    # stride 2 over rows of 70 and 71 columns: the packers' vector gather of every other element
    # (whole vectors, the last one ending at the row's end, a tail), at each tap's shift; the
    # second has 175 output positions, so that a batch runs one sample per packed GEMM
    conv_case("2d-stride2-wide-rows", (2, 3, 70), 3, 3, stride=2, pad=((1, 1), (1, 2))),
    conv_case("2d-stride2-wide-rows-odd", (1, 9, 71), 2, (2, 3), stride=2, pad=((0, 1), (2, 0)), dilation=(1, 2)),
    conv_case("2d-flip", (2, 6, 7), 3, (2, 3), flip=True, pad=1),
    conv_case("2d-flip-groups-stride", (4, 5, 5), 4, 3, groups=2, flip=True, stride=2),
    conv_case("2d-kernel-is-input", (3, 5, 4), 6, (5, 4)),
    conv_case("2d-stride-beyond-kernel", (2, 9, 9), 2, 2, stride=4),
    conv_case("2d-pointwise-stride", (5, 6, 7), 4, 1, stride=2),
    conv_case("2d-pointwise-groups", (6, 3, 5), 4, 1, groups=2),
    # 1×1 padded only after an axis: the output grid is larger than the input, so the input is
    # not the column matrix (issue 7: the plan once looked at the padding before each axis only)
    conv_case("2d-pointwise-pad-after", (3, 5, 6), 4, 1, pad=((0, 0), (0, 2))),
    conv_case("1d-pointwise-pad-after", (3, 7), 2, 1, pad=((0, 3),)),
    conv_case("2d-pointwise-groups-pad-after", (6, 4, 5), 4, 1, groups=2, pad=((0, 1), (0, 0))),
    conv_case("3d-pointwise-pad-after-nobias", (2, 3, 2, 4), 3, 1, pad=((0, 0), (0, 0), (0, 1)), bias=False),
    # 1×1 on the input itself over 99 positions: broadcast's chunks of 64 and 35 columns (whole
    # and partial vectors), 30 output channels (a partial block of tile rows), 2 groups
    conv_case("2d-pointwise-ragged-chunks", (14, 9, 11), 30, 1, groups=2),
    conv_case("2d-frozen", (3, 6, 5), 2, 3, frozen=True, pad="same"),
    # 3-D
    conv_case("3d-same-mixed", (2, 5, 6, 7), 3, (3, 2, 3), stride=(2, 1, 2), dilation=(1, 2, 1), pad="same"),
    conv_case("3d-groups-pairs-nobias", (4, 4, 5, 3), 4, 2, groups=2, pad=((1, 0), (0, 1), (1, 1)), bias=False),
    conv_case("3d-flip", (2, 3, 4, 5), 2, (2, 3, 2), flip=True),
    conv_case("3d-full-stride", (1, 3, 3, 4), 2, 2, pad="full", stride=(1, 2, 3)),
    # depthwise: one input channel per group (the direct loop), multiplier 1 and 2
    conv_case("depthwise-m1", (3, 7, 8), None, 3, kind="depthwise", pad="same", stride=2),
    conv_case("depthwise-m2", (2, 6, 9), None, (3, 2), kind="depthwise", multiplier=2, dilation=2,
              pad=((2, 1), (0, 3))),
    conv_case("depthwise-1d-m2-same-odd", (3, 10), None, 4, kind="depthwise", multiplier=2, pad="same"),
    conv_case("depthwise-3d-flip", (2, 4, 5, 6), None, 3, kind="depthwise", stride=(1, 2, 2), pad=1, flip=True),
    conv_case("depthwise-nobias-full", (2, 4, 4), None, 3, kind="depthwise", multiplier=3, bias=False, pad="full"),
    # wider than 64 taps: read from the weights, no copy of the row's taps on a thread's stack
    conv_case("depthwise-1d-wide-kernel-flip", (2, 80), None, 70, kind="depthwise", pad="same", flip=True),
    # more channels than a vector holds, the last block partial (the small maps' form across channels)
    conv_case("depthwise-channel-blocks", (19, 5, 6), None, 3, kind="depthwise", stride=2, pad=((1, 0), (0, 1))),
    conv_case("depthwise-channel-blocks-dilated-flip", (11, 6, 6), None, 3, kind="depthwise", multiplier=3,
              dilation=2, pad="same", flip=True),
    conv_case("conv-groups-is-channels", (3, 6, 6), 6, 3, groups=3),
    # separable: depthwise (stride, pad, dilation) then a 1×1 conv with the bias
    conv_case("separable-2d", (4, 7, 6), 5, 3, kind="separable", stride=2, pad="same"),
    conv_case("separable-1d-dilated-nobias", (3, 11), 2, 3, kind="separable", dilation=2, bias=False),
    # large enough for several GEMM panels (C·K > 128, positions > 2048) and the threaded paths
    conv_case("large-depth", (34, 14, 14), 40, 3, pad=1),
    conv_case("large-positions", (2, 48, 47), 3, 3, pad="same"),
    conv_case("large-depthwise", (24, 30, 30), None, 5, kind="depthwise", pad="same"),
    # the direct loop's vectors of output columns (16 at AVX-512, 8 at AVX2) with ragged ends, a
    # stride-1 dX gathered through the mirrored kernel: dilated, padded unevenly, multiplier 2;
    # a 3-D one with flip
    conv_case("depthwise-wide-rows-dilated", (3, 7, 45), None, 3, kind="depthwise", multiplier=2, dilation=(1, 2),
              pad=((2, 0), (1, 4))),
    conv_case("depthwise-3d-wide-rows-flip", (2, 3, 4, 37), None, (2, 3, 3), kind="depthwise", flip=True,
              pad=((1, 0), (1, 1), (0, 2))),
    # one vector of channels on a 6 × 6 map: gcc 12 -O3 vectorized the grids' copy wrongly in
    # dX's loop once the plane was inlined there (its rows' range tested per row)
    conv_case("depthwise-6x6-one-block", (16, 6, 6), None, 3, kind="depthwise", pad=1),
    # blocked's padded copy at stride 2 in vectors (rows past two vectors), its ends one by one
    conv_case("stride2-wide-rows", (2, 5, 41), 3, 3, stride=2, pad=((1, 0), (1, 2))),
    # the grids' stride-2 split in vectors (two vectors of a source row into both column
    # phases; rows wider than two vectors past the padding), uneven padding, and a dilation
    conv_case("depthwise-grid-stride2-wide", (3, 9, 45), None, 3, kind="depthwise", stride=2, pad=((1, 0), (1, 2))),
    conv_case("depthwise-grid-stride2-dilated", (2, 8, 40), None, 3, kind="depthwise", stride=(1, 2),
              dilation=(1, 2), bias=False),
    # maps past the direct loop's grids (ops/conv.py, DIRECT_GRID_MAX), row by row in vectors:
    # stride 2 (the even lanes of two vectors of a row; the last columns, whose second vector
    # would pass the row's end, one by one) and stride 1 dilated
    conv_case("depthwise-rows-stride2", (2, 70, 130), None, 3, kind="depthwise", stride=2, pad=((1, 1), (1, 0))),
    conv_case("depthwise-rows-dilated-m2", (1, 96, 90), None, 3, kind="depthwise", multiplier=2, dilation=2,
              pad=((2, 1), (2, 3))),
    # leading pads wider than the window: dX's grid starts inside dY (negative padding)
    conv_case("depthwise-pads-wider-than-window", (2, 6, 20), None, 2, kind="depthwise", multiplier=2,
              pad=((3, 0), (2, 1))),
    conv_case("depthwise-stride2-wide-rows", (3, 9, 75), None, 3, kind="depthwise", stride=2,
              pad=((1, 1), (1, 0))),
    conv_case("depthwise-stride2-dilated-wide-m2", (2, 8, 90), None, (2, 3), kind="depthwise", stride=2,
              multiplier=2, dilation=(1, 2), pad="same"),
    # 3×3 at stride 1, the Winograd variants' shapes: padding before one side only, after only,
    # wider than the kernel, none; groups with flip; one-row and odd maps; run-time sizes below
    conv_case("3x3-pairs-asymmetric-wide", (3, 9, 7), 4, 3, pad=((2, 0), (0, 3))),
    conv_case("3x3-end-only-nobias", (2, 5, 10), 3, 3, pad=((0, 2), (0, 1)), bias=False),
    conv_case("3x3-groups-flip-same", (4, 6, 9), 6, 3, groups=2, flip=True, pad="same"),
    conv_case("3x3-one-row", (2, 1, 7), 3, 3, pad=1),
    # OpenCL's tiled kernels: every product ragged against its tiles (20 channels in tiles of 16
    # rows, 70 positions in tiles of 64 columns, a reduction of 45 in chunks of 16; dX and dW
    # likewise), strided on one axis, padded unevenly
    conv_case("ragged-tiles", (5, 13, 11), 20, 3, stride=(2, 1), pad=((1, 2), (0, 1))),
    # run-time sizes: one model, the batch-3 run at a second size
    conv_case("runtime-same-stride", (3, 9, 7), 4, 3, stride=2, pad="same", dims=(3, "H", "W"), shape2=(3, 6, 10)),
    conv_case("runtime-3x3-same", (3, 9, 7), 4, 3, pad="same", dims=(3, "P", "Q"), shape2=(3, 6, 13)),
    conv_case("runtime-1d-depthwise", (2, 9), None, 3, kind="depthwise", pad="same", stride=2, dims=(2, "L"),
              shape2=(2, 14)),
    conv_case("runtime-pointwise", (3, 5, 4), 4, 1, dims=(3, "A", "B"), shape2=(3, 7, 2)),
    conv_case("runtime-pointwise-pad-after", (3, 5, 4), 2, 1, pad=((0, 2), (0, 0)), dims=(3, "C", "E"),
              shape2=(3, 3, 6)),
)
IDS = [c.id for c in CASES]


# On OpenCL (PoCL in CI): a selection of the cases, see opcases.opencl_suite.
OPENCL_CASES = (
    '1d-pairs-flip', '2d-same-dilated-strided', '2d-groups-dilation-stride', '2d-flip-groups-stride',
    '2d-pointwise-pad-after', '2d-frozen', '3d-same-mixed', 'depthwise-m2',
    'depthwise-1d-wide-kernel-flip', 'separable-2d', 'runtime-same-stride', 'runtime-1d-depthwise', 'large-depth',
)
opencl_runs, test_opencl_matches_torch = opencl_suite(CASES, reference, seed=105, ids=OPENCL_CASES)
test_opencl_nhwc_layout_matches_torch = opencl_nhwc_test(CASES, reference, seed=1105, ids=OPENCL_CASES)

# OpenCL's own conv variant, `tiled` (work-groups over tiles, staged in local memory): the plan
# picks it for large-depth above (and keeps the one-work-item kernel for the small cases); here it
# is forced on cases that reach every edge of its tiles: ragged products (every case; blocks of 1
# to 8 columns and 1 or 2 rows a work-item, ragged-tiles' 2 × 8 among them), groups, strides,
# dilation, every padding form (same's uneven split, explicit pairs, after only, wider than the
# kernel), flip, 1-D and 3-D, a frozen weight (no dW kernel), run-time sizes, and depthwise.
TILED = {"conv": "tiled", "depthwise": "tiled"}
OPENCL_TILED_CASES = (
    '1d-stride', '2d-pairs-wider-than-kernel', '2d-groups-dilation-stride', '2d-flip-groups-stride',
    '2d-pointwise-pad-after', '2d-frozen', '3d-same-mixed', '3d-groups-pairs-nobias', 'ragged-tiles',
    'runtime-same-stride', 'depthwise-m2',
)
opencl_tiled_runs, test_opencl_tiled_matches_torch = opencl_suite(
    CASES, reference, seed=106, ids=OPENCL_TILED_CASES, algo=TILED, name="opencl_tiled_runs")
OPENCL_TILED_FD_CASES = ('1d-pairs-flip', '2d-groups-dilation-stride', '3d-groups-pairs-nobias', 'ragged-tiles')


def by_ids(ids) -> list:
    return [CASES[IDS.index(i)] for i in ids]


def test_the_plan_tiles_large_layers_on_opencl_only():
    """What runs is the lowered program's choice: `tiled` for the large layer of the OpenCL suite
    and wherever it is forced, the one-work-item kernel for the small layers (whose tiles would
    be mostly empty), never on the C backend (forcing it there gives way to a C variant). Each
    product's tile is the plan's, fitted to its own rows and columns, and the kernels are built
    for that work-group size."""
    auto = dict(zip(OPENCL_CASES, opencl_variants(by_ids(OPENCL_CASES))))
    assert auto["large-depth"] == {"tiled"}
    assert {i for i, v in auto.items() if "tiled" in v} == {"large-depth"}
    forced = opencl_variants(by_ids(OPENCL_TILED_CASES), TILED)
    assert all(v == {"tiled"} for v in forced), dict(zip(OPENCL_TILED_CASES, forced))
    compiled = compile_graph(graph_from_source(source(by_ids(("ragged-tiles", "large-depth")))), TILED,
                             backend="opencl")
    tiles = [dict(s.parallel.tiles) for s in compiled.program.forward]
    assert [(t["forward"].rows, t["forward"].cols) for t in tiles] == [(16, 64), (32, 64)]
    assert [(t["dx"].rows, t["dx"].cols) for t in tiles] == [(8, 64), (32, 64)]
    assert [(t["dw"].rows, t["dw"].cols) for t in tiles] == [(16, 32), (32, 64)]
    assert compiled.source.c.count("reqd_work_group_size(8, 8, 1)") == 6
    on_c = compile_graph(graph_from_source(source(by_ids(OPENCL_TILED_CASES))), TILED, backend="c").program
    assert not any(s.variant == "tiled" for s in on_c.steps)


def test_tiled_is_forced_by_the_layer_and_the_environment(monkeypatch):
    """`algo=tiled` on the layer and CONVDSL_ALGO=conv=tiled force it on OpenCL; the C backend
    has no kernels for it and runs its own choice."""
    layer = "network F {\n input x: [3, 6, 5]\n y = x -> conv(4, kernel=3%s)\n output y\n}\n"

    def variant(src, backend):
        return compile_graph(graph_from_source(src), backend=backend).program.forward[0].variant

    assert variant(layer % "", "opencl") == "im2col"
    assert variant(layer % ", algo=tiled", "opencl") == "tiled"
    assert variant(layer % ", algo=tiled", "c") != "tiled"
    monkeypatch.setenv("CONVDSL_ALGO", "conv=tiled")
    assert variant(layer % "", "opencl") == "tiled"
    assert variant(layer % "", "c") != "tiled"


@requires_opencl
def test_opencl_tiled_finite_differences_float64():
    cases = by_ids(OPENCL_TILED_FD_CASES)
    finite_differences(compile_cases(cases, dtype="f64", algo=TILED, backend="opencl"), cases,
                       np.random.default_rng(107))

# Every kernel variant of the conv family runs every case it applies to: the plan's own choice
# in the `auto` build, each other applicable variant in a build that forces it (convdsl.load's
# `algo=`).
VARIANTS = variant_plan(CASES, ("conv", "depthwise"))


@pytest.fixture(scope="module")
def runs():
    module = compile_cases(CASES)
    rng = np.random.default_rng(101)
    net = module.Model(seed=0)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape)
    return {1: run_cases(module, CASES, 1, rng, net=net), 3: run_cases(module, CASES, 3, rng, net=net, variant=1)}


@pytest.fixture(scope="module")
def nhwc_run():
    module = compile_cases(CASES, layout="NHWC")
    return run_cases(module, CASES, 2, np.random.default_rng(102), layout="NHWC")


@pytest.fixture(scope="module")
def forced():
    return forced_runs(VARIANTS, CASES, 103)


@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("variant, index", VARIANTS.pairs, ids=VARIANTS.ids(IDS))
def test_forward_and_gradients_match_torch(runs, forced, variant, index, batch):
    run, position = variant_run(VARIANTS, runs, forced, variant, index, batch)
    compare_with_torch(run, position, CASES[index], reference)


def test_every_variant_is_run_and_applies_by_its_rule():
    """pointwise only where the input is the column matrix (1×1, stride 1, no padding before or
    after any axis), direct only with one input channel per group, im2col and blocked everywhere."""
    pointwise = {IDS[i] for v, i in VARIANTS.pairs if v == "pointwise"}
    assert {"2d-pointwise-groups", "runtime-pointwise"} <= pointwise
    assert not pointwise & {"2d-pointwise-pad-after", "1d-pointwise-pad-after", "2d-pointwise-groups-pad-after",
                            "3d-pointwise-pad-after-nobias", "runtime-pointwise-pad-after", "2d-pointwise-stride"}
    assert {IDS[i] for v, i in VARIANTS.pairs if v == "im2col"} == set(IDS)
    assert {IDS[i] for v, i in VARIANTS.pairs if v == "blocked"} == set(IDS)
    assert {IDS[i] for v, i in VARIANTS.pairs if v == "dot"} == set(IDS)
    assert {IDS[i] for v, i in VARIANTS.pairs if v == "broadcast"} == set(IDS)
    assert {IDS[i] for v, i in VARIANTS.pairs if v == "narrow"} == set(IDS)
    direct = {IDS[i] for v, i in VARIANTS.pairs if v == "direct"}
    assert {"depthwise-m1", "depthwise-m2", "conv-groups-is-channels", "3d-full-stride"} <= direct
    assert "2d-pointwise-groups" not in direct
    assert VARIANTS.forced["im2col"], "im2col is forced where the plan picks another variant"
    assert VARIANTS.forced["blocked"], "blocked is forced where the plan picks another variant"
    for winograd in ("winograd2", "winograd4"):
        runs_it = {IDS[i] for v, i in VARIANTS.pairs if v == winograd}
        assert runs_it == {c.id for c in CASES if c.ref.get("kernel") == 3 and c.ref.get("stride", 1) == 1
                           and len(c.shape) == 3}, winograd
        assert {"3x3-pairs-asymmetric-wide", "3x3-groups-flip-same", "runtime-3x3-same", "large-depth"} <= runs_it
    # FFT: stride 1 on every axis, more than one tap, sizes known when the file is checked
    runs_fft = {IDS[i] for v, i in VARIANTS.pairs if v == "fft"}
    assert runs_fft == {c.id for c in CASES if c.ref.get("stride", 1) in (1, (1,) * (len(c.shape) - 1))
                        and np.prod(c.ref["kernel"]) > 1 and c.dims is None}
    assert {"2d-dilation", "2d-pairs-wider-than-kernel", "3d-groups-pairs-nobias", "depthwise-m2",
            "depthwise-1d-wide-kernel-flip", "2d-frozen"} <= runs_fft


# Winograd in float64: each applicable case forced to each Winograd variant in the op's own
# `algo=`, so that one f64 module holds both.
WINOGRAD_CASES = tuple(
    Case(f"{c.id}-{v}", c.shape, c.op[:-1] + f", algo={v})", c.ref, c.dims)
    for v in ("winograd2", "winograd4") for i, c in enumerate(CASES)
    if (v, i) in VARIANTS.pairs and "large" not in c.id and "runtime" not in c.id)


def test_winograd_finite_differences_float64():
    assert len(WINOGRAD_CASES) >= 14
    finite_differences(compile_cases(WINOGRAD_CASES, dtype="f64"), WINOGRAD_CASES, np.random.default_rng(104))


# FFT in float64: each case it applies to (but the large ones) forced in the op's own `algo=`.
FFT_CASES = tuple(
    Case(f"{c.id}-fft", c.shape, c.op[:-1] + ", algo=fft)", c.ref, c.dims)
    for i, c in enumerate(CASES)
    if ("fft", i) in VARIANTS.pairs and "large" not in c.id and c.ref["kind"] != "separable")


def test_fft_finite_differences_float64():
    assert len(FFT_CASES) >= 20
    finite_differences(compile_cases(FFT_CASES, dtype="f64"), FFT_CASES, np.random.default_rng(108))


def test_fft_weight_gradient_by_its_spectra_finite_differences_float64(monkeypatch):
    """The FFT variant's weight gradient by the kernels' spectra, one inverse transform per
    kernel, which the plan keeps for kernels far larger than these cases' (ops/conv.py,
    fft_weight_form; the cases above run the direct stride-1 loop, or the rows form from kernels
    five wide): forced here by pricing the spectra at nothing and turning the rows form off."""
    from convdsl.ops import conv as conv_op
    assert all(conv_op.fft_direct_weights(*_fft_attrs_and_output(c)) for c in FFT_CASES)
    monkeypatch.setattr(conv_op, "FFT_SPECTRA_GRADIENT_WEIGHT", 0)
    monkeypatch.setattr(conv_op, "FFT_ROWS_MIN_WIDTH", 10 ** 9)
    assert {conv_op.fft_weight_form(*_fft_attrs_and_output(c)) for c in FFT_CASES} == {"spectra"}
    module = convdsl.load_source(source(FFT_CASES, "f64", "NCHW"))
    finite_differences(module, FFT_CASES, np.random.default_rng(109))


def test_fft_weight_gradient_by_rows_matches_torch_and_finite_differences(monkeypatch):
    """The FFT variant's weight gradient by DFTs of the rows (lib/fft's
    cdsl_fft_rows_weight_gradient), which the plan takes for kernels of one or two dims at least
    FFT_ROWS_MIN_WIDTH wide: forced here on every such case by a least width of 1 (kernels of
    one tap across, dilations, groups, flip, odd and even row lengths), in f32 against PyTorch and
    in float64 by finite differences."""
    from convdsl.ops import conv as conv_op
    monkeypatch.setattr(conv_op, "FFT_ROWS_MIN_WIDTH", 1)
    cases = tuple(c for c in FFT_CASES if conv_op.fft_weight_form(*_fft_attrs_and_output(c)) == "rows")
    assert len(cases) >= 15
    finite_differences(convdsl.load_source(source(cases, "f64", "NCHW")), cases, np.random.default_rng(118))
    module = convdsl.load_source(source(cases))
    for batch in (1, 3):
        run = run_cases(module, cases, batch, np.random.default_rng(119 + batch))
        for position, case in enumerate(cases):
            compare_with_torch(run, position, case, reference)


def test_fft_weight_gradient_by_rows_on_channel_panels_of_two_vectors():
    """The rows form's products take two vectors of input channels at a time: 20 input channels
    (two vectors of 16 in f32, padded) into 21 outputs, a 3×7 kernel dilated along the width,
    asymmetric pads, batch 3, on one thread and two, against PyTorch in float64."""
    src = ("network R {\n input x: [20, 13, 17]\n"
           " y = x -> conv(21, kernel=(3, 7), pad=((1, 2), (3, 2)), dilation=(1, 2), algo=fft)\n output y\n}\n")
    from convdsl.ops import conv as conv_op
    graph = graph_from_source(src)
    node = graph.nodes[0]
    assert conv_op.fft_weight_form(node.attrs, graph.values[node.output].type, conv_op.fft_grid(node.attrs)) == "rows"
    module = convdsl.load_source(src)
    rng = np.random.default_rng(120)
    x = rng.standard_normal((3, 20, 13, 17)).astype(np.float32)
    for threads in (1, 2):
        net = module.Model(seed=0, threads=threads)
        net.train()
        y = net.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = net.backward(dy)
        p = torch_params(net)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        yt = F.conv2d(pad_spatial(xt, ((1, 2), (3, 2))), p["conv1.weight"], p["conv1.bias"], dilation=(1, 2))
        yt.backward(torch.tensor(dy, dtype=torch.float64))
        assert_close(y, yt.detach().numpy(), what="y")
        assert_close(dx, xt.grad.numpy(), what="dx")
        for name, t in p.items():
            assert_close(net.grads[name], t.grad.numpy(), what=f"d{name}")


def _fft_attrs_and_output(case):
    """A case's conv attributes, output type and FFT grid, as the plan sees them."""
    graph = graph_from_source(source((case,)))
    node = next(n for n in graph.nodes if n.op in ("conv", "depthwise"))
    out = next(v.type for v in graph.values if v.id == node.output)
    from convdsl.ops import conv as conv_op
    return node.attrs, out, conv_op.fft_grid(node.attrs)


# `blocked` runs as a direct tile loop for a reduction of at most BLOCKED_DIRECT_DEPTH input
# channels × taps and as the packed GEMM over the padded copy past it (lib/conv_blocked): the
# cases here are nearly all short, so the GEMM form is forced by setting the bound to 0.
BLOCKED_CASES = [i for v, i in VARIANTS.pairs if v == "blocked"]


@pytest.fixture(scope="module")
def blocked_as_gemm():
    from convdsl.ops import conv as conv_op
    cases = [CASES[i] for i in BLOCKED_CASES]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_op, "BLOCKED_DIRECT_DEPTH", 0)
        assert not any(conv_op.blocked_direct(_fft_attrs_and_output(c)[0]) for c in cases)
        modules = {key: compile_cases(cases, dtype=dtype, layout=layout, algo=VARIANTS.force("blocked"))
                   for key, dtype, layout in (("f32", "f32", "NCHW"), ("nhwc", "f32", "NHWC"), ("f64", "f64", "NCHW"))}
    return cases, modules


@pytest.mark.parametrize("batch", (1, 3))
def test_blocked_as_the_gemm_matches_torch(blocked_as_gemm, batch):
    cases, modules = blocked_as_gemm
    assert len(cases) >= 40
    rng = np.random.default_rng(111)
    run = run_cases(modules["f32"], cases, batch, rng, variant=int(batch == 3))
    for position, case in enumerate(cases):
        compare_with_torch(run, position, case, reference)
    nhwc = run_cases(modules["nhwc"], cases, 2, rng, layout="NHWC")
    for position, case in enumerate(cases):
        compare_with_torch(nhwc, position, case, reference)


def test_blocked_as_the_gemm_finite_differences_float64(blocked_as_gemm):
    cases, modules = blocked_as_gemm
    finite_differences(modules["f64"], cases, np.random.default_rng(112))


# `direct` (one input channel per group) runs across channels on a small map (direct_across)
# and plane by plane past it; the plane loop is forced on every case by setting the bound to 0.
DIRECT_CASES = [i for v, i in VARIANTS.pairs if v == "direct"]


def _direct_across(case):
    from convdsl.ops import conv as conv_op
    graph = graph_from_source(source((case,)))
    node = next(n for n in graph.nodes if n.op in ("conv", "depthwise"))
    in_types = tuple(graph.values[v].type for v in node.inputs)
    return conv_op.direct_across(node.attrs, in_types, graph.values[node.output].type)


def test_direct_runs_across_channels_on_small_maps_and_plane_by_plane_past_them():
    across = [CASES[i].id for i in DIRECT_CASES if _direct_across(CASES[i]) is not None]
    planes = [CASES[i].id for i in DIRECT_CASES if _direct_across(CASES[i]) is None]
    assert len(across) >= 8 and len(planes) >= 8, (across, planes)


@pytest.fixture(scope="module")
def direct_by_planes():
    from convdsl.ops import conv as conv_op
    cases = [CASES[i] for i in DIRECT_CASES]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_op, "DIRECT_ACROSS_CELLS", 0)
        assert not any(_direct_across(c) for c in cases)
        modules = {key: compile_cases(cases, dtype=dtype, layout=layout, algo=VARIANTS.force("direct"))
                   for key, dtype, layout in (("f32", "f32", "NCHW"), ("f64", "f64", "NCHW"))}
    return cases, modules


@pytest.mark.parametrize("batch", (1, 3))
def test_direct_plane_by_plane_matches_torch(direct_by_planes, batch):
    cases, modules = direct_by_planes
    rng = np.random.default_rng(113)
    run = run_cases(modules["f32"], cases, batch, rng, variant=int(batch == 3))
    for position, case in enumerate(cases):
        compare_with_torch(run, position, case, reference)


@pytest.mark.parametrize("variant", ("direct", "winograd2", "winograd4", "dot"))
def test_variants_built_as_users_get_them_match_torch(optimised, variant):
    """The suite builds at -O0; the cases of the variants whose kernels gcc vectorizes hardest
    once more at -O3, at batch 1 and 2: its loop vectorizer once summed the depthwise grids'
    rows wrongly in dX (depthwise-6x6-one-block) that every -O0 and -O1 build had right."""
    cases = [CASES[i] for v, i in VARIANTS.pairs if v == variant]
    module = convdsl.load_source(source(cases), algo=VARIANTS.force(variant))
    for batch in (1, 2):
        run = run_cases(module, cases, batch, np.random.default_rng(115 + batch))
        for position, case in enumerate(cases):
            compare_with_torch(run, position, case, reference)


def test_direct_plane_by_plane_finite_differences_float64(direct_by_planes):
    cases, modules = direct_by_planes
    finite_differences(modules["f64"], cases, np.random.default_rng(114))


def test_fft_applies_by_its_rule():
    """algo=fft refuses a stride, a single tap and sizes known at run time only, saying what it needs."""
    for shape, op in (("[2, 9, 9]", "conv(3, kernel=3, stride=2, algo=fft)"),
                      ("[2, 9, 9]", "conv(3, kernel=1, algo=fft)"),
                      ("[2, H, W]", "conv(3, kernel=3, pad=same, algo=fft)")):
        with pytest.raises(convdsl.ConvDSLError, match="algo=fft does not apply.*stride 1"):
            convdsl.load_source(f"network F {{\n input x: {shape}\n y = x -> {op}\n output y\n}}\n")


def test_winograd_remakes_its_kernels_when_the_weights_change():
    """The forward keeps its transformed kernels across calls: a write into Model.params, a
    train_step and a load must each be seen by the next forward."""
    src = ("network W {\n input x: [5, 8, 7]\n y = x -> conv(6, kernel=3, pad=same, algo=winograd4) -> relu"
           " -> conv(4, kernel=3, pad=((0, 2), (1, 0)), algo=winograd2)\n output y\n loss mse(y)\n}\n")
    _remakes_kernels(src, ("conv1.weight", "conv2.weight"))


def test_fft_remakes_its_spectra_when_the_weights_change():
    """The FFT variant keeps its kernels' spectra across calls, as Winograd its kernels."""
    src = ("network W {\n input x: [5, 8, 7]\n y = x -> conv(6, kernel=3, pad=same, algo=fft) -> relu"
           " -> conv(4, kernel=3, pad=((0, 2), (1, 0)), algo=fft)\n output y\n loss mse(y)\n}\n")
    _remakes_kernels(src, ("conv1.weight", "conv2.weight"))


def _remakes_kernels(src, weights):
    net = convdsl.load_source(src).Model(seed=0)
    rng = np.random.default_rng(105)
    x = rng.standard_normal((2, 5, 8, 7)).astype(np.float32)

    def expected():
        p = torch_params(net)
        h = F.relu(F.conv2d(torch.tensor(x, dtype=torch.float64), p["conv1.weight"], p["conv1.bias"], padding=1))
        return F.conv2d(pad_spatial(h, ((0, 2), (1, 0))), p["conv2.weight"], p["conv2.bias"]).detach().numpy()

    assert_close(net.forward(x), expected(), what="first forward")
    for name in weights:
        net.params[name][...] = rng.standard_normal(net.params[name].shape)
        assert_close(net.forward(x), expected(), what=f"after writing {name}")
    net.train()
    net.train_step(x, rng.standard_normal((2, 4, 8, 6)).astype(np.float32), lr=0.1)
    net.eval()
    assert_close(net.forward(x), expected(), what="after a train_step")


def two_backwards_match_torch(net, seed, batches, in_dims, out_dims, torch_forward):
    """For each batch in turn a forward, then two backwards of it, each compared with PyTorch in
    float64 (dX and every parameter gradient): `torch_forward(x, params)` is the reference
    network. A kernel that added into a gradient it should write would double what the call
    before it left there."""
    net.train()
    rng = np.random.default_rng(seed)
    for batch in batches:
        x = rng.standard_normal((batch, *in_dims)).astype(np.float32)
        net.forward(x)
        for _ in range(2):
            dy = rng.standard_normal((batch, *out_dims)).astype(np.float32)
            dx = net.backward(dy)
            p = torch_params(net)
            xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
            torch_forward(xt, p).backward(torch.tensor(dy, dtype=torch.float64))
            assert_close(dx, xt.grad.numpy(), what=f"dx at batch {batch}")
            for name, t in p.items():
                assert_close(net.grads[name], t.grad.numpy(), what=f"d{name} at batch {batch}")


WRITES_DX = """
network W {
    input x: [4, 9, 9]
    a = x -> conv(6, kernel=3, pad=1, algo=winograd4) -> relu
    b = a -> depthwise(3, pad=1) -> relu
    c = b -> conv(6, kernel=3, pad=((2, 2), (1, 3)), dilation=2, algo=winograd2)
    y = add(c, a) -> depthwise(3, pad=1)
    output y
}
"""


def test_backwards_that_write_their_input_gradient_match_torch():
    """Winograd's dX and the direct depthwise dX at stride 1 write their input's gradient instead of
    adding into it where their step is the first to touch it (the plan's Step.writes_first), which
    then is not zeroed (as the element-wise activations' backwards do): here every conv, depthwise
    and relu but depthwise1, whose input `a` add1 reaches first, in memory that held other
    tensors before. Two backwards of one forward, then another
    forward, each against PyTorch."""
    module = convdsl.load_source(WRITES_DX)
    program = compile_graph(graph_from_source(WRITES_DX)).program
    written = {s.label for s in program.backward if s.writes_first}
    assert written == {"conv1", "relu1", "relu2", "depthwise2", "conv2"}, written

    def reference(xt, p):
        a = F.relu(F.conv2d(xt, p["conv1.weight"], p["conv1.bias"], padding=1))
        b = F.relu(F.conv2d(a, p["depthwise1.weight"], p["depthwise1.bias"], padding=1, groups=6))
        c = F.conv2d(pad_spatial(b, ((2, 2), (1, 3))), p["conv2.weight"], p["conv2.bias"], dilation=2)
        return F.conv2d(c + a, p["depthwise2.weight"], p["depthwise2.bias"], padding=1, groups=6)

    two_backwards_match_torch(module.Model(seed=0), 117, (2, 2), (4, 9, 9), (6, 9, 9), reference)


POINTWISE_WRITES_DX = """
network P {
    input x: [8, 9, 9]
    a = x -> conv(8, kernel=1, groups=2, algo=pointwise) -> relu -> maxpool(3)
    b = a -> conv(12, kernel=1, algo=dot) -> relu -> conv(8, kernel=1, algo=narrow)
    c = b -> conv(8, kernel=1, groups=4, algo=broadcast)
    y = add(c, b)
    output y
}
"""


def test_pointwise_backwards_that_write_their_input_gradient_match_torch():
    """A 1×1 conv's dX is one product per sample and group, written whole where its step is the
    first to touch it: the pointwise GEMM on 9² (grouped), the narrow tiles of dot's and
    narrow's backward on 3²; conv4, whose input `b` add1 reaches first, adds. Two backwards of
    one forward, then another forward, each against PyTorch in float64."""
    module = convdsl.load_source(POINTWISE_WRITES_DX)
    program = compile_graph(graph_from_source(POINTWISE_WRITES_DX)).program
    written = {s.label for s in program.backward if s.writes_first}
    assert written == {"conv1", "relu1", "conv2", "relu2", "conv3"}, written

    def reference(xt, p):
        a = F.max_pool2d(F.relu(F.conv2d(xt, p["conv1.weight"], p["conv1.bias"], groups=2)), 3)
        b = F.conv2d(F.relu(F.conv2d(a, p["conv2.weight"], p["conv2.bias"])), p["conv3.weight"], p["conv3.bias"])
        return F.conv2d(b, p["conv4.weight"], p["conv4.bias"], groups=4) + b

    two_backwards_match_torch(module.Model(seed=0), 118, (2, 2), (8, 9, 9), (8, 3, 3), reference)


PARAM_GRADS_WRITTEN = """
network G {
    input x: [3, 16, 16]
    layer S = conv(4, kernel=1)
    a = x -> conv(32, kernel=3, pad=1, algo=im2col) -> relu
    b = a -> conv(8, kernel=3, pad=1, algo=winograd2) -> relu
    c = b -> conv(8, kernel=3, stride=4, pad=1, algo=im2col) -> relu
    d = c -> conv(8, kernel=1, algo=pointwise) -> conv(6, kernel=3, pad=1, algo=dot)
    e = d -> conv(4, kernel=1, algo=narrow) -> S -> relu -> S
    y = e -> flatten -> dense(5)
    output y
}
"""


def test_backwards_that_write_their_parameter_gradients_match_torch():
    """Where a layer is not shared, its backward writes dW and db at their first contribution
    and the backward's start no longer zeroes them (Step.writes_param_grads): im2col's per-sample
    GEMM (on one thread, and split over the batch across two: conv1, whose first thread's share
    is copied), its batched backward over several samples (conv3 on 4²), Winograd's transform
    back, pointwise, dot, narrow and dense; the shared S, which two steps add into, is still
    zeroed. Batches 1, 3 and 2, two backwards of each forward, against PyTorch in float64:
    a kernel that still added would double what the last call left."""
    module = convdsl.load_source(PARAM_GRADS_WRITTEN)
    program = compile_graph(graph_from_source(PARAM_GRADS_WRITTEN)).program
    written = {s.label for s in program.backward if s.writes_param_grads}
    assert written == {"conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "dense1"}, written
    s_grads = {(p.offset, p.size) for p in program.params if p.layer.name == "S"}
    zeroed = program.zeroed_param_grads()
    assert all(any(o >= z and o + n <= z + m for z, m in zeroed) for o, n in s_grads), (s_grads, zeroed)

    def reference(xt, p):
        a = F.relu(F.conv2d(xt, p["conv1.weight"], p["conv1.bias"], padding=1))
        b = F.relu(F.conv2d(a, p["conv2.weight"], p["conv2.bias"], padding=1))
        c = F.relu(F.conv2d(b, p["conv3.weight"], p["conv3.bias"], stride=4, padding=1))
        d = F.conv2d(F.conv2d(c, p["conv4.weight"], p["conv4.bias"]), p["conv5.weight"], p["conv5.bias"], padding=1)
        e = F.conv2d(d, p["conv6.weight"], p["conv6.bias"])
        e = F.conv2d(F.relu(F.conv2d(e, p["S.weight"], p["S.bias"])), p["S.weight"], p["S.bias"])
        return F.linear(e.flatten(1), p["dense1.weight"], p["dense1.bias"])

    two_backwards_match_torch(module.Model(seed=0, threads=2), 119, (1, 3, 2), (3, 16, 16), (5,), reference)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_nhwc_layout_matches_torch(nhwc_run, index):
    compare_with_torch(nhwc_run, index, CASES[index], reference)


def test_frozen_case_has_no_gradient_entries(runs):
    index = IDS.index("2d-frozen")
    assert f"L{index}.weight" in runs[1].params and f"L{index}.bias" in runs[1].params
    assert not any(name.startswith(f"L{index}.") for name in runs[1].grads)


def test_parameter_shapes_follow_the_reference():
    meta = module_meta(graph_from_source(source(CASES)))
    shapes = {name: shape for name, shape, _ in meta["params"]}
    assert shapes[f"L{IDS.index('2d-groups-dilation-stride')}.weight"] == (9, 2, 3, 3)
    assert f"L{IDS.index('2d-groups-dilation-stride')}.bias" not in shapes
    assert shapes[f"L{IDS.index('depthwise-m2')}.weight"] == (4, 1, 3, 2)
    assert shapes[f"L{IDS.index('3d-flip')}.weight"] == (2, 2, 2, 3, 2)
    sep = IDS.index("separable-2d")
    assert {k: v for k, v in shapes.items() if k.startswith(f"L{sep}.")} == {
        f"L{sep}.dw.weight": (4, 1, 3, 3), f"L{sep}.pw.weight": (5, 4, 1, 1), f"L{sep}.pw.bias": (5,)}
    sep1 = IDS.index("separable-1d-dilated-nobias")
    assert {k: v for k, v in shapes.items() if k.startswith(f"L{sep1}.")} == {
        f"L{sep1}.dw.weight": (3, 1, 3), f"L{sep1}.pw.weight": (2, 3, 1)}



# ---- frozen layers, const weights, initialisers, names ----------------------------------

SETUP = """
network K {
    input x: [2, 6, 6]
    input big: [64, 3, 3]
    const sobel = [[[[1, 0, -1], [2, 0, -2], [1, 0, -1]], [[0, 1, 0], [1, -4, 1], [0, 1, 0]]]]
    e = x -> conv(1, kernel=3, weight=sobel, bias=false)
    f = x -> conv(1, kernel=3, weight=sobel, flip=true, frozen=true)
    h = x -> conv(4, kernel=3, pad=same, frozen=true) -> relu -> dense(3)
    a = big -> conv(64, kernel=3)
    b = big -> conv(64, kernel=3, init=xavier)
    c = big -> conv(64, kernel=3, init=normal(0.05))
    d = big -> conv(64, kernel=3, init=uniform(0.3))
    z = big -> conv(8, kernel=1, init=zeros)
    o = big -> conv(8, kernel=1, init=ones)
    g = big -> dense(300)
    s = big -> separable(16, kernel=3, init=ones)
    gq = big -> conv(64, kernel=3, groups=4)
    dq = big -> depthwise(3, multiplier=4)
    output h, e, f, a, b, c, d, z, o, g, s, gq, dq
    loss mse(h)
}
"""
SOBEL = np.array([[[[1, 0, -1], [2, 0, -2], [1, 0, -1]], [[0, 1, 0], [1, -4, 1], [0, 1, 0]]]], dtype=np.float32)


@pytest.fixture(scope="module")
def setup_module_(backend):
    """On each backend: the parameters' names, const weights, frozen layers and initialisers are
    the host's on OpenCL too (create, the optimizer), over device kernels."""
    return convdsl.load_source(SETUP, backend=backend)


def test_names_and_order_of_parameters(setup_module_):
    net = setup_module_.Model(seed=0)
    assert list(net.params) == [
        "conv1.weight", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias", "dense1.weight", "dense1.bias",
        "conv4.weight", "conv4.bias", "conv5.weight", "conv5.bias", "conv6.weight", "conv6.bias",
        "conv7.weight", "conv7.bias", "conv8.weight", "conv8.bias", "conv9.weight", "conv9.bias",
        "dense2.weight", "dense2.bias", "separable1.dw.weight", "separable1.pw.weight", "separable1.pw.bias",
        "conv10.weight", "conv10.bias", "depthwise1.weight", "depthwise1.bias"]
    frozen = {"conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias"}
    assert list(net.grads) == [k for k in net.params if k not in frozen]
    assert net.params["dense2.weight"].shape == (300, 64 * 9)


def test_const_weights_land_in_params_and_compute_like_torch(setup_module_):
    net = setup_module_.Model(seed=0)
    np.testing.assert_array_equal(net.params["conv1.weight"], SOBEL)
    np.testing.assert_array_equal(net.params["conv2.weight"], SOBEL)
    np.testing.assert_array_equal(net.params["conv2.bias"], [0])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    big = rng.standard_normal((2, 64, 3, 3)).astype(np.float32)
    outs = net.forward(x, big)
    xt = torch.tensor(x, dtype=torch.float64)
    w = torch.tensor(SOBEL, dtype=torch.float64)
    assert_close(outs[1], F.conv2d(xt, w).numpy(), what="const kernel")
    assert_close(outs[2], F.conv2d(xt, torch.flip(w, dims=(2, 3))).numpy(), what="const kernel, flipped")


def test_frozen_layers_pass_gradients_but_do_not_train(setup_module_):
    net = setup_module_.Model(seed=2)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    big = rng.standard_normal((3, 64, 3, 3)).astype(np.float32)
    outs = net.forward(x, big)
    dys = [rng.standard_normal(o.shape).astype(np.float32) for o in outs]
    dx, _ = net.backward(*dys)
    p = torch_params(net, ("conv1.weight", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias",
                           "dense1.weight", "dense1.bias"))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    h = F.linear(F.relu(F.conv2d(xt, p["conv3.weight"], p["conv3.bias"], padding=1)).flatten(1),
                 p["dense1.weight"], p["dense1.bias"])
    e = F.conv2d(xt, p["conv1.weight"])
    f = F.conv2d(xt, torch.flip(p["conv2.weight"], dims=(2, 3)), p["conv2.bias"])
    total = sum((t * torch.tensor(d, dtype=torch.float64)).sum() for t, d in zip((h, e, f), dys))
    total.backward()
    assert_close(dx, xt.grad.numpy(), what="input gradient through frozen convs")
    for name in ("conv1.weight", "dense1.weight", "dense1.bias"):
        assert_close(net.grads[name], p[name].grad.numpy(), what=name)

    before = {k: v.copy() for k, v in net.params.items()}
    net.train_step(x, big, rng.standard_normal((3, 3)).astype(np.float32), lr=0.5)
    for name in ("conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias"):
        np.testing.assert_array_equal(net.params[name], before[name], err_msg=name)
    assert not np.array_equal(net.params["dense1.weight"], before["dense1.weight"])


def test_initialisers_have_the_documented_statistics(setup_module_):
    p = setup_module_.Model(seed=1).params
    fan_in = fan_out = 64 * 9
    he = p["conv4.weight"]
    assert abs(he.std() / np.sqrt(2 / fan_in) - 1) < 0.1
    assert abs(he.mean()) < 0.1 * np.sqrt(2 / fan_in)
    bound = np.sqrt(6 / (fan_in + fan_out))
    xav = p["conv5.weight"]
    assert -bound <= xav.min() and xav.max() <= bound
    assert abs(xav.std() / (bound / np.sqrt(3)) - 1) < 0.1
    assert abs(p["conv6.weight"].std() / 0.05 - 1) < 0.1
    uni = p["conv7.weight"]
    assert -0.3 <= uni.min() and uni.max() <= 0.3 and abs(uni.std() / (0.3 / np.sqrt(3)) - 1) < 0.1
    assert np.all(p["conv8.weight"] == 0) and np.all(p["conv9.weight"] == 1)
    assert abs(p["dense2.weight"].std() / np.sqrt(2 / 576) - 1) < 0.1
    assert np.all(p["separable1.dw.weight"] == 1) and np.all(p["separable1.pw.weight"] == 1)
    for name in ("conv4.bias", "conv5.bias", "dense2.bias", "separable1.pw.bias"):
        assert np.all(p[name] == 0), name


def test_he_uses_the_fan_in_of_one_group(setup_module_):
    p = setup_module_.Model(seed=4).params
    assert p["conv10.weight"].shape == (64, 16, 3, 3) and p["depthwise1.weight"].shape == (256, 1, 3, 3)
    assert abs(p["conv10.weight"].std() / np.sqrt(2 / (16 * 9)) - 1) < 0.1
    assert abs(p["depthwise1.weight"].std() / np.sqrt(2 / 9) - 1) < 0.1


def test_nhwc_conv_on_channel_last_arrays_matches_torch():
    """The NHWC layout end to end with the user's own arrays: input [N, H, W, C], output likewise."""
    module = convdsl.load_source("network L {\n layout NHWC\n input x: [7, 6, 3]\n"
                                 " y = x -> conv(4, kernel=(3, 2), stride=(2, 1), pad=same)\n output y\n}\n")
    net = module.Model(seed=3)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    y = net.forward(x)
    assert y.shape == (2, 4, 6, 4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy)
    p = torch_params(net)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = F.conv2d(pad_spatial(xt.permute(0, 3, 1, 2), ((1, 1), (0, 1))), p["conv1.weight"], p["conv1.bias"],
                  stride=(2, 1)).permute(0, 2, 3, 1)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(y, yt.detach().numpy(), what="forward")
    assert_close(dx, xt.grad.numpy(), what="input gradient")
    assert_close(net.grads["conv1.weight"], p["conv1.weight"].grad.numpy(), what="weight gradient")


# broadcast and narrow in float64 (lib/gemm's double tiles, 8 lanes at AVX-512: other tile
# widths and packed squares than f32's): each case the variant applies to (but the large ones,
# whose losses sum too many terms for a central difference's rounding) forced in the op's own
# `algo=`.
def forced_cases(variant: str) -> tuple:
    return tuple(Case(f"{c.id}-{variant}", c.shape, c.op[:-1] + f", algo={variant})", c.ref, c.dims)
                 for i, c in enumerate(CASES)
                 if (variant, i) in VARIANTS.pairs and c.ref["kind"] != "separable" and "large" not in c.id)


@pytest.mark.parametrize("variant, seed", [("broadcast", 109), ("narrow", 113)])
def test_few_column_products_finite_differences_float64(variant, seed):
    cases = forced_cases(variant)
    assert len(cases) >= 40
    finite_differences(compile_cases(cases, dtype="f64"), cases, np.random.default_rng(seed))


@pytest.mark.parametrize("algo", ["im2col", "winograd2", "broadcast"])
def test_a_shared_layer_gets_the_sum_of_its_uses_whatever_the_gradients_held(algo):
    """A layer applied twice gets the sum of both uses' gradients, a layer used once its own. With
    every gradient NaN before each backward, one that the backward reads before zeroing it
    shows, and the second backward must not add to the first's."""
    src = (f"network S {{\n input x: [3, 6, 6]\n layer U = conv(3, kernel=3, pad=same, algo={algo})\n"
           f" y = x -> conv(3, kernel=3, pad=same, algo={algo}) -> U -> relu -> U -> dense(5)\n output y\n}}\n")
    net = convdsl.load_source(src).Model(seed=1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    y = net.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    for _ in range(2):
        spoil_gradients(net)
        net.backward(dy)
    p = torch_params(net)
    xt = torch.tensor(x, dtype=torch.float64)
    h = F.conv2d(xt, p["conv1.weight"], p["conv1.bias"], padding=1)
    h = F.conv2d(F.relu(F.conv2d(h, p["U.weight"], p["U.bias"], padding=1)), p["U.weight"], p["U.bias"], padding=1)
    out = F.linear(h.flatten(1), p["dense1.weight"], p["dense1.bias"])
    (out * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    for name, t in p.items():
        assert_close(net.grads[name], t.grad.numpy(), what=name)
