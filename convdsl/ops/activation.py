"""Element-wise activations, prelu (a learned slope per channel) and the per-position softmax over
channels (§4.1)."""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import Init, ParamSpec
from .base import INPUTS, OUTPUT, Arg, OpDef, expect_bool, expect_float, register


class Pointwise(OpDef):
    positionwise = True
    locality = "value"
    fuses_as = "activation"        # a producer's kernel may apply it (templates/c/lib/epilogue.j2)
    saves_for_backward = frozenset({OUTPUT})   # dx from y (y > 0, y·(1 − y), 1 − y²): a fused step never writes x
    # dx[i] from dy[i] alone, each element once: the C kernels write it where the plan says
    # (templates/c/lib/pointwise.j2's `put`).
    writes_input_grad = (("c", lambda attrs: True),)

    def kernel_context(self, attrs, in_types, out, c):
        return {"numel": c(D.product(out.shape))}


@register
class Relu(Pointwise):
    name = "relu"
    parallel = "elements"
    relatives = ("selu", "mish", "softplus", "celu")
    summary = "max(x, 0)"


@register
class Sigmoid(Pointwise):
    name = "sigmoid"
    aliases = ("logistic",)
    summary = "1 / (1 + e^-x)"


@register
class Tanh(Pointwise):
    name = "tanh"
    relatives = ("softsign",)
    summary = "tanh(x)"


@register
class LeakyRelu(Pointwise):
    name = "leaky_relu"
    aliases = ("lrelu",)
    relatives = ("rrelu",)
    summary = "x if x > 0 else alpha·x"
    args = (Arg("alpha", 0.01),)

    def normalize(self, attrs, in_types, ctx):
        return {"alpha": expect_float(attrs["alpha"], ctx, "alpha", lo=0.0)}

    def describe(self, attrs):
        return f"leaky_relu({attrs['alpha']:g})"


class InputPointwise(Pointwise):
    """An activation whose derivative is not a function of its output (silu, gelu, hardswish
    are not one-to-one): its backward reads x. Fused into a producer, training keeps the value
    the producer made for it (lower/plan.py's `keep`), as for scale."""
    saves_for_backward = frozenset({INPUTS})
    parallel = "elements"


@register
class Clip(Pointwise):
    name = "clip"
    parallel = "elements"
    aliases = ("clamp", "hardtanh")
    summary = "min(max(x, min), max): PyTorch's hardtanh / clamp, ONNX Clip"
    args = (Arg("min"), Arg("max"))

    def normalize(self, attrs, in_types, ctx):
        lo = expect_float(attrs["min"], ctx, "min")
        hi = expect_float(attrs["max"], ctx, "max")
        # The backward tells the linear part from the output, lo < y < hi: an empty range has none.
        if not lo < hi:
            raise ctx.error(f"clip needs min < max, got min={attrs['min']} and max={attrs['max']}", arg="max")
        return {"min": lo, "max": hi}

    def describe(self, attrs):
        return f"clip({attrs['min']:g}, {attrs['max']:g})"


@register
class Relu6(Clip):
    name = "relu6"
    aliases = ()
    template = "clip"              # clip(0, 6): one kernel, one epilogue formula
    summary = "min(max(x, 0), 6) (MobileNet)"
    args = ()

    def normalize(self, attrs, in_types, ctx):
        return {"min": 0.0, "max": 6.0}

    def describe(self, attrs):
        return "relu6"


@register
class HardSigmoid(Pointwise):
    name = "hardsigmoid"
    parallel = "elements"
    aliases = ("hard_sigmoid",)
    summary = "min(max(x/6 + 1/2, 0), 1), as PyTorch's Hardsigmoid"


@register
class HardSwish(InputPointwise):
    name = "hardswish"
    aliases = ("hard_swish", "hswish")
    summary = "x · min(max(x + 3, 0), 6) / 6 (MobileNetV3)"


@register
class Silu(InputPointwise):
    name = "silu"
    aliases = ("swish",)
    summary = "x · sigmoid(x) (swish)"


@register
class Gelu(InputPointwise):
    name = "gelu"
    summary = "x · Φ(x), Φ the normal CDF, with erf (PyTorch's exact GELU)"


@register
class Elu(Pointwise):
    name = "elu"
    parallel = "elements"
    summary = "x if x > 0 else alpha·(e^x − 1)"
    args = (Arg("alpha", 1.0),)

    def normalize(self, attrs, in_types, ctx):
        # alpha ≥ 0 keeps y > 0 exactly where x > 0, so that the backward can read y alone.
        return {"alpha": expect_float(attrs["alpha"], ctx, "alpha", lo=0.0)}

    def describe(self, attrs):
        return f"elu({attrs['alpha']:g})"


@register
class Softmax(OpDef):
    name = "softmax"
    parallel = "batch × positions"
    relatives = ("log_softmax", "logsoftmax", "softmin")
    summary = "softmax over channels, at every position of a map"
    positionwise = True            # the channels of one position, each position on its own
    locality = "position"
    saves_for_backward = frozenset({OUTPUT})   # dx_c = y_c · (dy_c − Σ_k dy_k y_k)

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial))}


@register
class Prelu(OpDef):
    name = "prelu"
    saves_for_backward = frozenset({INPUTS})   # dx and the slopes' gradient both tell x > 0 from x
    parallel = "channels"
    summary = "x if x > 0 else a[c]·x, a learned slope per channel (PyTorch's PReLU(num_parameters=C))"
    args = (Arg("init", 0.25), Arg("shared", False))
    positionwise = True
    locality = "channel"

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        if not isinstance(t.channels, int):
            raise ctx.error(f"prelu needs a fixed channel count; the input is {ctx.shape_text(t)}")
        return {"C": t.channels, "init": expect_float(attrs["init"], ctx, "init"),
                "shared": expect_bool(attrs["shared"], ctx, "shared")}

    def param_specs(self, in_types, attrs):
        # One slope per channel, or one for all (PyTorch's PReLU() default, num_parameters=1).
        n = 1 if attrs["shared"] else attrs["C"]
        return (ParamSpec("weight", (n,), Init("const"), True, 1, 1, (attrs["init"],) * n),)

    def macs(self, in_types, out, attrs):
        return D.product(out.shape)

    def describe(self, attrs):
        parts = ([f"init={attrs['init']:g}"] if attrs["init"] != 0.25 else []) + (["shared"] if attrs["shared"] else [])
        return "prelu" + (f"({', '.join(parts)})" if parts else "")

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial))}
