"""The text form of what `convdsl check` tells about a network (§5)."""
from __future__ import annotations

from .ir import dims as D
from .ir.dims import Dim
from .ir.graph import Graph
from .passes.stats import NetworkStats


def number(d: Dim) -> str:
    return f"{d:,}" if isinstance(d, int) else D.to_text(d)


def human_bytes(d: Dim) -> str:
    if not isinstance(d, int):
        return f"{D.to_text(d)} B"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if d >= size:
            return f"{d / size:.2f} {unit}"
    return f"{d} B"


def text_report(graph: Graph, stats: NetworkStats) -> str:
    header = ("layer", "op", "output", "params", "MACs", "FLOPs", "RF", "line")
    rows = []
    for r in stats.layers:
        params = "shared" if r.shared_use else number(r.params)
        rows.append((r.label, r.describe, r.shape, params, number(r.macs), number(D.mul(r.macs, 2)),
                     r.receptive_field, str(r.line)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {3, 4, 5, 7}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    inputs = ", ".join(f"{i.name} {graph.values[i.value].type.text(graph.layout)}" for i in graph.inputs)
    lines = [f"network {graph.name} ({graph.source_path}) — layout {graph.layout}, dtype {graph.dtype}",
             f"inputs: {inputs}", "", fmt(header), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    lines += [
        "",
        f"parameters:  {stats.params:,} ({stats.trainable_params:,} trainable), {human_bytes(stats.param_bytes)}",
        f"MACs:        {number(stats.macs)} per sample (FLOPs {number(stats.flops)})",
        f"activations: {human_bytes(stats.activation_bytes)} per sample (every value kept for backward)",
    ]
    return "\n".join(lines)
