"""The training objectives of `loss …`: cross-entropies, Dice, and the regression losses.

They are not layers: a LossDef reads one network output and a target, and seeds that
output's gradient. Registered separately from ops so that a loss name is never a layer.
A loss says here everything the rest of the compiler and the runtime ask about it: its
arguments and how they are checked, the target it takes (`target`: its kind and, for labels,
the index that is skipped), the op it applies itself, its fewest classes, the scratch its
kernel needs and what its template reads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..ir import dims as D
from ..ir.graph import TensorType
from ..limits import MAX_INT
from .base import Arg, ConstTensor, OpContext, Symbol, bind_arguments, describe_value, expect_finite, expect_symbol

# What a loss's target is, as the runtime checks it (runtime/model.py) and the header describes it:
LABELS = "labels"                 # int64 class indices, per sample or per position (target_shape)
VALUES = "values"                 # real numbers shaped like the output
PROBABILITIES = "probabilities"   # real numbers in [0, 1] shaped like the output


@dataclass(frozen=True)
class Target:
    kind: str                        # LABELS, VALUES or PROBABILITIES
    ignore_index: int | None = None  # LABELS: the label that counts for nothing (none when None)


@dataclass(frozen=True)
class LossDef:
    name: ClassVar[str] = ""
    args: ClassVar[tuple[Arg, ...]] = ()
    # Names PyTorch and Keras give the same objective (compared as `loss_key` does).
    aliases: ClassVar[tuple[str, ...]] = ()
    # Losses of other libraries that the language lacks and for which this one is the closest,
    # and what to say about the difference (`binary_cross_entropy` takes probabilities).
    relatives: ClassVar[tuple[str, ...]] = ()
    relative_why: ClassVar[str] = ""

    def bind(self, positional: list, keywords: dict, ctx: OpContext) -> dict:
        if "reduction" in keywords:
            raise ctx.error(f"{self.name} has no argument `reduction`: a loss is one number for the whole batch, "
                            f"as with PyTorch's default reduction=\"mean\"", arg="reduction")
        return bind_arguments(self.name, self.args, positional, keywords, ctx, "the output it reads")

    def normalize(self, attrs: dict, t: TensorType, ctx: OpContext) -> dict:
        """Check the arguments against the output `t` it reads; errors point at the argument."""
        return attrs

    def target(self, attrs: dict) -> Target:
        return Target(VALUES)

    def applies(self, attrs: dict) -> str | None:
        """The op it applies to the output before comparing (softmax_cross_entropy: softmax), so
        that a lint can say when the network already ends in it."""
        return None

    def min_classes(self, attrs: dict) -> int:
        """The fewest channels it makes sense on."""
        return 1

    def target_shape(self, t: TensorType, attrs: dict) -> tuple:
        """The per-sample shape of the target this loss expects for output type t."""
        if self.target(attrs).kind == LABELS:
            # One class per sample for [C] / [C,1,1]; one per pixel for a map.
            return () if all(d == 1 for d in t.spatial) else tuple(t.spatial)
        return tuple(t.shape)

    def scratch_doubles(self, t: TensorType, attrs: dict):
        """Doubles of scratch its kernel needs (the host glue allocates them per call, the
        kernel never allocates); a Dim."""
        return 0

    def kernel_context(self, t: TensorType, attrs: dict, c) -> dict:
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial)), "numel": c(D.product(t.shape))}

    def describe(self, output: str, attrs: dict) -> str:
        """The loss as a call with the arguments that differ from their defaults."""
        shown = [f"{a.name}={_value_text(attrs[a.name])}" for a in self.args
                 if a.name in attrs and attrs[a.name] != _normal_default(a.default)]
        return f"{self.name}({', '.join([output, *shown])})"


def _normal_default(value):
    return value.name if isinstance(value, Symbol) else value


def _value_text(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def expect_number(value, ctx: OpContext, arg: str, least: float, inclusive: bool = False, why: str = "") -> float:
    """A finite number above `least` (or at it, when `inclusive`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(f"`{arg}` must be a number, got {describe_value(value)}", arg=arg)
    v = float(value)
    expect_finite(v, ctx, arg)
    if not (v >= least if inclusive else v > least):
        bound = f"at least {least:g}" if inclusive else f"greater than {least:g}"
        raise ctx.error(f"`{arg}` must be {bound}, got {value}" + (f": {why}" if why else ""), arg=arg)
    return v


def c_double(value: float) -> str:
    """A float as a C double literal that reads back exactly (repr is the shortest such text)."""
    return repr(float(value))


# ---- the cross-entropies ----------------------------------------------------------------------

@dataclass(frozen=True)
class SoftmaxCrossEntropy(LossDef):
    name: ClassVar[str] = "softmax_cross_entropy"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("weight", None, doc="one weight per class", forms="a list of one number per class, [1.0, 2.0, …]"),
        Arg("ignore_index", None, doc="a label that counts for nothing", forms="an integer"),
    )
    # PyTorch's cross_entropy and Keras's categorical cross-entropies take scores and apply the
    # softmax themselves, as this loss does.
    aliases: ClassVar[tuple[str, ...]] = ("cross_entropy", "categorical_crossentropy",
                                          "sparse_categorical_crossentropy", "softmax_cross_entropy_with_logits")

    def normalize(self, attrs, t, ctx):
        out = dict(attrs)
        if attrs["weight"] is not None:
            out["weight"] = class_weights(attrs["weight"], t, ctx)
        if attrs["ignore_index"] is not None:
            v = attrs["ignore_index"]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ctx.error(f"`ignore_index` must be an integer (a label), got {describe_value(v)}",
                                arg="ignore_index")
            if abs(v) > MAX_INT:
                raise ctx.error(f"`ignore_index` must be within ±2^62, got {v}", arg="ignore_index")
        return out

    def target(self, attrs):
        return Target(LABELS, attrs.get("ignore_index"))

    def applies(self, attrs):
        return "softmax"

    def min_classes(self, attrs):
        return 2

    def kernel_context(self, t, attrs, c):
        weight = attrs.get("weight")
        return {**super().kernel_context(t, attrs, c),
                "weight": None if weight is None else [c_double(w) for w in weight],
                "ignore_index": attrs.get("ignore_index")}


