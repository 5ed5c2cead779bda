"""The plan: execution order, an algorithm per op, parameter offsets, buffer sizes.

The code generator renders exactly what the plan says. Choices that trade speed (which
conv algorithm, fusing bias/activation epilogues, sharing activation memory) belong here,
so that they can change without touching the templates' meaning.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph, Layer, ParamSpec
from ..ops.base import lookup


@dataclass(frozen=True)
class ParamSlot:
    full_name: str                   # layer.param, as Model.params names it
    layer: Layer
    spec: ParamSpec
    offset: int                      # elements from the start of the parameter block
    size: int


@dataclass(frozen=True)
class Plan:
    graph: Graph
    order: tuple[int, ...]           # node ids, forward order
    params: tuple[ParamSlot, ...]
    param_total: int
    scratch: tuple[Dim, ...]         # per-sample scratch needs; the module takes the largest
    algorithms: tuple[tuple[int, str], ...]   # node id → algorithm chosen

    def param(self, full_name: str) -> ParamSlot:
        return next(p for p in self.params if p.full_name == full_name)

    def layer_params(self, layer_name: str) -> dict[str, ParamSlot]:
        return {p.spec.name: p for p in self.params if p.layer.name == layer_name}


def _align(n: int, to: int = 16) -> int:
    # Parameters start on 64-byte boundaries so vector loads of a weight row stay aligned.
    return (n + to - 1) // to * to


def make_plan(graph: Graph) -> Plan:
    params = []
    offset = 0
    for layer in graph.layers:
        for spec in layer.params:
            size = D.product(spec.shape)
            params.append(ParamSlot(f"{layer.name}.{spec.name}", layer, spec, offset, size))
            offset = _align(offset + size)
    scratch = []
    algorithms = []
    for node in graph.nodes:
        op = lookup(node.op)
        in_types = tuple(graph.values[v].type for v in node.inputs)
        need = op.scratch_elements(in_types, graph.values[node.output].type, node.attrs)
        if need != 0:
            scratch.append(need)
        algo = node.attrs.get("algo")
        if algo is not None:
            algorithms.append((node.id, "im2col" if algo == "auto" else algo))
    return Plan(graph, tuple(n.id for n in graph.nodes), tuple(params), max(offset, 1), tuple(scratch),
                tuple(algorithms))
