"""conv, depthwise and separable: the convolution family of §1.2 and §3.8.

conv computes cross-correlation as every DL library does; flip=true is the mathematical
convolution (§1.1.1): the kernel is read reversed along every spatial axis.
"""
from __future__ import annotations

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Init, ParamSpec, TensorType
from .base import (INPUTS, Arg, ConstTensor, OpContext, OpDef, Symbol, Variant, describe_value, expect_bool, expect_int,
                   expect_symbol, init_arg, parse_init, register)
from .spatial import (PAD_MODES, effective_kernel, input_rank_check, output_sizes, pad_arg, pad_mode_arg, per_axis,
                      resolve_padding, window_context)

ALGOS = ("auto", "im2col", "pointwise", "direct")

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


# ---- kernel variants: applicability on the attributes, cost in element operations per sample ----

def _is_pointwise(attrs) -> bool:
    """A 1×1 window at stride 1 with no zeros before or after on any axis: the input itself
    is the column matrix. Padding at the end alone still makes the output bigger than the input."""
    return all(k == 1 for k in attrs["kernel"]) and all(s == 1 for s in attrs["stride"]) \
        and all(before == 0 and after == 0 for before, after in attrs["pads"])


def _one_channel_per_group(attrs) -> bool:
    return attrs["in"] == attrs["groups"]


def _gemm_cost(in_types, out, attrs):
    # A GEMM of few rows per group (COG) pays its packing and loop overhead on every row.
    rows = attrs["out"] // attrs["groups"]
    macs = Conv.macs_of(attrs, out)
    return D.add(macs, D.floordiv(D.mul(macs, 4), rows))


def _columns(in_types, out, attrs):
    return D.mul(attrs["in"] * D.product(attrs["kernel"]), D.product(out.spatial))


def _own_gradients(in_types, out, attrs):
    # dW and db of one thread, added up in thread order after the batch loop.
    return attrs["out"] * (attrs["in"] // attrs["groups"]) * D.product(attrs["kernel"]) + attrs["out"]


def _columns_and_gradients(in_types, out, attrs):
    return D.add(_columns(in_types, out, attrs), _own_gradients(in_types, out, attrs))


CONV_VARIANTS = (
    Variant("im2col", "conv", "GEMM per group over the column matrix, gathered as the GEMM packs it",
            cost=lambda in_types, out, attrs: D.add(_gemm_cost(in_types, out, attrs), _columns(in_types, out, attrs)),
            workspace=_columns, parallel="batch, or the GEMM's rows for large products", fuses_epilogue=True,
            thread_workspace=_columns_and_gradients),
    Variant("pointwise", "conv", "1×1 at stride 1 without padding: a GEMM on the input itself",
            cost=_gemm_cost, applies=_is_pointwise,
            needs="a 1×1 kernel, stride 1 and no padding before or after on any axis",
            parallel="batch, or the GEMM's rows for large products", fuses_epilogue=True,
            thread_workspace=_own_gradients),
    Variant("direct", "conv_direct", "a loop over the window per output channel (one input channel per group)",
            cost=lambda in_types, out, attrs: D.mul(Conv.macs_of(attrs, out), 2),
            applies=_one_channel_per_group, needs="one input channel per group (depthwise)",
            parallel="batch × channels", parallel_threshold=0, fuses_epilogue=True),
)


@register
class Conv(OpDef):
    name = "conv"
    saves_for_backward = frozenset({INPUTS})   # dW += dY · colᵀ, the columns from x (dX needs the weights only)
    aliases = ("convolution", "conv_nd")
    summary = "convolution (cross-correlation; flip=true for the mathematical one)"
    args = (Arg("out"), Arg("kernel"), *_WINDOW_ARGS, Arg("groups", 1), *_LAYER_ARGS)
    template = "conv"
    c_helpers = ("gemm", "im2col")
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
        return window_context(attrs, in_types[0], out, c)


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