def class_weights(value, t: TensorType, ctx: OpContext) -> tuple[float, ...]:
    """`weight=[…]` (or a const of one row): one finite weight ≥ 0 per class, not all 0."""
    if isinstance(value, ConstTensor):
        if len(value.shape) != 1:
            raise ctx.error(f"`weight` must be one number per class; const `{value.name}` has shape "
                            f"{list(value.shape)}", arg="weight")
        numbers = value.values
    elif isinstance(value, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        numbers = value
    else:
        raise ctx.error(f"`weight` must be a list of one number per class, as [1.0, 2.0, 0.5], "
                        f"got {describe_value(value)}", arg="weight")
    if not isinstance(t.channels, int):
        raise ctx.error(f"class weights need a fixed number of classes; the output has "
                        f"{D.to_text(t.channels)} channels, a size known at run time", arg="weight")
    if len(numbers) != t.channels:
        raise ctx.error(f"`weight` has {len(numbers)} value(s); the output has {t.channels} classes (channels), "
                        f"one weight each", arg="weight")
    weights = tuple(float(v) for v in numbers)
    for w in weights:
        expect_finite(w, ctx, "weight")
        if not w >= 0:
            raise ctx.error(f"class weights must be at least 0, got {w}", arg="weight")
    if not any(weights):
        raise ctx.error("every class weight is 0: no label would count", arg="weight")
    return weights


@dataclass(frozen=True)
class SigmoidCrossEntropy(LossDef):
    name: ClassVar[str] = "sigmoid_cross_entropy"
    aliases: ClassVar[tuple[str, ...]] = ("binary_cross_entropy_with_logits", "bce_with_logits",
                                          "sigmoid_cross_entropy_with_logits")
    # PyTorch's binary_cross_entropy and Keras's binary_crossentropy (by default) take probabilities.
    relatives: ClassVar[tuple[str, ...]] = ("binary_cross_entropy", "binary_crossentropy", "bce")
    relative_why: ClassVar[str] = ("it takes probabilities; `sigmoid_cross_entropy` takes the scores before "
                                   "the sigmoid and applies it itself (PyTorch's binary_cross_entropy_with_logits)")

    def target(self, attrs):
        return Target(PROBABILITIES)

    def applies(self, attrs):
        return "sigmoid"


# ---- Dice ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dice(LossDef):
    name: ClassVar[str] = "dice"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("activation", Symbol("softmax"), doc="how scores become probabilities",
            forms="softmax (classes exclusive, labels) or sigmoid (each channel on its own, targets in [0, 1])",
            symbols=("softmax", "sigmoid")),
        Arg("eps", 1.0, doc="added above and below each class's ratio", forms="a number > 0"),
    )
    aliases: ClassVar[tuple[str, ...]] = ("soft_dice",)

    def normalize(self, attrs, t, ctx):
        out = dict(attrs)
        out["activation"] = expect_symbol(attrs["activation"], ("softmax", "sigmoid"), ctx, "activation")
        out["eps"] = expect_number(attrs["eps"], ctx, "eps", least=0.0, why=(
            "a class absent from both the target and the prediction would divide 0 by 0"))
        return out

    def target(self, attrs):
        return Target(LABELS if attrs["activation"] == "softmax" else PROBABILITIES)

    def applies(self, attrs):
        return attrs["activation"]

    def min_classes(self, attrs):
        return 2 if attrs["activation"] == "softmax" else 1

    def scratch_doubles(self, t, attrs):
        return D.mul(t.channels, 3)       # per class: Σ p·t, Σ p, Σ t

    def kernel_context(self, t, attrs, c):
        return {**super().kernel_context(t, attrs, c), "eps": c_double(attrs["eps"]),
                "softmax": attrs["activation"] == "softmax"}


