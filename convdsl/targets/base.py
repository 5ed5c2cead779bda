"""The base of every backend target: how a lowered program becomes source text.

In the manner of tinygrad's `CStyleLanguage`: this class knows how to walk a lowered program
(convdsl/lower/program.py) — which kernels exist, the plain arguments each one takes, where
each argument lives on the host, the sizes known only at run time, the parameter and buffer
tables — and hands the templates plain values. A subclass (targets/c.py) says only what
differs between targets: scalar types and math function names, how a number and a run-time
size are written, how a checked size is computed, and where its templates live; its templates
say how a buffer is referenced, how a kernel is declared, launched and parallelised, and the
host glue (module and header).

It reads the program and nothing else: never the graph or the plan.

A kernel's arguments are its step's operands, named by their roles in the program (x0, y, dy,
dx0, weight, dweight, running_mean, saved …), plus the batch, the run-time sizes (`dim`) when
the network has any, its workspaces, and the model state its op declares (`OpDef.kernel_state`).
The same list is the kernel's signature and, resolved on the host, its launch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import jinja2

from .. import resources
from ..errors import ConvDSLError
from ..ir import dims as D
from ..ir.dims import Dim
from ..lower.program import (ACTIVATION, ACTIVATIONS, BATCHED_DERIVED, BATCHED_WORKSPACE, DERIVED, PER_SAMPLE_REGIONS,
                             THREAD_WORKSPACE, WORKSPACE, Boundary, Operand, ParallelSplit, Program, Step)
from ..ops.base import lookup
from ..ops.losses import LABELS, LOSSES, PROBABILITIES

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

INT64_MAX = 2 ** 63 - 1


def checked_identifier(name: str, dotted: bool = False) -> str:
    """Names from the .cnn file reach generated code only through here: identifiers, nothing else."""
    if not (_DOTTED if dotted else _IDENT).match(name):
        raise ConvDSLError(None, f"internal error: `{name!r}` is not a valid identifier for generated code")
    return name


_CALL_TEXT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\([A-Za-z0-9_.,=\[\] +-]*\)$")


def checked_call_text(text: str) -> str:
    """A loss written as a call (`dice(y, eps=0.5)`) for a generated comment: names, numbers and
    list brackets only, so that it can close no comment."""
    if not _CALL_TEXT.match(text):
        raise ConvDSLError(None, f"internal error: `{text!r}` is not a call the generated code may show")
    return text


def comment_safe(text: str) -> str:
    """A file name shown in a generated comment or docstring: anything but a plain name
    character becomes `_`, so no name can close the comment (`*/`) or the docstring."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:120]


def module_name(network: str) -> str:
    """The generated module's name: the network name, lower-cased (a validated identifier)."""
    return checked_identifier(network.lower())


def layer_function(node_id: int, label: str) -> str:
    """The stem of one layer's kernels: `cdsl_L3_inception1_conv3` (+ `_forward`, …); why no two
    names of the generated code can be equal is said in codegen/render.py."""
    return f"cdsl_L{node_id}_" + checked_identifier(label, dotted=True).replace(".", "_")


@dataclass(frozen=True)
class KernelLibrary:
    """The C that networks share instead of each compiling it (templates/c/kernels.c.j2): the
    out-of-line halves of the kernel helpers, one source per element type. `name` is its file
    stem (cdsl_kernels_f32), `tag` what its function names carry (element type and hash)."""
    name: str
    tag: str
    c: str


@dataclass(frozen=True)
class Rendered:
    """What a target makes of a program: the module's source, its header and the cffi
    declarations, and the kernel library it calls (None when it calls none)."""
    prefix: str
    c: str
    h: str
    cdef: str
    kernels: KernelLibrary | None = None


class SizeSlots:
    """Sizes known only at run time, each computed once by the module's prepare into a slot that
    kernels and host code read; a size known now is a literal.

    prepare computes every slot with each + and * checked for int64 overflow (Target.checked_size),
    so a kernel only ever sees sizes that are exact. Every tensor's element count is itself a slot
    (or a literal), and prepare keeps the arena — each count times the batch, added up — below
    both 2^63 bytes and the memory limit, so every index a kernel forms from these sizes (a
    product of extents of one tensor) fits int64. Products across tensors, such as a layer's
    multiply-adds, are estimated in double in the templates."""

    def __init__(self, target: "Target", sym_dims: tuple[str, ...]):
        self.target = target
        self.sym_index = {name: i for i, name in enumerate(sym_dims)}
        self.slots: dict[Dim, int] = {}

    def _slot(self, d: Dim) -> int:
        if d not in self.slots:
            self.slots[d] = len(self.slots)
        return self.slots[d]

    def kernel(self, d: Dim) -> str:
        """A size as a kernel reads it (from its `dim` argument)."""
        return self.target.int_literal(d) if isinstance(d, int) else self.target.size_slot(self._slot(d), on_host=False)

    __call__ = kernel

    def host(self, d: Dim) -> str:
        """A size as the host code reads it (from the model)."""
        return self.target.int_literal(d) if isinstance(d, int) else self.target.size_slot(self._slot(d), on_host=True)

    def slot_exprs(self) -> list[dict]:
        t = self.target
        return [{"index": i, "expr": t.checked_size(d, lambda n: t.run_time_size(self.sym_index[n])),
                 "text": D.to_text(d)} for d, i in self.slots.items()]


