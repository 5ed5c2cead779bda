"""Ops that mix channels at each position: maxout (§5.2) and ShuffleNet's channel shuffle (§3.9).

Both work on maps of any rank and on flat vectors ([F] counts as F channels of one position).
"""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import TensorType
from .base import INPUTS, Arg, OpContext, OpDef, expect_int, register


def _channel_split(op: str, t: TensorType, value, arg: str, ctx: OpContext) -> int:
    """`value` as a positive integer that divides the input's channel count."""
    n = expect_int(value, arg, ctx, arg, minimum=1)
    c = t.channels
    if not isinstance(c, int):
        raise ctx.error(f"{op} needs a fixed channel count; the input is {ctx.shape_text(t)}")
    if c % n:
        raise ctx.error(f"{op}: {arg}={n} must divide the input channels, but the input is {ctx.shape_text(t)} "
                        f"with {c} channels", arg=arg)
    return n


@register
class Maxout(OpDef):
    name = "maxout"
    saves_for_backward = frozenset({INPUTS})   # the winning channel is found again in x
    parallel = "batch × groups"
    summary = "max over each group of k consecutive channels: C → C/k (§5.2)"
    locality = "position"
    args = (Arg("k"),)

    def normalize(self, attrs, in_types, ctx):
        return {"k": _channel_split(self.name, in_types[0], attrs["k"], "k", ctx)}

    def infer(self, in_types, attrs, ctx):
        t = in_types[0]
        return TensorType((t.channels // attrs["k"], *t.spatial))

    def describe(self, attrs):
        return f"maxout({attrs['k']})"

    def kernel_context(self, attrs, in_types, out, c):
        return {"C_out": c(out.channels), "spatial": c(D.product(out.spatial))}


@register
class Shuffle(OpDef):
    name = "shuffle"
    saves_for_backward = frozenset()           # the inverse permutation of dy
    aliases = ("channel_shuffle",)
    summary = "channel shuffle of ShuffleNet: [g, C/g] → [C/g, g] (§3.9)"
    args = (Arg("groups"),)
    positionwise = True            # a permutation of the channels of each position
    locality = "position"

    def normalize(self, attrs, in_types, ctx):
        return {"groups": _channel_split(self.name, in_types[0], attrs["groups"], "groups", ctx)}

    def describe(self, attrs):
        return f"shuffle({attrs['groups']})"

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial))}
