"""Activation memory of a plan: the peak while running forward only, and what training keeps.

Forward-only (inference): a value is live from the node that makes it to the last node that
reads it (network inputs from the start, outputs to the end); while a node runs, its inputs and
its output are live. The peak is the largest sum of live values over the nodes. Training keeps
every value for backward, a gradient of the same size for each, and what a forward saves for its
backward (dropout's mask): that is what the generated module allocates. Neither counts the
parameters or the convolutions' shared im2col workspace.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph
from ..ops.base import lookup

BYTES = {"f32": 4, "f64": 8}


@dataclass(frozen=True)
class MemoryPlan:
    peak_inference_bytes: Dim        # per sample
    peak_node: int | None            # the node at which the peak is reached
    training_bytes: Dim              # per sample: all values, their gradients, saved masks
    per_node_live_bytes: tuple[Dim, ...]


def _bigger(a: Dim, b: Dim, env_probe: dict) -> bool:
    # Sizes with run-time dims are compared at a probe size (every named dim = 64).
    return D.evaluate(a, env_probe) > D.evaluate(b, env_probe)


def plan_memory(g: Graph) -> MemoryPlan:
    size = BYTES[g.dtype]
    value_bytes = [D.mul(D.product(v.type.shape), size) for v in g.values]
    n = len(g.nodes)
    last_use = [-1] * len(g.values)
    for node in g.nodes:
        for vid in node.inputs:
            last_use[vid] = max(last_use[vid], node.id)
    for out in g.outputs:
        last_use[out.value] = n - 1
    # Each value is live over a range of nodes: from its producer (inputs: from the first node) to
    # its last reader (a value nobody reads: its producer only). Sweep the ranges' ends.
    change: list[Dim] = [0] * (n + 1)
    for v in g.values:
        first = 0 if v.producer is None else v.producer
        last = last_use[v.id] if v.producer is None else max(last_use[v.id], v.producer)
        if last >= first:
            change[first] = D.add(change[first], value_bytes[v.id])
            change[last + 1] = D.sub(change[last + 1], value_bytes[v.id])
    probe = {name: 64 for name in g.sym_dims}
    live_at = []
    live: Dim = 0
    peak: Dim = 0
    peak_node = None
    for node in g.nodes:
        live = D.add(live, change[node.id])
        live_at.append(live)
        if peak_node is None or _bigger(live, peak, probe):
            peak, peak_node = live, node.id
    if not g.nodes:
        peak = sum((value_bytes[i.value] for i in g.inputs), 0)
    training: Dim = 0
    for b in value_bytes:
        training = D.add(training, D.mul(b, 2))
    for node in g.nodes:
        in_types = tuple(g.values[v].type for v in node.inputs)
        saved = lookup(node.op).saved_elements(in_types, g.values[node.output].type, node.attrs)
        training = D.add(training, D.mul(saved, size))
    return MemoryPlan(peak, peak_node, training, tuple(live_at))
