"""Plan → C source, header and cffi declarations, through one Jinja environment (StrictUndefined).

This module prepares plain values for the templates — names, offsets, C expressions for
sizes — and never writes C itself: every line of C lives in templates/.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from .. import resources
from ..errors import ConvDSLError
from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph, TensorType
from ..ops.base import lookup
from ..ops.losses import LOSSES
from ..passes.schedule import Plan
from .backends import C, Backend

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

C_TYPES = {"f32": "float", "f64": "double"}
MATH = {"f32": {"exp": "expf", "tanh": "tanhf", "sqrt": "sqrtf", "log": "logf", "fabs": "fabsf"},
        "f64": {"exp": "exp", "tanh": "tanh", "sqrt": "sqrt", "log": "log", "fabs": "fabs"}}


def checked_identifier(name: str, dotted: bool = False) -> str:
    """Names from the .cnn file reach C only through here: identifiers, nothing else."""
    if not (_DOTTED if dotted else _IDENT).match(name):
        raise ConvDSLError(None, f"internal error: `{name!r}` is not a valid identifier for generated code")
    return name


def comment_safe(text: str) -> str:
    """A file name shown in a generated comment or docstring: anything but a plain name
    character becomes `_`, so no name can close the comment (`*/`) or the docstring."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:120]


def module_name(network: str) -> str:
    """The generated module's name: the network name, lower-cased (a validated identifier)."""
    return checked_identifier(network.lower())


# Names in the generated C file, and why no two can be equal whatever the .cnn file says:
#   public API   `<prefix>_<suffix>`: the prefix is the network name lower-cased and every suffix
#                (create, loss, forward, …, real, model) is lower case, so a public name never
#                holds an upper-case letter;
#   helpers      `cdsl_<lower case>` fixed in templates/c, `real`, `model_t`: none ends in
#                `_<public suffix>` and `real` has no `_`, so none is `<prefix>_<suffix>` for any
#                prefix (tests/e2e/test_identifiers.py checks every template for both rules);
#   layers       `cdsl_L<node id>_<label>` below: the upper-case `L` keeps them apart from every
#                public name and every helper, and the id, followed by `_` and a label that cannot
#                start with a digit, keeps two layers apart; `cdsl_` keeps them off C keywords and
#                every library name (no header uses that prefix).
# Nothing else from the file becomes an identifier: value, input and parameter names reach the
# C only inside comments and string literals.
def layer_function(node_id: int, label: str) -> str:
    """The stem of one layer's kernels: `cdsl_L3_inception1_conv3` (+ `_forward`, …)."""
    return f"cdsl_L{node_id}_" + checked_identifier(label, dotted=True).replace(".", "_")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources.templates_dir())),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=False, lstrip_blocks=False, autoescape=False)
    env.filters["ident"] = checked_identifier
    return env


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


class DimRenderer:
    """Renders dims to C: ints as literals, run-time expressions as slots filled by prepare."""

    def __init__(self, sym_dims: tuple[str, ...]):
        self.sym_index = {name: i for i, name in enumerate(sym_dims)}
        self.slots: dict[Dim, int] = {}

    def __call__(self, d: Dim) -> str:
        if isinstance(d, int):
            return str(d)
        if d not in self.slots:
            self.slots[d] = len(self.slots)
        return f"m->dim[{self.slots[d]}]"

    def slot_exprs(self):
        return [{"index": i, "expr": D.to_c(d, lambda n: f"m->sym[{self.sym_index[n]}]"), "text": D.to_text(d)}
                for d, i in self.slots.items()]


@dataclass
class TensorView:
    data: str
    grad: str
    C: str
    numel: str


@dataclass
class ParamView:
    data: str
    grad: str | None
    trainable: bool
    size: int
    shape: tuple


@dataclass
class BufferView:
    data: str
    size: int


@dataclass
class NodeView:
    fn: str
    label: str
    line: int
    op: str
    describe: str
    template: str
    x: list
    y: TensorView
    p: dict
    attrs: Any
    k: dict
    real: Any = field(repr=False, default=None)
    b: dict = field(default_factory=dict)         # buffers of the layer: running_mean …
    saved: str | None = None                      # per-batch memory kept from forward to backward
    algorithm: str | None = None                  # the plan's choice for ops that have several


