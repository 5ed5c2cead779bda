"""FC → conv (§2.5): the dense layers after the last spatial map become equivalent convolutions.

A dense layer that reads a flattened map [C, *S] computes, for each output j, the sum of
W[j, :] against the map: a convolution with kernel size S whose kernel j is W[j, :] reshaped
to [C, *S] (in the layout's flatten order). A dense layer after that reads a [F, 1, …] map
and becomes a 1×1 convolution. Element-wise ops between them work on maps as they did on
vectors, and so do channel ops once the map is 1×1. The converted network therefore gives
the same output at the training size, and on a larger input slides the whole classifier over
it, returning a map of scores (§2.5, §4.2) — the input's fixed spatial sizes become run-time
names for that.

The file is rewritten statement by statement: only the statements holding a converted layer
or a removed `flatten`, and the inputs, are written anew (canonical form, see
frontend/unparse.py); every other line, comments included, stays as written.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConvDSLError
from ..frontend import ast, unparse
from ..frontend.parser import KEYWORDS, parse, parse_file
from ..ir.build import BUILTINS, build_graph, load_program
from ..ir.graph import Graph, Init, Node, TensorType
from ..ops.base import INIT_CALLS, lookup, registry, symbol_vocabulary
from ..passes.schedule import buffer_layout
from ..passes.verify import verify

# What an op does on a map is read from its OpDef's traits (ops/base.py), never from its name:
# `locality` "value" ops act on every value alone, the same on a map as on the flattened vector;
# "channel" and "position" ops mix or normalise the channels of a position, the same once the
# map is 1×1; `map_form` names what a dense layer becomes on a map.

_SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


@dataclass(frozen=True)
class ConvertedDense:
    node: int                        # the dense node in the original graph
    kernel: tuple[int, ...]          # spatial size of the map it reads (1s after the first dense)
    channels: int                    # channels of that map
    label: str


@dataclass(frozen=True)
class WeightMove:
    """One entry of the weight file: where it goes and how it is reshaped."""
    old: str
    new: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    dense: ConvertedDense | None     # set for the weight of a converted dense layer


@dataclass(frozen=True)
class Conversion:
    network: str
    text: str                        # the whole new .cnn file
    graph: Graph                     # the original network
    converted: Graph                 # the new one, as built from `text`
    dense: tuple[ConvertedDense, ...]
    moves: tuple[WeightMove, ...]
    sizes: tuple[str, ...]           # run-time size names introduced for the inputs

    def new_label(self, label: str) -> str:
        """The label a layer of the original network has in the converted one."""
        for move in self.moves:
            if move.old.rsplit(".", 1)[0] == label:
                return move.new.rsplit(".", 1)[0]
        raise KeyError(label)

    def convert_weights(self, weights: dict) -> dict[str, np.ndarray]:
        """A weight file of the original network (params and buffers by name) → the converted one's."""
        names = set(weights)
        expected = {m.old for m in self.moves}
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise ConvDSLError(None, f"the weights do not belong to network {self.network}"
                                     + (f"; missing {missing}" if missing else "")
                                     + (f"; unexpected {extra}" if extra else ""))
        out = {}
        for move in self.moves:
            value = np.asarray(weights[move.old])
            if value.shape != move.old_shape:
                raise ConvDSLError(None, f"weight `{move.old}` has shape {list(value.shape)}, but network "
                                         f"{self.network} expects {list(move.old_shape)}")
            if move.dense is not None:
                value = _dense_to_conv_weight(value, move.dense, self.graph.layout)
            out[move.new] = np.ascontiguousarray(value.reshape(move.new_shape))
        return out


def _dense_to_conv_weight(w: np.ndarray, d: ConvertedDense, layout: str) -> np.ndarray:
    """[out, C·prod(S)] in the layout's flatten order → [out, C, *S]."""
    out = w.shape[0]
    if layout == "NHWC" and any(k != 1 for k in d.kernel):
        return np.moveaxis(w.reshape(out, *d.kernel, d.channels), -1, 1)
    return w.reshape(out, d.channels, *d.kernel)


# ---- finding the classifier head --------------------------------------------------------

