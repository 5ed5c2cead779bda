"""pad: explicit padding of a map with zeros, its border mirrored (reflect) or its border repeated
(replicate), as PyTorch's F.pad(mode=…). conv, depthwise and separable with `pad_mode=reflect` or
`replicate` expand into this op followed by the convolution without padding (conv.py)."""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import TensorType
from .base import Arg, OpContext, OpDef, Symbol, expect_symbol, register
from .spatial import PAD_MODES, as3d, input_rank_check, mode_error, pad_mode_arg

PAD_AMOUNTS = ("an integer (that much on every side), a tuple per axis such as (1, 2), or (before, after) pairs "
               "such as ((1, 0), (2, 1))")


def check_mode_fits(mode: str, t: TensorType, pads, ctx: OpContext, arg: str) -> None:
    """reflect mirrors the map about its border value without repeating it, so it can pad at most
    size − 1 on a side (PyTorch refuses more); it needs the padded axes' sizes at check time."""
    if mode != "reflect":
        return
    for axis, (size, (before, after)) in enumerate(zip(t.spatial, pads)):
        most = max(before, after)
        if most == 0:
            continue
        if not isinstance(size, int):
            raise ctx.error(f"reflect padding needs a fixed size on each padded axis, but spatial axis {axis + 1} "
                            f"of {ctx.shape_text(t)} is a run-time size; use replicate there", arg=arg)
        if most >= size:
            raise ctx.error(f"reflect padding of {most} on spatial axis {axis + 1} of {ctx.shape_text(t)}, whose "
                            f"size is {size}: reflect pads at most size − 1 = {size - 1} on a side (the border is "
                            f"not repeated); use less padding or pad_mode=replicate", arg=arg)


@register
class Pad(OpDef):
    name = "pad"
    saves_for_backward = frozenset()           # each input cell's gradient sums the cells read from it
    parallel = "batch × channels"
    aliases = ("padding", "reflection_pad", "replication_pad", "zero_pad", "constant_pad")
    summary = "pad a map: zeros, its border mirrored (reflect) or repeated (replicate)"
    args = (Arg("pad", forms=PAD_AMOUNTS), pad_mode_arg("mode"))
    template = "pad"

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        rank = input_rank_check(self.name, t, ctx)
        if isinstance(attrs["pad"], Symbol) and attrs["pad"].name in PAD_MODES:
            raise mode_error(attrs["pad"], ctx, "pad")
        if isinstance(attrs["pad"], Symbol):
            raise ctx.error(f"`pad` of the pad op is {PAD_AMOUNTS}; `{attrs['pad'].name}` needs a window, which "
                            f"only the conv and pool family has", arg="pad")
        from .spatial import resolve_padding
        pads = resolve_padding(attrs["pad"], t.spatial, (1,) * rank, (1,) * rank, (1,) * rank, ctx)
        mode = expect_symbol(attrs["mode"], PAD_MODES, ctx, "mode")
        check_mode_fits(mode, t, pads, ctx, "pad")
        return {"pads": pads, "mode": mode}

    def infer(self, in_types, attrs, ctx):
        t = in_types[0]
        return TensorType((t.channels, *(D.add(D.add(s, b), a) for s, (b, a) in zip(t.spatial, attrs["pads"]))))

    def describe(self, attrs):
        pads = attrs["pads"]
        shown = str(pads[0][0]) if len({p for pair in pads for p in pair}) == 1 else \
            "(" + ", ".join(f"({b}, {a})" for b, a in pads) + ")"
        return f"pad({shown}{'' if attrs['mode'] == 'zeros' else ', ' + attrs['mode']})"

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"C": c(t.channels), "I": tuple(c(d) for d in as3d(t.spatial, 1)),
                "O": tuple(c(d) for d in as3d(out.spatial, 1)),
                "P": tuple(c(b) for b, _ in as3d(attrs["pads"], (0, 0)))}
