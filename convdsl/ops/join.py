"""Joins of several tensors: add (residuals), sub and mul (element-wise), concat (Inception, §3.6),
scale (SE, §3.10)."""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import TensorType
from .base import INPUTS, OpDef, register


@register
class Add(OpDef):
    name = "add"
    saves_for_backward = frozenset()           # every input's gradient is dy
    parallel = "elements"
    aliases = ("sum", "plus")
    summary = "element-wise sum of tensors of one shape"
    locality = "value"
    fuses_as = "residual"          # of two tensors: the producer of one adds the other as it writes
    min_inputs, max_inputs = 2, None

    def infer(self, in_types, attrs, ctx):
        first = in_types[0]
        for i, t in enumerate(in_types[1:], start=1):
            if t.shape != first.shape:
                raise ctx.error(f"add: input {i + 1} is {ctx.shape_text(t)} but input 1 is "
                                f"{ctx.shape_text(first)}; add needs equal shapes")
        return first

    def kernel_context(self, attrs, in_types, out, c):
        return {"numel": c(D.product(out.shape))}


class Binary(OpDef):
    """An element-wise op of exactly two tensors of one shape, as add has them (a per-channel
    factor is `scale`'s)."""
    parallel = "elements"
    locality = "value"
    min_inputs, max_inputs = 2, 2

    def infer(self, in_types, attrs, ctx):
        a, b = in_types
        if b.shape != a.shape:
            hint = ""
            if b.shape[0] == a.channels and all(d == 1 for d in b.shape[1:]) and a.shape != b.shape and \
                    self.name == "mul":
                hint = "; for one factor per channel write scale(x, s)"
            raise ctx.error(f"{self.name}: input 2 is {ctx.shape_text(b)} but input 1 is {ctx.shape_text(a)}; "
                            f"{self.name} needs equal shapes{hint}")
        return a

    def kernel_context(self, attrs, in_types, out, c):
        return {"numel": c(D.product(out.shape))}


@register
class Sub(Binary):
    name = "sub"
    saves_for_backward = frozenset()           # da = dy, db = −dy
    aliases = ("subtract", "minus", "difference")
    summary = "element-wise difference a − b of two tensors of one shape"


@register
class Mul(Binary):
    name = "mul"
    saves_for_backward = frozenset({INPUTS})   # da = dy·b, db = dy·a
    aliases = ("multiply", "product", "hadamard")
    summary = "element-wise product of two tensors of one shape (a gate; per channel: scale)"


@register
class Concat(OpDef):
    name = "concat"
    saves_for_backward = frozenset()           # each input's gradient is its slice of dy
    aliases = ("concatenate", "cat")
    summary = "join along channels"
    locality = "position"
    min_inputs, max_inputs = 2, None

    def infer(self, in_types, attrs, ctx):
        first = in_types[0]
        for i, t in enumerate(in_types[1:], start=1):
            if t.rank != first.rank or t.spatial != first.spatial:
                raise ctx.error(f"concat: channels may differ, the rest may not: input {i + 1} is "
                                f"{ctx.shape_text(t)} but input 1 is {ctx.shape_text(first)}")
        total = 0
        for t in in_types:
            total = D.add(total, t.channels)
        return TensorType((total, *first.spatial))

    def kernel_context(self, attrs, in_types, out, c):
        return {"spatial": c(D.product(out.spatial)), "Cs": [c(t.channels) for t in in_types],
                "C_out": c(out.channels)}


@register
class Scale(OpDef):
    name = "scale"
    saves_for_backward = frozenset({INPUTS})   # dx = dy·s and ds = Σ dy·x: both inputs
    parallel = "batch × channels"
    summary = "x[c] · s[c]: s is [C] or [C, 1, 1]"
    fuses_as = "scale"             # the producer of x multiplies by s as it writes
    min_inputs, max_inputs = 2, 2

    def infer(self, in_types, attrs, ctx):
        x, s = in_types
        ok = s.shape[0] == x.channels and all(d == 1 for d in s.shape[1:])
        if not ok:
            raise ctx.error(f"scale: the scale is {ctx.shape_text(s)} but needs [{D.to_text(x.channels)}] "
                            f"(one factor per channel of {ctx.shape_text(x)})")
        return x

    def kernel_context(self, attrs, in_types, out, c):
        x = in_types[0]
        return {"C": c(x.channels), "spatial": c(D.product(x.spatial))}
