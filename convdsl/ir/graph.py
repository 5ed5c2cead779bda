"""The IR: a typed dataflow graph of nodes (one per layer application) over tensor values.

Shapes are per sample and channel-first whatever the file's layout: (C, *spatial) or (F,)
for flat vectors. The layout only changes how inputs, outputs and reports are written.
Everything here is frozen: passes build new objects instead of editing these.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import Span
from .dims import Dim, to_text


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]          # per sample, channel-first

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def channels(self) -> Dim:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[Dim, ...]:
        return self.shape[1:]

    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def text(self, layout: str = "NCHW") -> str:
        dims = list(self.shape)
        if layout == "NHWC" and len(dims) > 1:
            dims = dims[1:] + dims[:1]
        return "[" + ", ".join(to_text(d) for d in dims) + "]"


@dataclass(frozen=True)
class Init:
    """How a parameter starts: he | xavier | normal(std) | uniform(a) | zeros | ones | const."""
    kind: str
    arg: float = 0.0


@dataclass(frozen=True)
class ParamSpec:
    name: str                        # local to its layer: weight, bias, dw.weight …
    shape: tuple[int, ...]
    init: Init
    trainable: bool = True
    fan_in: int = 1
    fan_out: int = 1
    const_values: tuple[float, ...] | None = None   # weight=CONST, flattened row-major


@dataclass(frozen=True)
class Node:
    id: int
    op: str                          # the OpDef name
    inputs: tuple[int, ...]          # value ids
    output: int                      # value id
    attrs: Mapping[str, Any]         # normalised by the OpDef
    label: str                       # display name: conv1, U, inception1.conv3
    layer: str                       # the owner of its parameters (shared layers reuse one)
    span: Span
    scope: tuple[str, ...] = ()      # names of the blocks it sits in, outermost first
    block_calls: tuple[Span, ...] = ()   # where each block of `scope` was called, outermost first

    def __post_init__(self):
        if not isinstance(self.attrs, MappingProxyType):
            object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))


@dataclass(frozen=True)
class Value:
    id: int
    type: TensorType
    producer: int | None             # node id, None for a network input
    name: str = ""                   # the name it was bound to, when there was one


@dataclass(frozen=True)
class Layer:
    """One set of parameters. A shared `layer` is used by several nodes."""
    name: str
    op: str
    params: tuple[ParamSpec, ...]
    span: Span


@dataclass(frozen=True)
class InputDecl:
    name: str
    value: int
    dims: tuple[Dim, ...]            # as written (layout order), ints or Sym vars
    span: Span


@dataclass(frozen=True)
class OutputDecl:
    name: str
    value: int
    span: Span


@dataclass(frozen=True)
class LossDecl:
    kind: str
    value: int                       # which value the loss reads
    output_index: int                # which network output that value is
    attrs: Mapping[str, Any]
    span: Span


@dataclass(frozen=True)
class Graph:
    name: str
    source_path: str
    span: Span
    layout: str
    dtype: str
    inputs: tuple[InputDecl, ...]
    outputs: tuple[OutputDecl, ...]
    nodes: tuple[Node, ...]
    values: tuple[Value, ...]
    layers: tuple[Layer, ...]
    loss: LossDecl | None = None
    sym_dims: tuple[str, ...] = ()   # run-time dim names, in order of first appearance

    def value(self, vid: int) -> Value:
        return self.values[vid]

    def node(self, nid: int) -> Node:
        return self.nodes[nid]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def consumers(self, vid: int) -> tuple[Node, ...]:
        """The nodes that read a value, in order; from an index built once, so that a pass asking
        for every node's readers stays linear in the size of the graph."""
        return self._readers.get(vid, ())

    @cached_property
    def _readers(self) -> dict[int, tuple[Node, ...]]:
        readers: dict[int, list[Node]] = {}
        for n in self.nodes:
            for vid in dict.fromkeys(n.inputs):          # a node that reads a value twice counts once
                readers.setdefault(vid, []).append(n)
        return {vid: tuple(ns) for vid, ns in readers.items()}
