"""The plan: execution order, an algorithm per op, parameter offsets, buffer sizes.

The code generator renders exactly what the plan says. Choices that trade speed (which
conv algorithm, fusing bias/activation epilogues, sharing activation memory) belong here,
so that they can change without touching the templates' meaning.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph, Layer, ParamSpec, TensorType
from ..ops.base import BufferSpec, lookup


@dataclass(frozen=True)
class ParamSlot:
    full_name: str                   # layer.param, as Model.params names it
    layer: Layer
    spec: ParamSpec
    offset: int                      # elements from the start of the parameter block
    size: int


@dataclass(frozen=True)
class BufferSlot:
    """A layer's non-trainable state (batchnorm's running statistics) in the buffer block."""
    full_name: str                   # layer.buffer, as Model.buffers names it
    layer: str
    spec: BufferSpec
    offset: int                      # elements from the start of the buffer block
    size: int


@dataclass(frozen=True)
class Plan:
    graph: Graph
    order: tuple[int, ...]           # node ids, forward order
    params: tuple[ParamSlot, ...]
    param_total: int
    scratch: tuple[Dim, ...]         # per-sample scratch needs; the module takes the largest
    algorithms: tuple[tuple[int, str], ...]   # node id → algorithm chosen
    buffers: tuple[BufferSlot, ...] = ()
    buffer_total: int = 1
    saved: tuple[tuple[int, Dim], ...] = ()   # node id → per-sample elements its forward keeps for backward
    # With make_plan(guard=…) (sanitizer builds): the gaps after each parameter, (offset, elements),
    # at least `guard` long, which the module poisons in the parameter and gradient blocks.
    param_guards: tuple[tuple[int, int], ...] = ()

    def param(self, full_name: str) -> ParamSlot:
        return next(p for p in self.params if p.full_name == full_name)

    def algorithm(self, node_id: int) -> str | None:
        return dict(self.algorithms).get(node_id)

    def layer_params(self, layer_name: str) -> dict[str, ParamSlot]:
        return dict(self._params_of.get(layer_name, {}))

    def layer_buffers(self, layer_name: str) -> dict[str, BufferSlot]:
        return dict(self._buffers_of.get(layer_name, {}))

    # Indexes built once: asking for every layer's slots stays linear in the number of layers.
    @cached_property
    def _params_of(self) -> dict[str, dict[str, ParamSlot]]:
        return slots_by_layer(self.params, lambda p: p.layer.name)

    @cached_property
    def _buffers_of(self) -> dict[str, dict[str, BufferSlot]]:
        return slots_by_layer(self.buffers, lambda b: b.layer)


def slots_by_layer(slots, layer_of) -> dict[str, dict]:
    """layer name → {slot name: slot}, in the order of `slots`."""
    out: dict[str, dict] = {}
    for slot in slots:
        out.setdefault(layer_of(slot), {})[slot.spec.name] = slot
    return out


def _align(n: int, to: int = 16) -> int:
    # Parameters start on 64-byte boundaries so vector loads of a weight row stay aligned.
    return (n + to - 1) // to * to


def buffer_layout(graph: Graph) -> tuple[BufferSlot, ...]:
    """Every layer's buffers, in the order of the layers' parameters. A shared layer's buffers
    come from its first use (every use has the same input shape, as its parameters do)."""
    first_use = {}
    for node in graph.nodes:
        first_use.setdefault(node.layer, node)
    # Layers with parameters in their order; then any parameterless owner of buffers.
    owners = list(dict.fromkeys([layer.name for layer in graph.layers] + list(first_use)))
    slots, offset = [], 0
    for owner in owners:
        node = first_use.get(owner)
        if node is None:
            continue
        in_types = tuple(graph.values[v].type for v in node.inputs)
        for spec in lookup(node.op).buffer_specs(in_types, node.attrs):
            size = D.product(spec.shape)
            slots.append(BufferSlot(f"{owner}.{spec.name}", owner, spec, offset, size))
            offset = _align(offset + size)
    return tuple(slots)


def reads_input_as_columns(attrs: dict, in_type: TensorType, out_type: TensorType) -> bool:
    """True when a convolution's column matrix is its input, unchanged: every kernel extent and
    stride 1 (dilation then moves nothing), no padding before or after any axis, so the output
    grid is the input grid. Decided from the attributes, never from rendered C."""
    return (all(k == 1 for k in attrs["kernel"]) and all(s == 1 for s in attrs["stride"])
            and all(before == 0 and after == 0 for before, after in attrs["pads"])
            and tuple(out_type.spatial) == tuple(in_type.spatial))


# Algorithms that need no column matrix, so no per-sample scratch.
_NO_COLUMNS = frozenset({"direct", "gemm_1x1"})


def choose_algorithm(node, in_type: TensorType | None = None, out_type: TensorType | None = None) -> str | None:
    """How a convolution runs. im2col + GEMM in general; with one input channel per group
    (depthwise) the GEMMs would have a single row, so a direct loop over the window wins; a 1×1
    convolution without stride or padding is one GEMM on the input itself (`gemm_1x1`)."""
    algo = node.attrs.get("algo")
    if algo is None or "kernel" not in node.attrs:     # not a convolution (the tuner forces any op's variant)
        return None
    if algo == "auto" and node.attrs["groups"] > 1 and node.attrs["in"] == node.attrs["groups"]:
        return "direct"
    if in_type is not None and out_type is not None and reads_input_as_columns(node.attrs, in_type, out_type):
        return "gemm_1x1"
    return "im2col"


def make_plan(graph: Graph, guard: int = 0) -> Plan:
    """`guard`: elements kept free after every parameter (sanitizer builds, lower/plan.py)."""
    params, param_guards = [], []
    offset = 0
    for layer in graph.layers:
        for spec in layer.params:
            size = D.product(spec.shape)
            params.append(ParamSlot(f"{layer.name}.{spec.name}", layer, spec, offset, size))
            end = offset + size
            offset = _align(end + guard)
            if guard:
                param_guards.append((end, offset - end))
    scratch = []
    algorithms = []
    saved = []
    for node in graph.nodes:
        op = lookup(node.op)
        in_types = tuple(graph.values[v].type for v in node.inputs)
        out_type = graph.values[node.output].type
        algo = choose_algorithm(node, in_types[0] if in_types else None, out_type)
        if algo is not None:
            algorithms.append((node.id, algo))
        need = op.scratch_elements(in_types, out_type, node.attrs)
        if need != 0 and algo not in _NO_COLUMNS:
            scratch.append(need)
        keep = op.saved_elements(in_types, graph.values[node.output].type, node.attrs)
        if keep != 0:
            saved.append((node.id, keep))
    buffers = buffer_layout(graph)
    buffer_total = max((b.offset + b.size for b in buffers), default=0)
    return Plan(graph, tuple(n.id for n in graph.nodes), tuple(params), max(offset, 1), tuple(scratch),
                tuple(algorithms), buffers, max(buffer_total, 1), tuple(saved), tuple(param_guards))
