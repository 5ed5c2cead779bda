"""upsample: fixed (not learned) up-sampling by an integer factor per axis, nearest or linear.

The linear modes follow PyTorch's align_corners=False: output cell o reads the input at
(o + 0.5) / f − 0.5, clamped at 0, interpolating between its two neighbours on each axis.
"""
from __future__ import annotations

from fractions import Fraction

from ..ir import dims as D
from ..ir.graph import TensorType
from .base import Arg, OpDef, Symbol, expect_symbol, register
from .spatial import as3d, input_rank_check, per_axis

# The linear mode of each rank, named as PyTorch names them.
LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}
MODES = ("nearest", "linear", "bilinear", "trilinear")


@register
class Upsample(OpDef):
    name = "upsample"
    saves_for_backward = frozenset()           # dy added back with the forward's weights
    parallel = "batch × channels"
    aliases = ("upsampling", "interpolate", "resize", "upsample_nearest", "upsample_bilinear")
    summary = "up-sampling by an integer factor: nearest, or (bi/tri)linear with align_corners=false"
    args = (Arg("factor"), Arg("mode", Symbol("nearest"), symbols=("nearest", "linear", "bilinear", "trilinear")))

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        rank = input_rank_check(self.name, t, ctx)
        factor = per_axis(attrs["factor"], rank, ctx, "factor")
        mode = expect_symbol(attrs["mode"], MODES, ctx, "mode")
        if mode != "nearest" and mode != LINEAR[rank]:
            raise ctx.error(f"mode={mode} does not fit a {rank}-D map ({ctx.shape_text(t)}): use "
                            f"mode={LINEAR[rank]} (or nearest)", arg="mode")
        return {"factor": factor, "mode": mode}

    def infer(self, in_types, attrs, ctx):
        t = in_types[0]
        return TensorType((t.channels, *(D.mul(s, f) for s, f in zip(t.spatial, attrs["factor"]))))

    def macs(self, in_types, out, attrs):
        if attrs["mode"] == "nearest":
            return 0
        # A linear mode blends 2 input cells on every axis that grows: 2^axes multiply-adds per value.
        taps = 2 ** sum(1 for f in attrs["factor"] if f > 1)
        return D.mul(D.product(out.shape), taps)

    def window(self, in_types, attrs):
        # Nearest reads one input cell, a linear mode two neighbours on every axis that grows;
        # one output step is 1/f of an input step.
        linear = attrs["mode"] != "nearest"
        span = tuple(2 if linear and f > 1 else 1 for f in attrs["factor"])
        step = tuple(Fraction(1, f) if f > 1 else 1 for f in attrs["factor"])
        return span, step

    def describe(self, attrs):
        factor = "×".join(map(str, attrs["factor"]))
        return f"upsample({factor}" + (f", {attrs['mode']})" if attrs["mode"] != "nearest" else ")")

    def kernel_context(self, attrs, in_types, out, c):
        return {
            "F": as3d(attrs["factor"], 1),
            "I": tuple(c(d) for d in as3d(in_types[0].spatial, 1)),
            "O": tuple(c(d) for d in as3d(out.spatial, 1)),
            "C": c(out.channels),
        }