def _c_float(value: float, dtype: str) -> str:
    text = repr(float(value))
    if "inf" in text or "nan" in text:
        raise ConvDSLError(None, f"cannot use {value} in generated code")
    return text + ("f" if dtype == "f32" else "")


def _c_number_list(values, dtype: str) -> list[str]:
    return [_c_float(v, dtype) for v in values]


@dataclass(frozen=True)
class CSource:
    prefix: str
    c: str
    h: str
    cdef: str


def render_c(plan: Plan, backend: Backend = C) -> CSource:
    g: Graph = plan.graph
    backend.check_supported(g)
    prefix = module_name(g.name)
    dtype = g.dtype
    c = DimRenderer(g.sym_dims)
    env = environment()
    real = lambda v: _c_float(v, dtype)  # noqa: E731

    def view(vid: int) -> TensorView:
        t = g.values[vid].type
        return TensorView(f"m->value[{vid}]", f"m->value_grad[{vid}]", c(t.channels), c(D.product(t.shape)))

    saved_index = {nid: k for k, (nid, _) in enumerate(plan.saved)}
    nodes, helpers, guards = [], [], []
    for nid in plan.order:
        node = g.nodes[nid]
        op = lookup(node.op)
        for h in op.c_helpers:
            if h not in helpers:
                helpers.append(h)
        in_types = tuple(g.values[v].type for v in node.inputs)
        out_t = g.values[node.output].type
        params = {}
        for local, slot in plan.layer_params(node.layer).items():
            params[local] = ParamView(f"(m->params + {slot.offset})",
                                      f"(m->grads + {slot.offset})" if slot.spec.trainable else None,
                                      slot.spec.trainable, slot.size, slot.spec.shape)
        buffers = {local: BufferView(f"(m->buffers + {slot.offset})", slot.size)
                   for local, slot in plan.layer_buffers(node.layer).items()}
        fn = layer_function(nid, node.label)
        label = checked_identifier(node.label, dotted=True)
        nodes.append(NodeView(
            fn=fn, label=label, line=node.span.line, op=node.op,
            describe=op.describe(node.attrs), template=backend.op_template(op),
            x=[view(v) for v in node.inputs], y=view(node.output), p=params, attrs=node.attrs,
            k=op.kernel_context(node.attrs, in_types, out_t, c), real=real, b=buffers,
            saved=f"m->saved[{saved_index[nid]}]" if nid in saved_index else None,
            algorithm=plan.algorithm(nid)))
        for cond, message in op.training_guards(node.attrs, in_types, out_t, c):
            guards.append({"cond": cond, "message": f"{node.op} {label} (line {node.span.line}) {message}"})

    def boundary(vid: int, index: int, name: str):
        t = g.values[vid].type
        transpose = g.layout == "NHWC" and t.rank > 1 and D.product(t.spatial) != 1
        dims = list(t.shape)
        if g.layout == "NHWC" and t.rank > 1:
            dims = dims[1:] + dims[:1]
        return {"index": index, "name": checked_identifier(name), "value": vid, "transpose": transpose,
                "C": c(t.channels), "S": c(D.product(t.spatial)), "numel": c(D.product(t.shape)),
                "layout_dims": [c(d) for d in dims], "dims_text": ", ".join(D.to_text(d) for d in dims)}

    inputs = [boundary(i.value, k, i.name) for k, i in enumerate(g.inputs)]
    outputs = [boundary(o.value, k, o.name) for k, o in enumerate(g.outputs)]

    consts, params = [], []
    for idx, slot in enumerate(plan.params):
        spec = slot.spec
        entry = {"name": checked_identifier(slot.full_name, dotted=True), "offset": slot.offset, "size": slot.size,
                 "shape": spec.shape, "trainable": spec.trainable, "init": spec.init.kind,
                 "init_text": _init_text(spec), "init_scale": repr(_init_scale(spec)), "const_name": ""}
        if spec.init.kind == "const":
            cname = f"cdsl_const_{idx}"
            consts.append({"c_name": cname, "name": slot.full_name, "numbers": _c_number_list(spec.const_values, dtype)})
            entry["const_name"] = cname
        params.append(entry)

    loss = None
    if g.loss is not None:
        ldef = LOSSES[g.loss.kind]
        t = g.values[g.loss.value].type
        out_name = g.outputs[g.loss.output_index].name
        loss = {"kind": ldef.name, "template": backend.loss_template(ldef), "value": g.loss.value, "line": g.loss.span.line,
                "output_name": checked_identifier(out_name), "y": view(g.loss.value),
                "k": ldef.kernel_context(t, c),
                "transpose_target": ldef.target_kind == "values" and g.layout == "NHWC" and t.rank > 1
                and D.product(t.spatial) != 1,
                "target_doc": _target_doc(ldef, t, g.layout)}

    values = [{"index": v.id, "numel": c(D.product(v.type.shape))} for v in g.values]
    # Values whose size depends on run-time sizes must not come out empty.
    size_checks = []
    for v in g.values:
        for d in v.type.shape:
            if not isinstance(d, int):
                where = "an input" if v.producer is None else f"{g.nodes[v.producer].label} (line {g.nodes[v.producer].span.line})"
                size_checks.append({"expr": c(d), "message": f"the input is too small: the output of {where} "
                                                              f"would be empty ({D.to_text(d)} < 1)"})
    scratch = [c(s) for s in plan.scratch]
    saved = [{"index": k, "numel": c(n), "node": g.nodes[nid].label} for k, (nid, n) in enumerate(plan.saved)]
    buffer_table = [{"name": checked_identifier(b.full_name, dotted=True), "offset": b.offset, "size": b.size,
                     "shape": b.spec.shape, "fill": real(b.spec.fill)} for b in plan.buffers]
    # The slot table is complete only once everything above has been rendered.
    context = {
        "prefix": prefix, "net": g, "source_name": comment_safe(Path(g.source_path).name), "ctype": C_TYPES[dtype],
        "model_t": "model_t", "math": MATH[dtype], "sym_dims": [checked_identifier(s) for s in g.sym_dims],
        "nodes": nodes, "helpers": helpers, "values": values, "inputs": inputs, "outputs": outputs,
        "params": params, "param_total": plan.param_total, "consts": consts, "loss": loss,
        "size_checks": size_checks, "scratch": scratch,
        "buffers": buffer_table, "buffer_total": plan.buffer_total, "saved": saved, "training_guards": guards,
    }
    try:
        body = env.get_template(backend.module_template()).render(dims=c.slot_exprs(), **context)
        header = env.get_template(backend.header_template()).render(for_cffi=False, **context)
        cdef = env.get_template(backend.header_template()).render(for_cffi=True, **context)
    except jinja2.TemplateError as e:
        raise ConvDSLError(g.span, f"internal error while generating C: {type(e).__name__}: {e}") from None
    return CSource(prefix, body, header, cdef)


def _init_scale(spec) -> float:
    import math
    kind = spec.init.kind
    if kind == "he":
        return math.sqrt(2.0 / max(spec.fan_in, 1))
    if kind == "xavier":
        return math.sqrt(6.0 / max(spec.fan_in + spec.fan_out, 1))
    if kind in ("normal", "uniform"):
        return spec.init.arg
    return 0.0


def _init_text(spec) -> str:
    kind = spec.init.kind
    return {"he": "He: normal(0, sqrt(2 / fan_in))", "xavier": "Xavier: uniform(±sqrt(6 / (fan_in + fan_out)))",
            "normal": f"normal(0, {spec.init.arg:g})", "uniform": f"uniform(±{spec.init.arg:g})",
            "zeros": "zeros", "ones": "ones", "const": "from a const"}[kind]


def _target_doc(ldef, t: TensorType, layout: str) -> str:
    if ldef.target_kind == "labels":
        shape = ldef.target_shape(t)
        return "int64 labels [N" + "".join(f", {D.to_text(d)}" for d in shape) + "]"
    return "an array shaped like the output"
