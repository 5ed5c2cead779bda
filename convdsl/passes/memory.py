"""Activation memory of a plan: the peak while running forward only, and what training keeps.

Forward-only (inference): a value is live from the node that makes it to the last node that
reads it (network inputs from the start, outputs to the end); the peak is the largest sum of
live values at any node. Training keeps every value for backward, plus a gradient of the same
size for each: that is what the generated module allocates today.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph

BYTES = {"f32": 4, "f64": 8}


@dataclass(frozen=True)
class MemoryPlan:
    peak_inference_bytes: Dim        # per sample
    peak_node: int | None            # the node at which the peak is reached
    training_bytes: Dim              # per sample: all values and their gradients
    per_node_live_bytes: tuple[Dim, ...]


def _bigger(a: Dim, b: Dim, env_probe: dict) -> bool:
    # Sizes with run-time dims are compared at a probe size (every named dim = 64).
    return D.evaluate(a, env_probe) > D.evaluate(b, env_probe)


def plan_memory(g: Graph) -> MemoryPlan:
    size = BYTES[g.dtype]
    value_bytes = [D.mul(D.product(v.type.shape), size) for v in g.values]
    last_use = {v.id: -1 for v in g.values}
    for node in g.nodes:
        for vid in node.inputs:
            last_use[vid] = max(last_use[vid], node.id)
    for out in g.outputs:
        last_use[out.value] = len(g.nodes)
    born = {v.id: (-1 if v.producer is None else v.producer) for v in g.values}
    probe = {name: 64 for name in g.sym_dims}
    live_at = []
    peak: Dim = 0
    peak_node = None
    for node in g.nodes:
        live: Dim = 0
        for v in g.values:
            if born[v.id] <= node.id and (last_use[v.id] >= node.id or v.id == node.output):
                live = D.add(live, value_bytes[v.id])
        live_at.append(live)
        if peak_node is None or _bigger(live, peak, probe):
            peak, peak_node = live, node.id
    if not g.nodes:
        peak = sum((value_bytes[i.value] for i in g.inputs), 0)
    training: Dim = 0
    for b in value_bytes:
        training = D.add(training, D.mul(b, 2))
    return MemoryPlan(peak, peak_node, training, tuple(live_at))
