"""The training objectives of `loss …`: softmax cross-entropy and mean squared error.

They are not layers: a LossDef reads one network output and a target, and seeds that
output's gradient. Registered separately from ops so that a loss name is never a layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..ir import dims as D
from ..ir.graph import TensorType


@dataclass(frozen=True)
class LossDef:
    name: ClassVar[str] = ""
    target_kind: ClassVar[str] = ""     # "labels" (int64) or "values" (like the output)
    # Names PyTorch and Keras give the same objective (compared as `loss_key` does).
    aliases: ClassVar[tuple[str, ...]] = ()
    # The op it applies to the output before comparing (softmax_cross_entropy: softmax), so that
    # a lint can say when the network already ends in it; the fewest channels it makes sense on.
    applies: ClassVar[str | None] = None
    min_classes: ClassVar[int] = 1

    def target_shape(self, t: TensorType) -> tuple:
        """The per-sample shape of the target this loss expects for output type t."""
        return tuple(t.shape)

    def kernel_context(self, t: TensorType, c) -> dict:
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial)), "numel": c(D.product(t.shape))}


@dataclass(frozen=True)
class SoftmaxCrossEntropy(LossDef):
    name: ClassVar[str] = "softmax_cross_entropy"
    target_kind: ClassVar[str] = "labels"
    applies: ClassVar[str | None] = "softmax"
    min_classes: ClassVar[int] = 2
    # PyTorch's cross_entropy and Keras's categorical cross-entropies take scores and apply the
    # softmax themselves, as this loss does.
    aliases: ClassVar[tuple[str, ...]] = ("cross_entropy", "categorical_crossentropy",
                                          "sparse_categorical_crossentropy", "softmax_cross_entropy_with_logits")

    def target_shape(self, t):
        # One class per sample for [C] / [C,1,1]; one per pixel for a map.
        if all(d == 1 for d in t.spatial):
            return ()
        return tuple(t.spatial)


@dataclass(frozen=True)
class MeanSquaredError(LossDef):
    name: ClassVar[str] = "mse"
    target_kind: ClassVar[str] = "values"
    aliases: ClassVar[tuple[str, ...]] = ("mean_squared_error",)


LOSSES: dict[str, LossDef] = {cls.name: cls() for cls in (SoftmaxCrossEntropy, MeanSquaredError)}

# Losses of other libraries that the language lacks. A name among them is answered with the
# losses that exist, never taken for a misspelling of one (`mae` is not a mistyped `mse`).
OTHER_LOSSES = ("mae", "l1", "mean_absolute_error", "huber", "smooth_l1", "binary_cross_entropy",
                "binary_crossentropy", "bce", "bce_with_logits", "nll", "kl_div", "kld", "hinge",
                "cosine_embedding", "ctc", "focal", "dice", "poisson")


def loss_key(name: str) -> str:
    """A loss name as spellings are compared: lower case, no underscores, no `loss` at the end
    (`CrossEntropyLoss`, `cross_entropy` and `crossentropy` are one name)."""
    return re.sub(r"loss$", "", name.lower().replace("_", ""))


def loss_alias(name: str) -> LossDef | None:
    """The loss another library's name stands for: `CrossEntropyLoss` → softmax_cross_entropy."""
    key = loss_key(name)
    return next((loss for loss in LOSSES.values()
                 if key == loss_key(loss.name) or key in map(loss_key, loss.aliases)), None)


def is_other_loss(name: str) -> bool:
    return loss_key(name) in map(loss_key, OTHER_LOSSES)