@dataclass
class TensorView:
    data: str            # kernel argument holding the tensor
    grad: str            # kernel argument holding its gradient
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


@dataclass(frozen=True)
class KernelArg:
    """One plain argument of a kernel: its name inside the kernel, what it is (the target's
    templates give each kind its type), and where the host finds it (`source`: a region and,
    for an operand, its value or offset)."""
    name: str
    kind: str            # count | sizes | input | output | flag | stream | threads
    source: dict


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
    saved: str | None = None                      # argument: per-batch memory kept from forward to backward
    variant: str = "default"                      # the kernel variant the plan chose
    fused: bool = False                           # an activation whose forward runs in its producer's kernel
    epilogue: dict | None = None                  # the activation this node's kernel applies as it writes
    forward_args: list = field(default_factory=list)    # KernelArgs of its forward kernel (none when fused)
    backward_args: list = field(default_factory=list)   # KernelArgs of its backward kernel
    size_args: list = field(default_factory=list)       # batch (and dim): what a helper of the kernel needs
    work: str | None = None                       # argument: the shared workspace, when the step has one
    derived: str | None = None                    # argument: the step's memory kept across calls (Step.derived)
    thread_work: str | None = None                # argument: per-thread workspaces (with work_threads)
    # How the step's loops are split: axis and thresholds (its own loops and the im2col helpers',
    # the GEMM's, the batch loop's) and a device kernel's work-group tile per product (name →
    # WorkGroupTile), all from the lowered program's ParallelSplit.
    split: dict = field(default_factory=dict)
    # The gradients its backward is the first to touch, zeroed just before it (gradients share
    # memory by lifetime in training): value index and elements per sample.
    zero_first: list = field(default_factory=list)
    # Its backward writes its first input's gradient instead of adding into it (Step.writes_first).
    dx_written: bool = False
    # Its backward writes its parameters' gradients whole at their first contribution, instead
    # of adding into zeroed memory (Step.writes_param_grads).
    dw_written: bool = False
    # Eval mode's schedule (Program.eval_forward): a twin of a producer's kernel with the
    # batchnorms folded into its epilogue renders its forward only (`fn` ends in `_eval`); a
    # folded batchnorm's node renders a `fold` kernel too, with these arguments.
    forward_only: bool = False
    fold_args: list = field(default_factory=list)
    # The step's `batched` alternative (Step.batched): its own kernels (`fn` ends in `_batched`),
    # which the passes call instead of this node's on a batch of at least `min_batch` samples;
    # `alternative` marks such a view, which the passes never call on its own.
    batched: "NodeView | None" = None
    min_batch: int = 0
    alternative: bool = False


# How a kernel reads the model state an op declares (OpDef.kernel_state), per phase.
_STATE_ARGS = {
    "mode": {"forward": KernelArg("training", "flag", {"region": "mode"}),
             "backward": KernelArg("training", "flag", {"region": "forward_mode"})},
    "random": {"forward": KernelArg("rng", "stream", {"region": "random"})},
}


class _Environment(jinja2.Environment):
    """Jinja's environment, reading `{{ d.key }}` of a plain dict (or of a read-only view of one)
    as the item at once. Jinja asks for an attribute first, which on a dict fails by raising an
    AttributeError before it looks up the item; the templates read tens of thousands of such
    fields in a large network (each kernel argument's source, each op's kernel context), and
    those exceptions were a sizeable part of a render. The result is the same: a name the type
    has as an attribute (`d.get`, `d.items`) is still that attribute."""

    _TYPE_ATTRIBUTES = {dict: frozenset(dir(dict)), MappingProxyType: frozenset(dir(MappingProxyType))}

    def getattr(self, obj, attribute):
        own = self._TYPE_ATTRIBUTES.get(type(obj))
        if own is None or attribute in own:
            try:                                    # jinja2.Environment.getattr, inline
                return getattr(obj, attribute)
            except AttributeError:
                pass
        try:
            return obj[attribute]
        except (TypeError, LookupError, AttributeError):
            return self.undefined(obj=obj, name=attribute)


