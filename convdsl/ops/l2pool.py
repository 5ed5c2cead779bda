"""l2pool: the square root of the sum of squares in each window (§2.2), a pool between average and max."""
from __future__ import annotations

from ..ir import dims as D
from .base import INPUTS, OUTPUT, register
from .pool import WindowPool


@register
class L2Pool(WindowPool):
    name = "l2pool"
    saves_for_backward = frozenset({INPUTS, OUTPUT})   # dx = dy · x / y
    aliases = ("lp_pool",)
    summary = "sqrt of the sum of squares in each window; padded cells add nothing"

    def macs(self, in_types, out, attrs):
        # Unlike max and average, every window cell costs one multiply-add (its square, summed).
        return D.mul(D.product(out.shape), D.product(attrs["kernel"]))
