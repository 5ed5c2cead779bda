"""Graph invariants checked between stages: a broken invariant is a compiler bug, said plainly."""
from __future__ import annotations

from ..errors import ConvDSLError
from ..ir.graph import Graph
from ..ops.base import lookup


def verify(graph: Graph) -> Graph:
    produced = {i.value for i in graph.inputs}
    for idx, node in enumerate(graph.nodes):
        where = f"internal error in {node.label} (line {node.span.line})"
        if node.id != idx:
            raise ConvDSLError(node.span, f"{where}: node ids out of order")
        if lookup(node.op) is None:
            raise ConvDSLError(node.span, f"{where}: unknown op {node.op}")
        for vid in node.inputs:
            if vid not in produced:
                raise ConvDSLError(node.span, f"{where}: reads a value before it is made")
        if graph.values[node.output].producer != node.id:
            raise ConvDSLError(node.span, f"{where}: output value not linked to its node")
        produced.add(node.output)
    for out in graph.outputs:
        if out.value not in produced:
            raise ConvDSLError(out.span, f"internal error: output {out.name} is never computed")
    return graph
