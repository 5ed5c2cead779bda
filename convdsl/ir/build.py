"""AST → IR: resolves names, unrolls `repeat`, inlines blocks, shares `layer` weights, expands consts.

Shapes are inferred as nodes are made, because a block may ask `channels(x)` of a tensor
built a line earlier. Every failure is a ConvDSLError at the span of the offending text.
"""
from __future__ import annotations

import dataclasses
import keyword
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import limits
from ..errors import ConvDSLError, Note, Span, block_note, did_you_mean, raise_errors
from ..frontend import ast
from ..frontend.parser import bad_byte_position, decode_source, file_end, parse, parse_file
from ..frontend.unparse import expr as expr_text
from ..ops.base import (INIT_CALLS, Arg, ConstTensor, OpContext, Symbol, SymbolCall, alias_names, describe_value,
                        lookup, op_alias, op_relative, registry, symbol_vocabulary)
from ..ops.losses import LOSSES, is_other_loss, loss_alias, loss_relative
from . import dims as D
from .budget import Budget, BudgetExceeded, short_text
from .graph import Graph, InputDecl, Layer, LossDecl, Node, OutputDecl, TensorType, Value

# Bare names that stand for themselves when nothing else is bound to them.
SYMBOL_FUNCS = frozenset(INIT_CALLS)
BUILTINS = ("channels", "height", "width", "depth")
MAX_REPEAT = 1000
MAX_NODES = 100_000
MAX_ERRORS = 20          # errors reported from one network before the builder stops
# First input dims that name the batch: an input's shape is one sample's (the batch is implicit).
BATCH_NAMES = frozenset({"n", "b", "bs", "batch", "batch_size", "batchsize", "nbatch"})
# The default of `first` in the methods below: the call's first argument is not evaluated yet
# (only a chain link's is, by GraphBuilder.eval_chain).
NOT_PIPED = object()


@dataclass(frozen=True)
class TensorRef:
    value: int


@dataclass(frozen=True)
class LayerRef:
    """`layer NAME = OP(args)`: the op and its arguments; parameters appear at first use."""
    name: str
    call: ast.Call
    positional: tuple
    keywords: tuple[tuple[str, Any], ...]
    arg_spans: tuple[tuple[str, Span], ...]
    span: Span


@dataclass(frozen=True)
class Failed:
    """What a name is bound to when the statement that defines it failed: a later use is not
    reported again (it would only repeat the first error in other words)."""
    name: str


class CascadeError(ConvDSLError):
    """A use of a Failed name; the builder drops it, since the failed definition is reported."""


@dataclass
class Scope:
    """The names visible in one network or block instance. Bindings may be shadowed."""
    bindings: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)     # name → input|value|layer|const|param
    prefix: str = ""                                          # label prefix: "inception1."
    path: tuple[str, ...] = ()                                # block instances, outermost first
    counters: dict[str, int] = field(default_factory=dict)
    returned: Any = None

    def lookup(self, name: str):
        return self.bindings.get(name)


@dataclass(frozen=True)
class Program:
    """A parsed file with the blocks it can see (its own and those it `use`s)."""
    module: ast.Module
    blocks: dict[str, ast.Block]
    networks: tuple[ast.Network, ...]


def load_program(module: ast.Module, _stack: tuple[str, ...] = (), _loaded: dict | None = None) -> Program:
    """The file's blocks and networks, with the blocks of the files it `use`s.

    Each used file is read and parsed once per program, however many files use it: files that
    each use the next one twice are not re-parsed along every path (2**n times)."""
    loaded: dict[str, Program] = {} if _loaded is None else _loaded
    blocks: dict[str, ast.Block] = {}
    networks: list[ast.Network] = []
    names: dict[str, Span] = {}
    base = Path(module.path).parent if not module.path.startswith("<") else Path.cwd()
    here = (*_stack, str(Path(module.path).resolve()))
    for item in module.items:
        if isinstance(item, ast.Use):
            target = (base / item.path).resolve()
            if str(target) in here:
                raise ConvDSLError(item.span, f"`use \"{item.path}\"` makes a cycle of files")
            used = loaded.get(str(target))
            if used is None:
                if len(here) > limits.MAX_USE_DEPTH:
                    raise ConvDSLError(item.span, f"`use` nests more than {limits.MAX_USE_DEPTH} files deep")
                if len(loaded) >= limits.MAX_FILES:
                    raise ConvDSLError(item.span, f"the program brings in more than {limits.MAX_FILES} files "
                                                  "with `use`")
                used = load_program(_parse_used(item, base / item.path, target), here, loaded)
                loaded[str(target)] = used
            for bname, block in used.blocks.items():
                blocks.setdefault(bname, block)
            continue
        if item.name in names:
            raise ConvDSLError(item.span, f"`{item.name}` is defined twice in this file "
                                          f"(first at line {names[item.name].line})")
        names[item.name] = item.span
        if isinstance(item, ast.Block):
            if lookup(item.name) is not None:
                raise ConvDSLError(item.span, f"block `{item.name}` has the name of a built-in op")
            blocks[item.name] = item
        else:
            networks.append(item)
    return Program(module, blocks, tuple(networks))


def _parse_used(item: ast.Use, shown: Path, target: Path) -> ast.Module:
    """The file a `use` names, parsed; what stops it from being read is said at the `use`."""
    if target.is_dir():
        raise ConvDSLError(item.span, f"`{item.path}` is a folder ({shown}), not a .cnn file")
    if not target.is_file():
        raise ConvDSLError(item.span, f"cannot find `{item.path}` (looked for {shown})")
    try:
        data = target.read_bytes()
    except OSError as e:
        raise ConvDSLError(item.span, f"cannot read `{item.path}`: {e.strerror}") from None
    try:
        text = decode_source(data)
    except UnicodeDecodeError as e:
        line, col = bad_byte_position(data, e.start)
        raise ConvDSLError(item.span, f"`{item.path}` is not UTF-8 text: byte {e.start} (0x{data[e.start]:02X}, "
                                      f"line {line}, column {col}) is not valid UTF-8") from None
    return parse(text, str(target))


