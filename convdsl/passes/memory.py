"""Activation memory of a network, per sample, as the generated module allocates it.

Forward-only (eval mode): a value is live from the node that makes it to the last node that
reads it (network inputs from the start, outputs to the end); while a node runs, its inputs and
its output are live. The module places values by lifetime (convdsl/lower/memory.py), so that
its eval-mode arena is this figure; on every example it is the largest sum of live values over
the nodes, the least any placement can reach. Training keeps what the backward reads (each op
says what: a conv its input, a relu its output, dropout its mask) until the end of the backward,
and the gradients from the first backward step that touches them to the last, all sharing one
block by lifetime (lower/memory.training_placement): that block is what the module allocates in
training mode. `all_kept_bytes` is the figure without any of that, every value and its gradient
and every mask, for comparison. None counts the parameters or the workspaces (im2col columns,
per-thread gradients), which the module reports apart (Model.memory()).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph
from ..lower.memory import inference_placement, lifetimes, saved_elements, training_placement
from ..lower.plan import fusions_of

BYTES = {"f32": 4, "f64": 8}


@dataclass(frozen=True)
class MemoryPlan:
    peak_inference_bytes: Dim        # per sample: the eval-mode arena the module allocates
    peak_node: int | None            # the node at which the most values are live
    training_bytes: Dim              # per sample: the training block the module allocates
    per_node_live_bytes: tuple[Dim, ...]
    all_kept_bytes: Dim = 0          # per sample: every value, its gradient and every saved mask


def _bigger(a: Dim, b: Dim, env_probe: dict) -> bool:
    # Sizes with run-time dims are compared at a probe size (every named dim = 64).
    return D.evaluate(a, env_probe) > D.evaluate(b, env_probe)


def plan_memory(g: Graph) -> MemoryPlan:
    size = BYTES[g.dtype]
    value_bytes = [D.mul(D.product(v.type.shape), size) for v in g.values]
    fusions = fusions_of(g)
    # Eval mode runs its own schedule, with each batchnorm folded into the kernel before it.
    eval_fusions = fusions_of(g, eval_mode=True)
    # Each value is live over a range of nodes, from the node that writes it (inputs: the first;
    # an activation fused into its producer: the producer, which writes it) to its last reader.
    life = lifetimes(g, eval_fusions)
    probe = {name: 64 for name in g.sym_dims}
    # A sweep over the nodes: a value's bytes join the sum where it becomes live and leave it
    # after its last node (sizes add exactly: the sums are those of adding up each node's values).
    born: list[list[int]] = [[] for _ in g.nodes]
    dead_after: list[list[int]] = [[] for _ in g.nodes]
    for v in g.values:
        if life.first[v.id] <= life.last[v.id] and life.first[v.id] < len(g.nodes):
            born[life.first[v.id]].append(v.id)
            dead_after[min(life.last[v.id], len(g.nodes) - 1)].append(v.id)
    live_at = []
    peak: Dim = 0
    peak_node = None
    live: Dim = 0
    for node in g.nodes:
        for vid in born[node.id]:
            live = D.add(live, D.mul(life.size[vid], size))
        live_at.append(live)
        if peak_node is None or _bigger(live, peak, probe):
            peak, peak_node = live, node.id
        for vid in dead_after[node.id]:
            live = D.sub(live, D.mul(life.size[vid], size))
    # What the module allocates: the placement by lifetime (the largest live sum is its lower bound).
    _, placed = inference_placement(g, eval_fusions)
    peak = D.mul(placed, size)
    training = D.mul(training_placement(g, fusions).total, size)
    everything: Dim = 0
    for b in value_bytes:
        everything = D.add(everything, D.mul(b, 2))
    for elems in saved_elements(g).values():
        everything = D.add(everything, D.mul(elems, size))
    return MemoryPlan(peak, peak_node, training, tuple(live_at), everything)