class Target:
    """A backend target. Subclasses override the hooks in the first section; everything after
    it is shared."""

    name = ""
    template_dir = ""        # folder under templates/
    kernel_ext = ""          # ops/<kind>.<ext>.j2
    # Whether its module poisons the gaps of a guarded layout (Region.guards) in a sanitizer
    # build: only memory the sanitized host code's kernels touch can be watched that way.
    poisons_guard_zones = False
    # Kernel variants this target has no kernels of its own for: the plan chooses among the others
    # (an `algo=` naming one gives way to the cheapest of the rest).
    lacks_variants: frozenset = frozenset()
    # Whether its templates run eval mode's own schedule (Program.eval_forward: batchnorms folded
    # into their producers' epilogues, after a fold kernel each).
    runs_eval_schedule = False
    # Whether its module runs a step's `batched` alternative on a batch of at least its min_batch
    # samples (Step.batched: the plan makes them from Variant.batch_costs of this backend).
    runs_batched_alternatives = False

    # ---- what differs between targets ---------------------------------------------------

    def scalar_type(self, dtype: str) -> str:
        """The element type of a network of `dtype` (f32, f64)."""
        raise NotImplementedError

    def math_functions(self, dtype: str) -> dict[str, str]:
        """exp, tanh, sqrt, log, fabs, erf → the target's names for `dtype`."""
        raise NotImplementedError

    def int_literal(self, n: int) -> str:
        raise NotImplementedError

    def float_literal(self, value: float, dtype: str) -> str:
        raise NotImplementedError

    def size_slot(self, index: int, on_host: bool) -> str:
        """Run-time size slot `index`, as the host reads it or as a kernel reads it."""
        raise NotImplementedError

    def run_time_size(self, index: int) -> str:
        """The network's run-time size `index` (as given to prepare), on the host."""
        raise NotImplementedError

    # A size computed on the host with every step checked for overflow (Target.checked_size).
    def checked_add(self, a: str, b: str) -> str:
        raise NotImplementedError

    def checked_sub(self, a: str, b: str) -> str:
        raise NotImplementedError

    def checked_mul(self, a: str, b: str) -> str:
        raise NotImplementedError

    def floordiv(self, a: str, k: str) -> str:
        raise NotImplementedError

    def maximum(self, a: str, b: str) -> str:
        raise NotImplementedError

    # ---- templates --------------------------------------------------------------------------

    def op_template(self, op) -> str:
        return self.kernel_template(op.template or op.name)

    def kernel_template(self, stem: str) -> str:
        """The template of a kernel variant (`conv`, `conv_direct`) on this target."""
        return f"{self.template_dir}/ops/{stem}.{self.kernel_ext}.j2"

    def loss_template(self, loss) -> str:
        return f"{self.template_dir}/losses/{loss.name}.{self.kernel_ext}.j2"

    def module_template(self) -> str:
        return f"{self.template_dir}/module.{self.kernel_ext}.j2"

    def header_template(self) -> str:
        return f"{self.template_dir}/header.h.j2"

    def has_template(self, name: str) -> bool:
        return (resources.templates_dir() / name).is_file()

    def check_supported(self, graph) -> None:
        """An op kind without a template in this target's folder is unsupported here; said at
        check time, at the op's line (from the checked graph, before anything is lowered)."""
        for node in graph.nodes:
            if not self.has_template(self.op_template(lookup(node.op))):
                raise ConvDSLError(node.span, f"`{node.op}` is not supported by the {self.name} backend")
        if graph.loss is not None and not self.has_template(self.loss_template(LOSSES[graph.loss.kind])):
            raise ConvDSLError(graph.loss.span, f"loss `{graph.loss.kind}` is not supported by the {self.name} backend")

    def check_program(self, program: Program) -> None:
        """Every step's variant has its template here (the plan may pick one another target lacks)."""
        for step in program.forward:
            if step.batched is not None and not self.runs_batched_alternatives:
                raise ConvDSLError(None, f"internal error: {step.op} {step.label} (line {step.line}) has a batched "
                                         f"alternative, which the {self.name} target does not run")
            for s in (step, step.batched) if step.batched is not None else (step,):
                if not self.has_template(self.kernel_template(s.variant_template)):
                    raise ConvDSLError(None, f"{s.op} {s.label} (line {s.line}): kernel variant "
                                             f"`{s.variant}` is not supported by the {self.name} backend")

    # Helpers (templates/<target>/lib/<h>.h.j2) whose out-of-line half (<h>.c.j2) is compiled
    # once, as the target's kernel library, instead of into every network; in this order.
    kernel_library_parts: tuple[str, ...] = ()

    def kernel_library(self, dtype: str) -> KernelLibrary | None:
        """The kernel library networks of `dtype` link; None: this target compiles everything
        into each network."""
        return None

    _env: jinja2.Environment | None = None

    def environment(self) -> jinja2.Environment:
        """One Jinja environment per target (StrictUndefined); every `{{ … }}` integer is
        written as the target writes integers."""
        if self._env is None:
            def finalize(value):
                if type(value) is str:              # most of what is written: no int to check
                    return value
                if isinstance(value, int) and not isinstance(value, bool):
                    return self.int_literal(value)
                return value
            env = _Environment(loader=jinja2.FileSystemLoader(str(resources.templates_dir())),
                               undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                               trim_blocks=False, lstrip_blocks=False, autoescape=False, finalize=finalize)
            env.filters["ident"] = checked_identifier
            env.filters["c_int"] = self.int_literal
            self._env = env
        return self._env

    # ---- shared: sizes ----------------------------------------------------------------------

    def checked_size(self, d: Dim, var: Callable[[str], str]) -> str:
        """A run-time size in which every sum and product goes through the target's checked
        operations, which report overflow instead of wrapping (prepare refuses the sizes then).
        `var(name)` renders a run-time size. A visitor over the Dim's terms and atoms."""
        if isinstance(d, int):
            return self.int_literal(d)
        total = None
        for atom, coeff in d.terms:
            term = self._checked_atom(atom, var)
            if total is not None and coeff < 0:          # written as a subtraction, as a person would
                magnitude = term if coeff == -1 else self.checked_mul(self.int_literal(-coeff), term)
                total = self.checked_sub(total, magnitude)
                continue
            if coeff != 1:
                term = self.checked_mul(self.int_literal(coeff), term)
            total = term if total is None else self.checked_add(total, term)
        if d.const > 0:
            return self.checked_add(total, self.int_literal(d.const))
        if d.const < 0:
            return self.checked_sub(total, self.int_literal(-d.const))
        return total

    def _checked_atom(self, atom: D.Atom, var) -> str:
        if atom.kind == "var":
            return var(atom.name)
        if atom.kind == "floordiv":
            inner, k = atom.args
            return self.floordiv(self.checked_size(inner, var), self.int_literal(k))
        if atom.kind == "max":
            a, b = atom.args
            return self.maximum(self.checked_size(a, var), self.checked_size(b, var))
        factors = [self._checked_atom(f, var) for f in atom.args]            # mul: a product of atoms
        product = factors[0]
        for f in factors[1:]:
            product = self.checked_mul(product, f)
        return product

    def check_sizes_fit(self, pg: Program) -> None:
        """Every size the module holds as a number must fit int64: per-sample element counts
        (prepare then multiplies them by the batch with overflow checks) and the parameter block;
        said at the layer."""
        for v in pg.values:
            try:
                self.checked_size(D.product(v.type.shape), lambda name: name)
            except ConvDSLError:
                what = "this input" if v.producer_label is None else f"the output of {v.producer_label}"
                raise ConvDSLError(v.span, f"{what} would have {D.to_text(D.product(v.type.shape))} elements per "
                                           f"sample, more than 64-bit sizes can count (2^63)") from None
        for slot in pg.params:
            if slot.offset + slot.size > INT64_MAX:
                raise ConvDSLError(slot.layer.span, f"the parameters up to `{slot.full_name}` would have "
                                                    f"{slot.offset + slot.size} elements, more than 64-bit sizes can count")

    # ---- shared: kernel arguments -----------------------------------------------------------

    @staticmethod
    def _operand_source(o: Operand, saved_index: dict[int, int] | None = None, node: int | None = None) -> dict:
        source = {"region": o.region, "value": o.value, "offset": o.offset}
        if saved_index is not None:
            source["index"] = saved_index[node]
        return source

    def size_arguments(self, pg: Program) -> list[KernelArg]:
        args = [KernelArg("batch", "count", {"region": "batch"})]
        if pg.sym_dims:
            args.append(KernelArg("dim", "sizes", {"region": "sizes"}))
        return args

    def forward_arguments(self, pg: Program, step: Step, saved_index: dict[int, int]) -> list[KernelArg]:
        src = self._operand_source
        args = self.size_arguments(pg)
        args += [KernelArg(x.role, "input", src(x)) for x in step.inputs]
        args += [KernelArg(y.role, "output", src(y)) for y in step.outputs]
        args += [KernelArg(checked_identifier(p.role), "input", src(p)) for p in step.params]
        args += [KernelArg(checked_identifier(b.role), "output", src(b)) for b in step.buffers]
        if step.saved is not None:
            args.append(KernelArg("saved", "output", src(step.saved, saved_index, step.node)))
        # The epilogue's own tensors: what its stages read, and where training keeps the values
        # in between that a backward reads (eval mode passes NULL: such a value has no memory there).
        for i, stage in enumerate(step.epilogue.stages):
            if stage.operand is not None:
                args.append(KernelArg(f"epi_in{i}", "input", src(stage.operand)))
            if stage.keep_input is not None:
                args.append(KernelArg(f"epi_keep{i}", "output", {**src(stage.keep_input), "training_only": True}))
        if step.workspace.elements != 0:
            args.append(KernelArg("work", "output", {"region": WORKSPACE}))
        if step.derived is not None:
            args.append(KernelArg("derived", "output", src(step.derived)))
        args += [_STATE_ARGS[s]["forward"] for s in lookup(step.op).kernel_state if "forward" in _STATE_ARGS[s]]
        return args

    def fold_arguments(self, pg: Program, step: Step) -> list[KernelArg]:
        """A fold step's kernel (eval mode's schedule): the parameters and buffers it reads, and
        the table it writes."""
        src = self._operand_source
        args = self.size_arguments(pg)
        args += [KernelArg(checked_identifier(p.role), "input", src(p)) for p in step.params]
        args += [KernelArg(checked_identifier(b.role), "input", src(b)) for b in step.buffers]
        args.append(KernelArg("table", "output", src(step.derived)))
        return args

    def backward_arguments(self, pg: Program, step: Step, saved_index: dict[int, int]) -> list[KernelArg]:
        """What it reads — of the forward its inputs x0 … and its output y, those its op declares
        that its backward reads (`OpDef.saves_for_backward`; the others are NULL: in the training
        block their memory may hold another tensor by now) — then dy, the parameters, buffers and
        saved memory, then the gradients it adds into."""
        src = self._operand_source
        args = self.size_arguments(pg)
        dy, *read = step.inputs
        given = {o.role: o for o in read}
        for role in [f"x{i}" for i in range(len(step.in_types))] + ["y"]:
            o = given.get(role)
            args.append(KernelArg(role, "input", src(o) if o is not None else {"region": "none"}))
        args.append(KernelArg(dy.role, "input", src(dy)))
        args += [KernelArg(checked_identifier(p.role), "input", src(p)) for p in step.params]
        args += [KernelArg(checked_identifier(b.role), "input", src(b)) for b in step.buffers]
        if step.saved is not None:
            args.append(KernelArg("saved", "input", src(step.saved, saved_index, step.node)))
        args += [KernelArg(checked_identifier(o.role), "output", src(o)) for o in step.outputs]
        if step.workspace.elements != 0:
            args.append(KernelArg("work", "output", {"region": WORKSPACE}))
        if step.derived is not None:
            args.append(KernelArg("derived", "output", src(step.derived)))
        if step.workspace.per_thread != 0:
            args.append(KernelArg("thread_work", "output", {"region": THREAD_WORKSPACE}))
            args.append(KernelArg("work_threads", "threads", {"region": "threads"}))
        args += [_STATE_ARGS[s]["backward"] for s in lookup(step.op).kernel_state if "backward" in _STATE_ARGS[s]]
        return args

    # ---- shared: the whole program ----------------------------------------------------------

    def render(self, program: Program) -> Rendered:
        """The source of a lowered program; reads the program only, never the graph or the plan."""
        pg = program
        self.check_program(pg)
        self.check_sizes_fit(pg)
        prefix = module_name(pg.name)
        dtype = pg.dtype
        sizes = SizeSlots(self, pg.sym_dims)
        c, host = sizes.kernel, sizes.host
        real = lambda v: self.float_literal(v, dtype)  # noqa: E731

        if pg.eval_forward and not self.runs_eval_schedule:
            raise ConvDSLError(None, f"internal error: the {self.name} target has no kernels for eval mode's "
                                     f"folded batchnorms")
        saved_steps = [s for s in pg.forward if s.saved is not None]
        saved_index = {s.node: k for k, s in enumerate(saved_steps)}
        backward_of = {s.node: s for s in pg.backward}
        forward_of = {s.node: s for s in pg.forward}
        # Every node has kernels: its forward step, or (an activation fused into its producer's
        # kernel) its backward step only.
        kernel_steps = sorted((forward_of.get(n, b) for n, b in backward_of.items()), key=lambda s: s.node)
        nodes, helpers, guards = [], [], []

        def node_view(step: Step, fn: str, forward_only: bool = False, backward: Step | None = None) -> NodeView:
            """`backward`: the backward step of a batched alternative (default: the node's)."""
            op = lookup(step.op)
            slots = pg.layer_params(step.layer)
            params = {}
            for operand in step.params:
                role = checked_identifier(operand.role)
                params[operand.role] = ParamView(role, f"d{role}" if operand.trainable else None,
                                                 operand.trainable, operand.size, slots[operand.role].spec.shape)
            buffers = {b.role: BufferView(checked_identifier(b.role), b.size) for b in step.buffers}
            backward = backward or backward_of[step.node]
            own_output = pg.values[backward.inputs[0].value].type   # dy: the gradient of what the node computes
            x_types = step.in_types
            label = checked_identifier(step.label, dotted=True)
            # The stages fused into this kernel, in order: each reads its other tensor (a
            # residual, the factors of a scale, a folded batchnorm's table) from the argument
            # `epi_in<i>`, and writes the value a backward reads to `epi_keep<i>`, which is NULL in
            # eval mode (forward_arguments).
            epilogue = [{"kind": s.kind, "op": s.op, "attrs": s.attrs, "label": s.label, "describe": s.describe,
                         "formula": self.kernel_template(f"{lookup(s.op).template or s.op}_epilogue")
                         if s.kind == ACTIVATION else None,
                         "operand": f"epi_in{i}" if s.operand is not None else None,
                         "keep": f"epi_keep{i}" if s.keep_input is not None else None,
                         "keep_of": pg.values[s.keep_input.value].producer_label if s.keep_input is not None else None}
                        for i, s in enumerate(step.epilogue.stages)] if step.phase == "forward" else []
            return NodeView(
                fn=fn, label=label, line=step.line, op=step.op,
                describe=step.describe, template=self.kernel_template(step.variant_template),
                x=[TensorView(f"x{i}", f"dx{i}", c(t.channels), c(D.product(t.shape))) for i, t in enumerate(x_types)],
                y=TensorView("y", "dy", c(own_output.channels), c(D.product(own_output.shape))),
                p=params, attrs=step.attrs, k=op.kernel_context(step.attrs, step.in_types, step.out_type, c),
                real=real, b=buffers, saved="saved" if step.saved is not None else None,
                variant=step.variant, fused=step.fused_into is not None, epilogue=epilogue,
                forward_args=self.forward_arguments(pg, step, saved_index) if step.phase == "forward" else [],
                backward_args=[] if forward_only else self.backward_arguments(pg, backward, saved_index),
                size_args=self.size_arguments(pg),
                work="work" if step.workspace.elements != 0 else None,
                derived="derived" if step.derived is not None else None,
                thread_work="thread_work" if step.workspace.per_thread != 0 else None,
                split={"axis": step.parallel.axis, "threshold": step.parallel.threshold,
                       "gemm_threshold": step.parallel.gemm_threshold,
                       "batch_threshold": step.parallel.batch_threshold, "tiles": dict(step.parallel.tiles),
                       "dot_columns": step.parallel.dot_columns},
                zero_first=[] if forward_only else [{"index": o.value, "numel": host(o.size)}
                                                    for o in backward.zero_first],
                dx_written=not forward_only and bool(backward.writes_first),
                dw_written=not forward_only and backward.writes_param_grads,
                forward_only=forward_only, min_batch=step.min_batch, alternative=step.min_batch > 0)

        def with_batched(view: NodeView, step: Step, forward_only: bool = False) -> list[NodeView]:
            """The view, and the view of the step's batched alternative (kernels `<fn>_batched`)."""
            if step.batched is None:
                return [view]
            alt = node_view(step.batched, view.fn + "_batched", forward_only,
                            None if forward_only else backward_of[step.node].batched)
            view.batched = alt
            return [view, alt]

        for step in kernel_steps:
            op = lookup(step.op)
            for h in op.c_helpers:
                if h not in helpers:
                    helpers.append(h)
            label = checked_identifier(step.label, dotted=True)
            nodes.extend(with_batched(node_view(step, layer_function(step.node, step.label)), step))
            for g in op.training_guards(step.attrs, step.in_types, step.out_type):
                guards.append({"per_sample": host(g.per_sample), "least": g.least,
                               "message": f"{step.op} {label} (line {step.line}) {g.message}"})

        # Eval mode's schedule, where it differs from the training forward: each launch in order
        # (a fold kernel, a producer's twin, or the training forward's kernel), and the twins.
        eval_nodes, eval_launches = [], []
        if pg.eval_forward:
            view_of = {n.fn: n for n in nodes}
            for step in pg.eval_forward:
                fn = layer_function(step.node, step.label)
                where = {"label": checked_identifier(step.label, dotted=True), "line": step.line}
                trained = forward_of[step.node]
                if step.folds_into is not None:
                    args = self.fold_arguments(pg, step)
                    view_of[fn].fold_args = args
                    into = checked_identifier(forward_of[step.folds_into].label, dotted=True)
                    eval_launches.append({"fn": fn + "_fold", "args": args, **where,
                                          "doc": f"its scale and shift per channel, which {into} applies",
                                          "batched": None})
                elif step.epilogue == trained.epilogue and step.outputs == trained.outputs:
                    eval_launches.append({"fn": fn + "_forward", "args": view_of[fn].forward_args, **where, "doc": "",
                                          "batched": view_of[fn].batched})
                else:
                    twin = node_view(step, fn + "_eval", forward_only=True)
                    eval_nodes.extend(with_batched(twin, step, forward_only=True))
                    eval_launches.append({"fn": twin.fn + "_forward", "args": twin.forward_args, **where,
                                          "doc": " + ".join(f"{s['label']} (fused)" for s in twin.epilogue),
                                          "batched": twin.batched})

        def value_view(vid: int) -> TensorView:
            t = pg.values[vid].type
            return TensorView("y", "dy", host(t.channels), host(D.product(t.shape)))

        def boundary(b: Boundary, index: int):
            t = b.type
            transpose = b.transposed
            dims = list(t.shape)
            if pg.layout == "NHWC" and t.rank > 1:
                dims = dims[1:] + dims[:1]
            return {"index": index, "name": checked_identifier(b.name), "value": b.value, "transpose": transpose,
                    "eval_in_place": b.eval_in_place, "train_in_place": b.train_in_place,
                    "grad_in_place": b.grad_in_place,
                    "C": host(t.channels), "S": host(D.product(t.spatial)), "numel": host(D.product(t.shape)),
                    "layout_dims": [host(d) for d in dims], "dims_text": ", ".join(D.to_text(d) for d in dims)}

        inputs = [boundary(b, k) for k, b in enumerate(pg.inputs)]
        outputs = [boundary(b, k) for k, b in enumerate(pg.outputs)]
        # A backward copies each output's gradient over its place (no value is two outputs: the
        # front end refuses it), so that place is not zeroed first.
        output_values = {o["value"] for o in outputs}

        consts, params = [], []
        written_grads = {offset for offset, _ in pg.written_param_grads}
        for idx, slot in enumerate(pg.params):
            spec = slot.spec
            entry = {"name": checked_identifier(slot.full_name, dotted=True), "offset": slot.offset,
                     "size": slot.size, "shape": spec.shape, "trainable": spec.trainable, "init": spec.init.kind,
                     "init_text": _init_text(spec), "init_scale": repr(_init_scale(spec)), "const_name": "",
                     "grad_written": slot.offset in written_grads}
            if spec.init.kind == "const":
                cname = f"cdsl_const_{idx}"
                consts.append({"c_name": cname, "name": slot.full_name,
                               "numbers": [real(v) for v in spec.const_values]})
                entry["const_name"] = cname
            params.append(entry)

        loss = None
        if pg.loss is not None:
            ldef = LOSSES[pg.loss.kind]
            t = pg.loss.type
            y = pg.activations[pg.loss.value]
            attrs = pg.loss.attrs
            loss = {"kind": ldef.name, "template": self.loss_template(ldef), "value": pg.loss.value,
                    "line": pg.loss.line, "output_name": checked_identifier(pg.loss.output_name),
                    "call": checked_call_text(ldef.describe(pg.loss.output_name, attrs)),
                    "y": value_view(pg.loss.value), "k": ldef.kernel_context(t, attrs, c),
                    "host_k": ldef.kernel_context(t, attrs, host),
                    "scratch": host(ldef.scratch_doubles(t, attrs)) if ldef.scratch_doubles(t, attrs) != 0 else None,
                    "args": self.size_arguments(pg) + [KernelArg("y", "input", {"region": ACTIVATIONS, "value": y.value,
                                                                                "offset": y.offset})],
                    # A target shaped like the output comes in the file's layout; the kernel reads it
                    # channel-first. Labels are one per position in both layouts.
                    "transpose_target": ldef.target(attrs).kind != LABELS and pg.layout == "NHWC" and t.rank > 1
                    and D.product(t.spatial) != 1,
                    "target_doc": _target_doc(ldef, attrs, t)}

        values = [{"index": v.id, "numel": host(D.product(v.type.shape)), "offset": host(pg.activations[v.id].offset),
                   "grad_offset": host(pg.gradients[v.id].offset), "eval_offset": host(pg.inference[v.id].offset)}
                  for v in pg.values]
        # Values whose size depends on run-time sizes must not come out empty.
        size_checks = []
        for v in pg.values:
            for d in v.type.shape:
                if not isinstance(d, int):
                    size_checks.append({"expr": host(d), "message": f"the input is too small: the output of {v.maker} "
                                                                    f"would be empty ({D.to_text(d)} < 1)"})
        saved = [{"index": k, "numel": host(s.saved.size), "offset": host(s.saved.offset), "node": s.label}
                 for k, s in enumerate(saved_steps)]
        regions = {r.name: host(r.size) for r in pg.regions
                   if r.name in PER_SAMPLE_REGIONS + (WORKSPACE, THREAD_WORKSPACE, DERIVED, BATCHED_DERIVED,
                                                      BATCHED_WORKSPACE)}
        # A sanitizer build's guard zones (lower(guard=…)): per sample in the activation blocks.
        guard_zones = {r.name: [{"offset": host(o), "size": host(n)} for o, n in r.guards] for r in pg.regions}
        buffer_table = [{"name": checked_identifier(b.full_name, dotted=True), "offset": b.offset, "size": b.size,
                         "shape": b.spec.shape, "fill": real(b.spec.fill)} for b in pg.buffers]
        # The optimizer's step (lib/optimizer.c.j2): how its pass over each parameter block is
        # split across threads, as the plan set it.
        update_step = next((s for s in pg.steps if s.phase == "update"), None)
        update_split = update_step.parallel if update_step is not None else ParallelSplit("none")
        update = {"split": {"axis": update_split.axis, "threshold": update_split.threshold},
                  "line": update_step.line if update_step is not None else pg.line}
        context = {
            "update": update,
            "prefix": prefix, "net": pg, "source_name": comment_safe(Path(pg.source_path).name),
            "ctype": self.scalar_type(dtype), "math": self.math_functions(dtype),
            "sym_dims": [checked_identifier(s) for s in pg.sym_dims],
            "nodes": nodes, "eval_nodes": eval_nodes, "eval_launches": eval_launches, "helpers": helpers,
            "values": values, "inputs": inputs, "outputs": outputs,
            "params": params, "param_total": pg.param_total,
            "zeroed_param_grads": [{"offset": o, "size": n} for o, n in pg.zeroed_param_grads()],
            "every_param_grad_zeroed": not pg.written_param_grads, "consts": consts, "loss": loss,
            "size_checks": size_checks, "regions": regions, "guard_zones": guard_zones, "batched_from": pg.batched_from,
            "zero_at_start": [{"index": o.value, "numel": host(o.size), "seeded": o.value in output_values}
                              for o in pg.zero_at_start],
            "buffers": buffer_table, "buffer_total": pg.buffer_total, "saved": saved, "training_guards": guards,
        }
        kernels = self.kernel_library(dtype) if set(helpers) & set(self.kernel_library_parts) else None
        context.update(kernels=kernels, kernels_tag=kernels.tag if kernels else "",
                       kernels_name=kernels.name if kernels else "")
        env = self.environment()
        try:
            body = env.get_template(self.module_template()).render(dims=sizes.slot_exprs(), **context)
            header = env.get_template(self.header_template()).render(for_cffi=False, **context)
            cdef = env.get_template(self.header_template()).render(for_cffi=True, **context)
        except jinja2.TemplateError as e:
            raise ConvDSLError(None, f"internal error while generating {self.name}: {type(e).__name__}: {e}") from None
        return Rendered(prefix, body, header, cdef, kernels)


def _init_scale(spec) -> float:
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


def _target_doc(ldef, attrs, t) -> str:
    target = ldef.target(attrs)
    if target.kind == LABELS:
        shape = ldef.target_shape(t, attrs)
        skipped = "" if target.ignore_index is None else f", label {target.ignore_index} ignored"
        return "int64 labels [N" + "".join(f", {D.to_text(d)}" for d in shape) + "]" + skipped
    if target.kind == PROBABILITIES:
        return "an array shaped like the output, values in [0, 1]"
    return "an array shaped like the output"
