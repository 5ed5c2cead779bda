"""What a network costs, by the chapter's formulas (§2.4): parameters, MACs, receptive fields, memory."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph
from ..ops.base import lookup

BYTES = {"f32": 4, "f64": 8}


@dataclass(frozen=True)
class LayerStats:
    node: int
    label: str
    op: str
    describe: str
    shape: str                # output shape in the file's layout
    params: int               # 0 for a later use of a shared layer
    shared_use: bool          # this node reuses weights counted at an earlier node
    macs: Dim                 # forward multiply-adds per sample
    backward_macs: Dim        # input gradient (as many as forward) + weight gradient (as many again)
    receptive_field: str      # "5×5", or "all" once every input position is seen
    line: int
    col: int = 0
    scope: tuple = ()


@dataclass(frozen=True)
class NetworkStats:
    layers: tuple[LayerStats, ...]
    params: int
    trainable_params: int
    macs: Dim
    backward_macs: Dim
    param_bytes: int
    activation_bytes: Dim     # per sample: every value kept for backward

    @property
    def flops(self) -> Dim:
        return D.mul(self.macs, 2)


def receptive_fields(graph: Graph) -> dict[int, object]:
    """Per value: (field per axis, jump per axis), or "all" (§2.1.1: r_out = r_in + (k−1)·j_in)."""
    fields: dict[int, object] = {}
    for inp in graph.inputs:
        t = graph.values[inp.value].type
        n = len(t.spatial)
        fields[inp.value] = ((1,) * n, (1,) * n) if n else "all"
    for node in graph.nodes:
        op = lookup(node.op)
        ins = [fields[v] for v in node.inputs]
        out_t = graph.values[node.output].type
        if any(f == "all" for f in ins) or not out_t.spatial:
            fields[node.output] = "all"
            continue
        rank = len(out_t.spatial)
        rf = tuple(max(f[0][a] for f in ins) for a in range(rank))
        jump = tuple(max(f[1][a] for f in ins) for a in range(rank))
        win = op.window(tuple(graph.values[v].type for v in node.inputs), node.attrs)
        if win == "global":
            fields[node.output] = "all"
        elif win is None:
            fields[node.output] = (rf, jump)
        else:
            keff, stride = win
            fields[node.output] = (tuple(r + (k - 1) * j for r, k, j in zip(rf, keff, jump)),
                                   tuple(j * s for j, s in zip(jump, stride)))
    return fields


def collect(graph: Graph) -> NetworkStats:
    fields = receptive_fields(graph)
    seen_layers: set[str] = set()
    rows = []
    layer_params = {layer.name: layer for layer in graph.layers}
    total_params = trainable = 0
    total_macs: Dim = 0
    total_back: Dim = 0
    for node in graph.nodes:
        op = lookup(node.op)
        out_t = graph.values[node.output].type
        in_types = tuple(graph.values[v].type for v in node.inputs)
        params = 0
        shared = False
        if node.layer in layer_params:
            if node.layer in seen_layers:
                shared = True
            else:
                seen_layers.add(node.layer)
                for spec in layer_params[node.layer].params:
                    size = D.product(spec.shape)
                    params += size
                    if spec.trainable:
                        trainable += size
        total_params += params
        macs = op.macs(in_types, out_t, node.attrs)
        total_macs = D.add(total_macs, macs)
        # Backward computes the input gradient (as many MACs as forward) and, for trainable
        # weights, the weight gradient (as many again).
        trains = node.layer in layer_params and any(p.trainable for p in layer_params[node.layer].params)
        back = D.mul(macs, 2 if trains else 1)
        total_back = D.add(total_back, back)
        f = fields[node.output]
        rf = "all" if f == "all" else "×".join(str(x) for x in f[0])
        rows.append(LayerStats(node.id, node.label, node.op, op.describe(node.attrs), out_t.text(graph.layout),
                               params, shared, macs, back, rf, node.span.line, node.span.col, node.scope))
    act: Dim = 0
    for v in graph.values:
        act = D.add(act, D.product(v.type.shape))
    return NetworkStats(tuple(rows), total_params, trainable, total_macs, total_back, total_params * BYTES[graph.dtype],
                        D.mul(act, BYTES[graph.dtype]))
