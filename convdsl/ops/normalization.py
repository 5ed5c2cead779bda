"""Normalisations and dropout. batchnorm and dropout behave differently in training and inference
mode; layernorm, groupnorm and instancenorm do not (each sample's own statistics, no running ones).

batchnorm follows PyTorch's BatchNorm1d/2d/3d: in training mode it normalises with the batch's
statistics (over the batch and every position, biased variance) and moves the running
statistics towards them (unbiased variance); in inference mode it uses the running statistics.
dropout is inverted dropout: in training mode each value is kept with probability 1 − p and
scaled by 1 / (1 − p); in inference mode it is the identity.
"""
from __future__ import annotations

from dataclasses import replace

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
    relatives = ("local_response_norm", "lrn")
    summary = "batch normalisation: batch statistics in training mode, running ones in inference mode"
    args = (Arg("eps", 1e-5), Arg("momentum", 0.1))
    positionwise = True            # at inference y = a·x + b per channel; training adds batch statistics
    folds_in_eval = "affine"       # that a·x + b, in the producer's kernel (lower/plan.py)
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

    def variants(self):
        # `fusing`: the same kernel, applying the ops after it (an activation, a residual add, …,
        # lower/plan.py's fusion rules) to each value as it writes it, in both modes, so that
        # batchnorm → relu is one pass over the tensor instead of two. One less pass costs less.
        # Only the C kernel applies an epilogue: other targets run `default`, which fuses nothing.
        (default,) = super().variants()
        return (default, replace(
            default, name="fusing", fuses_epilogue=True, backends=("c",), timed_alone=False,
            doc="the op's kernel, applying the ops fused after it as it writes",
            cost=lambda in_types, out, attrs: self.macs(in_types, out, attrs)))

    def training_guards(self, attrs, in_types, out):
        # As PyTorch: batch statistics of a single value per channel are meaningless (and the
        # unbiased variance of the running update would divide by zero).
        return (TrainingGuard(D.product(in_types[0].spatial), 2,
                              "needs more than one value per channel in training mode (batch x positions = 1); "
                              "use a larger batch, or eval() mode"),)


def _positive_eps(attrs, ctx) -> float:
    eps = expect_float(attrs["eps"], ctx, "eps", lo=0.0)
    if eps <= 0.0:
        raise ctx.error(f"`eps` must be greater than 0, got {attrs['eps']}", arg="eps")
    return eps


def _fixed_channels(op: str, t, ctx) -> int:
    if not isinstance(t.channels, int):
        raise ctx.error(f"{op} needs a fixed channel count; the input is {ctx.shape_text(t)}")
    return t.channels


def _affine_specs(c: int) -> tuple[ParamSpec, ...]:
    return (ParamSpec("weight", (c,), Init("ones"), True, c, c),
            ParamSpec("bias", (c,), Init("zeros"), True, c, c))


@register
class GroupNorm(OpDef):
    """PyTorch's GroupNorm(groups, C): each sample's channels in `groups` groups of C/groups
    consecutive channels, each group normalised over its channels and every position (biased
    variance), then a learned scale and shift per channel. No running statistics: training and
    inference compute the same."""
    name = "groupnorm"
    saves_for_backward = frozenset({INPUTS})   # the statistics are computed again from x
    parallel = "batch × groups"
    aliases = ("group_norm", "group_normalization")
    summary = "group normalisation: each sample's groups of channels over their positions, affine per channel"
    args = (Arg("groups"), Arg("eps", 1e-5))
    template = "groupnorm"
    positionwise = False
    locality = None                # a value depends on its whole group of channels and positions

    def groups_of(self, attrs, t, ctx) -> int:
        from .channel import _channel_split
        return _channel_split(self.name, t, attrs["groups"], "groups", ctx)

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        c = _fixed_channels(self.name, t, ctx)
        return {"C": c, "groups": self.groups_of(attrs, t, ctx), "eps": _positive_eps(attrs, ctx)}

    def param_specs(self, in_types, attrs):
        return _affine_specs(attrs["C"])

    def macs(self, in_types, out, attrs):
        # Mean, variance, then one multiply-add per value.
        return D.mul(D.product(out.shape), 3)

    def describe(self, attrs):
        eps = f", eps={attrs['eps']:g}" if attrs["eps"] != 1e-5 else ""
        return f"groupnorm({attrs['groups']}{eps})"

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial)), "G": attrs["groups"]}


@register
class InstanceNorm(GroupNorm):
    """groupnorm with one channel per group: PyTorch's InstanceNorm(C, affine=True), or
    GroupNorm(C, C). Each channel of each sample over its positions."""
    name = "instancenorm"
    aliases = ("instance_norm", "instance_normalization")
    summary = "instance normalisation: each channel of each sample over its positions, affine (groupnorm(C))"
    args = (Arg("eps", 1e-5),)

    def groups_of(self, attrs, t, ctx) -> int:
        if t.rank < 2 or D.product(t.spatial) == 1:
            raise ctx.error(f"instancenorm normalises each channel over its positions, but the input "
                            f"{ctx.shape_text(t)} has one position per channel (every value would become "
                            f"its bias); use layernorm for a vector")
        return t.channels

    def describe(self, attrs):
        return "instancenorm" + (f"(eps={attrs['eps']:g})" if attrs["eps"] != 1e-5 else "")


@register
class LayerNorm(OpDef):
    """Layer normalisation over the channels at each position, with a learned scale and shift per
    channel: PyTorch's LayerNorm(C) on a vector [C] (a transformer's or an MLP's), and ConvNeXt's
    channels-last LayerNorm on a map. Normalising over all of C, H, W is groupnorm(1)."""
    name = "layernorm"
    saves_for_backward = frozenset({INPUTS})   # the statistics are computed again from x
    parallel = "positions"
    aliases = ("layer_norm", "layer_normalization")
    summary = "layer normalisation over the channels at each position, affine per channel"
    args = (Arg("eps", 1e-5),)
    positionwise = True            # the channels of one position, each position on its own
    locality = "position"

    def normalize(self, attrs, in_types, ctx):
        (t,) = in_types
        return {"C": _fixed_channels(self.name, t, ctx), "eps": _positive_eps(attrs, ctx)}

    def param_specs(self, in_types, attrs):
        return _affine_specs(attrs["C"])

    def macs(self, in_types, out, attrs):
        return D.mul(D.product(out.shape), 3)

    def scratch_elements(self, in_types, out, attrs):
        # The backward's mean and 1/std at every position of one sample.
        return D.mul(D.product(in_types[0].spatial), 2)

    def describe(self, attrs):
        return "layernorm" + (f"(eps={attrs['eps']:g})" if attrs["eps"] != 1e-5 else "")

    def kernel_context(self, attrs, in_types, out, c):
        t = in_types[0]
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial))}


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
