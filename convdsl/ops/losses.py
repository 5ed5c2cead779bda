"""The training objectives of `loss …`: softmax cross-entropy and mean squared error.

They are not layers: a LossDef reads one network output and a target, and seeds that
output's gradient. Registered separately from ops so that a loss name is never a layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import dims as D
from ..ir.graph import TensorType


@dataclass(frozen=True)
class LossDef:
    name: ClassVar[str] = ""
    target_kind: ClassVar[str] = ""     # "labels" (int64) or "values" (like the output)

    def target_shape(self, t: TensorType) -> tuple:
        """The per-sample shape of the target this loss expects for output type t."""
        return tuple(t.shape)

    def kernel_context(self, t: TensorType, c) -> dict:
        return {"C": c(t.channels), "spatial": c(D.product(t.spatial)), "numel": c(D.product(t.shape))}


@dataclass(frozen=True)
class SoftmaxCrossEntropy(LossDef):
    name: ClassVar[str] = "softmax_cross_entropy"
    target_kind: ClassVar[str] = "labels"

    def target_shape(self, t):
        # One class per sample for [C] / [C,1,1]; one per pixel for a map.
        if all(d == 1 for d in t.spatial):
            return ()
        return tuple(t.spatial)


@dataclass(frozen=True)
class MeanSquaredError(LossDef):
    name: ClassVar[str] = "mse"
    target_kind: ClassVar[str] = "values"


LOSSES: dict[str, LossDef] = {cls.name: cls() for cls in (SoftmaxCrossEntropy, MeanSquaredError)}
