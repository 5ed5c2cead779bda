"""Lowered program → C source, header and cffi declarations, through one Jinja environment (StrictUndefined).

This module prepares plain values for the templates — names, offsets, C expressions for
sizes — and never writes C itself: every line of C lives in templates/.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from .. import resources
from ..errors import ConvDSLError
from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import TensorType
from ..lower.program import PER_SAMPLE_REGIONS, THREAD_WORKSPACE, WORKSPACE, Boundary, Program
from ..ops.base import lookup
from ..ops.losses import LOSSES
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


# Modules that a generated `build/<name>.py` must not hide: convdsl itself, what it needs at
# run time (with their own dependencies), and what its tests and examples import. The standard
# library comes from sys.stdlib_module_names. A fixed list, not "whatever is importable here",
# so that a file compiles or not the same way on every machine.
DEPENDENCY_MODULES = frozenset({
    "convdsl", "numpy", "cffi", "_cffi_backend", "pycparser", "lark", "jinja2", "markupsafe",
    "setuptools", "pkg_resources", "_distutils_hack", "pip",
    "torch", "pytest", "_pytest", "hypothesis", "jsonschema", "sklearn", "scipy",
})


def _hidden_module(module: str) -> str | None:
    """What importing `module` from the build folder would hide, said for a message; None if nothing."""
    if module == "convdsl":
        return "`convdsl` itself, which the generated module imports"
    if module in sys.stdlib_module_names or module == "__main__":
        return f"the standard library's `{module}`"
    if module in DEPENDENCY_MODULES:
        return f"`{module}`, which convdsl or its users import"
    return None


def check_module_names(networks) -> None:
    """Every network of a file must become a module of its own that imports as itself: not one
    that hides another module (`network os` would make `import os` load the network), and not
    one that two networks share (`Net` and `NET` would both write `net.py`).
    `networks` are the file's ast.Network items; errors point at the name."""
    seen: dict[str, object] = {}
    for net in networks:
        module = net.name.lower()
        hidden = _hidden_module(module)
        if hidden is not None:
            raise ConvDSLError(net.span, f"network `{net.name}` would be a Python module named `{module}`, "
                                         f"which would hide {hidden}; rename the network, e.g. `{net.name}Net`")
        if module in seen:
            first = seen[module]
            raise ConvDSLError(net.span, f"networks `{first.name}` (line {first.span.line}) and `{net.name}` "
                                         f"would both be the Python module `{module}` (module names are the "
                                         f"network names lower-cased); rename one, e.g. `{net.name}2`")
        seen[module] = net


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


INT64_MAX = 2 ** 63 - 1
INT32_MAX = 2 ** 31 - 1


def c_int(n: int) -> str:
    """An integer as C: a plain literal within int range, `INT64_C(n)` beyond it, so that every
    size reads as 64-bit in any expression; past int64 it cannot be written at all (gcc once
    said "integer constant is too large" and wrapped it, and no one saw the warning)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConvDSLError(None, f"internal error: {n!r} is not an integer for generated code")
    if not -INT64_MAX <= n <= INT64_MAX:
        raise ConvDSLError(None, f"the number {n} is too large for the generated code: sizes, counts and "
                                 f"offsets must stay below 2^63")
    return str(n) if -INT32_MAX <= n <= INT32_MAX else f"INT64_C({n})"


def _finalize(value):
    """Every `{{ … }}` of a template goes through here: integers only as c_int writes them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return c_int(value)
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources.templates_dir())),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=False, lstrip_blocks=False, autoescape=False, finalize=_finalize)
    env.filters["ident"] = checked_identifier
    env.filters["c_int"] = c_int
    return env


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


class DimRenderer:
    """Renders dims to C: ints as literals, run-time expressions as slots filled by prepare.

    prepare computes every slot with each + and * checked for int64 overflow (checked_c), so a
    kernel only ever sees sizes that are exact. Every tensor's element count is itself a slot
    (or a literal), and prepare keeps the arena — each count times the batch, added up — below
    both 2^63 bytes and the memory limit, so every index a kernel forms from these sizes (a
    product of extents of one tensor) fits int64. Products across tensors, such as a layer's
    multiply-adds, are estimated in double in the templates."""

    def __init__(self, sym_dims: tuple[str, ...]):
        self.sym_index = {name: i for i, name in enumerate(sym_dims)}
        self.slots: dict[Dim, int] = {}

    def __call__(self, d: Dim) -> str:
        if isinstance(d, int):
            return c_int(d)
        if d not in self.slots:
            self.slots[d] = len(self.slots)
        return f"m->dim[{self.slots[d]}]"

    def slot_exprs(self):
        return [{"index": i, "expr": checked_c(d, lambda n: f"m->sym[{self.sym_index[n]}]"), "text": D.to_text(d)}
                for d, i in self.slots.items()]


