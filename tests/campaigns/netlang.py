"""A small model of the .cnn language for the random-network campaign: a syntax tree, its text,
its JSON form (for regression files), and an interpreter that runs it in PyTorch float64.

The interpreter is the reference: it follows docs/language.md (labels, parameter names and
order, padding forms, every op's meaning) with torch.nn.functional primitives and never calls
the code under test. It runs in two modes: "abstract" (random parameters, several input sizes
at once; the generator uses it to tell valid choices from invalid ones) and "reference"
(the compiled model's parameters and the run's inputs, with autograd).
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields, is_dataclass

import numpy as np
import torch
import torch.nn.functional as F

REQUIRED = "<required>"


class Invalid(Exception):
    """The language's rules (as this model reads docs/language.md) refuse the network."""


# ---- values written as arguments ----------------------------------------------------------

@dataclass(frozen=True)
class Sym:
    """A bare name used as a value: pad=same, init=he, mode=nearest, algo=auto."""
    name: str


@dataclass(frozen=True)
class Dec:
    """A decimal number, kept with the text it is written as (0.5, .5, 5e-1)."""
    text: str

    @property
    def value(self) -> float:
        return float(self.text)


@dataclass(frozen=True)
class InitFn:
    """init=normal(0.02) / uniform(0.5)."""
    name: str
    arg: Dec


@dataclass(frozen=True)
class ConstName:
    name: str


@dataclass(frozen=True)
class ParamRef:
    """A block parameter used as a value."""
    name: str


@dataclass(frozen=True)
class Measure:
    """channels(t), height(t), width(t) inside a block."""
    fn: str
    name: str


@dataclass(frozen=True)
class NumList:
    """A flat list of numbers, `[0.5, 2.0]` (a loss's class weights)."""
    values: tuple    # Dec / int


@dataclass(frozen=True)
class ShapeList:
    """A shape written as a list, as `reshape([C, H, W])` takes it."""
    items: tuple


@dataclass(frozen=True)
class Arith:
    op: str          # + - * //
    left: object
    right: object


# ---- expressions and statements -----------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Apply:
    """An op, a `layer` or a block applied to tensors. style "pipe" writes the first input
    before an arrow (`a -> f(b, k=3)`), "call" writes it as the first argument (`f(a, b, k=3)`);
    `bare` writes a pipe without parentheses (`a -> relu`)."""
    kind: str                 # op | layer | block
    name: str
    inputs: tuple             # tensor expressions
    args: tuple = ()          # positional, after the tensors
    kwargs: tuple = ()        # ((name, value), …)
    style: str = "pipe"
    bare: bool = False


@dataclass(frozen=True)
class Input:
    name: str
    dims: tuple               # as written in the file's layout: ints and run-time size names


@dataclass(frozen=True)
class Assign:
    name: str
    expr: object


@dataclass(frozen=True)
class LayerDecl:
    name: str
    call: Apply               # kind op, no inputs


@dataclass(frozen=True)
class ConstDecl:
    name: str
    values: tuple             # nested tuples of Dec / int


@dataclass(frozen=True)
class Repeat:
    count: int
    body: tuple


@dataclass(frozen=True)
class Output:
    names: tuple


@dataclass(frozen=True)
class Loss:
    kind: str
    name: str
    kwargs: tuple = ()        # ((name, value), …): weight=NumList, ignore_index=int, beta=Dec, activation=Sym …

    def arg(self, name: str, default=None):
        """The argument's value as a Python number or word (its default when not written)."""
        v = dict(self.kwargs).get(name)
        if v is None:
            return default
        if isinstance(v, NumList):
            return tuple(x.value if isinstance(x, Dec) else float(x) for x in v.values)
        return v.value if isinstance(v, Dec) else v.name if isinstance(v, Sym) else v


@dataclass(frozen=True)
class Return:
    expr: object


@dataclass(frozen=True)
class BlockDef:
    name: str
    params: tuple             # ((name, default or None), …); the first is the tensor
    body: tuple


@dataclass(frozen=True)
class Program:
    name: str
    layout: str
    dtype: str
    blocks: tuple
    body: tuple
    write_layout: bool = True
    write_dtype: bool = True


@dataclass(frozen=True)
class Case:
    """One campaign network and how it is run."""
    program: Program
    sizes: tuple              # ((name, size), …) per run: run 1 then run 2 (probes follow for checking)
    batches: tuple            # (batch of run 1, batch of run 2)
    training: bool
    seed: int                 # for parameter values, inputs, output gradients, targets
    lr: float = 0.1
    probes: tuple = ()        # more size assignments the generator checked (never run)


# ---- JSON ---------------------------------------------------------------------------------

_CLASSES = {c.__name__: c for c in (Sym, Dec, InitFn, ConstName, ParamRef, Measure, NumList, Arith, ShapeList, Ref,
                                    Apply, Input,
                                    Assign, LayerDecl, ConstDecl, Repeat, Output, Loss, Return, BlockDef,
                                    Program, Case)}


def to_json(obj):
    if is_dataclass(obj):
        return {"_": type(obj).__name__, **{f.name: to_json(getattr(obj, f.name)) for f in fields(obj)}}
    if isinstance(obj, tuple):
        return [to_json(v) for v in obj]
    return obj


def from_json(data):
    if isinstance(data, dict):
        cls = _CLASSES[data["_"]]
        return cls(**{k: from_json(v) for k, v in data.items() if k != "_"})
    if isinstance(data, list):
        return tuple(from_json(v) for v in data)
    return data


def dumps(case: Case) -> str:
    return json.dumps(to_json(case), separators=(",", ":"))


def loads(text: str) -> Case:
    return from_json(json.loads(text))


# ---- text ---------------------------------------------------------------------------------