# ---- regression -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MeanSquaredError(LossDef):
    name: ClassVar[str] = "mse"
    aliases: ClassVar[tuple[str, ...]] = ("mean_squared_error",)
    relatives: ClassVar[tuple[str, ...]] = ("l2",)
    relative_why: ClassVar[str] = "`mse` is the mean of the squared differences"


@dataclass(frozen=True)
class L1(LossDef):
    name: ClassVar[str] = "l1"
    aliases: ClassVar[tuple[str, ...]] = ("mae", "mean_absolute_error")


@dataclass(frozen=True)
class SmoothL1(LossDef):
    name: ClassVar[str] = "smooth_l1"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("beta", 1.0, doc="where the square becomes linear", forms="a number ≥ 0"),
    )
    # PyTorch's HuberLoss(delta) is delta · smooth_l1(beta=delta).
    relatives: ClassVar[tuple[str, ...]] = ("huber",)
    relative_why: ClassVar[str] = "`smooth_l1(y, beta=δ)` is PyTorch's HuberLoss(delta=δ) divided by δ"

    def normalize(self, attrs, t, ctx):
        return {**attrs, "beta": expect_number(attrs["beta"], ctx, "beta", least=0.0, inclusive=True)}

    def kernel_context(self, t, attrs, c):
        return {**super().kernel_context(t, attrs, c), "beta": c_double(attrs["beta"])}


LOSSES: dict[str, LossDef] = {cls.name: cls() for cls in (
    SoftmaxCrossEntropy, SigmoidCrossEntropy, Dice, MeanSquaredError, L1, SmoothL1)}

# Losses of other libraries that the language lacks. A name among them is answered with the
# losses that exist, never taken for a misspelling of one (`nll` is not a mistyped `l1`).
OTHER_LOSSES = ("nll", "kl_div", "kld", "hinge", "cosine_embedding", "ctc", "focal", "poisson", "tversky",
                "lovasz", "triplet", "margin_ranking")


def loss_key(name: str) -> str:
    """A loss name as spellings are compared: lower case, no underscores, no `loss` at the end
    (`CrossEntropyLoss`, `cross_entropy` and `crossentropy` are one name)."""
    return re.sub(r"loss$", "", name.lower().replace("_", ""))


def loss_alias(name: str) -> LossDef | None:
    """The loss another library's name stands for: `CrossEntropyLoss` → softmax_cross_entropy."""
    key = loss_key(name)
    return next((loss for loss in LOSSES.values()
                 if key == loss_key(loss.name) or key in map(loss_key, loss.aliases)), None)


def loss_relative(name: str) -> LossDef | None:
    """The closest loss to one the language lacks: `binary_cross_entropy` → sigmoid_cross_entropy."""
    key = loss_key(name)
    return next((loss for loss in LOSSES.values() if key in map(loss_key, loss.relatives)), None)


def is_other_loss(name: str) -> bool:
    return loss_key(name) in map(loss_key, OTHER_LOSSES)