def checked_c(d: Dim, var) -> str:
    """A run-time size as C in which every sum and product goes through cdsl_add / cdsl_mul, which
    set `overflow` instead of wrapping (prepare refuses the sizes then). `var(name)` renders a
    run-time size."""
    if isinstance(d, int):
        return c_int(d)
    total = None
    for atom, coeff in d.terms:
        term = _checked_atom(atom, var)
        if total is not None and coeff < 0:          # written as a subtraction, as a person would
            magnitude = term if coeff == -1 else f"cdsl_mul(&overflow, {c_int(-coeff)}, {term})"
            total = f"cdsl_sub(&overflow, {total}, {magnitude})"
            continue
        if coeff != 1:
            term = f"cdsl_mul(&overflow, {c_int(coeff)}, {term})"
        total = term if total is None else f"cdsl_add(&overflow, {total}, {term})"
    if d.const > 0:
        return f"cdsl_add(&overflow, {total}, {c_int(d.const)})"
    if d.const < 0:
        return f"cdsl_sub(&overflow, {total}, {c_int(-d.const)})"
    return total


def _checked_atom(atom: D.Atom, var) -> str:
    if atom.kind == "var":
        return var(atom.name)
    if atom.kind == "floordiv":
        inner, k = atom.args
        return f"cdsl_floordiv({checked_c(inner, var)}, {c_int(k)})"
    if atom.kind == "max":
        a, b = atom.args
        return f"cdsl_max({checked_c(a, var)}, {checked_c(b, var)})"
    factors = [_checked_atom(f, var) for f in atom.args]            # mul: a product of atoms
    product = factors[0]
    for f in factors[1:]:
        product = f"cdsl_mul(&overflow, {product}, {f})"
    return product


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
    variant: str = "default"                      # the kernel variant the plan chose
    fused: bool = False                           # an activation whose forward runs in its producer's kernel
    epilogue: dict | None = None                  # the activation this node's kernel applies as it writes


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


def _check_sizes_fit(pg: Program) -> None:
    """Every size the C holds as a number must fit int64: per-sample element counts (prepare then
    multiplies them by the batch with overflow checks) and the parameter block; said at the layer."""
    for v in pg.values:
        try:
            checked_c(D.product(v.type.shape), lambda name: name)
        except ConvDSLError:
            what = "this input" if v.producer_label is None else f"the output of {v.producer_label}"
            raise ConvDSLError(v.span, f"{what} would have {D.to_text(D.product(v.type.shape))} elements per sample, "
                                       f"more than 64-bit sizes can count (2^63)") from None
    for slot in pg.params:
        if slot.offset + slot.size > INT64_MAX:
            raise ConvDSLError(slot.layer.span, f"the parameters up to `{slot.full_name}` would have "
                                                f"{slot.offset + slot.size} elements, more than 64-bit sizes can count")