def render_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Dec):
        return v.text
    if isinstance(v, (Sym, ConstName, ParamRef)):
        return v.name
    if isinstance(v, InitFn):
        return f"{v.name}({v.arg.text})"
    if isinstance(v, Measure):
        return f"{v.fn}({v.name})"
    if isinstance(v, NumList):
        return "[" + ", ".join(render_value(x) for x in v.values) + "]"
    if isinstance(v, Arith):
        return f"{render_value(v.left)} {v.op} {render_value(v.right)}"
    if isinstance(v, ShapeList):
        return "[" + ", ".join(render_value(x) for x in v.items) + "]"
    if isinstance(v, tuple):
        inner = ", ".join(render_value(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    raise TypeError(f"cannot write {v!r}")


def render_expr(e) -> str:
    if isinstance(e, Ref):
        return e.name
    if isinstance(e, Apply):
        items = [render_expr(x) for x in (e.inputs[1:] if e.style == "pipe" else e.inputs)]
        items += [render_value(v) for v in e.args]
        items += [f"{k}={render_value(v)}" for k, v in e.kwargs]
        if e.style == "pipe":
            head = render_expr(e.inputs[0])
            callee = e.name if e.bare and not items else f"{e.name}({', '.join(items)})"
            return f"{head} -> {callee}"
        return f"{e.name}({', '.join(items)})"
    raise TypeError(f"cannot write {e!r}")


def render_const(v) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(render_const(x) for x in v) + "]"
    return render_value(v)


def render_stmt(s, indent: str, breaks: bool) -> list[str]:
    if isinstance(s, Input):
        return [f"{indent}input {s.name}: [{', '.join(str(d) for d in s.dims)}]"]
    if isinstance(s, Assign):
        text = render_expr(s.expr)
        if breaks and text.count(" -> ") >= 3 and isinstance(s.expr, Apply) and s.expr.style == "pipe":
            # A line that starts with `->` continues the chain above it.
            parts = _split_top_chain(s.expr)
            lines = [f"{indent}{s.name} = {parts[0]}"] + [f"{indent}    -> {p}" for p in parts[1:]]
            return lines
        return [f"{indent}{s.name} = {text}"]
    if isinstance(s, LayerDecl):
        c = s.call
        text = c.name if c.bare and not c.args and not c.kwargs else render_expr(c)
        return [f"{indent}layer {s.name} = {text}"]
    if isinstance(s, ConstDecl):
        return [f"{indent}const {s.name} = {render_const(s.values)}"]
    if isinstance(s, Repeat):
        lines = [f"{indent}repeat {s.count} {{"]
        for inner in s.body:
            lines += render_stmt(inner, indent + "    ", breaks)
        return lines + [f"{indent}}}"]
    if isinstance(s, Output):
        return [f"{indent}output {', '.join(s.names)}"]
    if isinstance(s, Loss):
        args = [s.name] + [f"{k}={render_value(v)}" for k, v in s.kwargs]
        return [f"{indent}loss {s.kind}({', '.join(args)})"]
    if isinstance(s, Return):
        return [f"{indent}return {render_expr(s.expr)}"]
    raise TypeError(f"cannot write {s!r}")


def _split_top_chain(e: Apply) -> list[str]:
    """`a -> f -> g` as ["a", "f", "g"]: the steps of the outermost pipe chain."""
    steps = []
    while isinstance(e, Apply) and e.style == "pipe":
        rest = Apply(e.kind, e.name, (Ref("_"),) + e.inputs[1:], e.args, e.kwargs, "pipe", e.bare)
        steps.append(render_expr(rest)[len("_ -> "):])
        e = e.inputs[0]
    return [render_expr(e)] + steps[::-1]


def render(program: Program, breaks: bool = True) -> str:
    lines: list[str] = []
    for b in program.blocks:
        params = ", ".join(n if d is None else f"{n}={render_value(d)}" for n, d in b.params)
        lines.append(f"block {b.name}({params}) {{")
        for s in b.body:
            lines += render_stmt(s, "    ", breaks)
        lines += ["}", ""]
    lines.append(f"network {program.name} {{")
    if program.write_dtype or program.dtype != "f32":
        lines.append(f"    dtype {program.dtype}")
    if program.write_layout or program.layout != "NCHW":
        lines.append(f"    layout {program.layout}")
    for s in program.body:
        lines += render_stmt(s, "    ", breaks)
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- the interpreter ----------------------------------------------------------------------

class V:
    """A tensor value: one torch tensor per size assignment, [N, C, *spatial] (channel-first),
    and for each per-sample dim whether it depends on a run-time size."""

    def __init__(self, tensors: list, flags: tuple):
        self.tensors = tensors
        self.flags = flags

    def shape(self, i: int = 0) -> tuple:
        return tuple(self.tensors[i].shape[1:])

    @property
    def channels(self) -> int:
        return self.shape()[0]

    @property
    def rank(self) -> int:           # spatial rank; 0 for a vector
        return len(self.shape()) - 1

    @property
    def static(self) -> bool:
        return not any(self.flags)

    def shapes(self) -> list:
        return [tuple(t.shape[1:]) for t in self.tensors]


@dataclass
class LayerVal:
    name: str
    call: Apply
    bound: dict


@dataclass
class ConstVal:
    name: str
    shape: tuple
    values: tuple             # flat floats


@dataclass
class Scope:
    prefix: str = ""
    bindings: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    returned: object = None

    def next_label(self, base: str) -> str:
        n = self.counters.get(base, 0) + 1
        self.counters[base] = n
        return f"{self.prefix}{base}{n}"

    def copy(self) -> "Scope":
        return Scope(self.prefix, dict(self.bindings), dict(self.counters), self.returned)


@dataclass
class PSpec:
    local: str                # "weight", "bias", "dw.weight" …
    shape: tuple
    trainable: bool
    init: tuple               # ("he",) ("zeros",) ("uniform", a) ("const", values) …


@dataclass
class DropoutKeys:
    """SplitMix64 as docs/language.md §7 defines it: a stream started at seed ^ 0xA0761D6478BD642F;
    every training-mode forward of a dropout layer takes the stream's next output as its key."""
    seed: int
    taken: int = 0

    def next_key(self) -> int:
        self.taken += 1
        state = (self.seed ^ 0xA0761D6478BD642F) & MASK64
        return splitmix_outputs(state, self.taken)[-1]


MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def splitmix_outputs(state: int, count: int) -> list[int]:
    """The first `count` outputs of a SplitMix64 generator whose state starts at `state`."""
    with np.errstate(over="ignore"):
        steps = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GAMMA) + np.uint64(state)
        return [int(v) for v in _mix(steps)]


def dropout_keep(key: int, count: int, p: float) -> np.ndarray:
    """Value i is dropped when u < p, u = ((z >> 11) + 0.5) / 2^53, z the (i+1)-th output from key."""
    with np.errstate(over="ignore"):
        steps = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GAMMA) + np.uint64(key)
        z = _mix(steps)
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0 ** 53
    return u >= p