@dataclass
class _Head:
    """The values after the flattens being converted, with their shapes once converted."""
    shapes: dict                     # value id → TensorType after conversion
    seeds: dict                      # value id → the flatten nodes it descends from
    removed: set                     # flatten node ids
    dense: list                      # ConvertedDense


def _trace(graph: Graph, seeds: set[int]) -> tuple[_Head | None, Node | None, str, set[int]]:
    """Follow the flattened values of the `seeds` (flatten node ids) to the outputs. Returns the
    head, or the node that stops the conversion, why, and which seeds it involves."""
    head = _Head({}, {}, set(), [])
    for node in graph.nodes:
        ins = [v for v in node.inputs if v in head.shapes]
        if node.id in seeds:
            t = graph.values[node.inputs[0]].type
            head.shapes[node.output] = t
            head.seeds[node.output] = {node.id}
            head.removed.add(node.id)
            continue
        if not ins:
            continue
        origin = set().union(*(head.seeds[v] for v in ins))
        t = head.shapes[ins[0]]
        out_t = graph.values[node.output].type
        if len(ins) != len(node.inputs):
            return None, node, "it also reads values that are not part of the classifier head", origin
        op = lookup(node.op)
        if op.flattens:
            head.removed.add(node.id)
            shape = t
        elif op.locality == "value":
            if any(head.shapes[v] != t for v in ins):
                return None, node, "its inputs would have different shapes as maps", origin
            shape = t
        elif op.locality in ("channel", "position"):
            if not all(all(s == 1 for s in head.shapes[v].spatial) for v in ins):
                return None, node, (f"{node.op} would mix the positions of the flattened map "
                                    "(it must come after the first dense layer)"), origin
            shape = TensorType((out_t.shape[0], *t.spatial))
        elif op.map_form is not None:
            if not t.is_static():
                return None, node, "it reads a map whose size is not fixed", origin
            head.dense.append(ConvertedDense(node.id, tuple(t.spatial), t.channels, node.label))
            shape = TensorType((node.attrs["out"], *(1,) * len(t.spatial)))
        else:
            return None, node, f"`{node.op}` has no map form equal to its form on vectors", origin
        head.shapes[node.output] = shape
        head.seeds[node.output] = origin
    return head, None, "", set()


def find_head(graph: Graph) -> _Head:
    """The flattens of a map whose values reach the outputs through dense layers and ops that
    have an equal map form; an error that says what stands in the way when there are none."""
    seeds = {n.id for n in graph.nodes if lookup(n.op).flattens and graph.values[n.inputs[0]].type.rank > 1}
    reasons, first = [], None
    while seeds:
        head, node, why, involved = _trace(graph, seeds)
        if head is not None:
            # A flatten with no dense layer after it has nothing to convert.
            useful = {s for d in head.dense for s in head.seeds[graph.nodes[d.node].output]}
            if useful == seeds:
                return head
            seeds = useful
            continue
        reasons.append(f"{node.label} (line {node.span.line}): {why}")
        first = first or node
        seeds -= involved
    if not reasons:
        raise ConvDSLError(graph.span, f"network {graph.name}: no dense layer follows a spatial map, "
                                       "so there is nothing to convert")
    raise ConvDSLError(first.span, f"network {graph.name}: the dense layers cannot become convolutions: "
                                   f"{reasons[0]}", notes=tuple(reasons[1:]))


# ---- rewriting the source ---------------------------------------------------------------

def _walk_exprs(e, found: list) -> None:
    """Every call in an expression, outermost first; with a stack, not recursion, since a chain
    of `->` is an expression as deep as it is long."""
    todo = [e]
    while todo:
        e = todo.pop()
        if isinstance(e, ast.Call):
            found.append(e)
            todo += reversed([*e.args, *(k.value for k in e.kwargs)])
        elif isinstance(e, (ast.TupleLit, ast.ListLit)):
            todo += reversed(e.items)
        elif isinstance(e, ast.BinOp):
            todo += (e.right, e.left)
        elif isinstance(e, ast.Neg):
            todo.append(e.operand)


def _stmt_exprs(s) -> list:
    if isinstance(s, (ast.Assign, ast.LayerDecl, ast.ConstDecl, ast.Return)):
        return [s.value]
    if isinstance(s, ast.Loss):
        return [s.call]
    if isinstance(s, ast.Repeat):
        return [s.count]
    return []