def render_c(program: Program, backend: Backend = C) -> CSource:
    """The C of a lowered program; reads the program only, never the graph or the plan."""
    pg = program
    backend.check_program(pg)
    _check_sizes_fit(pg)
    prefix = module_name(pg.name)
    dtype = pg.dtype
    c = DimRenderer(pg.sym_dims)
    env = environment()
    real = lambda v: _c_float(v, dtype)  # noqa: E731

    def view(vid: int) -> TensorView:
        t = pg.values[vid].type
        return TensorView(f"m->value[{vid}]", f"m->value_grad[{vid}]", c(t.channels), c(D.product(t.shape)))

    saved_steps = [s for s in pg.forward if s.saved is not None]
    saved_index = {s.node: k for k, s in enumerate(saved_steps)}
    backward_of = {s.node: s for s in pg.backward}
    forward_of = {s.node: s for s in pg.forward}
    # Every node has kernels: its forward step, or (an activation fused into its producer's
    # kernel) its backward step only.
    kernel_steps = sorted((forward_of.get(n, b) for n, b in backward_of.items()), key=lambda s: s.node)
    nodes, helpers, guards = [], [], []
    for step in kernel_steps:
        op = lookup(step.op)
        for h in op.c_helpers:
            if h not in helpers:
                helpers.append(h)
        slots = pg.layer_params(step.layer)
        params = {}
        for operand in step.params:
            slot = slots[operand.role]
            params[operand.role] = ParamView(f"(m->params + {operand.offset})",
                                             f"(m->grads + {operand.offset})" if operand.trainable else None,
                                             operand.trainable, operand.size, slot.spec.shape)
        buffers = {b.role: BufferView(f"(m->buffers + {b.offset})", b.size) for b in step.buffers}
        fn = layer_function(step.node, step.label)
        label = checked_identifier(step.label, dotted=True)
        own_output = backward_of[step.node].inputs[0].value        # dy: the gradient of what the node computes
        written = step.outputs[0].value if step.phase == "forward" else own_output
        y = view(own_output)
        y = TensorView(f"m->value[{written}]", y.grad, y.C, y.numel)
        epilogue = None
        if step.activation_node is not None:
            act_step = backward_of[step.activation_node]
            epilogue = {"op": act_step.op, "attrs": act_step.attrs, "label": act_step.label}
        nodes.append(NodeView(
            fn=fn, label=label, line=step.line, op=step.op,
            describe=step.describe, template=backend.kernel_template(step.variant_template),
            x=[view(x.value) for x in step.inputs] if step.phase == "forward" else
              [view(v) for v in _fused_inputs(step)], y=y, p=params, attrs=step.attrs,
            k=op.kernel_context(step.attrs, step.in_types, step.out_type, c), real=real, b=buffers,
            saved=f"m->saved[{saved_index[step.node]}]" if step.node in saved_index else None,
            variant=step.variant, fused=step.fused_into is not None, epilogue=epilogue))
        for cond, message in op.training_guards(step.attrs, step.in_types, step.out_type, c):
            guards.append({"cond": cond, "message": f"{step.op} {label} (line {step.line}) {message}"})

    def boundary(b: Boundary, index: int):
        t = b.type
        transpose = pg.layout == "NHWC" and t.rank > 1 and D.product(t.spatial) != 1
        dims = list(t.shape)
        if pg.layout == "NHWC" and t.rank > 1:
            dims = dims[1:] + dims[:1]
        return {"index": index, "name": checked_identifier(b.name), "value": b.value, "transpose": transpose,
                "C": c(t.channels), "S": c(D.product(t.spatial)), "numel": c(D.product(t.shape)),
                "layout_dims": [c(d) for d in dims], "dims_text": ", ".join(D.to_text(d) for d in dims)}

    inputs = [boundary(b, k) for k, b in enumerate(pg.inputs)]
    outputs = [boundary(b, k) for k, b in enumerate(pg.outputs)]

    consts, params = [], []
    for idx, slot in enumerate(pg.params):
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
    if pg.loss is not None:
        ldef = LOSSES[pg.loss.kind]
        t = pg.loss.type
        loss = {"kind": ldef.name, "template": backend.loss_template(ldef), "value": pg.loss.value,
                "line": pg.loss.line, "output_name": checked_identifier(pg.loss.output_name),
                "y": view(pg.loss.value), "k": ldef.kernel_context(t, c),
                "transpose_target": ldef.target_kind == "values" and pg.layout == "NHWC" and t.rank > 1
                and D.product(t.spatial) != 1,
                "target_doc": _target_doc(ldef, t, pg.layout)}

    values = [{"index": v.id, "numel": c(D.product(v.type.shape)), "offset": c(pg.activations[v.id].offset),
               "grad_offset": c(pg.gradients[v.id].offset), "eval_offset": c(pg.inference[v.id].offset)}
              for v in pg.values]
    # Values whose size depends on run-time sizes must not come out empty.
    size_checks = []
    for v in pg.values:
        for d in v.type.shape:
            if not isinstance(d, int):
                size_checks.append({"expr": c(d), "message": f"the input is too small: the output of {v.maker} "
                                                              f"would be empty ({D.to_text(d)} < 1)"})
    saved = [{"index": k, "numel": c(s.saved.size), "offset": c(s.saved.offset), "node": s.label}
             for k, s in enumerate(saved_steps)]
    regions = {r.name: c(r.size) for r in pg.regions if r.name in PER_SAMPLE_REGIONS + (WORKSPACE, THREAD_WORKSPACE)}
    # The backward in program order, each step with the gradients it is the first to touch (zeroed
    # just before it: gradients share memory by lifetime), and those zeroed as a backward starts.
    backward = [{"fn": layer_function(s.node, s.label), "label": checked_identifier(s.label, dotted=True),
                 "zero": [{"index": o.value, "numel": c(o.size)} for o in s.zero_first]} for s in pg.backward]
    zero_at_start = [{"index": o.value, "numel": c(o.size)} for o in pg.zero_at_start]
    buffer_table = [{"name": checked_identifier(b.full_name, dotted=True), "offset": b.offset, "size": b.size,
                     "shape": b.spec.shape, "fill": real(b.spec.fill)} for b in pg.buffers]
    # The slot table is complete only once everything above has been rendered.
    context = {
        "prefix": prefix, "net": pg, "source_name": comment_safe(Path(pg.source_path).name), "ctype": C_TYPES[dtype],
        "model_t": "model_t", "math": MATH[dtype], "sym_dims": [checked_identifier(s) for s in pg.sym_dims],
        "nodes": nodes, "helpers": helpers, "values": values, "inputs": inputs, "outputs": outputs,
        "params": params, "param_total": pg.param_total, "consts": consts, "loss": loss,
        "size_checks": size_checks, "regions": regions, "backward": backward, "zero_at_start": zero_at_start,
        "buffers": buffer_table, "buffer_total": pg.buffer_total, "saved": saved, "training_guards": guards,
    }
    try:
        body = env.get_template(backend.module_template()).render(dims=c.slot_exprs(), **context)
        header = env.get_template(backend.header_template()).render(for_cffi=False, **context)
        cdef = env.get_template(backend.header_template()).render(for_cffi=True, **context)
    except jinja2.TemplateError as e:
        raise ConvDSLError(None, f"internal error while generating C: {type(e).__name__}: {e}") from None
    return CSource(prefix, body, header, cdef)


def _fused_inputs(step) -> list[int]:
    """The input values of a fused activation, from its backward step (which reads dy and y only):
    the values it writes the gradients of."""
    return [o.value for o in step.outputs if o.region == "gradients"]


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