class Interp:
    """Runs a Program. `variants` holds, per size assignment, the input tensors by name
    (channel-first). `param_source(name, spec)` returns the tensor of a parameter the first time
    it is attached, `buffer_source(name, shape, fill)` that of a buffer."""

    def __init__(self, program: Program, variants: list[dict], *, training: bool, param_source, buffer_source,
                 dropout: DropoutKeys | None = None, abstract: bool = False):
        self.program = program
        self.blocks = {b.name: b for b in program.blocks}
        self.variants = variants
        self.layout = program.layout
        self.training = training
        self.param_source = param_source
        self.buffer_source = buffer_source
        self.dropout = dropout
        self.abstract = abstract
        self.params: OrderedDict = OrderedDict()          # full name → tensor
        self.pspecs: OrderedDict = OrderedDict()          # full name → PSpec
        self.layer_params: dict = {}                      # label → [full names]
        self.slots: OrderedDict = OrderedDict()           # slot → [labels], in reservation order
        self.buffers: OrderedDict = OrderedDict()
        self.outputs: list = []
        self.loss = None
        self.scope = Scope()
        self.block_stack: list = []
        self.nodes = 0
        self.events: list = []                            # (op, label, info) in execution order
        self.consumed: dict = {}                          # id → value, for the values some layer read

    def fork(self) -> "Interp":
        """A copy whose later statements do not change this one (tensors are shared)."""
        other = object.__new__(Interp)
        other.__dict__.update(self.__dict__)
        other.params = OrderedDict(self.params)
        other.pspecs = OrderedDict(self.pspecs)
        other.layer_params = {k: list(v) for k, v in self.layer_params.items()}
        other.slots = OrderedDict((k, list(v)) for k, v in self.slots.items())
        other.buffers = OrderedDict(self.buffers)
        other.outputs = list(self.outputs)
        other.scope = self.scope.copy()
        other.block_stack = list(self.block_stack)
        other.events = list(self.events)
        other.consumed = dict(self.consumed)
        other.blocks = dict(self.blocks)
        return other

    # -- statements
    def run(self) -> "Interp":
        for s in self.program.body:
            self.exec(s, self.scope)
        if not self.outputs:
            raise Invalid("no output")
        return self

    def exec(self, s, scope: Scope) -> None:
        if isinstance(s, Input):
            dims = s.dims
            if self.layout == "NHWC" and len(dims) > 1:
                dims = (dims[-1], *dims[:-1])
            flags = tuple(isinstance(d, str) for d in dims)
            tensors = [v[s.name] for v in self.variants]
            self.bind(scope, s.name, V(tensors, flags), "input")
        elif isinstance(s, Assign):
            value = self.eval(s.expr, scope)
            if not isinstance(value, V):
                raise Invalid("assigning a non-tensor")
            self.bind(scope, s.name, value, "value")
        elif isinstance(s, LayerDecl):
            if s.call.name not in OPS:
                raise Invalid(f"unknown op {s.call.name}")
            bound = OPS[s.call.name].bind(tuple(self.resolve(a, scope) for a in s.call.args),
                                          {k: self.resolve(v, scope) for k, v in s.call.kwargs})
            self.reserve(s.name)
            self.bind(scope, s.name, LayerVal(s.name, s.call, bound), "layer")
        elif isinstance(s, ConstDecl):
            shape, flat = _const_shape(s.values)
            self.bind(scope, s.name, ConstVal(s.name, shape, flat), "const")
        elif isinstance(s, Repeat):
            for _ in range(s.count):
                for inner in s.body:
                    self.exec(inner, scope)
        elif isinstance(s, Output):
            for n in s.names:
                v = scope.bindings.get(n)
                if not isinstance(v, V):
                    raise Invalid(f"output {n} is not a tensor")
                if any(o[0] == n for o in self.outputs):
                    raise Invalid(f"output {n} twice")
                self.outputs.append((n, v))
        elif isinstance(s, Loss):
            names = [o[0] for o in self.outputs]
            if s.name not in names:
                raise Invalid("loss of a non-output")
            v = dict(self.outputs)[s.name]
            if loss_target(s) == "labels" and v.channels < 2:
                raise Invalid(f"{s.kind} over a softmax needs 2 classes")
            weight = s.arg("weight")
            if weight is not None and (len(weight) != v.channels or v.flags[0]):
                raise Invalid("one class weight per channel, and a fixed number of channels")
            self.loss = (s, names.index(s.name))
        elif isinstance(s, Return):
            v = self.eval(s.expr, scope)
            if not isinstance(v, V):
                raise Invalid("block returns a non-tensor")
            scope.returned = v
        else:
            raise Invalid(f"statement {type(s).__name__}")

    def bind(self, scope: Scope, name: str, value, kind: str) -> None:
        old = scope.bindings.get(name)
        if isinstance(old, (LayerVal, ConstVal)) or (old is not None and kind in ("layer", "const")):
            raise Invalid(f"rebinding {name}")
        if name in OPS or name in self.blocks or name in KEYWORDS:
            raise Invalid(f"{name} is reserved")
        scope.bindings[name] = value

    def reserve(self, slot: str) -> None:
        if slot not in self.slots:
            self.slots[slot] = []

    # -- expressions
    def resolve(self, v, scope: Scope):
        if isinstance(v, ParamRef):
            if v.name not in scope.bindings:
                raise Invalid(f"undefined {v.name}")
            return scope.bindings[v.name]
        if isinstance(v, ConstName):
            c = scope.bindings.get(v.name)
            if not isinstance(c, ConstVal):
                raise Invalid(f"{v.name} is not a const")
            return c
        if isinstance(v, Measure):
            t = scope.bindings.get(v.name)
            if not isinstance(t, V):
                raise Invalid(f"{v.fn} of a non-tensor")
            axis = {"channels": 0, "height": -2, "width": -1}[v.fn]
            if v.fn != "channels" and t.rank < 2:
                raise Invalid(f"{v.fn} of a map of rank {t.rank}")
            if t.flags[axis]:
                raise Invalid(f"{v.fn} of a run-time size")
            return t.shape()[axis]
        if isinstance(v, Arith):
            a, b = self.resolve(v.left, scope), self.resolve(v.right, scope)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
                raise Invalid("arithmetic on non-integers")
            if v.op == "+":
                return a + b
            if v.op == "-":
                return a - b
            if v.op == "*":
                return a * b
            if v.op == "//":
                if b == 0:
                    raise Invalid("division by zero")
                return a // b
            raise Invalid(f"operator {v.op}")
        if isinstance(v, Dec):
            return v.value
        if isinstance(v, ShapeList):
            return tuple(self.resolve(x, scope) for x in v.items)
        if isinstance(v, tuple):
            return tuple(self.resolve(x, scope) for x in v)
        return v

    def eval(self, e, scope: Scope):
        if isinstance(e, Ref):
            if e.name not in scope.bindings:
                raise Invalid(f"undefined {e.name}")
            return scope.bindings[e.name]
        if not isinstance(e, Apply):
            raise Invalid(f"expression {e!r}")
        ins = [self.eval(x, scope) for x in e.inputs]
        if not all(isinstance(v, V) for v in ins):
            raise Invalid("a non-tensor where a tensor goes")
        if e.kind == "op":
            op = OPS.get(e.name)
            if op is None:
                raise Invalid(f"unknown op {e.name}")
            bound = op.bind(tuple(self.resolve(a, scope) for a in e.args),
                            {k: self.resolve(v, scope) for k, v in e.kwargs})
            label = scope.next_label(e.name)
            self.reserve(label)
            return self.apply(op, label, ins, bound)
        if e.kind == "layer":
            layer = scope.bindings.get(e.name)
            if not isinstance(layer, LayerVal) or len(ins) != 1 or e.args or e.kwargs:
                raise Invalid(f"bad layer use {e.name}")
            return self.apply(OPS[layer.call.name], layer.name, ins, layer.bound)
        if e.kind == "block":
            return self.apply_block(e, ins, scope)
        raise Invalid(f"kind {e.kind}")

    def apply_block(self, e: Apply, ins: list, scope: Scope) -> V:
        block = self.blocks.get(e.name)
        if block is None or len(ins) != 1:
            raise Invalid(f"bad block call {e.name}")
        if e.name in self.block_stack:
            raise Invalid("recursive block")
        values = [self.resolve(a, scope) for a in e.args]
        names = [p[0] for p in block.params]
        if len(values) + 1 > len(names):
            raise Invalid("too many block arguments")
        label = scope.next_label(block.name)
        inner = Scope(prefix=f"{label}.")
        given = dict(zip(names[1:], values))
        for k, v in e.kwargs:
            if k not in names[1:] or k in given:
                raise Invalid(f"bad block keyword {k}")
            given[k] = self.resolve(v, scope)
        inner.bindings[names[0]] = ins[0]
        for n, default in block.params[1:]:
            if n not in given:
                if default is None:
                    raise Invalid(f"missing block argument {n}")
                given[n] = self.resolve(default, Scope())
            inner.bindings[n] = given[n]
        self.block_stack.append(block.name)
        try:
            for s in block.body:
                self.exec(s, inner)
        finally:
            self.block_stack.pop()
        if not isinstance(inner.returned, V):
            raise Invalid("block without return")
        return inner.returned

    def apply(self, op: "OpSpec", label: str, ins: list, bound: dict) -> V:
        self.nodes += 1
        if self.nodes > 400:
            raise Invalid("too many layers for a campaign network")
        if not (op.min_inputs <= len(ins) <= (op.max_inputs or 99)):
            raise Invalid(f"{op.name}: {len(ins)} inputs")
        op.check(ins, bound, self)
        specs = op.params(ins, bound, self)
        P = {}
        if specs:
            if label in self.layer_params:
                names = self.layer_params[label]
                if [self.pspecs[n].shape for n in names] != [s.shape for s in specs]:
                    raise Invalid(f"shared layer {label} used on another shape")
                P = {self.pspecs[n].local: self.params[n] for n in names}
            else:
                self.slots.setdefault(label, []).append(label)
                names = []
                for s in specs:
                    full = f"{label}.{s.local}"
                    self.pspecs[full] = s
                    self.params[full] = self.param_source(full, s)
                    names.append(full)
                    P[s.local] = self.params[full]
                self.layer_params[label] = names
        B = {}
        for bname, shape, fill in op.buffers(ins, bound, self):
            full = f"{label}.{bname}"
            if full not in self.buffers:
                self.buffers[full] = self.buffer_source(full, shape, fill)
            B[bname] = self.buffers[full]
        outs = []
        for i in range(len(self.variants)):
            xs = [v.tensors[i] for v in ins]
            try:
                y = op.forward(xs, bound, P, B, self, label)
            except (RuntimeError, ValueError, IndexError) as err:
                if not self.abstract:
                    raise
                raise Invalid(f"{op.name}: {err}") from None
            if any(d < 1 for d in y.shape[1:]):
                raise Invalid(f"{op.name}: empty output {tuple(y.shape)}")
            if y.numel() > 400_000:
                raise Invalid(f"{op.name}: too large for a campaign network")
            outs.append(y)
        self.events.append((op.name, label, bound))
        self.consumed.update((id(v), v) for v in ins)     # the value is kept, so its id stays its own
        return V(outs, op.out_flags(ins, bound))

    # -- what the checker reads
    def param_list(self) -> list:
        """(name, shape, trainable) in the order docs/language.md §7 promises for Model.params."""
        out = []
        for slot, labels in self.slots.items():
            for label in labels:
                for n in self.layer_params.get(label, ()):
                    s = self.pspecs[n]
                    out.append((n, tuple(s.shape), s.trainable))
        return out