def _index_calls(stmts, index: dict, layers: dict) -> None:
    """(line, col) of every call in a body → (call, the simple statement holding it)."""
    for s in stmts:
        if isinstance(s, ast.Repeat):
            _index_calls(s.body, index, layers)
        if isinstance(s, ast.LayerDecl):
            layers.setdefault(s.name, []).append(s)
        found: list = []
        for e in _stmt_exprs(s):
            _walk_exprs(e, found)
        for call in found:
            index[(call.span.line, call.span.col)] = (call, s)


def _init_expr(init: Init):
    if init.kind in INIT_CALLS:
        return ast.Call(init.kind, (ast.Num(init.arg, None),), (), None)
    return ast.Name(init.kind, None)


def _conv_call(dense_call: ast.Call, node: Node, kernel: tuple[int, ...], has_input: bool) -> ast.Call:
    attrs = node.attrs
    k = kernel[0] if len(set(kernel)) == 1 else ast.TupleLit(tuple(ast.Num(v, None) for v in kernel), None)
    kwargs = [ast.Kwarg("kernel", ast.Num(k, None) if isinstance(k, int) else k, None)]
    if not attrs["bias"]:
        kwargs.append(ast.Kwarg("bias", ast.Bool(False, None), None))
    if attrs["init"] != Init("he"):
        kwargs.append(ast.Kwarg("init", _init_expr(attrs["init"]), None))
    if attrs["frozen"]:
        kwargs.append(ast.Kwarg("frozen", ast.Bool(True, None), None))
    inputs = dense_call.args[:1] if has_input else ()
    return ast.Call(lookup(node.op).map_form, (*inputs, ast.Num(attrs["out"], None)), tuple(kwargs), dense_call.span,
                    piped=dense_call.piped)


def _replace(e, edits: dict):
    """The expression with the edited calls replaced (edits: id(call) → new expr or a function)."""
    if isinstance(e, ast.Call):
        # A chain is rebuilt link by link from its start, not by recursion down its length.
        links = []
        while isinstance(e, ast.Call) and e.piped and e.args:
            links.append(e)
            e = e.args[0]
        new = _replace_call(e, edits, None) if isinstance(e, ast.Call) else _replace(e, edits)
        for link in reversed(links):
            new = _replace_call(link, edits, new)
        return new
    if isinstance(e, ast.TupleLit):
        return dataclasses.replace(e, items=tuple(_replace(i, edits) for i in e.items))
    if isinstance(e, ast.BinOp):
        return dataclasses.replace(e, left=_replace(e.left, edits), right=_replace(e.right, edits))
    if isinstance(e, ast.Neg):
        return dataclasses.replace(e, operand=_replace(e.operand, edits))
    return e


def _replace_call(e: ast.Call, edits: dict, first):
    """One call with its arguments replaced; `first`, when not None, is its first argument, done."""
    args = tuple(_replace(a, edits) for a in (e.args if first is None else e.args[1:]))
    if first is not None:
        args = (first, *args)
    kwargs = tuple(dataclasses.replace(k, value=_replace(k.value, edits)) for k in e.kwargs)
    new = dataclasses.replace(e, args=args, kwargs=kwargs)
    edit = edits.get(id(e))
    return edit(new) if edit is not None else new


def _replace_in_stmt(s, edits: dict):
    if isinstance(s, (ast.Assign, ast.LayerDecl, ast.Return)):
        return dataclasses.replace(s, value=_replace(s.value, edits))
    if isinstance(s, ast.Loss):
        return dataclasses.replace(s, call=_replace(s.call, edits))
    return s


