"""local and tiled: convolutions whose weights are not shared across positions (§3.1, §3.2).

Both compute Z[i, j, k] = Σ V[l, j·s + m, k·s + n] · W[i, j mod T, k mod T, l, m, n]; `local`
is the case T = output size (one kernel set per output position), `tiled` takes T = tile
(kernel sets repeat every T positions; tile = 1 is conv). One template serves both.
"""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import Init, ParamSpec, TensorType
from .base import (INPUTS, Arg, OpContext, OpDef, Symbol, describe_value, expect_bool, expect_int, init_arg, parse_init,
                   register)
from .spatial import as3d, output_sizes, pad_arg, per_axis, resolve_padding, window_context

_TAIL_ARGS = (Arg("stride", 1), pad_arg(), Arg("bias", True), init_arg(),
              Arg("frozen", False))


def _x(values) -> str:
    return "×".join(map(str, values))


class UnsharedConv(OpDef):
    """What local and tiled share; a subclass says how many kernel sets there are per axis."""
    template = "local"
    saves_for_backward = frozenset({INPUTS})   # dW += dY · x at each position (dX needs the weights only)
    parallel = "batch × channels"
    unshared = True

    def backward_reads(self, attrs):
        # The input is read for the weight gradient only, which a frozen layer does not compute.
        return frozenset() if attrs["frozen"] else self.saves_for_backward

    def kernel_sets(self, attrs: dict, out_spatial: tuple, ctx: OpContext) -> tuple:
        """Kernel sets per axis: one per output position unless a subclass says otherwise."""
        return tuple(out_spatial)

    def check_input(self, t: TensorType, ctx: OpContext) -> None:
        pass

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        rank = len(t.spatial)
        if rank not in (1, 2):
            raise ctx.error(f"{self.name} works on 1-D and 2-D maps ([C, L] or [C, H, W]); the input is "
                            f"{ctx.shape_text(t)}")
        if not isinstance(t.channels, int):
            raise ctx.error(f"{self.name} needs a fixed channel count; the input is {ctx.shape_text(t)}")
        self.check_input(t, ctx)
        kernel = per_axis(attrs["kernel"], rank, ctx, "kernel")
        stride = per_axis(attrs["stride"], rank, ctx, "stride")
        ones = (1,) * rank
        pads = resolve_padding(attrs["pad"], t.spatial, kernel, stride, ones, ctx)
        norm = {
            "out": expect_int(attrs["out"], "out", ctx, "out", minimum=1), "in": t.channels,
            "kernel": kernel, "stride": stride, "dilation": ones, "pads": pads, "pad_spec": attrs["pad"],
            "bias": expect_bool(attrs["bias"], ctx, "bias"), "init": parse_init(attrs["init"], ctx),
            "frozen": expect_bool(attrs["frozen"], ctx, "frozen"),
        }
        outs = output_sizes(self.name, t, pads, kernel, stride, ones, ctx, attrs["pad"])
        norm["tile"] = self.kernel_sets(attrs, outs, ctx)
        return norm

    def infer(self, in_types, attrs, ctx):
        (t,) = in_types
        outs = output_sizes(self.name, t, attrs["pads"], attrs["kernel"], attrs["stride"], attrs["dilation"], ctx,
                            attrs["pad_spec"])
        return TensorType((attrs["out"], *outs))

    def param_specs(self, in_types, attrs):
        k, tile = attrs["kernel"], attrs["tile"]
        fan_in = attrs["in"] * D.product(k)
        fan_out = attrs["out"] * D.product(k)
        trainable = not attrs["frozen"]
        specs = [ParamSpec("weight", (attrs["out"], *tile, attrs["in"], *k), attrs["init"], trainable,
                           fan_in, fan_out)]
        if attrs["bias"]:
            specs.append(ParamSpec("bias", (attrs["out"], *tile), Init("zeros"), trainable, fan_in, fan_out))
        return tuple(specs)

    def macs(self, in_types, out, attrs):
        # §2.4: every output value is one dot product over in · kernel taps, whatever its weights.
        return D.mul(attrs["out"] * attrs["in"] * D.product(attrs["kernel"]), D.product(out.spatial))

    def window(self, in_types, attrs):
        return attrs["kernel"], attrs["stride"]

    def describe_extra(self, attrs) -> list[str]:
        return []

    def describe(self, attrs):
        parts = [str(attrs["out"]), f"k={_x(attrs['kernel'])}", *self.describe_extra(attrs)]
        if any(s > 1 for s in attrs["stride"]):
            parts.append(f"s={_x(attrs['stride'])}")
        pad = attrs["pad_spec"]
        if isinstance(pad, Symbol) and pad.name != "valid":
            parts.append(f"pad={pad.name}")
        elif not isinstance(pad, Symbol):
            parts.append(f"pad={describe_value(pad)}")
        if attrs["frozen"]:
            parts.append("frozen")
        return f"{self.name}({', '.join(parts)})"

    def kernel_context(self, attrs, in_types, out, c):
        ctx = window_context(attrs, in_types[0], out, c)
        ctx["T"] = as3d(attrs["tile"], 1)
        return ctx


@register
class Local(UnsharedConv):
    name = "local"
    aliases = ("locally_connected",)
    summary = "locally connected: a kernel of its own at every output position (§3.1)"
    kernel_per_position = True
    args = (Arg("out"), Arg("kernel"), *_TAIL_ARGS)

    def check_input(self, t, ctx):
        if not t.is_static():
            name = ctx.input_names[0] if ctx.input_names else "x"
            raise ctx.error(f"local needs a fixed-size input: `{name}` is {ctx.shape_text(t)} and local has "
                            f"one set of weights per output position; use tiled or conv for a run-time size")


@register
class Tiled(UnsharedConv):
    name = "tiled"
    summary = "tiled convolution: kernel set (j mod t, k mod t) at output position (j, k) (§3.2)"
    args = (Arg("out"), Arg("kernel"), Arg("tile"), *_TAIL_ARGS)

    def kernel_sets(self, attrs, out_spatial, ctx):
        tile = per_axis(attrs["tile"], len(out_spatial), ctx, "tile")
        for t, o in zip(tile, out_spatial):
            # A set that no position uses would be a weight that never trains.
            if isinstance(o, int) and t > o:
                raise ctx.error(f"tile {_x(tile)} is larger than the output ({_x(out_spatial)}): some kernel "
                                f"sets would never be used; tile = the output size is `local`", arg="tile")
        return tile

    def describe_extra(self, attrs):
        return [f"t={_x(attrs['tile'])}"]
