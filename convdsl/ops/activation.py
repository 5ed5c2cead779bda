"""Element-wise activations and the per-position softmax over channels (§4.1)."""
from __future__ import annotations

from ..ir import dims as D
from .base import OUTPUT, Arg, OpDef, expect_float, register


class Pointwise(OpDef):
    positionwise = True
    locality = "value"
    fuses_as = "activation"        # a producer's kernel may apply it (templates/c/lib/epilogue.j2)
    saves_for_backward = frozenset({OUTPUT})   # dx from y (y > 0, y·(1 − y), 1 − y²): a fused step never writes x

    def kernel_context(self, attrs, in_types, out, c):
        return {"numel": c(D.product(out.shape))}


@register
class Relu(Pointwise):
    name = "relu"
    parallel = "elements"
    relatives = ("relu6", "elu", "selu", "gelu", "silu", "swish", "mish", "softplus", "hardswish", "celu")
    summary = "max(x, 0)"


@register
class Sigmoid(Pointwise):
    name = "sigmoid"
    aliases = ("logistic",)
    relatives = ("hardsigmoid",)
    summary = "1 / (1 + e^-x)"


@register
class Tanh(Pointwise):
    name = "tanh"
    relatives = ("hardtanh", "softsign")
    summary = "tanh(x)"


@register
class LeakyRelu(Pointwise):
    name = "leaky_relu"
    aliases = ("lrelu",)
    relatives = ("prelu", "rrelu")
    summary = "x if x > 0 else alpha·x"
    args = (Arg("alpha", 0.01),)

    def normalize(self, attrs, in_types, ctx):
        return {"alpha": expect_float(attrs["alpha"], ctx, "alpha", lo=0.0)}

    def describe(self, attrs):
        return f"leaky_relu({attrs['alpha']:g})"


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