class _Text:
    """The source as lines, with (line, col) → offset; lines end at "\n" alone, as the parser counts."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def offset(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col - 1

    def line_start(self, line: int) -> int:
        return self.starts[line - 1]


_LEAD = re.compile(r"[ \t]*(input|layer|const|output|loss|return|layout|dtype)?[ \t]*$")


def _statement_anchor(s) -> tuple[int, int]:
    if isinstance(s, ast.Loss):
        return s.call.span.line, s.call.span.col
    return s.span.line, s.span.col


def _splice(source: str, rewrites: list, path: str) -> str:
    """Replace each statement in `rewrites` [(old statement, new statement)] by its canonical text,
    keeping its indentation and whatever follows it on its last line (a comment)."""
    text = _Text(source)
    pieces = []
    for old, new in rewrites:
        line, col = _statement_anchor(old)
        before = source[text.line_start(line):text.offset(line, col)]
        if not _LEAD.match(before):
            raise ConvDSLError(old.span, "convert rewrites this statement, but it shares its line with other "
                                         "code; put it on a line of its own")
        indent = re.match(r"[ \t]*", before).group(0)
        start = text.line_start(line) + len(indent)
        end = text.offset(*old.end)      # just past its last token, as the parser saw it
        lines = unparse.statement(new, indent)
        pieces.append((start, end, ("\n" + indent).join(lines)))
    pieces.sort()
    out, pos = [], 0
    for start, end, replacement in pieces:
        if start < pos:
            raise ConvDSLError(None, f"{path}: internal error: overlapping rewrites")  # pragma: no cover
        out += [source[pos:start], replacement]
        pos = end
    out.append(source[pos:])
    return "".join(out)


def _used_names(module: ast.Module) -> set[str]:
    """Every identifier the file uses, so that new size names clash with none."""
    names = set(KEYWORDS) | set(symbol_vocabulary()) | set(BUILTINS) | set(registry()) | set(INIT_CALLS)

    todo = [module]                      # a stack, not recursion: a chain is as deep as it is long
    while todo:
        x = todo.pop()
        if isinstance(x, ast.Name):
            names.add(x.id)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                if f.name == "span":
                    continue
                v = getattr(x, f.name)
                if f.name == "name" and isinstance(v, str) or f.name == "func":
                    names.add(v)
                todo.append(v)
        elif isinstance(x, tuple):
            todo += x
    return names


def _run_time_inputs(network: ast.Network, layout: str, taken: set[str]) -> tuple[list, tuple[str, ...]]:
    """(old, new) Input statements with every fixed spatial dim replaced by a run-time name.
    Equal sizes on the same axis share a name across inputs (so that they still agree)."""
    chosen: dict[tuple[str, int], str] = {}
    rewrites = []
    for s in network.body:
        if not isinstance(s, ast.Input) or len(s.dims) < 2:
            continue
        spatial = range(len(s.dims) - 1) if layout == "NHWC" else range(1, len(s.dims))
        bases = _SPATIAL_NAMES.get(len(s.dims) - 1)
        if bases is None:
            continue
        dims = list(s.dims)
        for base, axis in zip(bases, spatial):
            d = dims[axis]
            if not isinstance(d, ast.Num):
                continue
            key = (base, d.value)
            if key not in chosen:
                name, k = base, 1
                while name in taken:
                    k += 1
                    name = f"{base}{k}"
                taken.add(name)
                chosen[key] = name
            dims[axis] = ast.Name(chosen[key], d.span)
        if dims != list(s.dims):
            rewrites.append((s, dataclasses.replace(s, dims=tuple(dims))))
    return rewrites, tuple(dict.fromkeys(chosen.values()))


def _rebase_uses(source: str, module: ast.Module, src_dir: Path, dst_dir: Path) -> str:
    """`use "x.cnn"` paths made relative to the new file's folder."""
    if src_dir.resolve() == dst_dir.resolve():
        return source
    text = _Text(source)
    edits = []
    for item in module.items:
        if isinstance(item, ast.Use):
            target = (src_dir / item.path).resolve()
            rel = os.path.relpath(target, dst_dir.resolve()).replace(os.sep, "/")
            if '"' in rel or "\n" in rel:
                raise ConvDSLError(item.span, f"cannot write the path {rel!r} in a `use`")
            start = text.offset(item.span.line, item.span.col)
            end = source.index('"', start + 1) + 1
            edits.append((start, end, f'"{rel}"'))
    for start, end, new in sorted(edits, reverse=True):
        source = source[:start] + new + source[end:]
    return source


# ---- the pass ---------------------------------------------------------------------------

