"""Pooling (§2.2): maxpool, avgpool and the global pools that make a variable-size map fixed (§4.2)."""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import TensorType
from .base import INPUTS, Arg, OpDef, Symbol, register
from .spatial import input_rank_check, output_sizes, pad_arg, per_axis, resolve_padding, window_context


class WindowPool(OpDef):
    """A window sliding over each channel on its own; padded cells never count."""
    args = (Arg("window"), Arg("stride", None), pad_arg())
    parallel = "batch × channels"
    window_pool = True
    parallel_threshold = 16384         # a window's cells are many reads per output element

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        rank = input_rank_check(self.name, t, ctx)
        window = per_axis(attrs["window"], rank, ctx, "window")
        stride = window if attrs["stride"] is None else per_axis(attrs["stride"], rank, ctx, "stride")
        ones = (1,) * rank
        pads = resolve_padding(attrs["pad"], t.spatial, window, stride, ones, ctx)
        for (before, after), k in zip(pads, window):
            # Every window must hold at least one real cell, or it would have nothing to pool.
            if isinstance(before, int) and before >= k or isinstance(after, int) and after >= k:
                raise ctx.error(f"{self.name}: padding must be smaller than the window ({k}) on every axis",
                                arg="pad")
        return {"kernel": window, "stride": stride, "dilation": ones, "pads": pads, "pad_spec": attrs["pad"]}

    def infer(self, in_types, attrs, ctx):
        (t,) = in_types
        outs = output_sizes(self.name, t, attrs["pads"], attrs["kernel"], attrs["stride"], attrs["dilation"], ctx,
                            attrs["pad_spec"])
        return TensorType((t.channels, *outs))

    def macs(self, in_types, out, attrs):
        # The chapter counts multiply-adds; a pool has none, but it reads every window cell once.
        return 0

    def window(self, in_types, attrs):
        return attrs["kernel"], attrs["stride"]

    def describe(self, attrs):
        k = "×".join(map(str, attrs["kernel"]))
        s = "×".join(map(str, attrs["stride"]))
        text = f"{self.name}({k}" + (f", s={s}" if attrs["stride"] != attrs["kernel"] else "")
        if isinstance(attrs["pad_spec"], Symbol) and attrs["pad_spec"].name != "valid":
            text += f", pad={attrs['pad_spec'].name}"
        return text + ")"

    def kernel_context(self, attrs, in_types, out, c):
        return window_context(attrs, in_types[0], out, c)


@register
class MaxPool(WindowPool):
    name = "maxpool"
    saves_for_backward = frozenset({INPUTS})   # the winner of each window is found again in x
    c_helpers = ("vector",)                    # 2×2 at stride 2: vectors of windows
    aliases = ("max_pooling",)
    relatives = ("fractional_max_pool",)
    summary = "max over each window; a padded cell never wins"

    def kernel_context(self, attrs, in_types, out, c):
        # Without padding every window lies inside the input (the output size is the floor of
        # (I − K) / S + 1), and the forward reads its cells with no bounds to check.
        inside = all(before == 0 and after == 0 for before, after in attrs["pads"])
        context = super().kernel_context(attrs, in_types, out, c)
        # The commonest pool of all, 2×2 at stride 2 on a 2-D map without padding: its windows
        # are the even and odd columns of two rows, vectors of windows apart (the template).
        pairs = inside and len(in_types[0].spatial) == 2 and context["K"] == (1, 2, 2) and context["S"] == (1, 2, 2)
        return {**context, "inside": inside, "pairs": pairs}


@register
class AvgPool(WindowPool):
    name = "avgpool"
    saves_for_backward = frozenset()           # dy spread evenly over each window's real cells
    aliases = ("average_pooling", "avg_pooling", "average_pool")
    summary = "mean over each window; padding is not counted"


class GlobalPool(OpDef):
    def normalize(self, attrs, in_types, ctx):
        input_rank_check(self.name, in_types[0], ctx)
        return {}

    def infer(self, in_types, attrs, ctx):
        t = in_types[0]
        return TensorType((t.channels, *(1 for _ in t.spatial)))

    def window(self, in_types, attrs):
        return "global"

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"spatial": c(D.product(t.spatial))}


@register
class GlobalAvgPool(GlobalPool):
    name = "globalavgpool"
    saves_for_backward = frozenset()           # dy / positions, everywhere
    aliases = ("adaptive_avg_pool", "global_average_pooling", "global_average_pool", "global_avg_pool", "gap")
    summary = "mean over all positions → [C, 1, 1]"


@register
class GlobalMaxPool(GlobalPool):
    name = "globalmaxpool"
    saves_for_backward = frozenset({INPUTS})   # the winning position is found again in x
    aliases = ("adaptive_max_pool", "global_max_pooling", "global_max_pool")
    summary = "max over all positions → [C, 1, 1]"