def load_source(text: str, path: str = "<string>") -> Program:
    return load_program(parse(text, path))


class GraphBuilder:
    """Builds one network's Graph. Internal lists grow as statements run; the result is frozen."""

    def __init__(self, program: Program, network: ast.Network):
        self.program = program
        self.network = network
        self.layout = "NCHW"
        self.dtype = "f32"
        self.values: list[Value] = []
        self.nodes: list[Node] = []
        self.layers: dict[str, Layer] = {}
        self.layer_slots: list[str] = []          # declaration order of parameter owners
        self.slot_members: dict[str, list[str]] = {}
        self.inputs: list[InputDecl] = []
        self.outputs: list[OutputDecl] = []
        self.loss: tuple | None = None
        self.sym_dims: list[str] = []
        self.block_stack: list[str] = []
        self.block_calls: list[Span] = []         # where each block of block_stack was called
        self.composite: tuple[str, str, Span] | None = None   # (label, slot, span) of the op being expanded
        self.budget = Budget(self.layout)
        self.eval_depth = 0

    # ---- entry -------------------------------------------------------------------------
    def build(self) -> Graph:
        net = self.network
        if keyword.iskeyword(net.name.lower()) or keyword.issoftkeyword(net.name.lower()):
            raise ConvDSLError(net.span, f"network `{net.name}` would be a Python module named "
                                         f"`{net.name.lower()}`, which is a Python keyword; pick another name")
        seen: dict[str, Span] = {}
        for stmt in net.body:
            if isinstance(stmt, (ast.Layout, ast.DType)):
                key = type(stmt).__name__.lower()
                if key in seen:
                    raise ConvDSLError(stmt.span, f"{key} is set twice (first at line {seen[key].line})")
                seen[key] = stmt.span
                if isinstance(stmt, ast.Layout):
                    self.layout = stmt.value
                else:
                    self.dtype = stmt.value
        self.budget = Budget(self.layout)       # anew, now that the layout its messages use is known
        scope = Scope()
        self.run_network_body(net.body, scope)
        if not self.outputs:
            raise ConvDSLError(net.span, f"network {net.name} has no `output` statement")
        loss_decl = None
        if self.loss is not None:
            kind, vid, attrs, span = self.loss
            index = next((i for i, o in enumerate(self.outputs) if o.value == vid), None)
            if index is None:
                raise ConvDSLError(span, "the loss must read one of the network's outputs; add it to `output`")
            loss_decl = LossDecl(kind, vid, index, attrs, span)
            vt = self.values[vid].type
            fewest = LOSSES[kind].min_classes(attrs)
            if isinstance(vt.shape[0], int) and vt.shape[0] < fewest:
                raise ConvDSLError(span, f"{kind} needs at least {fewest} classes (channels); "
                                         f"the output is {vt.text(self.layout)}")
        layers = []
        for slot in self.layer_slots:
            for name in self.slot_members.get(slot, ()):
                layers.append(self.layers[name])
        return Graph(name=net.name, source_path=self.program.module.path, span=net.span, layout=self.layout,
                     dtype=self.dtype, inputs=tuple(self.inputs), outputs=tuple(self.outputs),
                     nodes=tuple(self.nodes), values=tuple(self.values), layers=tuple(layers),
                     loss=loss_decl, sym_dims=tuple(self.sym_dims))

    # ---- statements --------------------------------------------------------------------
    def run_body(self, body, scope: Scope, in_block: bool) -> None:
        for stmt in body:
            self.budget.statement(stmt.span)
            self.run_stmt(stmt, scope, in_block)

    def run_network_body(self, body, scope: Scope) -> None:
        """The network's statements, each on its own: a statement that fails is reported and the
        next one runs, so one check shows several independent mistakes (up to MAX_ERRORS), in
        source order. What a failed statement would have bound is marked Failed, and the errors
        of later statements that only use such a name are dropped: they would cascade."""
        errors: list[ConvDSLError] = []
        for i, stmt in enumerate(body):
            try:
                self.run_stmt(stmt, scope, in_block=False)
            except CascadeError:
                self.mark_failed(stmt, scope)
            except BudgetExceeded as e:          # every later statement would cross it too
                raise_errors([*errors, e])
            except ConvDSLError as e:
                self.mark_failed(stmt, scope)
                if not any((f.span, f.message) == (e.span, e.message) for f in errors):
                    errors.append(e)
                if len(errors) == MAX_ERRORS and i + 1 < len(body):
                    raise_errors(errors, stopped_after=MAX_ERRORS)
        raise_errors(errors)

    def mark_failed(self, stmt, scope: Scope) -> None:
        """Bind every name the failed statement defines (a repeat body's too) to Failed."""
        if isinstance(stmt, ast.Repeat):
            for inner in stmt.body:
                self.mark_failed(inner, scope)
        elif isinstance(stmt, (ast.Assign, ast.LayerDecl, ast.ConstDecl, ast.Input)):
            scope.bindings[stmt.name] = Failed(stmt.name)
            scope.kinds.setdefault(stmt.name, "value")

    def bind(self, scope: Scope, name: str, value, kind: str, span: Span) -> None:
        old = scope.kinds.get(name)
        if old in ("layer", "const") or (old is not None and kind in ("layer", "const")):
            raise ConvDSLError(span, f"`{name}` is already bound as a {old}; binding it again here would be "
                                     f"ambiguous — pick another name")
        if old == "input" and kind == "input":
            raise ConvDSLError(span, f"input `{name}` is declared twice")
        if kind != "param" and (name in self.program.blocks or lookup(name) is not None):
            what = "block" if name in self.program.blocks else "built-in op"
            if kind in ("layer", "const", "input"):
                raise ConvDSLError(span, f"`{name}` is the name of a {what}; pick another name")
        scope.bindings[name] = value
        scope.kinds[name] = kind

    def run_stmt(self, stmt, scope: Scope, in_block: bool) -> None:
        if isinstance(stmt, (ast.Layout, ast.DType)):
            if in_block:
                raise ConvDSLError(stmt.span, f"`{type(stmt).__name__.lower()}` belongs in a network, not a block")
            return
        if isinstance(stmt, ast.Input):
            if in_block:
                raise ConvDSLError(stmt.span, "`input` belongs in a network; a block's input is its first parameter")
            self.declare_input(stmt, scope)
        elif isinstance(stmt, ast.Assign):
            value = self.eval(stmt.value, scope)
            if isinstance(value, (LayerRef,)):
                raise ConvDSLError(stmt.span, "to name a layer, write `layer NAME = …`")
            self.bind(scope, stmt.name, value, "value", stmt.span)
            if isinstance(value, TensorRef) and not self.values[value.value].name:
                self.values[value.value] = dataclasses.replace(self.values[value.value], name=stmt.name)
        elif isinstance(stmt, ast.LayerDecl):
            self.bind(scope, stmt.name, self.declare_layer(stmt, scope), "layer", stmt.span)
        elif isinstance(stmt, ast.ConstDecl):
            self.bind(scope, stmt.name, self.make_const(stmt), "const", stmt.span)
        elif isinstance(stmt, ast.Repeat):
            count = self.eval(stmt.count, scope)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConvDSLError(stmt.count.span, f"repeat needs a positive integer count, "
                                                    f"got {describe_value(count)}")
            if count > limits.MAX_REPEAT:
                raise ConvDSLError(stmt.count.span, f"repeat {count} is more than the limit of {limits.MAX_REPEAT}")
            for _ in range(count):
                self.budget.statement(stmt.span)      # a round counts even when its body makes nothing
                self.run_body(stmt.body, scope, in_block)
        elif isinstance(stmt, ast.Output):
            if in_block:
                raise ConvDSLError(stmt.span, "`output` belongs in a network; a block ends with `return`")
            for name in stmt.names:
                ref = self.eval(name, scope)
                if not isinstance(ref, TensorRef):
                    raise ConvDSLError(name.span, f"output `{name.id}` is not a tensor")
                if any(o.name == name.id for o in self.outputs):
                    raise ConvDSLError(name.span, f"`{name.id}` is already an output")
                self.outputs.append(OutputDecl(name.id, ref.value, name.span))
        elif isinstance(stmt, ast.Loss):
            self.declare_loss(stmt, scope, in_block)
        elif isinstance(stmt, ast.Return):
            if not in_block:
                raise ConvDSLError(stmt.span, "`return` belongs in a block; a network names its `output`")
            value = self.eval(stmt.value, scope)
            if not isinstance(value, TensorRef):
                raise ConvDSLError(stmt.value.span, "a block must return a tensor")
            scope.returned = value
        else:  # pragma: no cover - the parser makes no other statement
            raise ConvDSLError(getattr(stmt, "span", None), f"unknown statement {type(stmt).__name__}")

    def declare_input(self, stmt: ast.Input, scope: Scope) -> None:
        self.check_no_batch_dim(stmt)
        written: list = []
        for d in stmt.dims:
            if isinstance(d, ast.Num) and isinstance(d.value, int) and d.value >= 1:
                written.append(d.value)
            elif isinstance(d, ast.Name):
                if d.id not in self.sym_dims:
                    self.sym_dims.append(d.id)
                written.append(D.Sym.var(d.id))
            else:
                raise ConvDSLError(d.span, "an input dim is a positive integer or a name (a run-time size)")
        if not written:
            raise ConvDSLError(stmt.span, "an input needs at least one dim")
        if len(written) > 4:
            raise ConvDSLError(stmt.span, f"inputs have at most 4 dims (C, D, H, W); `{stmt.name}` has {len(written)}")
        shape = tuple(written)
        if self.layout == "NHWC" and len(shape) > 1:
            shape = (shape[-1], *shape[:-1])     # channel-first inside
        self.budget.tensor(TensorType(shape), stmt.span, f"input `{stmt.name}`")
        vid = self.new_value(TensorType(shape), None, stmt.name)
        self.inputs.append(InputDecl(stmt.name, vid, tuple(written), stmt.span))
        self.bind(scope, stmt.name, TensorRef(vid), "input", stmt.span)

    def check_no_batch_dim(self, stmt: ast.Input) -> None:
        """`input x: [N, 3, 32, 32]`: a first dim named like a batch (N, B, batch …) is the classic
        slip of writing the batch, which is implicit. As a run-time channel count (NCHW) or, in NHWC,
        a run-time size of a 1-D map ([L, C]), such a name would be odd but legal, so an NHWC input
        needs 3 dims or more before this is said."""
        first = stmt.dims[0] if stmt.dims else None
        if not isinstance(first, ast.Name) or first.id.lower() not in BATCH_NAMES:
            return
        if len(stmt.dims) < (2 if self.layout == "NCHW" else 3):
            return
        raise ConvDSLError(first.span, f"`{first.id}` looks like the batch size, but the batch is implicit: an "
                                       f"input's shape is one sample's; write `input {stmt.name}: "
                                       f"{self.dims_text(stmt.dims[1:])}`")

    @staticmethod
    def dims_text(dims) -> str:
        return "[" + ", ".join(expr_text(d) for d in dims) + "]"

    def leading_name_note(self, in_types) -> Note | None:
        """For an op that failed on a map whose channel count is a run-time size: if that size is
        an input's first dim, written as a name before fixed dims ([X, 3, 32, 32]), it may be a
        batch written by mistake. Said as a note at the input, since it may also be meant."""
        if self.layout != "NCHW":
            return None
        for decl in self.inputs:
            dims = decl.dims
            if len(dims) >= 2 and isinstance(dims[0], D.Sym) and isinstance(dims[1], int) and \
                    any(t.rank >= 1 and t.channels == dims[0] for t in in_types):
                name = D.to_text(dims[0])
                rest = "[" + ", ".join(D.to_text(d) for d in dims[1:]) + "]"
                return Note(f"input `{decl.name}` at {decl.span} has the run-time size `{name}` as its first "
                            f"dim, the channels; if `{name}` is the batch, leave it out (the batch is implicit): "
                            f"`input {decl.name}: {rest}`", decl.span)
        return None

    def declare_layer(self, stmt: ast.LayerDecl, scope: Scope) -> LayerRef:
        call = stmt.value
        if isinstance(call, ast.Name) and lookup(call.id) is not None:
            call = ast.Call(call.id, (), (), call.span)      # `layer P = globalavgpool`: an op without arguments
        if not isinstance(call, ast.Call):
            raise ConvDSLError(stmt.span, "`layer NAME = …` takes one op, such as conv(32, kernel=3)")
        if call.piped:
            raise ConvDSLError(call.span, "a layer declaration takes the op alone; apply it later with `x -> "
                                          f"{stmt.name}`")
        op = lookup(call.func)
        if op is None:
            if call.func in self.program.blocks:
                raise ConvDSLError(call.span, "`layer` takes a single op, not a block")
            raise self.unknown_callable(call.func, call.span, scope)
        positional = tuple(self.eval_arg(a, scope, op.args[i] if i < len(op.args) else None)
                           for i, a in enumerate(call.args))
        if any(isinstance(v, TensorRef) for v in positional):
            raise ConvDSLError(call.span, "a layer declaration takes the op alone, without its input")
        keywords = tuple((k.name, self.eval_arg(k.value, scope, op_arg(op, k.name))) for k in call.kwargs)
        spans = tuple((k.name, k.value.span) for k in call.kwargs)
        spans += tuple((a.name, e.span) for a, e in zip(op.args, call.args))
        self.reserve_slot(stmt.name)
        return LayerRef(stmt.name, call, positional, keywords, spans, stmt.span)

    def make_const(self, stmt: ast.ConstDecl) -> ConstTensor:
        largest = limits.FLOAT_MAX[self.dtype]

        def representable(nums) -> None:
            # Each value becomes a literal of the network's element type: 1e300 would be inf in f32.
            for n in nums:
                if abs(n.value) > largest:
                    raise ConvDSLError(n.span, f"{n.value:g} does not fit in {self.dtype} (at most "
                                               f"{largest:.4g} in size)")

        def walk(e):
            if isinstance(e, ast.ListLit):
                if not e.items:
                    raise ConvDSLError(e.span, "a const cannot hold an empty list")
                if all(type(i) is ast.Num for i in e.items):      # a row of numbers: one pass
                    representable(e.items)
                    shape, values = (len(e.items),), [float(i.value) for i in e.items]
                else:
                    subs = [walk(i) for i in e.items]
                    shapes = {s for s, _ in subs}
                    if len(shapes) != 1:
                        raise ConvDSLError(e.span, "const rows must all have the same shape (this list is ragged)")
                    shape, values = (len(subs), *subs[0][0]), [v for _, vals in subs for v in vals]
                if len(values) > limits.MAX_CONST_ELEMENTS:
                    raise ConvDSLError(e.span, f"this const holds more than "
                                               f"{limits.power_text(limits.MAX_CONST_ELEMENTS)} numbers")
                return shape, values
            if isinstance(e, ast.Num):
                representable((e,))
                return (), [float(e.value)]
            raise ConvDSLError(e.span, "a const holds numbers in nested lists, like [[1, 0], [0, 1]]")
        if not isinstance(stmt.value, ast.ListLit):
            raise ConvDSLError(stmt.span, "a const holds numbers in nested lists, like [[1, 0], [0, 1]]")
        shape, values = walk(stmt.value)
        return ConstTensor(stmt.name, tuple(shape), tuple(values))

    def declare_loss(self, stmt: ast.Loss, scope: Scope, in_block: bool) -> None:
        call = stmt.call
        if in_block:
            raise ConvDSLError(stmt.span, "`loss` belongs in a network")
        if self.loss is not None:
            raise ConvDSLError(stmt.span, "a network has one loss")
        if call.func not in LOSSES:
            raise ConvDSLError(call.span, self.unknown_loss(call.func))
        ldef = LOSSES[call.func]
        if not call.args:
            raise ConvDSLError(call.span, f"{call.func} reads one of the network's outputs: "
                                          f"`loss {call.func}(NAME)`")
        ref = self.eval(call.args[0], scope)
        if not isinstance(ref, TensorRef):
            raise ConvDSLError(call.args[0].span, f"{call.func} reads a tensor")
        args = {a.name: a for a in ldef.args}
        spans = {k.name: k.value.span for k in call.kwargs}
        positional = []
        for i, expr in enumerate(call.args[1:]):
            a = ldef.args[i] if i < len(ldef.args) else None
            if a is not None:
                spans[a.name] = expr.span
            positional.append(self.loss_argument(expr, scope, a))
        # An argument the loss lacks is said first (bind), before its value is read.
        keywords = {k.name: self.loss_argument(k.value, scope, args[k.name]) if k.name in args else None
                    for k in call.kwargs}
        ctx = OpContext(call.span, spans, self.layout, self.dtype)
        attrs = ldef.normalize(ldef.bind(positional, keywords, ctx), self.values[ref.value].type, ctx)
        self.loss = (call.func, ref.value, attrs, call.span)

    def loss_argument(self, e, scope: Scope, arg: Arg | None):
        """A loss's argument: as an op's, and also a bare word it takes (`activation=sigmoid`, where
        `sigmoid` is an op's name elsewhere) and a list of numbers (`weight=[1.0, 2.0]`)."""
        if arg is not None and arg.symbols and isinstance(e, ast.Name) and \
                (e.id in arg.symbols or scope.lookup(e.id) is None):
            return Symbol(e.id)         # a word it does not take is refused by the loss, with its words
        if isinstance(e, ast.ListLit):
            items = []
            for item in e.items:
                if isinstance(item, ast.ListLit):
                    raise ConvDSLError(item.span, "a list here is flat: one number per class, as [1.0, 2.0, 0.5]")
                v = self.eval(item, scope)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConvDSLError(getattr(item, "span", e.span), f"a list here holds numbers, got "
                                                                      f"{describe_value(v)}")
                items.append(v)
            return tuple(items)
        v = self.eval_arg(e, scope, arg)
        if isinstance(v, TensorRef):
            raise ConvDSLError(e.span, "a loss reads one tensor; its other arguments are numbers or words")
        return v

    @staticmethod
    def unknown_loss(name: str) -> str:
        """Only a plain misspelling or another library's name for the same loss is suggested: a
        different loss (nll, hinge) is not the one the user wants; the closest of ours to one
        the language lacks is named with the difference (binary_cross_entropy)."""
        known = f"(known: {', '.join(LOSSES)})"
        alias = loss_alias(name)
        if alias is not None:
            return f"unknown loss `{name}`; did you mean `{alias.name}`?"
        relative = loss_relative(name)
        if relative is not None:
            return f"unknown loss `{name}`: {relative.relative_why}"
        if is_other_loss(name):
            return f"unknown loss `{name}`: it is not in the language {known}"
        hint = did_you_mean(name, LOSSES)
        if hint:
            return f"unknown loss `{name}`; did you mean `{hint}`?"
        if lookup(name) is not None:
            return f"`{name}` is an op, not a loss {known}"
        return f"unknown loss `{name}` {known}"

    # ---- expressions -------------------------------------------------------------------
    def eval(self, e, scope: Scope):
        # Expressions are evaluated recursively, and a block's body inside the call that applies
        # it, so nesting adds up across blocks; counting it keeps Python's stack from running out.
        if self.eval_depth >= limits.MAX_NESTING:
            stack = self.block_stack if len(self.block_stack) <= 4 else [*self.block_stack[:2], "…",
                                                                           self.block_stack[-1]]
            where = f" (blocks applied inside blocks count too: {' → '.join(stack)})" \
                if len(self.block_stack) > 1 else ""
            raise ConvDSLError(getattr(e, "span", None), f"expressions nest more than {limits.MAX_NESTING} levels "
                                                         f"deep here{where}")
        self.eval_depth += 1
        try:
            return self._eval(e, scope)
        finally:
            self.eval_depth -= 1

    def _eval(self, e, scope: Scope):
        if isinstance(e, ast.Num):
            return e.value
        if isinstance(e, ast.Bool):
            return e.value
        if isinstance(e, ast.Str):
            raise self.string_error(e, scope)
        if isinstance(e, ast.Name):
            bound = scope.lookup(e.id)
            if isinstance(bound, Failed):
                raise CascadeError(e.span, f"`{e.id}` is not defined: its statement failed")
            if bound is not None:
                return bound
            if e.id in symbol_vocabulary():
                return Symbol(e.id)
            if e.id in self.program.blocks or lookup(e.id) is not None:
                raise ConvDSLError(e.span, f"`{e.id}` is an op; apply it to a tensor, as `x -> {e.id}`")
            raise self.undefined(e.id, e.span, scope)
        if isinstance(e, ast.TupleLit):
            return tuple(self.eval(i, scope) for i in e.items)
        if isinstance(e, ast.ListLit):
            raise ConvDSLError(e.span, "a list is only allowed in `input` shapes and `const` values; for one "
                                       f"value per axis write a tuple: `{tuple_text(e)}`")
        if isinstance(e, ast.Neg):
            v = self.eval(e.operand, scope)
            self.expect_number(v, e.operand.span)
            return D.mul(v, -1) if not isinstance(v, float) else -v
        if isinstance(e, ast.BinOp):
            return self.arithmetic_result(self.eval_binop(e, scope), e)
        if isinstance(e, ast.Call):
            return self.eval_chain(e, scope) if e.piped else self.eval_call(e, scope)
        raise ConvDSLError(getattr(e, "span", None), "unsupported expression")  # pragma: no cover

    def eval_chain(self, call: ast.Call, scope: Scope):
        """`a -> f -> g -> …`, link by link without recursion: a chain is as long as the user likes
        (up to the layer limit), while Python's stack is not."""
        links = []
        while isinstance(call, ast.Call) and call.piped and call.args:
            links.append(call)
            call = call.args[0]
        value = self.eval(call, scope)
        for link in reversed(links):
            value = self.eval_call(link, scope, first=value)
        return value

    def eval_args(self, call: ast.Call, scope: Scope, first=NOT_PIPED) -> list:
        """The values of a call's positional arguments; `first`, when given, is the first one,
        already evaluated (it came in through `->`)."""
        values, rest = ([], call.args) if first is NOT_PIPED else ([first], call.args[1:])
        for a in rest:                   # a loop, not a comprehension: one Python frame less per level
            values.append(self.eval(a, scope))
        return values

    @staticmethod
    def arithmetic_result(value, e: ast.BinOp):
        """Refuses a result that no size or attribute could use, before a `repeat` grows it further:
        an integer beyond ±MAX_INT, an inf or a NaN, a run-time size expression over the size limits."""
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ConvDSLError(e.span, f"this arithmetic gives {value}, not a finite number")
        elif isinstance(value, int):
            if abs(value) > limits.MAX_INT:
                raise ConvDSLError(e.span, f"this arithmetic gives {value:,}, beyond the limit of "
                                           f"±{limits.power_text(limits.MAX_INT)} on integers")
        else:
            Budget.size(value, e.span, "this run-time size arithmetic")
        return value

    def expect_number(self, v, span: Span) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float, D.Sym)):
            raise ConvDSLError(span, f"arithmetic needs numbers, got {describe_value(v)}")

    def eval_binop(self, e: ast.BinOp, scope: Scope):
        a, b = self.eval(e.left, scope), self.eval(e.right, scope)
        self.expect_number(a, e.left.span)
        self.expect_number(b, e.right.span)
        if isinstance(a, float) or isinstance(b, float):
            if isinstance(a, D.Sym) or isinstance(b, D.Sym):
                raise ConvDSLError(e.span, "run-time sizes only take integer arithmetic")
            if e.op == "//":
                return float(a // b) if b else self._div_zero(e)
            if e.op == "/":
                return a / b if b else self._div_zero(e)
            return {"+": a + b, "-": a - b, "*": a * b}[e.op]
        if e.op == "+":
            return D.add(a, b)
        if e.op == "-":
            return D.sub(a, b)
        if e.op == "*":
            return D.mul(a, b)
        if e.op == "/":
            raise ConvDSLError(e.span, "`/` on integers: use `//` for integer division")
        if not isinstance(b, int) or b <= 0:
            if b == 0:
                self._div_zero(e)
            raise ConvDSLError(e.span, "`//` needs a positive integer on the right")
        return D.floordiv(a, b)

    @staticmethod
    def _div_zero(e):
        raise ConvDSLError(e.span, "division by zero")

    def eval_arg(self, e, scope: Scope, arg: Arg | None):
        """An op's argument: as eval, but an undefined bare name is explained with what the
        argument takes (`pad=reflect` lists the padding forms)."""
        if isinstance(e, ast.Name) and scope.lookup(e.id) is None and e.id not in symbol_vocabulary() and \
                e.id not in self.program.blocks and lookup(e.id) is None:
            raise self.undefined(e.id, e.span, scope, arg)
        if isinstance(e, ast.Str):
            raise self.string_error(e, scope, arg)
        if isinstance(e, ast.ListLit) and arg is not None and arg.shape:
            # A shape, written as shapes are (`reshape([C, H, W])`): its sizes, each evaluated.
            return tuple(self.eval(i, scope) for i in e.items)
        return self.eval(e, scope)

    def undefined(self, name: str, span: Span, scope: Scope, arg: Arg | None = None) -> ConvDSLError:
        candidates = [n for n, v in scope.bindings.items() if not isinstance(v, Failed)] + sorted(symbol_vocabulary())
        hint = did_you_mean(name, candidates)
        takes = f"`{arg.name}` is {arg.forms}" if arg is not None and arg.forms else ""
        if arg is not None and name in arg.lacks:
            return ConvDSLError(span, f"undefined name `{name}`: {arg.lacks_why}" + (f"; {takes}" if takes else ""))
        if hint:
            return ConvDSLError(span, f"undefined name `{name}`; did you mean `{hint}`?")
        return ConvDSLError(span, f"undefined name `{name}`" + (f": {takes}" if takes else ""))

    def string_error(self, e: ast.Str, scope: Scope, arg: Arg | None = None) -> ConvDSLError:
        """`pad="same"`: the language's words are written bare; say so when the text is one."""
        message = "a string is only allowed in `use \"file.cnn\"`"
        word = e.value
        if word.isidentifier() and (word in symbol_vocabulary() or scope.lookup(word) is not None):
            return ConvDSLError(e.span, f"{message}; write `{word}` without quotes")
        if arg is not None and word in arg.lacks:
            return ConvDSLError(e.span, f"{message}, and {arg.lacks_why}" +
                                (f"; `{arg.name}` is {arg.forms}" if arg.forms else ""))
        if arg is not None and arg.forms:
            return ConvDSLError(e.span, f"{message}; `{arg.name}` is {arg.forms}")
        return ConvDSLError(e.span, message)

    def unknown_callable(self, name: str, span: Span, scope: Scope, piped: bool = True) -> ConvDSLError:
        """An unknown op: another library's name for one of ours (Linear → dense), the closest of
        ours to one the language lacks (relu6 → relu), or a misspelling of an op, block or layer
        in scope; nothing when nothing is close. The built-ins channels/height/width/depth are
        offered only for a call that is not in a chain (they are not ops)."""
        loss = LOSSES.get(name) or loss_alias(name)
        if loss is not None:
            return ConvDSLError(span, f"`{name}` is a loss; write it in a `loss` statement"
                                + ("" if loss.name == name else f": `loss {loss.name}(…)`"))
        if scope.lookup(name) is not None:
            return ConvDSLError(span, f"`{name}` is a {scope.kinds.get(name, 'value')}, not an op")
        alias = op_alias(name)
        if alias is not None:
            return ConvDSLError(span, f"unknown op `{name}`; did you mean `{alias.name}`?")
        relative = op_relative(name)
        if relative is not None:
            return ConvDSLError(span, f"unknown op `{name}`: it is not in the language yet; `{relative.name}` is "
                                      f"the closest")
        targets = dict(alias_names())            # a name → the op it suggests
        targets.update({n: n for n in registry()})
        targets.update({n: n for n in self.program.blocks})
        targets.update({n: n for n, k in scope.kinds.items()
                        if k == "layer" and not isinstance(scope.bindings.get(n), Failed)})
        if not piped:
            targets.update({n: n for n in BUILTINS})
        hint = did_you_mean(name, targets)
        return ConvDSLError(span, f"unknown op `{name}`" + (f"; did you mean `{targets[hint]}`?" if hint else ""))

    def eval_call(self, call: ast.Call, scope: Scope, first=NOT_PIPED):
        name = call.func
        bound = scope.lookup(name)
        if isinstance(bound, Failed):
            raise CascadeError(call.span, f"`{name}` is not defined: its statement failed")
        if isinstance(bound, LayerRef):
            return self.apply_layer(bound, call, scope, first)
        if bound is not None:
            raise self.unknown_callable(name, call.span, scope)
        if name in BUILTINS:
            return self.eval_builtin(call, scope, first)
        if name in self.program.blocks:
            return self.apply_block(self.program.blocks[name], call, scope, first)
        op = lookup(name)
        if op is not None:
            return self.apply_op_call(op, call, scope, first)
        if name in SYMBOL_FUNCS:
            args = tuple(self.eval_args(call, scope, first))
            if call.kwargs:
                raise ConvDSLError(call.kwargs[0].span, f"{name}(…) takes positional arguments only")
            return SymbolCall(name, args)
        # Its arguments first: in `x -> Conv2d(8, kernel=3) -> BatchNorm2d` the first slip is reported
        # first, although the chain nests it inside the second.
        for a in call.args:
            self.eval(a, scope)
        raise self.unknown_callable(name, call.span, scope, piped=call.piped)

    def eval_builtin(self, call: ast.Call, scope: Scope, first=NOT_PIPED):
        if len(call.args) != 1 or call.kwargs:
            raise ConvDSLError(call.span, f"{call.func}(t) takes one tensor")
        (ref,) = self.eval_args(call, scope, first)
        if not isinstance(ref, TensorRef):
            raise ConvDSLError(call.args[0].span, f"{call.func}(t) takes a tensor, got {describe_value(ref)}")
        t = self.values[ref.value].type
        if call.func == "channels":
            return t.channels
        axis = {"width": 1, "height": 2, "depth": 3}[call.func]
        if len(t.spatial) < axis:
            raise ConvDSLError(call.span, f"{call.func}(t): the tensor is {t.text(self.layout)}, "
                                          f"which has no {call.func}")
        return t.spatial[-axis]

    # ---- applying ops, layers and blocks -------------------------------------------------
    def split_args(self, call: ast.Call, scope: Scope, min_inputs: int, max_inputs, op=None, first=NOT_PIPED):
        """Evaluate a call's arguments: leading tensors are its inputs, the rest are attributes.
        With the op, a mistake in how an argument is written says what that argument takes;
        `first`, when given, is the first argument's value (it came in through `->`)."""
        inputs, attrs, attr_exprs = [], [], []
        for index, expr in enumerate(call.args):
            arg = op.args[len(attrs)] if op is not None and len(inputs) >= min_inputs and \
                len(attrs) < len(op.args) else None
            if index == 0 and first is not NOT_PIPED:
                v = first
            else:
                v = self.eval_arg(expr, scope, arg) if arg is not None else self.eval(expr, scope)
            if isinstance(v, TensorRef):
                if attrs:
                    raise ConvDSLError(expr.span, "tensors come first in a call, before the other arguments")
                inputs.append(v)
            else:
                attrs.append(v)
                attr_exprs.append(expr)
        if len(inputs) < min_inputs:
            raise ConvDSLError(call.span, f"{call.func} needs {min_inputs} input tensor(s), "
                                          f"got {len(inputs)}" + (" — write `x -> " + call.func + "`"
                                                                  if not inputs else ""))
        if max_inputs is not None and len(inputs) > max_inputs:
            raise ConvDSLError(call.span, f"{call.func} takes {max_inputs} input tensor(s), got {len(inputs)}")
        keywords = {}
        for k in call.kwargs:
            v = self.eval_arg(k.value, scope, op_arg(op, k.name)) if op is not None else self.eval(k.value, scope)
            if isinstance(v, TensorRef):
                raise ConvDSLError(k.value.span, f"`{k.name}` cannot be a tensor")
            keywords[k.name] = v
        return inputs, attrs, attr_exprs, keywords

    def reserve_slot(self, slot: str) -> None:
        if slot not in self.slot_members:
            self.layer_slots.append(slot)
            self.slot_members[slot] = []

    def next_label(self, scope: Scope, base: str) -> str:
        n = scope.counters.get(base, 0) + 1
        scope.counters[base] = n
        return f"{scope.prefix}{base}{n}"

    def apply_op_call(self, op, call: ast.Call, scope: Scope, first=NOT_PIPED) -> TensorRef:
        inputs, positional, pos_exprs, keywords = self.split_args(call, scope, op.min_inputs, op.max_inputs, op,
                                                                  first)
        spans = {k.name: k.value.span for k in call.kwargs}
        for a, expr in zip(op.args, pos_exprs):
            spans[a.name] = expr.span
        label = self.next_label(scope, op.name)
        return self.apply(op, tuple(inputs), positional, keywords, spans, call.span, call, label, label, scope)

    def apply_layer(self, layer: LayerRef, call: ast.Call, scope: Scope, first=NOT_PIPED) -> TensorRef:
        if call.kwargs or len(call.args) != 1:
            raise ConvDSLError(call.span, f"layer `{layer.name}` is applied to one tensor, as `x -> {layer.name}`")
        op = lookup(layer.call.func)
        inputs, _, _, _ = self.split_args(call, scope, op.min_inputs, op.max_inputs, first=first)
        return self.apply(op, tuple(inputs), list(layer.positional), dict(layer.keywords), dict(layer.arg_spans),
                          call.span, layer.call, layer.name, layer.name, scope)

    def apply(self, op, inputs, positional, keywords, spans, span, call, label, slot, scope) -> TensorRef:
        names = tuple(self.input_name(r, e, scope) for r, e in zip(inputs, call.args))
        ctx = OpContext(span, spans, self.layout, self.dtype, names)
        attrs = op.bind(positional, keywords, ctx)
        self.reserve_slot(slot)
        saved = self.composite
        self.composite = (label, slot, span)
        try:
            expanded = op.expand(self, inputs, attrs, ctx)
            if expanded is not None:
                return expanded
            return self._make_node(op, inputs, attrs, ctx, label, slot, scope)
        except ConvDSLError as e:
            note = self.leading_name_note(tuple(self.values[r.value].type for r in inputs))
            if note is None or isinstance(e, CascadeError):
                raise
            raise e.with_notes(note) from None
        finally:
            self.composite = saved

    def input_name(self, ref, expr, scope: Scope) -> str:
        if isinstance(expr, ast.Name):
            return expr.id
        return self.values[ref.value].name or "input"

    def apply_primitive(self, op_name: str, inputs, attrs: dict, ctx: OpContext, suffix: str | None) -> TensorRef:
        """Used by composite ops (OpDef.expand): one sub-node, labelled `<label>.<suffix>`."""
        label, slot, span = self.composite
        op = lookup(op_name)
        full = {a.name: a.default for a in op.args}
        full.update(attrs)
        sub_label = label if suffix is None else f"{label}.{suffix}"
        sub_ctx = OpContext(span, ctx.arg_spans, self.layout, self.dtype, ctx.input_names)
        return self._make_node(op, tuple(inputs), full, sub_ctx, sub_label, slot, None)

    def type_of(self, ref: TensorRef) -> TensorType:
        return self.values[ref.value].type

    def _make_node(self, op, inputs, attrs, ctx: OpContext, label: str, slot: str, scope) -> TensorRef:
        self.budget.node(len(self.nodes), ctx.call_span)
        in_types = tuple(self.values[r.value].type for r in inputs)
        norm = op.normalize(dict(attrs), in_types, ctx)
        out_type = op.infer(in_types, norm, ctx)
        self.check_sizes(op, in_types, out_type, norm, label, ctx.call_span)
        specs = op.param_specs(in_types, norm)
        layer_name = label if not specs else self.attach_params(op, label, slot, specs, ctx)
        nid = len(self.nodes)
        vid = self.new_value(out_type, nid, "")
        self.nodes.append(Node(nid, op.name, tuple(r.value for r in inputs), vid, norm, label, layer_name,
                               ctx.call_span, tuple(self.block_stack), tuple(self.block_calls)))
        return TensorRef(vid)

    def check_sizes(self, op, in_types, out_type: TensorType, attrs: dict, label: str, span: Span) -> None:
        """Every size this node hands to the C (its output, run-time paddings, its workspace, what it
        saves for backward) against the limits, once, here at the op (convdsl/ir/budget.py)."""
        for d in _run_time_sizes(attrs.values()):
            self.budget.size(d, span, lambda d=d: f"a size of {label} (`{short_text(d)}`)")
        self.budget.tensor(out_type, span, f"the output of {label}")
        for variant in op.variants():        # any kernel variant that applies may be the one the plan runs
            if variant.applies(attrs):
                self.budget.workspace(variant.workspace(in_types, out_type, attrs), span, f"the workspace of {label}")
        saved = op.saved_elements(in_types, out_type, attrs)
        # With run-time sizes it is an element count, which prepare counts overflow-checked.
        if isinstance(saved, int) and saved:
            self.budget.add_activation(saved, span, f"what {label} saves for backward")

    def attach_params(self, op, label: str, slot: str, specs, ctx: OpContext) -> str:
        existing = self.layers.get(label)
        if existing is not None:
            if existing.params != specs:
                first = ", ".join(f"{p.name} {list(p.shape)}" for p in existing.params)
                here = ", ".join(f"{p.name} {list(p.shape)}" for p in specs)
                raise ConvDSLError(ctx.call_span, f"layer `{label}` shares its weights, but here it would need "
                                                  f"{here} instead of {first}: its input has a different shape "
                                                  f"than at its first use (line {existing.span.line})")
            return label
        self.budget.layer(label, specs, ctx.call_span)
        self.layers[label] = Layer(label, op.name, specs, ctx.call_span)
        self.slot_members[slot].append(label)
        return label

    def apply_block(self, block: ast.Block, call: ast.Call, scope: Scope, first=NOT_PIPED) -> TensorRef:
        self.budget.block_call(call.span)
        if block.name in self.block_stack:
            chain = " → ".join([*self.block_stack[self.block_stack.index(block.name):], block.name])
            raise ConvDSLError(call.span, f"block `{block.name}` calls itself ({chain}); blocks cannot recurse")
        if not block.params:
            raise ConvDSLError(block.span, f"block `{block.name}` needs a first parameter: its input tensor")
        values = self.eval_args(call, scope, first)
        param_names = [p.name for p in block.params]
        if len(set(param_names)) != len(param_names):
            dup = next(n for n in param_names if param_names.count(n) > 1)
            raise ConvDSLError(block.span, f"block `{block.name}` has two parameters named `{dup}`")
        if len(values) > len(block.params):
            raise ConvDSLError(call.span, f"block `{block.name}` takes {len(block.params)} argument(s) "
                                          f"({', '.join(param_names)}), got {len(values)}")
        label = self.next_label(scope, block.name)
        inner = Scope(prefix=f"{label}.", path=(*scope.path, label))
        given: dict[str, Any] = dict(zip(param_names, values))
        for k in call.kwargs:
            if k.name not in param_names:
                hint = did_you_mean(k.name, param_names)
                raise ConvDSLError(k.span, f"block `{block.name}` has no parameter `{k.name}`" +
                                   (f"; did you mean `{hint}`?" if hint else ""))
            if k.name in given:
                raise ConvDSLError(k.span, f"parameter `{k.name}` of block `{block.name}` is given twice")
            given[k.name] = self.eval(k.value, scope)
        for p in block.params:
            if p.name not in given:
                if p.default is None:
                    raise ConvDSLError(call.span, f"block `{block.name}` needs the argument `{p.name}`")
                given[p.name] = self.eval(p.default, Scope())
            self.bind(inner, p.name, given[p.name], "param", p.span)
        if not isinstance(given[param_names[0]], TensorRef):
            raise ConvDSLError(call.span, f"the first argument of block `{block.name}` must be a tensor")
        self.block_stack.append(block.name)
        self.block_calls.append(call.span)
        try:
            self.run_body(block.body, inner, in_block=True)
        except CascadeError:
            raise
        except ConvDSLError as e:
            # The error points into the block's body; say which use of the block it comes from.
            raise e.with_notes(block_note(block.name, call.span)) from None
        finally:
            self.block_stack.pop()
            self.block_calls.pop()
        if inner.returned is None:
            raise ConvDSLError(block.span, f"block `{block.name}` has no `return`")
        return inner.returned

    def new_value(self, t: TensorType, producer: int | None, name: str) -> int:
        vid = len(self.values)
        self.values.append(Value(vid, t, producer, name))
        return vid


def op_arg(op, name: str) -> Arg | None:
    return next((a for a in op.args if a.name == name), None)


def tuple_text(e: ast.ListLit) -> str:
    """A list literal written as the tuple it should be: [3, 3] → (3, 3), [[1, 0]] → ((1, 0),)."""
    items = [tuple_text(i) if isinstance(i, ast.ListLit) else expr_text(i) for i in e.items]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _run_time_sizes(values):
    """The run-time size expressions among attribute values (paddings of pad=same, …)."""
    for v in values:
        if isinstance(v, D.Sym):
            yield v
        elif isinstance(v, tuple):
            yield from _run_time_sizes(v)


def build_graph(program: Program, network: str | None = None) -> Graph:
    nets = program.networks
    if not nets:
        raise ConvDSLError(file_end(program.module), "no `network` in this file; a file that only defines "
                                                     "blocks is brought into another with `use`")
    if network is None:
        if len(nets) > 1:
            names = ", ".join(n.name for n in nets)
            raise ConvDSLError(nets[1].span, f"this file holds several networks ({names}); say which one")
        chosen = nets[0]
    else:
        found = [n for n in nets if n.name == network]
        if not found:
            raise ConvDSLError(nets[0].span, f"no network `{network}` in this file "
                                             f"(it has {', '.join(n.name for n in nets)})")
        chosen = found[0]
    return GraphBuilder(program, chosen).build()