def fc_to_conv(path, network: str | None = None, out_path=None) -> Conversion:
    """Convert `network` of the .cnn file at `path`; `out_path` is where the new file will live
    (it decides how `use` paths are written; default: beside the original)."""
    path = Path(path)
    out_path = Path(out_path) if out_path is not None else path
    module = parse_file(path)
    program = load_program(module)
    graph = verify(build_graph(program, network))
    net_ast = next(n for n in program.networks if n.name == graph.name)
    head = find_head(graph)

    calls: dict = {}
    layer_decls: dict = {}
    _index_calls(net_ast.body, calls, layer_decls)
    main_file = str(path)

    def ast_call(node: Node) -> tuple[ast.Call, object]:
        where = calls.get((node.span.line, node.span.col)) if node.span.path == main_file else None
        if where is None:
            block = f" inside block `{node.scope[-1]}`" if node.scope else ""
            raise ConvDSLError(node.span, f"{node.label}{block}: convert rewrites the network's own "
                                          "statements; write the classifier head in the network itself")
        return where

    edits: dict = {}                 # id(call) → function of the (already rewritten) call
    statements: dict = {}            # id(statement) → statement
    claimed: dict = {}               # id(call) → the IR nodes the edit covers
    by_id = {d.node: d for d in head.dense}
    for d in head.dense:
        node = graph.nodes[d.node]
        call, stmt = ast_call(node)
        if call.func == node.op:         # the op written inline, not a layer declared with it
            target, has_input = call, True
        else:
            decls = layer_decls.get(node.layer, [])
            if len(decls) != 1 or not isinstance(decls[0].value, ast.Call) or decls[0].value.func != node.op:
                raise ConvDSLError(node.span, f"{node.label}: cannot find the one `layer {node.layer} = dense(…)` "
                                              "declaration to rewrite")
            target, stmt, has_input = decls[0].value, decls[0], False
        prev = claimed.get(id(target))
        if prev is not None and by_id[prev[0]].kernel != d.kernel:
            raise ConvDSLError(node.span, f"{node.label}: this dense layer reads maps of different sizes at "
                                          "different uses, so it has no single convolution form")
        claimed[id(target)] = (prev or ()) + (d.node,)
        edits[id(target)] = (lambda new, node=node, d=d, has_input=has_input:
                             _conv_call(new, node, d.kernel, has_input))
        statements[id(stmt)] = stmt
    dense_spans = {(graph.nodes[d.node].span.line, graph.nodes[d.node].span.col) for d in head.dense}
    for nid in head.removed:
        node = graph.nodes[nid]
        call, stmt = ast_call(node)
        if call.func != node.op and (node.span.line, node.span.col) in dense_spans:
            continue                 # the flatten a dense layer does by itself: nothing written to remove
        if call.func != node.op:
            raise ConvDSLError(node.span, f"{node.label}: convert removes this flatten, which is declared as a "
                                          "layer; write `flatten` inline")
        claimed[id(call)] = claimed.get(id(call), ()) + (nid,)
        edits[id(call)] = lambda new: new.args[0]
        statements[id(stmt)] = stmt
    # An edited call that also makes nodes outside the head (a repeat body, a shared layer)
    # cannot be rewritten for the head alone.
    for node in graph.nodes:
        op = lookup(node.op)
        if not (op.map_form is not None or op.flattens) or node.span.path != main_file:
            continue
        where = calls.get((node.span.line, node.span.col))
        targets = [where[0]] if where else []
        if op.map_form is not None and node.layer in layer_decls:
            targets += [d.value for d in layer_decls[node.layer]]
        for t in targets:
            if id(t) in claimed and node.id not in claimed[id(t)] and node.id not in head.removed:
                raise ConvDSLError(node.span, f"{node.label}: this {node.op} is written once but used both in the "
                                              "classifier head and elsewhere; convert cannot rewrite it for one use")

    rewrites = [(s, _replace_in_stmt(s, edits)) for s in statements.values()]
    input_rewrites, sizes = _run_time_inputs(net_ast, graph.layout, _used_names(module))
    source = path.read_text(encoding="utf-8")
    text = _splice(source, rewrites + input_rewrites, str(path))
    text = _rebase_uses(text, parse(text, str(path)), path.parent, out_path.parent)

    try:
        converted = verify(build_graph(load_program(parse(text, str(out_path))), graph.name))
    except ConvDSLError as e:
        why = e.message if sizes else str(e)
        raise ConvDSLError(graph.span, f"network {graph.name}: the converted network does not check"
                           + (f" with run-time input sizes ({', '.join(sizes)})" if sizes else "") + f": {why}",
                           notes=("a layer that needs a fixed input size (such as `local`, or a dense layer "
                                  "outside the classifier head) keeps the network from running on larger "
                                  "inputs",) if sizes else ()) from None
    moves = _weight_moves(graph, converted, head)
    text = _summary(path.name, graph.name, head, moves, sizes) + text
    return Conversion(graph.name, text, graph, converted, tuple(head.dense), moves, sizes)


