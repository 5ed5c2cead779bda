"""batchnorm and dropout: the two layer kinds that behave differently in training and inference mode.

batchnorm follows PyTorch's BatchNorm1d/2d/3d: in training mode it normalises with the batch's
statistics (over the batch and every position, biased variance) and moves the running
statistics towards them (unbiased variance); in inference mode it uses the running statistics.
dropout is inverted dropout: in training mode each value is kept with probability 1 − p and
scaled by 1 / (1 − p); in inference mode it is the identity.
"""
from __future__ import annotations

from ..ir import dims as D
from ..ir.graph import Init, ParamSpec
from .base import INPUTS, SAVED, Arg, BufferSpec, OpDef, TrainingGuard, expect_float, register


@register
class BatchNorm(OpDef):
    name = "batchnorm"
    saves_for_backward = frozenset({INPUTS})   # the batch statistics are computed again from x
    parallel = "channels"
    kernel_state = ("mode",)
    aliases = ("batch_norm", "batch_normalization", "bn")
    relatives = ("layer_norm", "group_norm", "instance_norm", "layer_normalization", "group_normalization")
    summary = "batch normalisation: batch statistics in training mode, running ones in inference mode"
    args = (Arg("eps", 1e-5), Arg("momentum", 0.1))
    positionwise = True            # at inference y = a·x + b per channel; training adds batch statistics
    locality = "channel"

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        if not isinstance(t.channels, int):
            raise ctx.error(f"batchnorm needs a fixed channel count; the input is {ctx.shape_text(t)}")
        eps = expect_float(attrs["eps"], ctx, "eps", lo=0.0)
        if eps <= 0.0:
            raise ctx.error(f"`eps` must be greater than 0, got {attrs['eps']}", arg="eps")
        return {"C": t.channels, "eps": eps,
                "momentum": expect_float(attrs["momentum"], ctx, "momentum", lo=0.0, hi=1.0)}

    def param_specs(self, in_types, attrs):
        c = attrs["C"]
        return (ParamSpec("weight", (c,), Init("ones"), True, c, c),
                ParamSpec("bias", (c,), Init("zeros"), True, c, c))

    def buffer_specs(self, in_types, attrs):
        c = attrs["C"]
        return (BufferSpec("running_mean", (c,), 0.0), BufferSpec("running_var", (c,), 1.0))

    def macs(self, in_types, out, attrs):
        # At inference a batchnorm is one multiply-add per value: y = a·x + b.
        return D.product(out.shape)

    def describe(self, attrs):
        extra = []
        if attrs["eps"] != 1e-5:
            extra.append(f"eps={attrs['eps']:g}")
        if attrs["momentum"] != 0.1:
            extra.append(f"momentum={attrs['momentum']:g}")
        return "batchnorm" + (f"({', '.join(extra)})" if extra else "")

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial))}

    def training_guards(self, attrs, in_types, out):
        # As PyTorch: batch statistics of a single value per channel are meaningless (and the
        # unbiased variance of the running update would divide by zero).
        return (TrainingGuard(D.product(in_types[0].spatial), 2,
                              "needs more than one value per channel in training mode (batch x positions = 1); "
                              "use a larger batch, or eval() mode"),)


@register
class Dropout(OpDef):
    name = "dropout"
    saves_for_backward = frozenset({SAVED})    # its mask (saved_elements), never x or y
    parallel = "elements"
    relatives = ("alpha_dropout", "spatial_dropout")
    summary = "inverted dropout: keep with probability 1 - p and scale by 1/(1 - p) in training mode"
    args = (Arg("p"),)
    c_helpers = ("counter_rng",)
    kernel_state = ("mode", "random")
    positionwise = True
    locality = "value"

    def normalize(self, attrs, in_types, ctx):
        return {"p": expect_float(attrs["p"], ctx, "p", lo=0.0, hi=1.0, hi_open=True)}

    def saved_elements(self, in_types, out, attrs):
        # The mask (0 or 1/(1 − p) per value) of the last forward, for the backward.
        return D.product(out.shape)

    def describe(self, attrs):
        return f"dropout({attrs['p']:g})"

    def kernel_context(self, attrs, in_types, out, c):
        return {"numel": c(D.product(out.shape))}
