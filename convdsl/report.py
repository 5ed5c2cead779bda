"""What `convdsl check` tells about a network (§5): the text table and the JSON document.

The JSON form is versioned and described by docs/check-report.schema.json.
"""
from __future__ import annotations

from .errors import ConvDSLError, Diagnostic, Note, note_text
from .ir import dims as D
from .ir.dims import Dim
from .ir.graph import Graph
from .passes.memory import MemoryPlan
from .passes.stats import NetworkStats

JSON_VERSION = 1


def number(d: Dim) -> str:
    return f"{d:,}" if isinstance(d, int) else D.to_text(d)


def human_bytes(d: Dim) -> str:
    if not isinstance(d, int):
        return f"{D.to_text(d)} bytes"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if d >= size:
            return f"{d / size:.2f} {unit}"
    return f"{d} B"


def text_report(graph: Graph, stats: NetworkStats, memory: MemoryPlan) -> str:
    header = ("layer", "op", "output", "params", "MACs", "backward MACs", "FLOPs", "RF", "line")
    rows = []
    for r in stats.layers:
        params = "shared" if r.shared_use else number(r.params)
        rows.append((r.label, r.describe, r.shape, params, number(r.macs), number(r.backward_macs),
                     number(D.mul(r.macs, 2)), r.receptive_field, str(r.line)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {3, 4, 5, 6, 8}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    inputs = ", ".join(f"{i.name} {graph.values[i.value].type.text(graph.layout)}" for i in graph.inputs)
    peak_at = f" (at {graph.nodes[memory.peak_node].label})" if memory.peak_node is not None else ""
    lines = [f"network {graph.name} ({graph.source_path}) — layout {graph.layout}, dtype {graph.dtype}",
             f"inputs: {inputs}", "", fmt(header), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    lines += [
        "",
        f"parameters:  {stats.params:,} ({stats.trainable_params:,} trainable), {human_bytes(stats.param_bytes)}",
        f"MACs:        {number(stats.macs)} forward ({number(stats.flops)} FLOPs), {number(stats.backward_macs)} "
        f"backward, per sample",
        f"activations: {human_bytes(memory.peak_inference_bytes)} per sample at the peak running forward only"
        f"{peak_at}; {human_bytes(memory.training_bytes)} per sample training (what backward reads and the "
        f"gradients, sharing memory by lifetime; {human_bytes(memory.all_kept_bytes)} if every value and its gradient "
        f"were kept)",
    ]
    return "\n".join(lines)


def _json_dim(d: Dim):
    return d if isinstance(d, int) else D.to_text(d)


def _json_shape(graph: Graph, vid: int) -> list:
    t = graph.values[vid].type
    dims = list(t.shape)
    if graph.layout == "NHWC" and len(dims) > 1:
        dims = dims[1:] + dims[:1]
    return [_json_dim(d) for d in dims]


def json_note(note) -> dict:
    """A note: its text, and its place when it points somewhere (the call of a block instance)."""
    span = note.span if isinstance(note, Note) else None
    return {"message": note_text(note), "file": span.path if span else None, "line": span.line if span else None,
            "column": span.col if span else None}


def json_diagnostic(d: Diagnostic | ConvDSLError, severity: str = "warning") -> dict:
    """A warning (with its code) or an error (code null) as the JSON report writes it."""
    return {"severity": severity, "code": d.code, "message": d.message,
            "file": d.span.path if d.span else None, "line": d.span.line if d.span else None,
            "column": d.span.col if d.span else None, "notes": [json_note(n) for n in d.notes]}


def json_document(networks: list[dict], errors: list[ConvDSLError] = ()) -> dict:
    """Each error of a ConvDSLErrors is listed on its own."""
    return {"convdsl_check": JSON_VERSION, "networks": networks,
            "errors": [json_diagnostic(one, "error") for e in errors for one in e.errors]}


def json_network(graph: Graph, stats: NetworkStats, memory: MemoryPlan, diagnostics,
                 severity: str = "warning") -> dict:
    layers = []
    for r, node in zip(stats.layers, graph.nodes):
        layers.append({
            "label": r.label, "op": r.op, "describe": r.describe, "output_shape": _json_shape(graph, node.output),
            "params": r.params, "shared_weights": r.shared_use, "macs_forward": _json_dim(r.macs),
            "macs_backward": _json_dim(r.backward_macs), "flops_forward": _json_dim(D.mul(r.macs, 2)),
            "receptive_field": r.receptive_field, "line": r.line, "column": r.col, "blocks": list(r.scope),
            "inputs": [graph.values[v].producer if graph.values[v].producer is not None else
                       f"input:{next(i.name for i in graph.inputs if i.value == v)}" for v in node.inputs],
        })
    return {
        "name": graph.name, "source": graph.source_path, "layout": graph.layout, "dtype": graph.dtype,
        "inputs": [{"name": i.name, "shape": _json_shape(graph, i.value)} for i in graph.inputs],
        "outputs": [{"name": o.name, "shape": _json_shape(graph, o.value)} for o in graph.outputs],
        "run_time_sizes": list(graph.sym_dims),
        "loss": graph.loss.kind if graph.loss else None,
        "layers": layers,
        "totals": {
            "params": stats.params, "trainable_params": stats.trainable_params, "param_bytes": stats.param_bytes,
            "macs_forward": _json_dim(stats.macs), "macs_backward": _json_dim(stats.backward_macs),
            "flops_forward": _json_dim(stats.flops),
            "peak_activation_bytes_forward": _json_dim(memory.peak_inference_bytes),
            "peak_activation_layer": (graph.nodes[memory.peak_node].label if memory.peak_node is not None
                                      else None),
            "activation_bytes_training": _json_dim(memory.training_bytes),
        },
        "diagnostics": [json_diagnostic(d, severity) for d in diagnostics],
    }