def _summary(source_name: str, network: str, head: _Head, moves, sizes) -> str:
    """A comment for the top of the new file: what was converted into what."""
    renamed = {m.old: m.new for m in moves}
    parts = []
    for d in head.dense:
        new = next((renamed[m.old] for m in moves if m.dense is d), "?").rsplit(".", 1)[0]
        parts.append(f"{d.label} -> {new} (kernel {'x'.join(map(str, d.kernel))})")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", source_name)
    lines = [f"# Network {network} of {name}, converted by `convdsl convert --fc-to-conv`:",
             "#   " + ", ".join(parts) + "."]
    if sizes:
        lines.append(f"#   Input sizes {', '.join(sizes)} are given at run time: on a larger input the "
                     "output is a map of scores.")
    return "\n".join(lines) + "\n"


def _weight_moves(old: Graph, new: Graph, head: _Head) -> tuple[WeightMove, ...]:
    """Pair the nodes of both graphs (the same order, less the removed flattens) and so their
    parameters and buffers."""
    kept = [n for n in old.nodes if n.id not in head.removed]
    if len(kept) != len(new.nodes):
        raise ConvDSLError(new.span, "internal error: the converted network has a different number of "
                                     "layers")  # pragma: no cover
    dense = {d.node: d for d in head.dense}
    layer_map: dict[str, tuple[str, ConvertedDense | None]] = {}
    for a, b in zip(kept, new.nodes):
        want = lookup(a.op).map_form if a.id in dense else a.op
        if b.op != want:
            raise ConvDSLError(b.span, f"internal error: {a.label} ({a.op}) pairs with {b.label} ({b.op})")
        layer_map.setdefault(a.layer, (b.layer, dense.get(a.id)))
    moves = []
    new_params = {f"{layer.name}.{p.name}": p for layer in new.layers for p in layer.params}
    for layer in old.layers:
        target, d = layer_map[layer.name]
        for p in layer.params:
            name = f"{target}.{p.name}"
            moves.append(WeightMove(f"{layer.name}.{p.name}", name, tuple(p.shape), tuple(new_params[name].shape),
                                    d if p.name == "weight" else None))
    new_buffers = {b.full_name: b for b in buffer_layout(new)}
    for b in buffer_layout(old):
        target, _ = layer_map[b.layer]
        name = f"{target}.{b.spec.name}"
        moves.append(WeightMove(b.full_name, name, tuple(b.spec.shape), tuple(new_buffers[name].spec.shape), None))
    return tuple(moves)


def convert_file(path, out_path, *, network: str | None = None, weights=None, weights_out=None) -> Conversion:
    """Write the converted network to `out_path` and, given a weight file, the converted weights
    to `weights_out` (default: `out_path` with the suffix .npz)."""
    out_path = Path(out_path)
    conversion = fc_to_conv(path, network, out_path)
    converted_weights = None
    if weights is not None:
        try:
            with np.load(os.fspath(weights), allow_pickle=False) as data:
                stored = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise ConvDSLError(None, f"cannot read the weights {weights}: {e}") from None
        converted_weights = conversion.convert_weights(stored)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(conversion.text, encoding="utf-8")
    if converted_weights is not None:
        target = Path(weights_out) if weights_out is not None else out_path.with_suffix(".npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:          # a file object: numpy adds no suffix of its own
            np.savez(f, **converted_weights)
    return conversion
