"""conv, depthwise and separable: the convolution family of §1.2 and §3.8.

conv computes cross-correlation as every DL library does; flip=true is the mathematical
convolution (§1.1.1): the kernel is read reversed along every spatial axis.
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Init, ParamSpec, TensorType
from .base import (INPUTS, Arg, ConstTensor, OpContext, OpDef, Symbol, Variant, WorkGroupTile, describe_value, expect_bool,
                   expect_int, expect_symbol, init_arg, parse_init, register)
from .spatial import (PAD_MODES, effective_kernel, input_rank_check, output_sizes, pad_arg, pad_mode_arg, per_axis,
                      resolve_padding, window_context)

ALGOS = ("auto", "im2col", "pointwise", "broadcast", "narrow", "direct", "blocked", "winograd2", "winograd4", "dot",
         "separable", "tiled", "fft")

_WINDOW_ARGS = (
    Arg("stride", 1), pad_arg(), Arg("dilation", 1),
)
_LAYER_ARGS = (
    Arg("bias", True), Arg("flip", False), init_arg(), Arg("frozen", False),
    Arg("weight", None), Arg("algo", Symbol("auto"), symbols=ALGOS), pad_mode_arg(),
)


def explicit_padding(op: str, builder, x, attrs: dict, ctx: OpContext):
    """(input, attributes) of a convolution whose padding is filled as `pad_mode` says: with
    zeros, unchanged (the kernels skip the padded cells); reflect or replicate, a pad layer
    `<label>.pad` first (ops/pad.py) and the convolution then without padding, which gives the
    same output size (out = (in + before + after − keff) // stride + 1 either way)."""
    mode = expect_symbol(attrs["pad_mode"], PAD_MODES, ctx, "pad_mode")
    if mode == "zeros":
        return x, attrs
    t = builder.type_of(x)
    rank = input_rank_check(op, t, ctx)
    kernel = per_axis(attrs["kernel"], rank, ctx, "kernel")
    stride = per_axis(attrs["stride"], rank, ctx, "stride")
    dilation = per_axis(attrs["dilation"], rank, ctx, "dilation")
    pads = resolve_padding(attrs["pad"], t.spatial, kernel, stride, dilation, ctx)
    if not all(isinstance(p, int) for pair in pads for p in pair):
        raise ctx.error(f"pad_mode={mode} needs padding known at check time, but pad={describe_value(attrs['pad'])} "
                        f"depends on the run-time size of {ctx.shape_text(t)}", arg="pad")
    rest = {**attrs, "pad": Symbol("valid"), "pad_mode": Symbol("zeros")}
    if all(p == 0 for pair in pads for p in pair):
        return x, rest
    padded = builder.apply_primitive("pad", (x,), {"pad": tuple(pads), "mode": Symbol(mode)}, ctx, "pad")
    return padded, rest


def _kernel_text(k: tuple[int, ...]) -> str:
    return "×".join(map(str, k))


# lib/gemm's micro-tile: at most 8 rows (CDSL_MR) by 32 columns (CDSL_NR: two AVX-512 vectors of
# f32; AVX2 and narrower targets use fewer of both): the units `blocked`'s products are counted
# in (a tile computes all its rows and columns), and the slack each phase plane of its padded
# copy keeps.
BLOCKED_MAX_ROWS = 8
BLOCKED_MAX_COLS = 32
# A sample's GEMM splits across threads from this many multiply-adds on (ParallelSplit.
# gemm_threshold; the backward's GEMMs take it too). Measured on the 2-core Xeon, 2 threads,
# LeNet-5's convs (1→6 5×5 on 28², 117,600 MACs; 6→16 5×5 on 14², 240,000): split, each ran as
# long as on one thread or longer, and the maxpool after it ~2× longer for reading the other
# core's half; at batch 1 the forward took 34 µs split, 26 µs not (benchmarks/RESULTS.md).
BLOCKED_SPLIT_MACS = 1_000_000


# ---- kernel variants: applicability on the attributes, cost in element operations per sample ----

def _is_pointwise(attrs) -> bool:
    """A 1×1 window at stride 1 with no zeros before or after on any axis: the input itself
    is the column matrix. Padding at the end alone still makes the output bigger than the input."""
    return all(k == 1 for k in attrs["kernel"]) and all(s == 1 for s in attrs["stride"]) \
        and all(before == 0 and after == 0 for before, after in attrs["pads"])


def _one_channel_per_group(attrs) -> bool:
    return attrs["in"] == attrs["groups"]


# Backwards that can write their input's gradient whole (Variant.writes_input_grad): Winograd's dX
# tiles cover it, each element once; the direct loop's dX at stride 1 is one correlation per
# input channel, and with one output channel per input channel the only one that reaches it.
def _always_writes(attrs) -> bool:
    return True


def _direct_writes_dx(attrs) -> bool:
    return attrs["out"] == attrs["in"] and all(s == 1 for s in attrs["stride"])


# A 1×1 conv's dX is one product per sample and group, Wᵀ · dY, over that group's channels of
# dX: each element written once where the product is stored rather than added (1×1 256 → 64 on
# 28², training at batch 1: the 800 KB zeroing of dX before it and the GEMM's read of it gone).
# Any variant whose backward is the pointwise one (conv.c.j2's direct_input).
_POINTWISE_WRITES_DX = (("c", _is_pointwise),)

# The backward of every variant in conv.c.j2 writes dW and db at their first contribution where
# the plan lets it (Step.writes_param_grads): the first sample's GEMM stores them, the first
# thread's share is copied rather than added, Winograd's one transform back over the batch stores.
_PARAM_GRADS_WRITTEN_ON = ("c",)


def _gemm_work(attrs, columns):
    # A GEMM of few rows per group (COG) pays its packing and loop overhead on every row, and its
    # micro-tiles compute whole panels of columns (positions): 32 wide with AVX-512, so a small
    # map (a 4×4 one: 16 positions) wastes half of every tile.
    rows = attrs["out"] // attrs["groups"]
    tiled = D.mul(D.floordiv(D.add(columns, BLOCKED_MAX_COLS - 1), BLOCKED_MAX_COLS), BLOCKED_MAX_COLS)
    macs = D.mul(attrs["in"] // attrs["groups"] * D.product(attrs["kernel"]) * attrs["out"], tiled)
    return D.add(macs, D.floordiv(D.mul(macs, 4), rows))


def _gemm_cost(in_types, out, attrs):
    return _gemm_work(attrs, D.product(out.spatial))


def _columns(in_types, out, attrs):
    return D.mul(attrs["in"] * D.product(attrs["kernel"]), D.product(out.spatial))


def _own_gradients(in_types, out, attrs):
    # dW and db of one thread, added up in thread order after the batch loop.
    return attrs["out"] * (attrs["in"] // attrs["groups"]) * D.product(attrs["kernel"]) + attrs["out"]


def _columns_and_gradients(in_types, out, attrs):
    return D.add(_columns(in_types, out, attrs), _own_gradients(in_types, out, attrs))


# A reduction of at most this many input channels per group × taps runs `blocked` as its direct
# tile loop, a longer one as the packed GEMM (lib/conv_blocked says why). The two forms of one
# layer timed alternately (eval forward, L2 flushed between calls, one AVX-512 core), GEMM over
# loop: 6 → 16 5×5 on 14² (150) 1.18 at batch 1 and 1.45 at 64 (the GEMM's packing and staging
# per sample); 16 → 32 and 32 → 64 3×3 on 32² (144, 288) 1.20 and 1.10; stride-2 3×3 of 576 and
# 288 on 32² and 64² 1.00; ResNet's stride-2 128 → 256 on 28² (1,152) 0.87 (0.74 warm).
BLOCKED_DIRECT_DEPTH = 576


def blocked_direct(attrs) -> bool:
    """Whether `blocked` runs as its direct tile loop (else as the GEMM over the padded copy)."""
    return attrs["in"] // attrs["groups"] * D.product(attrs["kernel"]) <= BLOCKED_DIRECT_DEPTH


def _blocked_workspace(in_types, out, attrs):
    """One sample's input, zero-padded and split by phase along every axis (lib/conv_blocked),
    each phase with a panel's width of slack, and beside it either the weights packed for the
    direct loop (every group's channels rounded up to whole blocks of rows) or one depth slice's
    product over the grid (its output channels × the slice's grid positions); the backward
    (im2col's) reuses the same memory for its column matrix."""
    k, s, r = attrs["kernel"], attrs["stride"], attrs["dilation"]
    groups, cig, cog = attrs["groups"], attrs["in"] // attrs["groups"], attrs["out"] // attrs["groups"]
    grid_axes = [D.add(o, (kk - 1) * rr // st) for o, kk, st, rr in zip(out.spatial, k, s, r)]
    padded = D.mul(attrs["in"] * D.product(s), D.add(D.product(grid_axes), BLOCKED_MAX_COLS))
    if blocked_direct(attrs):
        beside = groups * (cog + BLOCKED_MAX_ROWS - 1) * cig * D.product(k)
    else:
        beside = D.mul(cog, D.product(grid_axes[-2:]))
    return D.maximum(D.add(padded, beside), _columns(in_types, out, attrs))


def _blocked_cost(in_types, out, attrs):
    # The multiply-adds over the grid's positions, (OH − 1)·WQ + OW per depth slice, in whole
    # tiles of rows and columns (the columns past each output row's end, the window's reach,
    # included): on a small map those are half as many again (8² under a 3×3: 78 positions,
    # three panels where im2col fills two). Measured against im2col on one AVX-512 core (20 conv shapes of
    # this project's benchmark networks, eval forward at batch 1), a multiply-add costs ~0.75 of
    # im2col's as the GEMM form, whose panels are copies where im2col gathers element by element
    # (0.72–0.83 of its time with windows of 3×3 to 9×9 at the same panels); a 1×1 window
    # reuses no input across taps, so there the padded copy is pure overhead (1.2–1.8× the
    # GEMM's time). Writing each output, staging it, and the padded copy: two operations each.
    k, s, r = attrs["kernel"], attrs["stride"], attrs["dilation"]
    cog = attrs["out"] // attrs["groups"]
    # The GEMM runs along each depth slice's grid positions, (OH − 1)·WQ + OW of them.
    grid_row = D.add(out.spatial[-1], (k[-1] - 1) * r[-1] // s[-1])
    height = out.spatial[-2] if len(out.spatial) > 1 else 1
    span = D.add(D.mul(D.add(height, -1), grid_row), out.spatial[-1])
    tiled = D.mul(D.floordiv(D.add(span, BLOCKED_MAX_COLS - 1), BLOCKED_MAX_COLS), BLOCKED_MAX_COLS)
    rows = -(-cog // BLOCKED_MAX_ROWS) * BLOCKED_MAX_ROWS      # whole tiles of output channels
    per_position = attrs["in"] * D.product(k) * rows
    macs = D.mul(per_position, D.mul(D.product(out.spatial[:-2]), tiled))
    copies = D.add(D.mul(attrs["out"], D.product(out.spatial)), D.product(in_types[0].shape))
    # The direct loop (a short reduction) at ~0.9 of im2col's time per multiply-add, as measured
    # before the GEMM form was added, with no product to stage.
    direct = blocked_direct(attrs)
    if D.product(k) > 1:
        work = D.floordiv(D.mul(macs, 9 if direct else 3), 10 if direct else 4)
    else:
        work = D.add(macs, D.floordiv(macs, 4))
    if not direct:
        copies = D.add(copies, D.mul(attrs["out"], D.mul(D.product(out.spatial[:-2]), span)))
    return D.add(work, D.mul(copies, 2))


# ---- Winograd F(m×m, 3×3) (lib/winograd.h.j2): 3×3, stride 1, any dilation, 2-D ----

WINOGRAD_TILES = {"winograd2": 2, "winograd4": 4}     # variant → m, the output tile's side
# The tile block a Winograd kernel transforms, multiplies and transforms back at a time: about
# this many elements of V and M together (L2-sized), in a multiple of 32 tiles (of every NR).
WINOGRAD_BLOCK_ELEMENTS = 1 << 17


def _is_winograd_shape(attrs) -> bool:
    # Any dilation: each phase of the map is a 3×3 convolution without (lib/winograd).
    return len(attrs["kernel"]) == 2 and attrs["kernel"] == (3, 3) and attrs["stride"] == (1, 1)


# F(4×4, 3×3) rounds with transform entries up to 8 (Aᵀ) and 5 (Bᵀ): against PyTorch in f64,
# f32 results of normal(0, 1) data and weights at 16² to 56², batch 1 to 4, used up to 0.68 of
# the f32 tolerance (rtol 1e-4, atol 1e-5 after scale) for 16 to 256 input channels (forward and
# dX; dW, reduced over the tiles, at most 0.34; F(2×2, 3×3): at most 0.05, as im2col's 0.03). In
# f32 it applies up to this many input channels per group, where it was measured; f64 has no bound.
WINOGRAD4_F32_MAX_CHANNELS = 256


def _is_winograd4_shape(attrs) -> bool:
    return _is_winograd_shape(attrs) and (attrs["dtype"] == "f64"
                                          or attrs["in"] // attrs["groups"] <= WINOGRAD4_F32_MAX_CHANNELS)


def winograd_block(attrs, m: int) -> int:
    """Tiles per block: V (α² × C/G × NB) and M (α² × K/G × NB) near WINOGRAD_BLOCK_ELEMENTS."""
    per_tile = (m + 2) ** 2 * (attrs["in"] // attrs["groups"] + attrs["out"] // attrs["groups"])
    return max(32, min(512, WINOGRAD_BLOCK_ELEMENTS // per_tile // 32 * 32))


# The weight gradient's block: its transformed input and dY (α² × (C/G + K/G) × NB) near this
# many elements, at least 64 tiles (its products reduce over the block's tiles, each adding into
# dU, which stays in L2 across blocks: a longer reduction reads and writes dU less often).
WINOGRAD_WEIGHT_BLOCK_ELEMENTS = 1 << 18


def winograd_weight_block(attrs, m: int) -> int:
    """Tiles per block of the weight gradient (lib/winograd's weight products)."""
    per_tile = (m + 2) ** 2 * (attrs["in"] // attrs["groups"] + attrs["out"] // attrs["groups"])
    return max(64, min(512, WINOGRAD_WEIGHT_BLOCK_ELEMENTS // per_tile // 32 * 32))


def _winograd_tiles(out, m: int, dilation=(1, 1)) -> Dim:
    # Per phase of a dilated map (lib/winograd's cdsl_wino_tiles), every phase as large as the first.
    rh, rw = dilation
    return D.mul(rh * rw, D.mul(D.ceildiv(D.ceildiv(out.spatial[0], rh), m), D.ceildiv(D.ceildiv(out.spatial[1], rw), m)))


def _winograd_workspace(m: int):
    def workspace(in_types, out, attrs):
        # V and M of one block, then the input gradient's packed transformed kernels of every group,
        # [C/G rows × K/G] per position, rows rounded up to a panel (at most MR − 1 ≤ 7 more); 16
        # more to align V. The forward's own kernels are kept in the derived region.
        t, g = (m + 2) ** 2, attrs["groups"]
        cg, kg = attrs["in"] // g, attrs["out"] // g
        forward_and_dx = t * (cg + kg) * winograd_block(attrs, m) + g * t * (cg + 7) * kg + 16
        # The weight gradient's, in the same memory before dX: its block of transformed input
        # (channels rounded up to a B panel: at most NR − 1 ≤ 31 more) and transformed dY (rows
        # rounded up to an A panel), then dU of one group, [α² × K/G × C/G]; 16 more to align.
        weight = t * (cg + 31 + kg + 7) * winograd_weight_block(attrs, m) + t * kg * cg + 16
        return max(forward_and_dx, weight)
    return workspace


def _winograd_derived(m: int):
    def derived(in_types, out, attrs):
        # The copy of the weights the kept kernels were made from, then those kernels: per group
        # and position [K/G rows rounded up to a panel × C/G].
        t, g = (m + 2) ** 2, attrs["groups"]
        cg, kg = attrs["in"] // g, attrs["out"] // g
        return attrs["out"] * cg * 9 + g * t * (kg + 7) * cg
    return derived


# The cost model in the im2col variant's units (its GEMM's multiply-adds plus the columns), fitted
# to one core of the machine the variants were measured on (16 to 512 channels, 4² to 56² maps,
# benchmarks/RESULTS.md): each product's multiply-add costs WINOGRAD_PRODUCT_WEIGHT of im2col's
# (short reductions over C/G, strided M), and the micro-kernel always computes whole panels of
# NR tiles (at most 32 for f32 on 512-bit vectors), so a small map pays for the panel's empty
# lanes; each input or output transform of one channel of one tile costs WINOGRAD_TILE_OPS[m]. The
# kernel transform is kept across calls (`derived`), so it is not counted per sample.
WINOGRAD_PRODUCT_WEIGHT = 1.2
WINOGRAD_TILE_OPS = {2: 150, 4: 600}
_WIDEST_VECTOR_BYTES = 64


def _winograd_batch_cost(m: int):
    # The kernels number the tiles across the batch (TILES = N × the tiles of a sample), so on a
    # batch the panels fill up: a 256-channel 8×8 map has 16 tiles of 2×2 a sample, half a panel.
    def cost(in_types, out, attrs, batch):
        t, g = (m + 2) ** 2, attrs["groups"]
        cg, kg = attrs["in"] // g, attrs["out"] // g
        tiles = D.mul(batch, _winograd_tiles(out, m, attrs["dilation"]))
        panel = 2 * _WIDEST_VECTOR_BYTES // (8 if attrs["dtype"] == "f64" else 4)
        lanes = D.mul(D.ceildiv(tiles, panel), panel)
        products = D.floordiv(D.mul(lanes, int(WINOGRAD_PRODUCT_WEIGHT * 10) * t * cg * kg * g), 10)
        return D.add(products, D.mul(tiles, WINOGRAD_TILE_OPS[m] * (attrs["in"] + attrs["out"])))
    return cost


def _winograd_cost(m: int):
    batch_cost = _winograd_batch_cost(m)
    return lambda in_types, out, attrs: batch_cost(in_types, out, attrs, 1)


def _winograd_variant(name: str) -> Variant:
    m = WINOGRAD_TILES[name]
    return Variant(
        name, "conv", f"Winograd F({m}×{m}, 3×3): {(m + 2) ** 2} channel products per {m}×{m} output tile",
        cost=_winograd_cost(m), batch_costs=(("c", _winograd_batch_cost(m)),),
        applies=_is_winograd_shape if m == 2 else _is_winograd4_shape,
        needs="a 2-D 3×3 kernel at stride 1" + (
            "" if m == 2 else f", and in f32 at most {WINOGRAD4_F32_MAX_CHANNELS} input channels per group "
                              "(where its rounding error is measured inside the f32 tolerance)"),
        workspace=_winograd_workspace(m), derived=_winograd_derived(m), parallel="tiles × channels",
        fuses_epilogue=True, writes_input_grad=(("c", _always_writes),), writes_param_grads=_PARAM_GRADS_WRITTEN_ON)


# ---- the separable-kernel split (§4.3.2, templates/c/ops/conv_separable.c.j2) ----

# A kernel of (output channel, input channel) pairs is rank 1 when each pair's taps are an outer
# product of one vector per axis (Sobel, box and Gaussian filters). The split is decided on the
# values themselves, so only a `const` weight that is also frozen qualifies: its values are in
# the IR and never change. A pair counts as rank 1 when the outer product of its factors is
# within SEPARABLE_TOLERANCE of the kernel's largest magnitude at every tap: below f32's
# rounding of that magnitude, so the split changes no result by more than the f32 arithmetic does.
SEPARABLE_TOLERANCE = 1e-7


def _rank1_factors(taps: np.ndarray, scale: float) -> list[np.ndarray] | None:
    """One vector per axis whose outer product is `taps` (within the tolerance of `scale`), read
    off the fibres through its largest tap; None if no such vectors exist."""
    pivot = np.unravel_index(np.argmax(np.abs(taps)), taps.shape)
    top = taps[pivot]
    if top == 0:
        return [np.zeros(k) for k in taps.shape]
    factors = []
    for axis in range(taps.ndim):
        fibre = taps[tuple(slice(None) if a == axis else pivot[a] for a in range(taps.ndim))]
        factors.append(fibre if axis == 0 else fibre / top)
    product = factors[0]
    for f in factors[1:]:
        product = np.multiply.outer(product, f)
    return factors if np.max(np.abs(product - taps)) <= SEPARABLE_TOLERANCE * scale else None


def separable_factors(attrs) -> tuple | None:
    """The split of a frozen `const` kernel of rank 1: per (output channel, input channel of its
    group) pair, one factor per axis of the kernel padded to 3-D (D, H, W; the taps in the order
    the passes read them, so flip=true reverses each factor), as nested tuples of floats; None
    where the split does not apply. An axis whose pass would copy its input (a 1-tap window at
    stride 1 without padding: the axes a 1-D or 2-D kernel is padded with) has no pass: its
    factor is folded into another axis's and it is left out (`separable_axes`)."""
    w = attrs.get("weight")
    if w is None or not attrs.get("frozen"):
        return None
    rank = len(attrs["kernel"])
    taps = np.asarray(w.values, dtype=np.float64).reshape(w.shape)
    scale = float(np.max(np.abs(taps))) if taps.size else 0.0
    active = separable_axes(attrs)
    pairs = []
    for co in range(w.shape[0]):
        row = []
        for ci in range(w.shape[1]):
            factors = _rank1_factors(taps[co, ci], scale)
            if factors is None:
                return None
            factors = [np.ones(1)] * (3 - rank) + [f[::-1] if attrs["flip"] else f for f in factors]
            folded = np.prod([f[0] for a, f in enumerate(factors) if a not in active])
            kept = [factors[a] * (folded if a == active[0] else 1.0) for a in active]
            row.append(tuple(tuple(float(v) for v in f) for f in kept))
        pairs.append(tuple(row))
    return tuple(pairs)


def separable_axes(attrs) -> tuple[int, ...]:
    """The axes (0 = D, 1 = H, 2 = W of the 3-D padded kernel) that get a 1-D pass, in the order
    the forward runs them (W first: it shrinks the map by the stride soonest); at least one."""
    rank = len(attrs["kernel"])
    axes = []
    for a in range(3):
        i = a - (3 - rank)
        if i < 0:
            continue
        identity = attrs["kernel"][i] == 1 and attrs["stride"][i] == 1 \
            and all(isinstance(p, int) and p == 0 for p in attrs["pads"][i])
        if not identity:
            axes.append(a)
    return tuple(reversed(axes)) or (2,)


def _is_separable(attrs) -> bool:
    return separable_factors(attrs) is not None


# A pass's multiply-add in im2col's units: the passes run per channel pair with no reuse across
# channels, each over a whole map in memory. Timed on one core of this project's machine (f32,
# -O3, 256² maps, best of 20): one channel, a 5×5 Gaussian: split 0.086 ms, the direct loop
# 0.091, im2col 0.55; a 3×3 one: split 0.071, direct 0.050 (three passes over memory cost more
# than 9 taps in registers); 8 channels depthwise 5×5: split 1.17, direct 1.20; 3 → 3 channels
# 5×5: split 1.3, im2col 2.4; 16 → 16: the GEMM variants win by 5×. So 3: the split for
# kernels of 5 taps a side and more on few channels, the direct loop for 3×3 on one channel,
# the GEMM variants for many channels.
SEPARABLE_PASS_WEIGHT = 3


def _separable_cost(in_types, out, attrs):
    # Per (output, input channel) pair one multiply-add per tap of each pass over the map it
    # writes: Σ_axis K_axis · (that pass's output size), O(w·d) per output instead of O(w^d);
    # each pass writes its map once more (one operation per element).
    rank = len(attrs["kernel"])
    ins = [1] * (3 - rank) + list(in_types[0].spatial)
    outs = [1] * (3 - rank) + list(out.spatial)
    ks = [1] * (3 - rank) + list(attrs["kernel"])
    sizes = list(ins)
    work = 0
    for a in separable_axes(attrs):
        sizes[a] = outs[a]
        work = D.add(work, D.mul(ks[a] + 1, D.product(sizes)))
    return D.mul(SEPARABLE_PASS_WEIGHT * attrs["out"] * (attrs["in"] // attrs["groups"]), work)


def _separable_workspace(in_types, out, attrs):
    # Two maps between passes, of the largest of them: after the W pass the map is ID × IH × OW,
    # after the H pass ID × OH × OW (none for a single pass).
    rank = len(attrs["kernel"])
    ins = [1] * (3 - rank) + list(in_types[0].spatial)
    outs = [1] * (3 - rank) + list(out.spatial)
    sizes, largest = list(ins), 0
    for a in separable_axes(attrs)[:-1]:
        sizes[a] = outs[a]
        largest = D.maximum(largest, D.product(sizes))
    return D.mul(largest, 2)


# ---- FFT convolution (§4.3.1, templates/c/ops/conv_fft.c.j2 and lib/fft.h.j2) ----

# Convolution is a pointwise product of spectra: the padded input and the (dilated) kernel are
# transformed on a grid at least as large as the padded input along every axis, so that the
# circular correlation equals the linear one at every output; each output channel's spectrum is
# the sum over its group's input channels of X · conj(W), transformed back. The grid's side is the
# least 2^a·3^b·5^c at least that size (the radices of lib/fft). Stride 1 only (a stride would
# compute every skipped output too), and sizes known when the file is checked (the grid and the
# kept kernel spectra are planned from them). The kernels' spectra are kept across calls in the
# step's derived memory, remade when the weights change, as Winograd's kernels are; both they and
# the backward's weight-gradient spectra have CO · CI/G · F complex values (F: the grid's half
# spectrum), up to FFT_MAX_SPECTRUM_ELEMENTS reals each, beyond which the variant does not apply.
FFT_RADICES = (4, 2, 3, 5)
FFT_MAX_SPECTRUM_ELEMENTS = 1 << 24
FFT_MAX_SIDE = 1 << 14
# Channel pairs are transformed in slots of the workspace, FFT_SLOTS at a time (threads share
# them out; each slot is one pair's grid, its Stockham buffer and two spectra).
FFT_SLOTS = 16


def fft_length(n: int) -> int:
    """The least 2^a·3^b·5^c that is at least n."""
    m = max(1, n)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_factors(n: int) -> tuple[int, ...]:
    """n's radices in the order lib/fft's stages apply them: 4s, a 2, then 3s and 5s."""
    out = []
    for p in FFT_RADICES:
        while n % p == 0:
            out.append(p)
            n //= p
    return tuple(out)


def _fft_padded(in_spatial, attrs):
    """The padded input's size per axis (3-D), or None where a size is known at run time only."""
    sizes = [1] * (3 - len(attrs["kernel"])) + list(in_spatial)
    pads = [(0, 0)] * (3 - len(attrs["kernel"])) + list(attrs["pads"])
    if not all(isinstance(v, int) for v in sizes) or not all(isinstance(p, int) for pair in pads for p in pair):
        return None
    return tuple(s + before + after for s, (before, after) in zip(sizes, pads))


def fft_grid(attrs) -> dict | None:
    """The FFT variant's grid for a conv (None where it does not apply): `L` per axis (D, H, W),
    each axis's radices, the half spectrum's last side `half`, F = L0·L1·half and T = L0·L1·L2."""
    if any(s != 1 for s in attrs["stride"]) or "in_spatial" not in attrs:
        return None
    padded = _fft_padded(attrs["in_spatial"], attrs)
    if padded is None:
        return None
    L = tuple(fft_length(n) for n in padded)
    if max(L) > FFT_MAX_SIDE:
        return None
    half = L[2] // 2 + 1
    return {"L": L, "factors": tuple(fft_factors(n) for n in L), "half": half,
            "F": L[0] * L[1] * half, "T": L[0] * L[1] * L[2]}


def _fft_spectra(attrs, grid) -> int:
    return 2 * attrs["out"] * (attrs["in"] // attrs["groups"]) * grid["F"]


def _is_fft_shape(attrs) -> bool:
    grid = fft_grid(attrs)
    return grid is not None and D.product(attrs["kernel"]) > 1 \
        and _fft_spectra(attrs, grid) <= FFT_MAX_SPECTRUM_ELEMENTS


def _fft_slots(attrs) -> int:
    pairs = max(attrs["in"], attrs["out"], attrs["out"] * (attrs["in"] // attrs["groups"]))
    return max(1, min(FFT_SLOTS, (pairs + 1) // 2))


# The FFT variant's weight gradient, by its spectra (Σ X · conj(dY) per kernel, then one inverse
# transform of the grid per kernel for its few taps) or directly (lib/im2col's stride-1 loop on
# the GEMM micro-kernel: KK·P multiply-adds per kernel and sample, nothing transformed). Fitted
# on an AVX-512 Xeon, one thread (benchmarks/RESULTS.md, eleventh session), on the 9×9 conv of
# 32 channels on 64² (a 72² grid): the spectra took 18 µs a kernel, 0.28 ns per T·log2(T); the
# direct loop 4.9 µs, 0.015 ns per multiply-add. The plan takes the direct loop where it is
# the cheaper by that measure: for all but kernels of hundreds of taps on small maps.
FFT_SPECTRA_GRADIENT_WEIGHT = 20


def fft_direct_weights(attrs, out, grid) -> bool:
    taps = D.product(attrs["kernel"]) * D.product(out.spatial)
    return taps <= FFT_SPECTRA_GRADIENT_WEIGHT * grid["T"] * math.log2(grid["T"])


# A third form, for kernels of one or two dims: DFTs of the rows only (lib/fft's
# cdsl_fft_rows_weight_gradient), each tap row's sum over the output rows a product of channel
# panels per frequency, about 4·(L/2 + 1) multiply-adds per output row and tap row where the
# direct loop spends KW·OW (L = OW + (KW − 1)·RW). The plan takes it from kernels this wide on:
# on the 9×9 conv of 32 channels on 64² (AMD EPYC, AVX-512, one thread) it took dW from 2.8 ms
# (the direct loop, near the FMA peak) to about 1.0 ms.
FFT_ROWS_MIN_WIDTH = 5


def fft_rows_weights(attrs) -> bool:
    kernel = attrs["kernel"]
    return len(kernel) <= 2 and kernel[-1] >= FFT_ROWS_MIN_WIDTH


def fft_weight_form(attrs, out, grid) -> str:
    """How the FFT variant's backward computes dW: "rows", "direct" or "spectra"."""
    if fft_rows_weights(attrs):
        return "rows"
    return "direct" if fft_direct_weights(attrs, out, grid) else "spectra"


def _fft_rows_elements(attrs, out) -> int:
    # lib/fft's cdsl_fft_rows_elems for the group's channels (2-D as 1 × H × W, 1-D as 1 × 1 × W;
    # channels rounded up to CDSL_FFT_ROWS_CH = 16, and alignment slack for vectors of up to 16
    # lanes), then the gradient summed over the batch, transposed (dwt).
    spatial = (1,) * (2 - len(out.spatial)) + tuple(out.spatial)
    k = (1,) * (2 - len(attrs["kernel"])) + tuple(attrs["kernel"])
    r = (1,) * (2 - len(attrs["dilation"])) + tuple(attrs["dilation"])
    (oh, ow), (kh, kw), (rh, rw) = spatial, k, r
    ch = lambda n: (n + 15) // 16 * 16
    cp, op = ch(attrs["in"] // attrs["groups"]), ch(attrs["out"] // attrs["groups"])
    length, rows = ow + (kw - 1) * rw, oh + (kh - 1) * rh
    f2 = length // 2 + 1
    work = (2 * length + rows * length * cp + rows * f2 * 2 * cp + oh * ow * op + oh * f2 * 2 * op
            + f2 * 2 * op * cp + 2 * kw * f2 + 4 * 16)
    return work + kh * kw * op * cp + 32


def _fft_direct_elements(attrs, out) -> int:
    # The padded input of one group's channels, dY transposed into panels of output channels
    # (rounded up to NR: at most 31 more), the transposed gradient, 32 to align the first two
    # (conv_fft.c.j2).
    cg, kg = attrs["in"] // attrs["groups"], attrs["out"] // attrs["groups"]
    reach = [o + (k - 1) * r for o, k, r in zip(out.spatial, attrs["kernel"], attrs["dilation"])]
    positions, taps = D.product(out.spatial), D.product(attrs["kernel"])
    return cg * D.product(reach) + (kg + 31) * positions + taps * cg * (kg + 31) + 32


def _fft_workspace(in_types, out, attrs):
    # The twiddles of each axis, then (backward) dY's spectra, the input's spectra, the weight
    # gradient's spectra or the direct loop's buffers, then the slots; the forward uses the same
    # start (the input's spectra where the backward keeps dY's).
    grid = fft_grid(attrs)
    if grid is None:
        return 0
    F, T = grid["F"], grid["T"]
    twiddles = 2 * sum(grid["L"])
    slots = _fft_slots(attrs) * (4 * T + 4 * F)
    form = fft_weight_form(attrs, out, grid)
    if attrs["frozen"]:
        gradients = 0
    elif form == "rows":
        gradients = _fft_rows_elements(attrs, out)
    elif form == "direct":
        gradients = _fft_direct_elements(attrs, out)
    else:
        gradients = _fft_spectra(attrs, grid)
    return twiddles + 2 * F * (attrs["out"] + attrs["in"]) + gradients + slots


def _fft_derived(in_types, out, attrs):
    # The copy of the weights the spectra were made from, then the kernels' spectra.
    grid = fft_grid(attrs)
    if grid is None:
        return 0
    return attrs["out"] * (attrs["in"] // attrs["groups"]) * D.product(attrs["kernel"]) + _fft_spectra(attrs, grid)


# In im2col's units, fitted on one core (AMD EPYC, AVX2, f32, forward at batch 1; 3×3 to 15×15
# kernels, 3 to 128 channels, 14² to 128² maps; the fit is within 0.8–1.2 of every time, and
# benchmarks/RESULTS.md has the table): a complex transform of T points costs FFT_POINT_OPS ·
# T · log2 T (one per channel pair: two real maps share a complex transform), and a complex
# multiply-add of the spectra FFT_PRODUCT_OPS (the kernels' spectra stream from memory: at 64
# channels on a 32² grid they are 17 MB). So it wins on large kernels: 7×7 and up on 64² maps
# (16 → 16 channels: 1.9 ms, im2col 3.4), 15×15 on 100² 7× faster than im2col; it loses on 3×3
# (Winograd) and where many channels make the products dominate (64 → 64, 5×5 on 32²: 5.2 ms,
# im2col 4.8).
FFT_POINT_OPS = 17
FFT_PRODUCT_OPS = 30


def _fft_cost(in_types, out, attrs):
    grid = fft_grid(attrs)
    T, F = grid["T"], grid["F"]
    log_t = max(1, (T - 1).bit_length())
    pairs = (attrs["in"] + 1) // 2 + (attrs["out"] + 1) // 2
    products = attrs["out"] * (attrs["in"] // attrs["groups"]) * F
    return FFT_POINT_OPS * pairs * T * log_t + FFT_PRODUCT_OPS * products

# ---- OpenCL's tiled kernels (templates/opencl/ops/conv_tiled.cl.j2) ----

# A work-group of 8×8 work-items: 64, the group size of the target's other launches (module.cl.j2's
# CDSL_LOCAL). A device whose work-groups hold fewer runs those in smaller groups but not these:
# the driver refuses the program or the launch, and the module says so with its message (the
# plan does not know the device). Each work-item keeps up to 4 rows × 8 neighbouring columns of
# sums in registers (a vector of 8 per row), so a tile is up to 32 × 64; the reduction is staged
# 16 at a time: (32 + 64) · 16 values of local memory, 12 KiB in f64, within the least local
# memory OpenCL 1.2 promises (32 KiB). Those sizes were the fastest of the few tried on PoCL
# (benchmarks/RESULTS.md, OpenCL).
TILED_LOCAL = (8, 8)
TILED_MAX_ROWS_BLOCK = 4
TILED_MAX_COLS_BLOCK = 8
TILED_CHUNK = 16
# The tiled kernels' cost in the one-work-item-per-output kernel's units: one a multiply-add (on
# OpenCL the plan's other conv variants are that kernel, and cost that, `_one_work_item_cost`).
# A multiply-add of a tile costs 1/TILED_SPEEDUP of one (3–6 times faster on full tiles in the
# measurement above, counted as 4), and each value a work-group stages in local memory
# TILED_STAGE_COST (the gather's index arithmetic and bounds checks, the barriers), which is what
# makes a small tile dear: per element of the reduction an 8 × 16 tile stages 24 values for 128
# multiply-adds, a 32 × 64 one 96 for 2048.
TILED_SPEEDUP = 4
TILED_STAGE_COST = 2


def _block_for(extent, items: int, largest: int) -> int:
    """A work-item's block along an axis of `extent` values that `items` work-items share: the
    largest power of two up to `largest` whose tile the axis fills at least once, so that a
    short axis does not leave most of a tile empty."""
    if not isinstance(extent, int):
        return largest                    # run-time sizes: planned for large maps
    block = largest
    while block > 1 and extent < items * block:
        block //= 2
    return block


def _tile_for(rows, cols) -> WorkGroupTile:
    return WorkGroupTile(TILED_LOCAL, (_block_for(rows, TILED_LOCAL[1], TILED_MAX_ROWS_BLOCK),
                                       _block_for(cols, TILED_LOCAL[0], TILED_MAX_COLS_BLOCK)), TILED_CHUNK)


def _tiled_products(in_types, out, attrs):
    """The three products of the tiled kernels, as (name, rows, columns, reduction per sample):
    the forward (output channels of a group × output positions, over input channels × taps), dX
    (input channels × input cells, over output channels × taps) and dW (output channels × input
    channels · taps, over the batch's positions)."""
    groups, taps = attrs["groups"], D.product(attrs["kernel"])
    cig, cog = attrs["in"] // groups, attrs["out"] // groups
    positions, cells = D.product(out.spatial), D.product(in_types[0].spatial)
    return (("forward", cog, positions, cig * taps), ("dx", cig, cells, cog * taps), ("dw", cog, cig * taps, positions))


def _tiled_tiles(in_types, out, attrs):
    """Each product's work-group tile, its blocks fitted to its own rows and columns."""
    return tuple((name, _tile_for(rows, cols)) for name, rows, cols, _ in _tiled_products(in_types, out, attrs))


def _one_work_item_cost(in_types, out, attrs):
    return Conv.macs_of(attrs, out)


ON_OPENCL = (("opencl", _one_work_item_cost),)     # im2col, pointwise, direct: conv.cl.j2's kernels there


def _tiled_cost(in_types, out, attrs):
    # Every (work-group, chunk) step of the three products: a whole tile's multiply-adds (its
    # ragged part computes too) and the values it stages, averaged over the three products.
    # So a layer whose tiles would be mostly empty or small (a few channels per group, as
    # depthwise has; a handful of positions) keeps the one-work-item-per-output kernel.
    total = 0
    for name, rows, cols, depth in _tiled_products(in_types, out, attrs):
        tile = _tile_for(rows, cols)
        steps = D.mul(attrs["groups"] * -(-rows // tile.rows), D.mul(D.ceildiv(cols, tile.cols),
                                                                       D.ceildiv(depth, tile.chunk)))
        per_step = (tile.rows * tile.cols // TILED_SPEEDUP + (tile.rows + tile.cols) * TILED_STAGE_COST) * tile.chunk
        total = D.add(total, D.mul(steps, per_step))
    return D.floordiv(total, 3)


# ---- dot: weight rows against windows, nothing packed (lib/gemm's cdsl_gemm_dot) ----

# In the im2col variant's units (its cost counts whole column panels of the packed GEMM and no
# copy of the weights), fitted to forward times on one core (AVX-512; 1×1 convs of MobileNetV2 at
# 3² to 24², ResNet-18's 3×3 and 1×1 convs at 4² to 16², benchmarks/RESULTS.md): a multiply-add
# costs DOT_MAC_WEIGHT (a vector load of a row feeds 4 FMAs, where the packed micro-kernel feeds
# 16), each output DOT_OUTPUT_OPS (folding its accumulator's lanes), and each entry of the
# transposed column matrix DOT_COLUMN_OPS (written with a stride of a whole row). It wins where
# a sample has few positions (≤ ~16) to reuse each weight on: the packed GEMM copies all the
# weights on every call and fills its 32-wide panels with zeros there.
DOT_MAC_WEIGHT = 1.4
DOT_OUTPUT_OPS = 90
DOT_COLUMN_OPS = 2
# On up to DOT_WIDE positions (lib/gemm's CDSL_DOT_WIDE, AVX-512) each tile takes every position
# at once against 1 to 4 rows of weights (cdsl_gemm_dot_wide says which), the rows read from
# memory once, in order, and fetched 4 KB ahead, the accumulators' lanes folded together
# (cdsl_vec_sums): fitted to 1×1 convs on 3² maps (MobileNetV2's, 160 to 1280 channels; one core
# of an AVX-512 EPYC, against narrow's measured time: 0.80–1.04× of it, where narrow's copy of the
# weights turned across cost half its time), when the tiles were 4 rows against groups of 4
# positions; the tiles of one row or three, since, are faster still (benchmarks/RESULTS.md), so
# the weights below overstate dot's cost there, which only makes the plan keep it less often.
DOT_WIDE = 12
DOT_WIDE_MAC_WEIGHT = 1.15
DOT_WIDE_OUTPUT_OPS = 30


# A small map's forward at a batch of several samples runs as packed GEMMs, each over the columns
# of GEMM_BATCH_COLUMNS // positions samples side by side (`im2col` from two samples on, `dot`
# from two samples on once the batch has more than DOT_COLUMNS positions, a run-time product of
# the batch and the positions; one sample runs as the plan chose it for one sample's shape):
# a GEMM per sample packed all the weights for each sample's few columns, and dot products read
# every weight once per sample, at about a third of the packed micro-kernel's speed once the
# windows no longer fit in L1. One GEMM packs the weights once for its samples (1 thread, AMD
# EPYC: a 512-channel 3×3 conv on 4×4 maps at batch 8 9.0 → 4.6 ms, PyTorch 4.3; a 256-channel
# one on 8×8 at batch 8 4.8 → 3.9 ms). The backward of both takes the same samples together too:
# one dW GEMM over their positions (dW read and written once for them) and one for their dX
# columns (ResNet-18 training at batch 8: 293 → 204 ms).
DOT_COLUMNS = 16
GEMM_BATCH_COLUMNS = 256


def gemm_samples(out) -> int:
    """The samples of one batched GEMM: GEMM_BATCH_COLUMNS // positions, at least 1 (1 where the
    positions are known at run time only: no batching)."""
    positions = D.product(out.spatial)
    return max(1, GEMM_BATCH_COLUMNS // positions) if isinstance(positions, int) else 1


# ---- the input gradient's columns on a small map (lib/gemm's cdsl_gemm_narrow_t) ----

# dX's columns are Wᵀ · dY, a product of the conv's positions as columns. The packed GEMM copies
# all the weights transposed for it on every backward and, on fewer columns than its panels are
# wide (32 at AVX-512), leaves lanes idle; narrow's tiles (vectors along dX's rows, each entry of
# dY broadcast) read the weights' rows where they lie instead. The plan takes them for one
# sample's product of up to DX_NARROW_COLUMNS positions. (A batched backward's product always
# has more: gemm_samples samples of P positions make more than GEMM_BATCH_COLUMNS / 2.)
DX_NARROW_COLUMNS = 64


def dx_narrow(out) -> bool:
    """Whether the backward's per-sample dX product runs as lib/gemm's narrow_t."""
    positions = D.product(out.spatial)
    return isinstance(positions, int) and positions <= DX_NARROW_COLUMNS


def _samples_gemm_cost(in_types, out, attrs, batch: int):
    """im2col's cost for a call on `batch` samples run as packed GEMMs of gemm_samples samples'
    columns at a time (the forward of im2col from two samples on, of broadcast, narrow and dot
    past their dot_columns): _gemm_cost's terms with each GEMM's panels filled across its
    samples, and each sample's columns gathered."""
    s = min(batch, gemm_samples(out))
    return D.add(D.mul(-(-batch // s), _gemm_work(attrs, D.mul(s, D.product(out.spatial)))),
                 D.mul(batch, _columns(in_types, out, attrs)))


def _im2col_cost(in_types, out, attrs):
    return D.add(_gemm_cost(in_types, out, attrs), _columns(in_types, out, attrs))


def _im2col_batch_cost(in_types, out, attrs, batch):
    if batch > 1 and gemm_samples(out) > 1:
        return _samples_gemm_cost(in_types, out, attrs, batch)
    return D.mul(batch, _im2col_cost(in_types, out, attrs))


def _batching_past(columns: int, cost):
    """The batch cost of a variant whose forward runs `cost` per sample, or, on more than one
    sample and more than `columns` positions in the batch (its dot_columns), packed GEMMs of
    several samples (a batch of a map known at run time only stays per sample)."""
    def batch_cost(in_types, out, attrs, batch):
        positions = D.product(out.spatial)
        if batch > 1 and isinstance(positions, int) and batch * positions > columns:
            return _samples_gemm_cost(in_types, out, attrs, batch)
        return D.mul(batch, cost(in_types, out, attrs))
    return batch_cost


def _batched_workspace(in_types, out, attrs):
    # The column matrix of one sample (dot's windows, im2col's backward), or, batched: one
    # group's result staged (forward), or one group's dY then every group's dX columns of the
    # samples (backward).
    s, positions = gemm_samples(out), D.product(out.spatial)
    staged = D.mul(attrs["out"] // attrs["groups"] * s, positions)
    if s > 1:
        staged = D.add(staged, D.mul(attrs["in"] * D.product(attrs["kernel"]) * s, positions))
    return D.maximum(_columns(in_types, out, attrs), staged)


def _dot_cost(in_types, out, attrs):
    positions = D.product(out.spatial)
    wide = isinstance(positions, int) and positions <= DOT_WIDE
    mac_weight, output_ops = (DOT_WIDE_MAC_WEIGHT, DOT_WIDE_OUTPUT_OPS) if wide else (DOT_MAC_WEIGHT, DOT_OUTPUT_OPS)
    macs = D.floordiv(D.mul(Conv.macs_of(attrs, out), int(mac_weight * 100)), 100)
    outputs = D.mul(attrs["out"] * output_ops, positions)
    return D.add(D.add(macs, outputs), D.mul(_columns(in_types, out, attrs), DOT_COLUMN_OPS))


# ---- direct (templates/c/ops/conv_direct.c.j2): the depthwise loop ----

# On a 1-D or 2-D map the direct loop copies each channel into zero-padded grids on the thread's
# stack, one per phase of the stride, and computes the outputs over the grids' whole rows as one
# flat run of vectors (a window's tap is one offset into one grid; the columns past each output
# row are computed and dropped), where the row by row loop spent most of its time on the columns
# at the edges and the partial vectors of short rows: MobileNetV2's depthwise layers at 6² to
# 48², 2–5× faster. The grids (the forward's; at stride 1 also dX's, the same loop over dY) must
# fit DIRECT_GRID_MAX reals with the last vector's reach past them as slack; larger maps go row
# by row, where rows are long enough.
DIRECT_GRID_MAX = 8192
DIRECT_GRID_SLACK = 16


def direct_grid(attrs, in_types, out) -> int | None:
    """The reals of the direct loop's grids (the larger of the forward's and, at stride 1, dX's),
    or None where it goes row by row: a 3-D map, sizes known at run time only, or grids past
    DIRECT_GRID_MAX."""
    k, r, s = attrs["kernel"], attrs["dilation"], attrs["stride"]
    spatial_in, spatial_out = in_types[0].spatial, out.spatial
    if len(k) > 2 or not all(isinstance(d, int) for d in (*spatial_in, *spatial_out)):
        return None
    reach = [(kk - 1) * rr for kk, rr in zip(k, r)]
    forward = math.prod(s) * math.prod(o + e // st for o, e, st in zip(spatial_out, reach, s))
    sizes = [forward + reach[-1] // s[-1]]
    if all(st == 1 for st in s):
        sizes.append(math.prod(i + e for i, e in zip(spatial_in, reach)) + reach[-1])
    size = max(sizes) + DIRECT_GRID_SLACK
    return size if size <= DIRECT_GRID_MAX else None


# On a small map the loop goes across channels instead (direct_across): a vector holds one cell
# of CDSL_VL channels, so the zero-padded grid of a block of channels is copied in once, each
# output is its window's taps of vector FMAs, with no edges and no partial vectors, and the
# outputs are copied out with the epilogue. Per channel, the plane loop's fixed costs (its
# grid's rows, a partial vector per row of outputs) outweighed the window's arithmetic on
# MobileNetV2's small maps; copying every cell in and out across channels costs more than that
# once the outputs are many. One-process A/B, eval forward with batchnorm and relu folded in,
# caches flushed: 960 channels at 3² 0.60 of the plane loop's time, 576 at 6² 0.89 (stride 2:
# 0.79), 192 at 12² stride 2 (36 outputs) 0.91, but at stride 1 (144 outputs) 1.19. So it runs
# for at most DIRECT_ACROSS_POSITIONS outputs per channel, its grid (on the thread's stack) at
# most DIRECT_ACROSS_CELLS cells and the window at most DIRECT_ACROSS_TAPS taps. With a channel
# multiplier M, lane l reads input channel (c0 + l) / M.
DIRECT_ACROSS_POSITIONS = 64
DIRECT_ACROSS_CELLS = 256
DIRECT_ACROSS_TAPS = 49


def direct_across(attrs, in_types, out) -> tuple[int, int] | None:
    """(GH, GW): the rows and columns of the across-channels form's zero-padded grid (the cells
    the windows read, from the padding before), or None where the plane loop runs: a 3-D map,
    sizes known at run time only, or outputs, grid or window past the bounds."""
    k, r, s = attrs["kernel"], attrs["dilation"], attrs["stride"]
    if len(k) > 2 or math.prod(k) > DIRECT_ACROSS_TAPS:
        return None
    if not all(isinstance(d, int) for d in out.spatial):
        return None
    def as_2d(axes):                # a 1-D map is one row
        return (1,) * (2 - len(axes)) + tuple(axes)
    o = as_2d(out.spatial)
    grid = tuple((oo - 1) * ss + (kk - 1) * rr + 1 for oo, kk, rr, ss in zip(o, as_2d(k), as_2d(r), as_2d(s)))
    small = o[0] * o[1] <= DIRECT_ACROSS_POSITIONS and grid[0] * grid[1] <= DIRECT_ACROSS_CELLS
    return grid if small else None


# ---- broadcast (lib/gemm's cdsl_gemm_broadcast): a 1×1 conv on a small map ----

# Each weight is broadcast against a vector of positions; the positions of a chunk of at most
# BROADCAST_COLUMNS are staged once, zero-padded to whole vectors (16 lanes at AVX-512, the
# widest, as the other costs count). In im2col's units, fitted to forward times on one core
# (AVX-512 Xeon; the 1×1 shapes of MobileNetV2 at 3² to 48², weights warm in L2 and cold, against
# pointwise and dot): a multiply-add of the padded lanes costs BROADCAST_MAC_WEIGHT (a broadcast
# and a vector load feed a tile's FMAs; nothing is packed, where the packed GEMM pays its
# packing in _gemm_cost's per-row term), each staged entry BROADCAST_STAGE_OPS, which also
# stands for what the tiles lose on few output channels (24 or 32 of them over 144 to 576
# positions: the packed GEMM is 10–30% faster there). It wins on 9 to ~150 positions, and on
# larger maps over few input channels; dot stays close at 3² over many input channels.
BROADCAST_COLUMNS = 64
BROADCAST_STAGE = 8192          # reals staged at a time (lib/gemm.c: CDSL_BROADCAST_STAGE)
BROADCAST_LANES = _WIDEST_VECTOR_BYTES // 4   # f32 lanes of the widest vectors, as the other costs count
BROADCAST_MAC_WEIGHT = 0.8
BROADCAST_STAGE_OPS = 12
BROADCAST_WIDE = 256            # positions past which, over a reduction of BROADCAST_DEEP, the packed GEMM gains
BROADCAST_DEEP = 256
# A batch of more positions than this (a run-time product: ParallelSplit.dot_columns) runs the
# forward as packed GEMMs over several samples' columns, as dot does: there the weights are
# packed once for those samples and its panels fill up, where broadcast reads every weight once
# per sample (ResNet-18 training at batch 8: 1.5× PyTorch's time per sample, 1.2× batched).
BROADCAST_BATCH_COLUMNS = 64


def _broadcast_padded(positions):
    chunks = D.floordiv(positions, BROADCAST_COLUMNS)
    rest = D.add(positions, D.mul(chunks, -BROADCAST_COLUMNS))
    return D.add(D.mul(chunks, BROADCAST_COLUMNS),
                 D.mul(D.floordiv(D.add(rest, BROADCAST_LANES - 1), BROADCAST_LANES), BROADCAST_LANES))


def _broadcast_cost(in_types, out, attrs):
    positions = D.product(out.spatial)
    padded = _broadcast_padded(positions)
    rows = attrs["in"] // attrs["groups"] * D.product(attrs["kernel"])
    macs = D.mul(rows * attrs["out"], padded)
    cost = D.add(D.floordiv(D.mul(macs, int(BROADCAST_MAC_WEIGHT * 10)), 10),
                 D.mul(rows * attrs["groups"] * BROADCAST_STAGE_OPS, padded))
    if isinstance(positions, int) and positions > BROADCAST_WIDE:
        # Many positions over a long reduction: the packed GEMM's blocking pays there (a 1×1
        # 256 → 64 on 28²: 10% faster), not over a short one (16 → 96 on 48²: broadcast 1.6×).
        depth = min(rows, BROADCAST_DEEP)
        cost = D.add(cost, macs * (positions - BROADCAST_WIDE) * depth * depth // (1024 * BROADCAST_DEEP ** 2))
    return cost


def _broadcast_workspace(in_types, out, attrs):
    # A block of a group's column matrix, staged: its rows × at most BROADCAST_COLUMNS positions
    # (fewer on a map known to be smaller), at most BROADCAST_STAGE reals; and, in the same
    # memory, what im2col's batched GEMMs need past BROADCAST_BATCH_COLUMNS positions in the
    # batch, and the backward's column matrix.
    padded = _broadcast_padded(D.product(out.spatial))
    columns = min(padded, BROADCAST_COLUMNS) if isinstance(padded, int) else BROADCAST_COLUMNS
    staged = min(attrs["in"] // attrs["groups"] * D.product(attrs["kernel"]) * columns, BROADCAST_STAGE)
    return D.maximum(staged, _batched_workspace(in_types, out, attrs))


def _broadcast_thread_workspace(in_types, out, attrs):
    return _own_gradients(in_types, out, attrs) if _is_pointwise(attrs) else _columns_and_gradients(in_types, out, attrs)


# ---- narrow (lib/gemm's cdsl_gemm_narrow): few positions, vectors along the output channels ----

# The transposed form of broadcast: each entry of the column matrix is broadcast against vectors
# of output channels, whose rows of weights are packed k-major a block at a time (squares of
# vectors turned across, in L1). No lane idles however few the positions: broadcast fills 9 of
# 16 lanes at 3², 4 at 2². Fitted to broadcast's cost, so that the ratio of the two costs is the
# ratio of their times, with the weights coming from memory as they do in a network's forward
# (caches flushed before each call; one core of an AVX-512 EPYC; 24 to 512 channels × 4 to 576
# positions × reductions of 27 to 2304: 112 shapes, 80% within 0.85–1.37 of the measured
# ratio): a multiply-add over the output channels rounded up to whole vectors costs
# NARROW_MAC_WEIGHT, each weight packed (once per chunk of up to NARROW_COLUMNS positions)
# NARROW_PACK_OPS, each output NARROW_OUTPUT_OPS (turned across into C), each entry of the
# column matrix NARROW_STAGE_OPS. It wins at 2² and 3² (0.45–0.85× broadcast's time) and on 6²
# over long reductions (0.9×), not where the positions fill whole vectors (4², 8², 12²:
# 1.1–1.5×) or the reduction is short. With the weights warm it does better (3²: 0.55–0.7×,
# 6²: 0.75–0.85×), but a network's forward rarely finds them there.
NARROW_COLUMNS = 64             # positions staged at a time (lib/gemm.h: CDSL_NARROW_COLUMNS)
NARROW_MAC_WEIGHT = 0.8
NARROW_PACK_OPS = 4.1
NARROW_OUTPUT_OPS = 10.2
NARROW_STAGE_OPS = 13.8


def _narrow_cost(in_types, out, attrs):
    positions = D.product(out.spatial)
    rows = attrs["in"] // attrs["groups"] * D.product(attrs["kernel"])
    channels = -(-attrs["out"] // attrs["groups"] // BROADCAST_LANES) * BROADCAST_LANES * attrs["groups"]
    chunks = D.floordiv(D.add(positions, NARROW_COLUMNS - 1), NARROW_COLUMNS)
    macs = D.floordiv(D.mul(rows * channels * int(NARROW_MAC_WEIGHT * 100), positions), 100)
    packs = D.mul(int(rows * channels * NARROW_PACK_OPS), chunks)
    outputs = D.mul(int(attrs["out"] * NARROW_OUTPUT_OPS), positions)
    staged = D.mul(int(rows * attrs["groups"] * NARROW_STAGE_OPS), positions)
    return D.add(D.add(macs, packs), D.add(outputs, staged))


def _narrow_workspace(in_types, out, attrs):
    # A group's column matrix staged whole, up to NARROW_COLUMNS positions of it at a time (none
    # for a 1×1 on the input itself, read where it lies); and, in the same memory, what im2col's
    # batched GEMMs need past BROADCAST_BATCH_COLUMNS positions in the batch, and the backward's
    # column matrix.
    positions = D.product(out.spatial)
    columns = min(positions, NARROW_COLUMNS) if isinstance(positions, int) else NARROW_COLUMNS
    staged = 0 if _is_pointwise(attrs) else attrs["in"] // attrs["groups"] * D.product(attrs["kernel"]) * columns
    return D.maximum(staged, _batched_workspace(in_types, out, attrs))


CONV_VARIANTS = (
    Variant("im2col", "conv", "GEMM per group over the column matrix, gathered as the GEMM packs it",
            cost=_im2col_cost, batch_costs=(("c", _im2col_batch_cost),), workspace=_batched_workspace,
            parallel="batch, or the GEMM's rows for large products", fuses_epilogue=True,
            thread_workspace=_columns_and_gradients, costs_on=ON_OPENCL, writes_param_grads=_PARAM_GRADS_WRITTEN_ON),
    Variant("pointwise", "conv", "1×1 at stride 1 without padding: a GEMM on the input itself",
            cost=_gemm_cost, applies=_is_pointwise,
            needs="a 1×1 kernel, stride 1 and no padding before or after on any axis",
            parallel="batch, or the GEMM's rows for large products", fuses_epilogue=True,
            thread_workspace=_own_gradients, costs_on=ON_OPENCL, writes_input_grad=_POINTWISE_WRITES_DX,
            writes_param_grads=_PARAM_GRADS_WRITTEN_ON),
    Variant("broadcast", "conv", "a small map: each weight broadcast against vectors of positions of the column "
                                 "matrix, gathered as it is staged, the weights read where they lie; a batch of more "
                                 "positions as GEMMs over several samples (backward as pointwise or im2col)",
            cost=_broadcast_cost, batch_costs=(("c", _batching_past(BROADCAST_BATCH_COLUMNS, _broadcast_cost)),),
            workspace=_broadcast_workspace,
            parallel="rows of output channels (backward: as pointwise or im2col)",
            fuses_epilogue=True, thread_workspace=_broadcast_thread_workspace, backends=("c",),
            dot_columns=BROADCAST_BATCH_COLUMNS, writes_input_grad=_POINTWISE_WRITES_DX,
            writes_param_grads=_PARAM_GRADS_WRITTEN_ON),
    Variant("narrow", "conv", "few positions: each entry of the column matrix broadcast against vectors of output "
                              "channels, whose weights are packed a block at a time in L1; a batch of more positions "
                              "as GEMMs over several samples (backward as pointwise or im2col)",
            cost=_narrow_cost, batch_costs=(("c", _batching_past(BROADCAST_BATCH_COLUMNS, _narrow_cost)),),
            workspace=_narrow_workspace,
            parallel="blocks of output channels (backward: as pointwise or im2col)",
            fuses_epilogue=True, thread_workspace=_broadcast_thread_workspace, backends=("c",),
            dot_columns=BROADCAST_BATCH_COLUMNS, writes_input_grad=_POINTWISE_WRITES_DX,
            writes_param_grads=_PARAM_GRADS_WRITTEN_ON),
    Variant("direct", "conv_direct", "a loop over the window per output channel (one input channel per group); on "
                                      "a small map across channels, a vector holding one cell of each",
            cost=lambda in_types, out, attrs: D.mul(Conv.macs_of(attrs, out), 2),
            applies=_one_channel_per_group, needs="one input channel per group (depthwise)",
            parallel="batch × channels", parallel_threshold=0, fuses_epilogue=True, costs_on=ON_OPENCL,
            writes_input_grad=(("c", _direct_writes_dx),)),
    Variant("blocked", "conv", "the input copied zero-padded and split by phase: the packed GEMM over it, each row of "
                               "the column matrix one contiguous run, or for a short reduction a direct loop of "
                               "register tiles (backward as im2col)",
            cost=_blocked_cost, workspace=_blocked_workspace,
            parallel="the GEMM's rows or columns, or channel blocks × position tiles, of each sample (backward: as "
                     "im2col)",
            gemm_threshold=BLOCKED_SPLIT_MACS, fuses_epilogue=True, thread_workspace=_columns_and_gradients,
            writes_param_grads=_PARAM_GRADS_WRITTEN_ON),
    _winograd_variant("winograd2"),
    _winograd_variant("winograd4"),
    Variant("separable", "conv_separable", "a frozen const kernel of rank 1 (Sobel, box, Gaussian) as one 1-D pass "
                                           "per axis (dX: the passes transposed, in reverse order)",
            cost=_separable_cost, applies=_is_separable,
            needs="a frozen `const` weight (weight=CONST, frozen=true) whose kernel is, for every pair of output and "
                  "input channel, an outer product of one vector per axis (rank 1)",
            workspace=_separable_workspace, fuses_epilogue=True, backends=("c",)),
    Variant("tiled", "conv_tiled", "OpenCL: work-groups over tiles of output channels × positions, the reduction "
                                   "staged in local memory (dX and dW the same way)",
            cost=_tiled_cost, parallel="work-groups over channel × position tiles", fuses_epilogue=True,
            backends=("opencl",), tiles=_tiled_tiles),
    Variant("fft", "conv_fft", "FFT convolution: the padded input's and the kernels' spectra multiplied per "
                               "frequency, transformed back (dX and dW the same way)",
            cost=_fft_cost, applies=_is_fft_shape,
            needs="stride 1, a window of more than one tap, sizes known when the file is checked, and at most "
                  f"{FFT_MAX_SPECTRUM_ELEMENTS // 2} complex values in the kernels' spectra (output channels × "
                  "input channels per group × the grid's half spectrum)",
            workspace=_fft_workspace, derived=_fft_derived, derived_in_backward=True,
            parallel="channel pairs and output channels", fuses_epilogue=True, backends=("c",)),
    Variant("dot", "conv", "dot products of weight rows with each position's window, nothing packed; a batch of "
                           "more positions as GEMMs over several samples (backward as pointwise or im2col)",
            cost=_dot_cost, batch_costs=(("c", _batching_past(DOT_COLUMNS, _dot_cost)),), workspace=_batched_workspace,
            parallel="weight rows (backward: as pointwise or im2col)",
            fuses_epilogue=True, thread_workspace=_columns_and_gradients, backends=("c",), dot_columns=DOT_COLUMNS,
            writes_input_grad=_POINTWISE_WRITES_DX, writes_param_grads=_PARAM_GRADS_WRITTEN_ON),
)


@register
class Conv(OpDef):
    name = "conv"
    saves_for_backward = frozenset({INPUTS})   # dW += dY · colᵀ, the columns from x (dX needs the weights only)
    aliases = ("convolution", "conv_nd")
    summary = "convolution (cross-correlation; flip=true for the mathematical one)"
    args = (Arg("out"), Arg("kernel"), *_WINDOW_ARGS, Arg("groups", 1), *_LAYER_ARGS)
    template = "conv"
    c_helpers = ("gemm", "im2col", "conv_blocked", "winograd", "fft")
    convolution = True

    def backward_reads(self, attrs):
        # The input is read for the weight gradient only, which a frozen layer does not compute.
        return frozenset() if attrs["frozen"] else self.saves_for_backward

    def out_channels(self, attrs: dict, cin, ctx: OpContext) -> int:
        return expect_int(attrs["out"], "out", ctx, "out", minimum=1)

    def groups(self, attrs: dict, cin, ctx: OpContext) -> int:
        return expect_int(attrs["groups"], "groups", ctx, "groups", minimum=1)

    def expand(self, builder, inputs, attrs, ctx):
        # Reflect and replicate padding: a pad layer, then this convolution on the padded map.
        x, rest = explicit_padding(self.name, builder, inputs[0], attrs, ctx)
        if x is inputs[0] and rest is attrs:
            return None
        return builder.apply_primitive(self.name, (x,), rest, ctx, None)

    def normalize(self, attrs: dict, in_types, ctx: OpContext) -> dict:
        (t,) = in_types
        rank = input_rank_check(self.name, t, ctx)
        cin = t.channels
        if not isinstance(cin, int):
            raise ctx.error(f"{self.name} needs a fixed channel count; the input is {ctx.shape_text(t)}")
        out = self.out_channels(attrs, cin, ctx)
        groups = self.groups(attrs, cin, ctx)
        if cin % groups or out % groups:
            raise ctx.error(f"groups={groups} must divide both the input channels ({cin}) and the output "
                            f"channels ({out})", arg="groups" if "groups" in ctx.arg_spans else None)
        kernel = per_axis(attrs["kernel"], rank, ctx, "kernel")
        stride = per_axis(attrs["stride"], rank, ctx, "stride")
        dilation = per_axis(attrs["dilation"], rank, ctx, "dilation")
        pads = resolve_padding(attrs["pad"], t.spatial, kernel, stride, dilation, ctx)
        weight = attrs["weight"]
        wshape = (out, cin // groups, *kernel)
        if weight is not None:
            if not isinstance(weight, ConstTensor):
                raise ctx.error(f"`weight` must name a const, got {describe_value(weight)}", arg="weight")
            if weight.shape != wshape:
                raise ctx.error(f"const `{weight.name}` has shape [{', '.join(map(str, weight.shape))}] but "
                                f"this {self.name}'s weight is [{', '.join(map(str, wshape))}] "
                                f"(out, in/groups, *kernel)", arg="weight")
        frozen = expect_bool(attrs["frozen"], ctx, "frozen")
        if expect_symbol(attrs["pad_mode"], PAD_MODES, ctx, "pad_mode") != "zeros":
            raise ctx.error("internal error: a convolution with pad_mode other than zeros is not expanded")
        normalized = {
            "out": out, "in": cin, "groups": groups, "kernel": kernel, "stride": stride,
            "dilation": dilation, "pads": pads, "pad_spec": attrs["pad"],
            "bias": expect_bool(attrs["bias"], ctx, "bias"),
            "flip": expect_bool(attrs["flip"], ctx, "flip"),
            "init": parse_init(attrs["init"], ctx),
            "frozen": frozen, "weight": weight,
            "algo": expect_symbol(attrs["algo"], ALGOS, ctx, "algo"),
            "dtype": ctx.dtype,          # Winograd F(4×4, 3×3) applies by its measured f32 error
            "in_spatial": tuple(t.spatial),   # the FFT variant's grid is planned from the input's size
        }
        chosen = next((v for v in self.variants() if v.name == normalized["algo"]), None)
        if chosen is not None and not chosen.applies(normalized):
            raise ctx.error(f"algo={chosen.name} does not apply to this {self.name}: it needs {chosen.needs}",
                            arg="algo")
        return normalized

    def variants(self):
        return CONV_VARIANTS

    @staticmethod
    def macs_of(attrs, out) -> Dim:
        per_out = attrs["in"] // attrs["groups"] * D.product(attrs["kernel"])
        return D.mul(per_out * attrs["out"], D.product(out.spatial))

    def infer(self, in_types, attrs, ctx) -> TensorType:
        (t,) = in_types
        outs = output_sizes(self.name, t, attrs["pads"], attrs["kernel"], attrs["stride"], attrs["dilation"], ctx,
                            attrs["pad_spec"])
        return TensorType((attrs["out"], *outs))

    def param_specs(self, in_types, attrs) -> tuple[ParamSpec, ...]:
        k = attrs["kernel"]
        kprod = D.product(k)
        fan_in = attrs["in"] // attrs["groups"] * kprod
        fan_out = attrs["out"] // attrs["groups"] * kprod
        trainable = not attrs["frozen"]
        w = attrs["weight"]
        specs = [ParamSpec("weight", (attrs["out"], attrs["in"] // attrs["groups"], *k),
                           Init("const") if w is not None else attrs["init"], trainable, fan_in, fan_out,
                           w.values if w is not None else None)]
        if attrs["bias"]:
            specs.append(ParamSpec("bias", (attrs["out"],), Init("zeros"), trainable, fan_in, fan_out))
        return tuple(specs)

    def macs(self, in_types, out, attrs):
        return self.macs_of(attrs, out)

    def window(self, in_types, attrs):
        return effective_kernel(attrs["kernel"], attrs["dilation"]), attrs["stride"]

    def describe(self, attrs) -> str:
        parts = [f"{attrs['out']}", f"k={_kernel_text(attrs['kernel'])}"]
        if any(s > 1 for s in attrs["stride"]):
            parts.append(f"s={_kernel_text(attrs['stride'])}")
        if any(r > 1 for r in attrs["dilation"]):
            parts.append(f"r={_kernel_text(attrs['dilation'])}")
        if isinstance(attrs["pad_spec"], Symbol) and attrs["pad_spec"].name != "valid":
            parts.append(f"pad={attrs['pad_spec'].name}")
        elif not isinstance(attrs["pad_spec"], Symbol):
            parts.append(f"pad={describe_value(attrs['pad_spec'])}")
        if attrs["groups"] > 1:
            parts.append(f"g={attrs['groups']}")
        if attrs["flip"]:
            parts.append("flip")
        if attrs["frozen"]:
            parts.append("frozen")
        return f"{self.name}({', '.join(parts)})"

    def kernel_context(self, attrs, in_types, out, c) -> dict:
        fft = fft_grid(attrs) if _is_fft_shape(attrs) else None
        return {**window_context(attrs, in_types[0], out, c),
                "wino_block": {m: winograd_block(attrs, m) for m in WINOGRAD_TILES.values()},
                "wino_weight_block": {m: winograd_weight_block(attrs, m) for m in WINOGRAD_TILES.values()},
                "pointwise": _is_pointwise(attrs), "gemm_samples": gemm_samples(out),
                "blocked_direct": blocked_direct(attrs), "dx_narrow": dx_narrow(out),
                "separable": separable_factors(attrs), "separable_axes": separable_axes(attrs),
                "fft": fft, "fft_slots": _fft_slots(attrs),
                "fft_weight_form": fft_weight_form(attrs, out, fft) if fft is not None else None,
                "direct_grid": direct_grid(attrs, in_types, out) if _one_channel_per_group(attrs) else None,
                "direct_across": direct_across(attrs, in_types, out) if _one_channel_per_group(attrs) else None}


@register
class Depthwise(Conv):
    name = "depthwise"
    aliases = ("depthwise_conv", "depthwise_convolution")
    summary = "depthwise convolution: conv with groups = input channels (§3.8)"
    depthwise = True
    args = (Arg("kernel"), Arg("multiplier", 1), *_WINDOW_ARGS, *_LAYER_ARGS)

    def out_channels(self, attrs, cin, ctx) -> int:
        return cin * expect_int(attrs["multiplier"], "multiplier", ctx, "multiplier", minimum=1)

    def groups(self, attrs, cin, ctx) -> int:
        return cin

    def describe(self, attrs) -> str:
        return super().describe(attrs).replace(f"{self.name}({attrs['out']}, ", f"{self.name}(")


@register
class Separable(OpDef):
    """Expands at build time into `<name>.dw` (depthwise, no bias) then `<name>.pw` (1×1 conv)."""
    name = "separable"
    aliases = ("separable_conv", "separable_convolution")
    summary = "depthwise then 1×1 conv with the bias, as in Keras (§3.8)"
    args = (Arg("out"), Arg("kernel"), *_WINDOW_ARGS, Arg("bias", True), init_arg(),
            Arg("frozen", False), pad_mode_arg())

    def expand(self, builder, inputs, attrs, ctx):
        x, attrs = explicit_padding(self.name, builder, inputs[0], attrs, ctx)
        dw = builder.apply_primitive("depthwise", (x,), {
            "kernel": attrs["kernel"], "stride": attrs["stride"], "pad": attrs["pad"],
            "dilation": attrs["dilation"], "bias": False, "init": attrs["init"], "frozen": attrs["frozen"],
        }, ctx, "dw")
        rank = len(builder.type_of(inputs[0]).spatial)
        return builder.apply_primitive("conv", (dw,), {
            "out": attrs["out"], "kernel": (1,) * rank, "bias": attrs["bias"], "init": attrs["init"],
            "frozen": attrs["frozen"],
        }, ctx, "pw")