KEYWORDS = {"network", "block", "input", "output", "layer", "const", "repeat", "loss", "layout", "dtype", "return",
            "use", "true", "false"}


def _const_shape(values) -> tuple:
    if isinstance(values, tuple):
        subs = [_const_shape(v) for v in values]
        if not subs or len({s for s, _ in subs}) != 1:
            raise Invalid("ragged const")
        return (len(subs), *subs[0][0]), tuple(x for _, flat in subs for x in flat)
    return (), (float(values.value if isinstance(values, Dec) else values),)


# ---- ops ----------------------------------------------------------------------------------

def axes(v, rank: int) -> tuple:
    return tuple(v) if isinstance(v, tuple) else (v,) * rank


def check_ints(v, rank: int, what: str, minimum: int = 1) -> tuple:
    items = axes(v, rank)
    if len(items) != rank or not all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum
                                     for x in items):
        raise Invalid(f"bad {what} {v!r}")
    return items


def pad_pairs(pad, sizes, kernel, stride, dilation) -> list:
    """(before, after) zeros per spatial axis, for one concrete input size (docs §4 Padding)."""
    rank = len(sizes)
    keff = [r * (k - 1) + 1 for k, r in zip(kernel, dilation)]
    if isinstance(pad, Sym):
        if pad.name == "valid":
            return [(0, 0)] * rank
        if pad.name == "full":
            return [(k - 1, k - 1) for k in keff]
        if pad.name == "same":
            out = []
            for n, k, s in zip(sizes, keff, stride):
                want = -(-n // s)
                total = max((want - 1) * s + k - n, 0)
                out.append((total // 2, total - total // 2))
            return out
        raise Invalid(f"pad {pad.name}")
    if isinstance(pad, bool):
        raise Invalid("pad bool")
    if isinstance(pad, int):
        if pad < 0:
            raise Invalid("negative pad")
        return [(pad, pad)] * rank
    if isinstance(pad, tuple) and len(pad) == rank:
        out = []
        for p in pad:
            if isinstance(p, int) and not isinstance(p, bool) and p >= 0:
                out.append((p, p))
            elif isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                              and x >= 0 for x in p):
                out.append(p)
            else:
                raise Invalid(f"pad entry {p!r}")
        return out
    raise Invalid(f"pad {pad!r}")


def torch_pad(x, pairs, value: float = 0.0):
    flat = []
    for before, after in reversed(list(pairs)):
        flat += [before, after]
    return F.pad(x, flat, value=value) if any(flat) else x


PAD_MODES = (Sym("zeros"), Sym("reflect"), Sym("replicate"))


def check_pad_mode(mode, pad, v: "V", kernel, stride, dilation) -> None:
    """docs §4 Padding modes: pad_mode needs padding known at check time (pad=same with a stride
    on a run-time size is not), and reflect pads at most size − 1 on a side, on fixed sizes."""
    if mode not in PAD_MODES:
        raise Invalid(f"pad mode {mode!r}")
    if mode == Sym("zeros"):
        return
    rank = len(kernel)
    if pad == Sym("same") and any(v.flags[1 + i] and stride[i] > 1 for i in range(rank)):
        raise Invalid("pad_mode with run-time padding")
    for shape in v.shapes():
        pairs = pad_pairs(pad, shape[1:], kernel, stride, dilation)
        if mode == Sym("reflect"):
            for i, (b, a) in enumerate(pairs):
                if max(b, a) > 0 and (v.flags[1 + i] or max(b, a) >= shape[1 + i]):
                    raise Invalid("reflect padding beyond size - 1, or on a run-time size")


def mode_pad(x, pairs, mode):
    """F.pad with the mode (zeros, reflect, replicate) and (before, after) per spatial axis."""
    if mode == Sym("zeros"):
        return torch_pad(x, pairs)
    flat = []
    for before, after in reversed(list(pairs)):
        flat += [before, after]
    return F.pad(x, flat, mode=mode.name) if any(flat) else x


def flatten_layout(x, layout: str):
    """[N, C, *S] → [N, C·prod(S)] in the layout's order (C,H,W for NCHW; H,W,C for NHWC)."""
    if x.dim() > 2 and layout == "NHWC":
        x = x.movedim(1, -1)
    return x.reshape(x.shape[0], -1)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def init_of(a: dict) -> tuple:
    v = a.get("init", Sym("he"))
    if isinstance(v, Sym) and v.name in ("he", "xavier", "zeros", "ones"):
        return (v.name,)
    if isinstance(v, InitFn) and v.name in ("normal", "uniform") and v.arg.value > 0:
        return (v.name, v.arg.value)
    raise Invalid(f"init {v!r}")


def check_bool(a: dict, *names) -> None:
    for n in names:
        if n in a and not isinstance(a[n], bool):
            raise Invalid(f"{n} must be a bool")


class OpSpec:
    name = ""
    args: tuple = ()
    min_inputs = 1
    max_inputs = 1

    def bind(self, args: tuple, kwargs: dict) -> dict:
        names = [n for n, _ in self.args]
        if len(args) > len(names):
            raise Invalid(f"{self.name}: too many arguments")
        bound = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names or k in bound:
                raise Invalid(f"{self.name}: bad keyword {k}")
            bound[k] = v
        for n, d in self.args:
            if n not in bound:
                if d == REQUIRED:
                    raise Invalid(f"{self.name} needs {n}")
                bound[n] = d
        return bound

    def check(self, ins: list, a: dict, it: Interp) -> None:
        pass

    def params(self, ins: list, a: dict, it: Interp) -> list:
        return []

    def buffers(self, ins: list, a: dict, it: Interp) -> list:
        return []

    def out_flags(self, ins: list, a: dict) -> tuple:
        return ins[0].flags

    def forward(self, xs, a, P, B, it, label):
        raise NotImplementedError


def _map(v: V, what: str) -> int:
    if v.rank not in (1, 2, 3):
        raise Invalid(f"{what} needs a 1-D, 2-D or 3-D map")
    return v.rank


def _window_flags(ins, a):
    return (False, *ins[0].flags[1:])


class Conv(OpSpec):
    name = "conv"
    args = (("out", REQUIRED), ("kernel", REQUIRED), ("stride", 1), ("pad", Sym("valid")), ("dilation", 1),
            ("groups", 1), ("bias", True), ("flip", False), ("init", Sym("he")), ("frozen", False),
            ("weight", None), ("algo", Sym("auto")), ("pad_mode", Sym("zeros")))

    def geometry(self, v: V, a: dict) -> dict:
        rank = _map(v, self.name)
        cin = v.channels
        out, groups = self.out_groups(cin, a)
        if not isinstance(out, int) or isinstance(out, bool) or out < 1:
            raise Invalid("out")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or cin % groups or out % groups:
            raise Invalid("groups")
        k = check_ints(a["kernel"], rank, "kernel")
        s = check_ints(a["stride"], rank, "stride")
        r = check_ints(a["dilation"], rank, "dilation")
        check_bool(a, "bias", "flip", "frozen")
        if a["algo"] not in (Sym("auto"), Sym("im2col")):
            raise Invalid("algo")
        pad_pairs(a["pad"], v.shape()[1:], k, s, r)
        check_pad_mode(a["pad_mode"], a["pad"], v, k, s, r)
        w = a["weight"]
        if w is not None:
            if not isinstance(w, ConstVal) or w.shape != (out, cin // groups, *k):
                raise Invalid("const weight shape")
        else:
            init_of(a)
        return {"rank": rank, "in": cin, "out": out, "groups": groups, "k": k, "s": s, "r": r}

    def out_groups(self, cin, a):
        return a["out"], a["groups"]

    def check(self, ins, a, it):
        self.geometry(ins[0], a)

    def params(self, ins, a, it):
        g = self.geometry(ins[0], a)
        w = a["weight"]
        init = ("const", w.values) if w is not None else init_of(a)
        specs = [PSpec("weight", (g["out"], g["in"] // g["groups"], *g["k"]), not a["frozen"], init)]
        if a["bias"]:
            specs.append(PSpec("bias", (g["out"],), not a["frozen"], ("zeros",)))
        return specs

    def out_flags(self, ins, a):
        return _window_flags(ins, a)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        rank = x.dim() - 2
        cin = x.shape[1]
        out, groups = self.out_groups(cin, a)
        k, s, r = axes(a["kernel"], rank), axes(a["stride"], rank), axes(a["dilation"], rank)
        pads = pad_pairs(a["pad"], tuple(x.shape[2:]), k, s, r)
        w = P["weight"]
        if a["flip"]:
            w = w.flip(list(range(2, 2 + rank)))
        return _CONV[rank](mode_pad(x, pads, a["pad_mode"]), w, P.get("bias"), stride=s, dilation=r, groups=groups)


class Depthwise(Conv):
    name = "depthwise"
    args = (("kernel", REQUIRED), ("multiplier", 1), ("stride", 1), ("pad", Sym("valid")), ("dilation", 1),
            ("bias", True), ("flip", False), ("init", Sym("he")), ("frozen", False), ("weight", None),
            ("algo", Sym("auto")), ("pad_mode", Sym("zeros")))

    def out_groups(self, cin, a):
        m = a["multiplier"]
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise Invalid("multiplier")
        return cin * m, cin


class Separable(OpSpec):
    name = "separable"
    args = (("out", REQUIRED), ("kernel", REQUIRED), ("stride", 1), ("pad", Sym("valid")), ("dilation", 1),
            ("bias", True), ("init", Sym("he")), ("frozen", False), ("pad_mode", Sym("zeros")))

    def check(self, ins, a, it):
        rank = _map(ins[0], self.name)
        if not isinstance(a["out"], int) or isinstance(a["out"], bool) or a["out"] < 1:
            raise Invalid("out")
        k, s, r = (check_ints(a[n], rank, n) for n in ("kernel", "stride", "dilation"))
        pad_pairs(a["pad"], ins[0].shape()[1:], k, s, r)
        check_pad_mode(a["pad_mode"], a["pad"], ins[0], k, s, r)
        check_bool(a, "bias", "frozen")
        init_of(a)

    def params(self, ins, a, it):
        v = ins[0]
        c, rank = v.channels, v.rank
        k = axes(a["kernel"], rank)
        t = not a["frozen"]
        specs = [PSpec("dw.weight", (c, 1, *k), t, init_of(a)), PSpec("pw.weight", (a["out"], c, *(1,) * rank), t,
                                                                       init_of(a))]
        if a["bias"]:
            specs.append(PSpec("pw.bias", (a["out"],), t, ("zeros",)))
        return specs

    def out_flags(self, ins, a):
        return _window_flags(ins, a)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        rank = x.dim() - 2
        k, s, r = axes(a["kernel"], rank), axes(a["stride"], rank), axes(a["dilation"], rank)
        pads = pad_pairs(a["pad"], tuple(x.shape[2:]), k, s, r)
        y = _CONV[rank](mode_pad(x, pads, a["pad_mode"]), P["dw.weight"], None, stride=s, dilation=r,
                        groups=x.shape[1])
        return _CONV[rank](y, P["pw.weight"], P.get("pw.bias"))


class Unshared(OpSpec):
    """local and tiled (§3.1, §3.2): Z[o, j, k] = Σ X[c, j·s+m, k·s+n] · W[o, j mod T, k mod T, c, m, n]."""

    def geometry(self, v: V, a: dict, size_index: int = 0) -> dict:
        rank = v.rank
        if rank not in (1, 2):
            raise Invalid(f"{self.name} on rank {rank}")
        if not isinstance(a["out"], int) or isinstance(a["out"], bool) or a["out"] < 1:
            raise Invalid("out")
        k = check_ints(a["kernel"], rank, "kernel")
        s = check_ints(a["stride"], rank, "stride")
        check_bool(a, "bias", "frozen")
        init_of(a)
        outs_all = []
        for shape in v.shapes():
            pads = pad_pairs(a["pad"], shape[1:], k, s, (1,) * rank)
            outs = tuple((n + b + e - kk) // ss + 1 for n, (b, e), kk, ss in zip(shape[1:], pads, k, s))
            if any(o < 1 for o in outs):
                raise Invalid("empty output")
            outs_all.append(outs)
        return {"rank": rank, "k": k, "s": s, "outs": outs_all, "tile": self.tile(a, outs_all, rank)}

    def params(self, ins, a, it):
        g = self.geometry(ins[0], a)
        t = not a["frozen"]
        specs = [PSpec("weight", (a["out"], *g["tile"], ins[0].channels, *g["k"]), t, init_of(a))]
        if a["bias"]:
            specs.append(PSpec("bias", (a["out"], *g["tile"]), t, ("zeros",)))
        return specs

    def check(self, ins, a, it):
        self.geometry(ins[0], a)

    def out_flags(self, ins, a):
        return _window_flags(ins, a)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        rank = x.dim() - 2
        k, s = axes(a["kernel"], rank), axes(a["stride"], rank)
        pads = pad_pairs(a["pad"], tuple(x.shape[2:]), k, s, (1,) * rank)
        w, b = P["weight"], P.get("bias")
        tile = tuple(w.shape[1:1 + rank])
        if rank == 1:
            x, k, s, pads, tile = x.unsqueeze(2), (1, *k), (1, *s), [(0, 0), *pads], (1, *tile)
            w = w.unsqueeze(1)
            b = b.unsqueeze(1) if b is not None else None
        xp = torch_pad(x, pads)
        n, out = x.shape[0], w.shape[0]
        oh = (xp.shape[2] - k[0]) // s[0] + 1
        ow = (xp.shape[3] - k[1]) // s[1] + 1
        cols = F.unfold(xp, k, stride=s)                                     # [N, C·kh·kw, oh·ow]
        rows, colsi = torch.arange(oh) % tile[0], torch.arange(ow) % tile[1]
        w = w[:, rows][:, :, colsi]                                          # [out, oh, ow, C, kh, kw]
        # A broadcast product and a sum, not torch.einsum: einsum's gradient came out wrong at batch 1
        # for this contraction (torch 2.13, float64; its own finite differences disagreed with it).
        terms = cols.transpose(1, 2).unsqueeze(1) * w.reshape(out, oh * ow, -1).unsqueeze(0)   # [N, out, L, C·kh·kw]
        y = terms.sum(-1).reshape(n, out, oh, ow)
        if b is not None:
            y = y + b[:, rows][:, :, colsi]
        return y.squeeze(2) if rank == 1 else y


class Local(Unshared):
    name = "local"
    args = (("out", REQUIRED), ("kernel", REQUIRED), ("stride", 1), ("pad", Sym("valid")), ("bias", True),
            ("init", Sym("he")), ("frozen", False))

    def check(self, ins, a, it):
        if not ins[0].static:
            raise Invalid("local needs a fixed size")
        super().check(ins, a, it)

    def tile(self, a, outs_all, rank):
        return outs_all[0]


class Tiled(Unshared):
    name = "tiled"
    args = (("out", REQUIRED), ("kernel", REQUIRED), ("tile", REQUIRED), ("stride", 1), ("pad", Sym("valid")),
            ("bias", True), ("init", Sym("he")), ("frozen", False))

    def tile(self, a, outs_all, rank):
        t = check_ints(a["tile"], rank, "tile")
        for outs in outs_all:
            if any(tt > o for tt, o in zip(t, outs)):
                raise Invalid("tile larger than the output")
        return t


class Deconv(OpSpec):
    name = "deconv"
    args = (("out", REQUIRED), ("kernel", REQUIRED), ("stride", 1), ("pad", 0), ("output_pad", 0), ("groups", 1),
            ("dilation", 1), ("bias", True), ("init", Sym("he")), ("frozen", False))

    def check(self, ins, a, it):
        v = ins[0]
        rank = _map(v, self.name)
        out, g = a["out"], a["groups"]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (out, g)):
            raise Invalid("out/groups")
        if v.channels % g or out % g:
            raise Invalid("groups")
        k = check_ints(a["kernel"], rank, "kernel")
        s = check_ints(a["stride"], rank, "stride")
        r = check_ints(a["dilation"], rank, "dilation")
        check_ints(a["pad"], rank, "pad", minimum=0)
        op = check_ints(a["output_pad"], rank, "output_pad", minimum=0)
        if any(o >= max(ss, rr) for o, ss, rr in zip(op, s, r)):
            raise Invalid("output_pad")
        check_bool(a, "bias", "frozen")
        init_of(a)

    def params(self, ins, a, it):
        v = ins[0]
        k = axes(a["kernel"], v.rank)
        t = not a["frozen"]
        specs = [PSpec("weight", (v.channels, a["out"] // a["groups"], *k), t, init_of(a))]
        if a["bias"]:
            specs.append(PSpec("bias", (a["out"],), t, ("zeros",)))
        return specs

    def out_flags(self, ins, a):
        return _window_flags(ins, a)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        rank = x.dim() - 2
        return _DECONV[rank](x, P["weight"], P.get("bias"), stride=axes(a["stride"], rank),
                             padding=axes(a["pad"], rank), output_padding=axes(a["output_pad"], rank),
                             groups=a["groups"], dilation=axes(a["dilation"], rank))


class Pool(OpSpec):
    args = (("window", REQUIRED), ("stride", None), ("pad", Sym("valid")))

    def geometry(self, shape, a, rank):
        k = check_ints(a["window"], rank, "window")
        s = k if a["stride"] is None else check_ints(a["stride"], rank, "stride")
        pads = pad_pairs(a["pad"], shape[1:], k, s, (1,) * rank)
        if any(b >= kk or e >= kk for (b, e), kk in zip(pads, k)):
            raise Invalid("pool padding must be smaller than the window")
        return k, s, pads

    def check(self, ins, a, it):
        rank = _map(ins[0], self.name)
        for shape in ins[0].shapes():
            self.geometry(shape, a, rank)

    def out_flags(self, ins, a):
        return _window_flags(ins, a)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        rank = x.dim() - 2
        k, s, pads = self.geometry(tuple(x.shape[1:]), a, rank)
        return self.pool(x, k, s, pads, rank)


class MaxPool(Pool):
    name = "maxpool"

    def pool(self, x, k, s, pads, rank):
        # A padded cell never wins the max.
        return _MAXPOOL[rank](torch_pad(x, pads, float("-inf")), k, s)


class AvgPool(Pool):
    name = "avgpool"

    def pool(self, x, k, s, pads, rank):
        # Padding is not counted in the average: the sum of the real cells over their count.
        cells = math.prod(k)
        total = _AVGPOOL[rank](torch_pad(x, pads), k, s) * cells
        count = _AVGPOOL[rank](torch_pad(torch.ones_like(x[:1, :1]), pads), k, s) * cells
        return total / count


class L2Pool(Pool):
    name = "l2pool"

    def pool(self, x, k, s, pads, rank):
        return torch.sqrt(_AVGPOOL[rank](torch_pad(x * x, pads), k, s) * math.prod(k))


class GlobalPool(OpSpec):
    def check(self, ins, a, it):
        _map(ins[0], self.name)

    def out_flags(self, ins, a):
        return (False,) * len(ins[0].flags)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        dims = tuple(range(2, x.dim()))
        return x.mean(dim=dims, keepdim=True) if self.name == "globalavgpool" else x.amax(dim=dims, keepdim=True)


class GlobalAvgPool(GlobalPool):
    name = "globalavgpool"


class GlobalMaxPool(GlobalPool):
    name = "globalmaxpool"


class Maxout(OpSpec):
    name = "maxout"
    args = (("k", REQUIRED),)

    def check(self, ins, a, it):
        k = a["k"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or ins[0].channels % k:
            raise Invalid("maxout k")

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        n, c = x.shape[:2]
        return x.reshape(n, c // a["k"], a["k"], *x.shape[2:]).amax(dim=2)


class Shuffle(OpSpec):
    name = "shuffle"
    args = (("groups", REQUIRED),)

    def check(self, ins, a, it):
        g = a["groups"]
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or ins[0].channels % g:
            raise Invalid("shuffle groups")

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        n, c = x.shape[:2]
        g = a["groups"]
        return x.reshape(n, g, c // g, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class Upsample(OpSpec):
    name = "upsample"
    args = (("factor", REQUIRED), ("mode", Sym("nearest")))
    LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}

    def check(self, ins, a, it):
        rank = _map(ins[0], self.name)
        check_ints(a["factor"], rank, "factor")
        if a["mode"] not in (Sym("nearest"), Sym(self.LINEAR[rank])):
            raise Invalid("upsample mode")

    def out_flags(self, ins, a):
        return _window_flags(ins, a)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        rank = x.dim() - 2
        f = axes(a["factor"], rank)
        if a["mode"] == Sym("nearest"):
            for axis, ff in enumerate(f):
                x = x.repeat_interleave(ff, dim=2 + axis)
            return x
        size = tuple(n * ff for n, ff in zip(x.shape[2:], f))
        return F.interpolate(x, size=size, mode=a["mode"].name, align_corners=False)


class Flatten(OpSpec):
    name = "flatten"

    def check(self, ins, a, it):
        if not ins[0].static:
            raise Invalid("flatten of a run-time size")

    def out_flags(self, ins, a):
        return (False,)

    def forward(self, xs, a, P, B, it, label):
        return flatten_layout(xs[0], it.layout)


class Dense(OpSpec):
    name = "dense"
    args = (("out", REQUIRED), ("bias", True), ("init", Sym("he")), ("frozen", False))

    def check(self, ins, a, it):
        if not ins[0].static:
            raise Invalid("dense of a run-time size")
        if not isinstance(a["out"], int) or isinstance(a["out"], bool) or a["out"] < 1:
            raise Invalid("out")
        check_bool(a, "bias", "frozen")
        init_of(a)

    def params(self, ins, a, it):
        t = not a["frozen"]
        specs = [PSpec("weight", (a["out"], math.prod(ins[0].shape())), t, init_of(a))]
        if a["bias"]:
            specs.append(PSpec("bias", (a["out"],), t, ("zeros",)))
        return specs

    def out_flags(self, ins, a):
        return (False,)

    def forward(self, xs, a, P, B, it, label):
        return F.linear(flatten_layout(xs[0], it.layout), P["weight"], P.get("bias"))


class Pointwise(OpSpec):
    FN = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}

    def forward(self, xs, a, P, B, it, label):
        return self.FN[self.name](xs[0])


class Relu(Pointwise):
    name = "relu"


class Sigmoid(Pointwise):
    name = "sigmoid"


class Tanh(Pointwise):
    name = "tanh"


class LeakyRelu(OpSpec):
    name = "leaky_relu"
    args = (("alpha", 0.01),)

    def check(self, ins, a, it):
        if isinstance(a["alpha"], bool) or not isinstance(a["alpha"], (int, float)) or a["alpha"] < 0:
            raise Invalid("alpha")

    def forward(self, xs, a, P, B, it, label):
        return F.leaky_relu(xs[0], float(a["alpha"]))


class Softmax(OpSpec):
    name = "softmax"

    def forward(self, xs, a, P, B, it, label):
        return F.softmax(xs[0], dim=1)


class Add(OpSpec):
    name = "add"
    min_inputs, max_inputs = 2, None

    def check(self, ins, a, it):
        for v in ins[1:]:
            if v.shapes() != ins[0].shapes() or v.flags != ins[0].flags:
                raise Invalid("add shapes")

    def forward(self, xs, a, P, B, it, label):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y


class Concat(OpSpec):
    name = "concat"
    min_inputs, max_inputs = 2, None

    def check(self, ins, a, it):
        first = ins[0]
        for v in ins[1:]:
            if [s[1:] for s in v.shapes()] != [s[1:] for s in first.shapes()] or v.flags[1:] != first.flags[1:]:
                raise Invalid("concat shapes")

    def forward(self, xs, a, P, B, it, label):
        return torch.cat(xs, dim=1)


class Scale(OpSpec):
    name = "scale"
    min_inputs, max_inputs = 2, 2

    def check(self, ins, a, it):
        x, s = ins
        if s.shape()[0] != x.channels or any(d != 1 for d in s.shape()[1:]) or any(s.flags):
            raise Invalid("scale shape")

    def forward(self, xs, a, P, B, it, label):
        x, s = xs
        return x * s.reshape(s.shape[0], s.shape[1], *(1,) * (x.dim() - 2))


class BatchNorm(OpSpec):
    name = "batchnorm"
    args = (("eps", 1e-5), ("momentum", 0.1))

    def check(self, ins, a, it):
        eps, m = a["eps"], a["momentum"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise Invalid("eps")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1:
            raise Invalid("momentum")
        if it.abstract and it.training and it.program.dtype == "f32" and \
                min(math.prod(s[1:]) for s in ins[0].shapes()) < 4:
            # Not a rule of the language: with 2 or 3 values per channel the gradient through the
            # batch statistics cancels almost entirely, and f32 rounding (PyTorch's as much as
            # ours) exceeds the tolerance. Such layers are tested in f64 networks and in eval mode.
            raise Invalid("campaign: a training-mode f32 batchnorm needs 4 positions or more")

    def params(self, ins, a, it):
        c = ins[0].channels
        return [PSpec("weight", (c,), True, ("ones",)), PSpec("bias", (c,), True, ("zeros",))]

    def buffers(self, ins, a, it):
        c = ins[0].channels
        return [("running_mean", (c,), 0.0), ("running_var", (c,), 1.0)]

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        if it.training and x.numel() // x.shape[1] <= 1:
            raise ValueError("batchnorm: one value per channel in training mode")
        if it.abstract:
            return F.batch_norm(x, B["running_mean"].clone(), B["running_var"].clone(), P["weight"], P["bias"],
                                training=it.training, momentum=float(a["momentum"]), eps=float(a["eps"]))
        # The running statistics move in place, as PyTorch's BatchNorm does (docs §4).
        return F.batch_norm(x, B["running_mean"], B["running_var"], P["weight"], P["bias"], training=it.training,
                            momentum=float(a["momentum"]), eps=float(a["eps"]))


class Dropout(OpSpec):
    name = "dropout"
    args = (("p", REQUIRED),)

    def check(self, ins, a, it):
        p = a["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise Invalid("dropout p")

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        if not it.training or it.abstract:
            return x
        key = it.dropout.next_key()
        p = float(a["p"])
        keep = dropout_keep(key, x.numel(), p).reshape(tuple(x.shape))
        return x * torch.tensor(keep / (1.0 - p), dtype=x.dtype)


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Invalid(f"{what} must be a number")
    return float(v)


class Relu6(OpSpec):
    name = "relu6"

    def forward(self, xs, a, P, B, it, label):
        return F.relu6(xs[0])


class Clip(OpSpec):
    name = "clip"
    args = (("min", REQUIRED), ("max", REQUIRED))

    def check(self, ins, a, it):
        if not _number(a["min"], "min") < _number(a["max"], "max"):
            raise Invalid("clip needs min < max")

    def forward(self, xs, a, P, B, it, label):
        return F.hardtanh(xs[0], float(a["min"]), float(a["max"]))


class HardSigmoid(OpSpec):
    name = "hardsigmoid"

    def forward(self, xs, a, P, B, it, label):
        # relu6(x + 3)/6 rather than F.hardsigmoid: PyTorch's hardsigmoid backward multiplies by
        # 1/6 rounded to float32 even in a float64 tensor, 3e-8 off, beyond the f64 tolerance.
        return F.relu6(xs[0] + 3) / 6


class HardSwish(OpSpec):
    name = "hardswish"

    def forward(self, xs, a, P, B, it, label):
        return F.hardswish(xs[0])


class Silu(OpSpec):
    name = "silu"

    def forward(self, xs, a, P, B, it, label):
        return F.silu(xs[0])


class Gelu(OpSpec):
    name = "gelu"

    def forward(self, xs, a, P, B, it, label):
        return F.gelu(xs[0])                 # exact, with erf


class Elu(OpSpec):
    name = "elu"
    args = (("alpha", 1.0),)

    def check(self, ins, a, it):
        if _number(a["alpha"], "alpha") < 0:
            raise Invalid("elu alpha")

    def forward(self, xs, a, P, B, it, label):
        return F.elu(xs[0], float(a["alpha"]))


class Prelu(OpSpec):
    name = "prelu"
    args = (("init", 0.25), ("shared", False))

    def check(self, ins, a, it):
        _number(a["init"], "init")
        check_bool(a, "shared")

    def params(self, ins, a, it):
        n = 1 if a["shared"] else ins[0].channels
        return [PSpec("weight", (n,), True, ("const", (float(a["init"]),) * n))]

    def forward(self, xs, a, P, B, it, label):
        return F.prelu(xs[0], P["weight"])


def _eps(a) -> float:
    eps = _number(a["eps"], "eps")
    if eps <= 0:
        raise Invalid("eps")
    return eps


def _affine(ins) -> list:
    c = ins[0].channels
    return [PSpec("weight", (c,), True, ("ones",)), PSpec("bias", (c,), True, ("zeros",))]


class LayerNorm(OpSpec):
    """Over the channels at each position (docs §4): F.layer_norm with the channels last."""
    name = "layernorm"
    args = (("eps", 1e-5),)

    def check(self, ins, a, it):
        _eps(a)
        if it.abstract and it.program.dtype == "f32" and ins[0].channels < 4:
            # Not a rule of the language: as for batchnorm, with fewer than 4 values the gradient
            # through the statistics cancels almost entirely and f32 rounding exceeds the
            # tolerance. Such layers are tested in f64 networks and in tests/ops.
            raise Invalid("campaign: an f32 layernorm needs 4 channels or more")

    def params(self, ins, a, it):
        return _affine(ins)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],), P["weight"], P["bias"], _eps(a)).movedim(-1, 1)


class GroupNorm(OpSpec):
    name = "groupnorm"
    args = (("groups", REQUIRED), ("eps", 1e-5))

    def group_count(self, v: "V", a: dict) -> int:
        g = a["groups"]
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or v.channels % g:
            raise Invalid("groupnorm groups")
        return g

    def check(self, ins, a, it):
        g = self.group_count(ins[0], a)
        _eps(a)
        if min(ins[0].channels // g * math.prod(s[1:]) for s in ins[0].shapes()) == 1:
            # Not a rule of the language (each value becomes its bias): F.group_norm refuses one
            # value per group at batch 1, as batch_norm does, though no batch statistic is taken.
            raise Invalid("campaign: PyTorch's group_norm refuses one value per group")
        if it.abstract and it.program.dtype == "f32" and \
                min(ins[0].channels // g * math.prod(s[1:]) for s in ins[0].shapes()) < 4:
            # As for batchnorm: with fewer than 4 values per group the gradient through the
            # statistics cancels almost entirely and f32 rounding exceeds the tolerance.
            raise Invalid("campaign: an f32 groupnorm needs 4 values per group or more")

    def params(self, ins, a, it):
        return _affine(ins)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        g = x.shape[1] if self.name == "instancenorm" else a["groups"]
        return F.group_norm(x, g, P["weight"], P["bias"], _eps(a))


class InstanceNorm(GroupNorm):
    """groupnorm with one channel per group; one position per channel is an error (docs §4)."""
    name = "instancenorm"
    args = (("eps", 1e-5),)

    def group_count(self, v: "V", a: dict) -> int:
        if v.rank == 0 or (not any(v.flags[1:]) and math.prod(v.shape()[1:]) == 1):
            raise Invalid("instancenorm of one position per channel")
        if any(math.prod(s[1:]) == 1 for s in v.shapes()):
            raise Invalid("campaign: a run-time size that leaves one position per channel")
        return v.channels


class Binary(OpSpec):
    min_inputs, max_inputs = 2, 2

    def check(self, ins, a, it):
        if ins[1].shapes() != ins[0].shapes() or ins[1].flags != ins[0].flags:
            raise Invalid(f"{self.name} shapes")


class Sub(Binary):
    name = "sub"

    def forward(self, xs, a, P, B, it, label):
        return xs[0] - xs[1]


class Mul(Binary):
    name = "mul"

    def forward(self, xs, a, P, B, it, label):
        return xs[0] * xs[1]


class Pad(OpSpec):
    name = "pad"
    args = (("pad", REQUIRED), ("mode", Sym("zeros")))

    def check(self, ins, a, it):
        rank = _map(ins[0], self.name)
        if isinstance(a["pad"], Sym):
            raise Invalid("pad op takes amounts only")
        ones = (1,) * rank
        pad_pairs(a["pad"], ins[0].shape()[1:], ones, ones, ones)
        check_pad_mode(a["mode"], a["pad"], ins[0], ones, ones, ones)

    def out_flags(self, ins, a):
        return _window_flags(ins, a)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        rank = x.dim() - 2
        ones = (1,) * rank
        return mode_pad(x, pad_pairs(a["pad"], tuple(x.shape[2:]), ones, ones, ones), a["mode"])


class Reshape(OpSpec):
    """docs §4: the values in the layout's order (numpy.reshape of the module's arrays), the shape
    written in that order; one size may be -1."""
    name = "reshape"
    args = (("shape", REQUIRED),)

    def target(self, v: "V", a: dict, layout: str) -> tuple:
        shape = a["shape"] if isinstance(a["shape"], tuple) else (a["shape"],)
        if not 1 <= len(shape) <= 4 or not all(isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1)
                                               for d in shape) or shape.count(-1) > 1:
            raise Invalid("reshape shape")
        if not v.static:
            raise Invalid("reshape of a run-time size")
        count = math.prod(v.shape())
        known = math.prod(d for d in shape if d != -1)
        if -1 in shape:
            if count % known:
                raise Invalid("reshape -1")
            shape = tuple(count // known if d == -1 else d for d in shape)
        elif known != count:
            raise Invalid("reshape count")
        return shape

    def check(self, ins, a, it):
        self.target(ins[0], a, it.layout)

    def out_flags(self, ins, a):
        shape = a["shape"] if isinstance(a["shape"], tuple) else (a["shape"],)
        return (False,) * len(shape)

    def forward(self, xs, a, P, B, it, label):
        (x,) = xs
        shape = self.target(V([x], (False,) * (x.dim() - 1)), a, it.layout)
        nhwc = it.layout == "NHWC"
        if nhwc and x.dim() > 2:
            x = x.movedim(1, -1)                  # the layout's order: channels last
        y = x.reshape(x.shape[0], *shape)
        if nhwc and y.dim() > 2:
            y = y.movedim(-1, 1)                  # written channels last: back to channel-first
        return y


OPS: dict[str, OpSpec] = {cls.name: cls() for cls in (
    Conv, Depthwise, Separable, Local, Tiled, Deconv, MaxPool, AvgPool, L2Pool, GlobalAvgPool, GlobalMaxPool,
    Maxout, Shuffle, Upsample, Flatten, Dense, Relu, Sigmoid, Tanh, LeakyRelu, Softmax, Add, Concat, Scale,
    BatchNorm, Dropout, Relu6, Clip, HardSigmoid, HardSwish, Silu, Gelu, Elu, Prelu, LayerNorm, GroupNorm,
    InstanceNorm, Sub, Mul, Pad, Reshape)}


# ---- losses -------------------------------------------------------------------------------

def loss_target(loss: Loss) -> str:
    """What the loss compares the output with (docs/language.md §7): class labels (one per sample,
    or per position of a map), values shaped like the output, or such values in [0, 1]."""
    if loss.kind == "softmax_cross_entropy" or loss.kind == "dice" and loss.arg("activation", "softmax") == "softmax":
        return "labels"
    if loss.kind in ("sigmoid_cross_entropy", "dice"):
        return "probabilities"
    return "values"


def dice_loss(p, t, eps: float):
    """1 − the mean over classes (dim 1) of (2 Σ p·t + eps) / (Σ p + Σ t + eps), summed over the
    batch and every position."""
    axes = [0, *range(2, p.dim())]
    return 1 - ((2 * (p * t).sum(axes) + eps) / (p.sum(axes) + t.sum(axes) + eps)).mean()


def torch_loss(loss: Loss, y, target):
    """The loss as docs/language.md §7 defines it, from PyTorch: the mean over the batch (and
    positions) of mse, l1, smooth_l1(beta), sigmoid_cross_entropy (binary cross-entropy with
    logits), softmax_cross_entropy (class weights, ignore_index; labels per sample ([N]) for a
    vector or an all-1 map, per position otherwise), and Dice over softmax or sigmoid."""
    kind = loss.kind
    if kind == "mse":
        return ((y - target) ** 2).mean()
    if kind == "l1":
        return (y - target).abs().mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(y, target, beta=loss.arg("beta", 1.0))
    if kind == "sigmoid_cross_entropy":
        return F.binary_cross_entropy_with_logits(y, target)
    if y.dim() > 2 and all(d == 1 for d in y.shape[2:]) and loss_target(loss) == "labels":
        y = y.reshape(y.shape[0], y.shape[1])
    if kind == "dice":
        eps = loss.arg("eps", 1.0)
        if loss.arg("activation", "softmax") == "sigmoid":
            return dice_loss(torch.sigmoid(y), target, eps)
        return dice_loss(torch.softmax(y, dim=1), F.one_hot(target, y.shape[1]).movedim(-1, 1).to(y.dtype), eps)
    weight = loss.arg("weight")
    ignore = loss.arg("ignore_index")
    return F.cross_entropy(y, target, weight=None if weight is None else torch.tensor(weight, dtype=y.dtype),
                           ignore_index=-100 if ignore is None else ignore)
