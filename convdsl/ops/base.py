"""OpDef: everything the compiler knows about one layer kind, and the registry that collects them.

An OpDef says how its arguments are written, the shape it produces, its parameters, its
cost in MACs, its window for the receptive field, and which template holds its C. The
builder, the passes and the code generator only ever talk to ops through this interface.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from ..errors import ConvDSLError, Span, did_you_mean
from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Init, ParamSpec, TensorType
from ..limits import FLOAT_MAX, MAX_ATTRIBUTE, MAX_INIT_SCALE, power_text

REQUIRED = object()

# What a backward may read besides dy (OpDef.saves_for_backward).
INPUTS = "inputs"
OUTPUT = "output"
SAVED = "saved"

# Keyword names of PyTorch and Keras layers, with the argument names they are here (the first one
# the op has): `padding=` is answered with `pad`, `filters=` with `out`.
KEYWORD_ALIASES: dict[str, tuple[str, ...]] = {
    "filters": ("out",), "out_channels": ("out",), "units": ("out",), "out_features": ("out",),
    "kernel_size": ("kernel", "window"), "pool_size": ("window",), "strides": ("stride",),
    "padding": ("pad",), "dilation_rate": ("dilation",), "use_bias": ("bias",),
    "kernel_initializer": ("init",), "depth_multiplier": ("multiplier",), "output_padding": ("output_pad",),
    "rate": ("p",), "negative_slope": ("alpha",), "scale_factor": ("factor",), "size": ("factor",),
    "interpolation": ("mode",), "epsilon": ("eps",),
}


@dataclass(frozen=True)
class Symbol:
    """A bare name used as a value: `pad=same`, `init=he`, `mode=nearest`."""
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class SymbolCall:
    """A call used as a value: `init=normal(0.02)`."""
    name: str
    args: tuple


@dataclass(frozen=True)
class ConstTensor:
    """A `const` declared in the file: its name, shape and row-major values."""
    name: str
    shape: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class BufferSpec:
    """State a layer keeps besides its parameters (batchnorm's running statistics): saved and
    loaded with the weights, changed by forward, never by training steps."""
    name: str                        # local to its layer: running_mean …
    shape: tuple[int, ...]
    fill: float                      # every element's value in a new model


def _always(attrs) -> bool:
    return True


def _no_workspace(in_types, out, attrs) -> Dim:
    return 0


@dataclass(frozen=True)
class WorkGroupTile:
    """How a device kernel of a matrix-shaped product splits its work (the OpenCL target's
    `tiled` conv): a work-group of `local` = (columns, rows) work-items computes a tile of
    rows × columns of the product, each work-item a `block` of (rows, columns) values in
    registers (rows LY·BM, columns LX·BN), and walks the reduction in chunks of `chunk`, staging
    each chunk of both operands in local memory. The launch's local size is `local`."""
    local: tuple[int, int]           # (LX, LY): work-items along the columns, along the rows
    block: tuple[int, int]           # (BM, BN): rows and columns of each work-item's values
    chunk: int                       # reduction elements staged in local memory at a time

    @property
    def rows(self) -> int:
        return self.local[1] * self.block[0]

    @property
    def cols(self) -> int:
        return self.local[0] * self.block[1]

    def text(self) -> str:
        return (f"tiles {self.rows}×{self.cols} by {self.chunk} ({self.local[0]}×{self.local[1]} work-items, "
                f"{self.block[0]}×{self.block[1]} each)")


def _no_tiles(in_types, out, attrs) -> tuple:
    return ()


@dataclass(frozen=True)
class Variant:
    """One way to run an op's kernels. The plan picks, per layer, the applicable variant of
    lowest estimated cost; `algo=` in the file or a per-run override can name one instead.
    Rules are written on the op's normalised attributes, never on rendered code."""
    name: str                                        # im2col, pointwise, direct …
    template: str                                    # template file stem holding its kernels
    doc: str                                         # one line, for `convdsl plan` and messages
    cost: Callable[[tuple, TensorType, dict], Dim]   # estimated work in element operations, per sample
    applies: Callable[[dict], bool] = _always
    needs: str = ""                                  # what `applies` asks for, said when it refuses
    workspace: Callable[[tuple, TensorType, dict], Dim] = _no_workspace   # elements per sample
    parallel: str = "none"                           # what its kernels split across threads
    # The least work (elements, or multiply-adds where a kernel says so) for which its loops are
    # split at all; below it one thread runs them. 0: always split.
    parallel_threshold: int = 65536
    # Kernels that call the shared GEMM: the least multiply-adds of one product for which it
    # splits across threads (ParallelSplit.gemm_threshold), and the per-sample multiply-adds from
    # which a batch loop splits each sample's GEMMs rather than giving each thread whole samples
    # (ParallelSplit.batch_threshold).
    gemm_threshold: int = 65536
    batch_threshold: int = 8_000_000
    # Kernels that call the shared GEMM on a product whose columns are known only at run time
    # (dense: the batch): up to this many columns it runs as dot products of rows
    # (ParallelSplit.dot_columns, lib/gemm's cdsl_gemm_dot), which pack nothing; 0: never.
    dot_columns: int = 0
    fuses_epilogue: bool = False                     # its forward applies an epilogue as it writes
    # Elements each thread needs of its own when the kernel splits a batch across threads (conv
    # backward: its columns and its share of dW and db), planned like the shared workspace.
    thread_workspace: Callable[[tuple, TensorType, dict], Dim] = _no_workspace
    # Elements its forward keeps from one call to the next, derived from the parameters alone
    # (Winograd's transformed kernels, with the copy of the weights they were made from): the
    # kernel remakes them when the weights differ from that copy (after an update, a load, a
    # write into Model.params). Planned per step in the `derived` region, zero at create.
    derived: Callable[[tuple, TensorType, dict], int] = lambda in_types, out, attrs: 0
    # Its backward reads (and, where the weights changed, remakes) that memory too (FFT: the
    # kernels' spectra, which dX multiplies with dY's).
    derived_in_backward: bool = False
    # Its cost on a backend whose kernels for it are not the C target's (OpenCL's conv variants
    # other than `tiled` are one work-item per output value there), as (backend, cost) pairs in
    # the same units; elsewhere `cost`.
    costs_on: tuple[tuple[str, Callable[[tuple, TensorType, dict], Dim]], ...] = ()
    # The backends that have kernels for it; empty: every backend. A variant of one backend only
    # is never chosen for another, and an `algo=` naming it there gives way to the cheapest other.
    backends: tuple[str, ...] = ()
    # Where its backward writes its (first) input's gradient whole, each element once, instead
    # of adding into it: (backend, rule on the attributes) pairs, since each backend has its
    # own kernels. The plan has it write where its step is the first to touch that gradient,
    # which then is not zeroed before it (Step.writes_first).
    writes_input_grad: tuple[tuple[str, Callable[[dict], bool]], ...] = ()
    # The backends on which its backward can write its parameters' gradients (dW, db) whole at
    # their first contribution instead of adding into zeroed memory. The plan has it do so where
    # no other step touches them (a layer not shared), and the backward then zeroes only the
    # other parameters' gradients (Step.writes_param_grads): a pass over dW and the GEMM's reading
    # it back, fewer (ResNet-18 at batch 1: 45 MB of them).
    writes_param_grads: tuple[str, ...] = ()
    # Device kernels of matrix-shaped products: the work-group tile of each of its products, as
    # (product, WorkGroupTile) pairs, that the plan gives the step (ParallelSplit.tiles).
    tiles: Callable[[tuple, TensorType, dict], tuple[tuple[str, WorkGroupTile], ...]] = _no_tiles
    # False for a variant that differs from another of its op only in what the plan fuses into
    # it (batchnorm's `fusing`): `--tune` times a layer alone, with nothing after it to fuse, so
    # the two would time alike and a coin would decide the fusion.
    timed_alone: bool = True

    # Its cost for one call on a batch of `batch` samples, where that is not `batch` times its
    # cost per sample: kernels that work across the samples of a batch (Winograd's tiles fill
    # its panels across samples; a small map's forward runs packed GEMMs over several samples'
    # columns), as (backend, cost) pairs, since each backend has its own kernels; elsewhere
    # `batch` × its cost. The plan compares variants at a batch of several samples with it
    # (lower/plan.py: a step's `batched` alternative).
    batch_costs: tuple[tuple[str, Callable[[tuple, TensorType, dict, int], Dim]], ...] = ()

    def cost_on(self, backend: str) -> Callable[[tuple, TensorType, dict], Dim]:
        """Its cost function on `backend`."""
        return dict(self.costs_on).get(backend, self.cost)

    def cost_of_batch(self, backend: str, in_types, out, attrs, batch: int) -> Dim:
        """Its estimated cost of one call on `batch` samples on `backend`."""
        cost = dict(self.batch_costs).get(backend)
        if cost is None:
            return D.mul(batch, self.cost_on(backend)(in_types, out, attrs))
        return cost(in_types, out, attrs, batch)

    def writes_param_grads_on(self, backend: str) -> bool:
        """Whether its backward on `backend` can write its parameters' gradients whole."""
        return backend in self.writes_param_grads

    def writes_input_grad_on(self, backend: str, attrs: dict) -> bool:
        """Whether its backward on `backend` can write its input's gradient instead of adding."""
        rule = dict(self.writes_input_grad).get(backend)
        return rule is not None and rule(attrs)


@dataclass(frozen=True)
class Arg:
    name: str
    default: Any = REQUIRED
    doc: str = ""
    forms: str = ""                  # what values it takes, for messages: "valid, same, full, …"
    lacks: tuple[str, ...] = ()      # values other libraries take here that the language lacks
    lacks_why: str = ""              # said when one of `lacks` is written: "reflect padding is …"
    symbols: tuple[str, ...] = ()    # bare words it takes (`same`, `he`): the language's vocabulary
    shape: bool = False              # takes a shape written as a list, as `input` has it: `[C, H, W]`


INIT_SYMBOLS = ("he", "xavier", "zeros", "ones")
INIT_CALLS = ("normal", "uniform")      # `init=normal(0.02)`: the calls the vocabulary has


def init_arg() -> Arg:
    """The `init` argument of every op with weights: he | xavier | zeros | ones | normal(s) | uniform(a)."""
    return Arg("init", Symbol("he"), symbols=INIT_SYMBOLS)


@dataclass(frozen=True)
class TrainingGuard:
    """A training-mode forward needs batch × per_sample ≥ least; else it fails with the message
    (after the layer's name and line)."""
    per_sample: Dim
    least: int
    message: str


class OpContext:
    """What an op may ask of the place it is written: spans for errors, the file's settings."""

    def __init__(self, call_span: Span, arg_spans: dict[str, Span], layout: str, dtype: str,
                 input_names: tuple[str, ...] = ()):
        self.call_span = call_span
        self.arg_spans = arg_spans
        self.layout = layout
        self.dtype = dtype
        self.input_names = input_names

    def span(self, arg: str | None = None) -> Span:
        if arg is not None and arg in self.arg_spans:
            return self.arg_spans[arg]
        return self.call_span

    def error(self, message: str, arg: str | None = None, notes: tuple[str, ...] = ()) -> ConvDSLError:
        return ConvDSLError(self.span(arg), message, notes=notes)

    def shape_text(self, t: TensorType) -> str:
        return t.text(self.layout)


def bind_arguments(owner: str, args: tuple[Arg, ...], positional: list, keywords: dict, ctx: OpContext,
                   first: str) -> dict:
    """Match a call's arguments to `args` (an op's, or a loss's; `first` names what comes before
    them: "its input"); unknown, doubled and missing ones are errors at their span."""
    names = [a.name for a in args]
    if positional and not args:
        raise ctx.error(f"{owner} takes no arguments besides {first}")
    if len(positional) > len(args):
        raise ctx.error(f"{owner} takes at most {len(args)} argument(s) after {first}"
                        + (f" ({', '.join(names)})" if names else "") + f", got {len(positional)}")
    bound: dict[str, Any] = {}
    for arg, value in zip(args, positional):
        bound[arg.name] = value
    for key, value in keywords.items():
        if key not in names:
            hint = next((n for n in KEYWORD_ALIASES.get(key.lower(), ()) if n in names), None) or \
                did_you_mean(key, names)
            msg = f"{owner} has no argument `{key}`"
            msg += f"; did you mean `{hint}`?" if hint else (f" (it takes: {', '.join(names)})" if names else "")
            raise ctx.error(msg, arg=key)
        if key in bound:
            raise ctx.error(f"argument `{key}` of {owner} is given twice", arg=key)
        bound[key] = value
    for arg in args:
        if arg.name not in bound:
            if arg.default is REQUIRED:
                raise ctx.error(f"{owner} needs the argument `{arg.name}`")
            bound[arg.name] = arg.default
    return bound


class OpDef:
    """Base for every layer kind. Subclasses set `name` and `args` and override what differs."""

    name: ClassVar[str] = ""
    args: ClassVar[tuple[Arg, ...]] = ()
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = 1
    template: ClassVar[str | None] = None        # template file stem; defaults to the op's name
    c_helpers: ClassVar[tuple[str, ...]] = ()    # shared C helpers the template calls (lib/<h>.c.j2)
    summary: ClassVar[str] = ""
    # Names PyTorch, Keras or ONNX give this op, so that `Linear` or `Conv2d` is answered with
    # `dense` or `conv`. Case, underscores and a 1d/2d/3d are ignored when comparing (see `normal_name`),
    # so `MaxPool2d` and `max_pool` find maxpool without being listed.
    aliases: ClassVar[tuple[str, ...]] = ()
    # Ops of those libraries that the language lacks and for which this one is the closest
    # (relu6 → relu): answered with "not in the language yet; relu is the closest".
    relatives: ClassVar[tuple[str, ...]] = ()
    # Computes each position of its one input on its own (at inference) into an output of the
    # same shape: activations, batchnorm, dropout, a channel shuffle. `convdsl graph` draws such
    # an op in the box of the layer before it; a trait, so no list of op names is kept elsewhere.
    positionwise: ClassVar[bool] = False

    # ---- traits the central code reads instead of op names (lints, `convert --fc-to-conv`) ----
    # What one output value is made from, when that is less than a window: "value" (the input
    # values at the same place alone: activations, dropout, add), "channel" (that value and
    # statistics of its channel: batchnorm, one value alone at inference), "position" (the
    # channels of the same position: softmax, maxout, shuffle, concat). None: a window or more.
    # Lints follow chains of one-input ops through them; `convert --fc-to-conv` knows that a
    # "value" op is the same on a map as on the flattened vector, the others once the map is 1×1.
    locality: ClassVar[str | None] = None
    # A convolution: one kernel per group slides over the map; its attributes have kernel, stride,
    # dilation, pads, pad_spec, groups, in and out (conv, depthwise; not deconv, local or tiled).
    convolution: ClassVar[bool] = False
    # A convolution with one input channel per group whatever its arguments (depthwise); a conv
    # is one too when groups = in > 1 (lints.is_depthwise).
    depthwise: ClassVar[bool] = False
    # A pool over a window of each channel on its own, with kernel, stride and pads (maxpool …).
    window_pool: ClassVar[bool] = False
    # Reshapes a map to a vector in the layout's order (flatten).
    flattens: ClassVar[bool] = False
    # Every output reads every input value with a weight of its own (dense).
    fully_connected: ClassVar[bool] = False
    # The op this one is on a map, for `convert --fc-to-conv` (§2.5): dense reading a flattened
    # [C, *S] map is a conv with kernel S (1×1 after the first); None when it has no map form.
    map_form: ClassVar[str | None] = None
    # Kernels not shared across positions (local, tiled; their attributes have `tile`, the kernel
    # sets per axis); `kernel_per_position`: one set for every output position (local).
    unshared: ClassVar[bool] = False
    kernel_per_position: ClassVar[bool] = False

    # -- arguments
    def bind(self, positional: list, keywords: dict, ctx: OpContext) -> dict:
        """Match call arguments to `args`; unknown and missing ones are errors at their span."""
        return bind_arguments(self.name, self.args, positional, keywords, ctx, "its input")

    def normalize(self, attrs: dict, in_types: tuple[TensorType, ...], ctx: OpContext) -> dict:
        """Validate argument values against the inputs and fill derived ones (padding per axis …)."""
        return attrs

    # -- how it runs: the kernel variants the plan chooses from
    def variants(self) -> tuple[Variant, ...]:
        """Every way this op's kernels can run; the first of an op without a choice is its
        only one, computed as its template says."""
        return (Variant("default", self.template or self.name, "the op's kernels",
                        cost=lambda in_types, out, attrs: D.add(self.macs(in_types, out, attrs),
                                                                D.product(out.shape)),
                        workspace=lambda in_types, out, attrs: self.scratch_elements(in_types, out, attrs),
                        parallel=self.parallel, parallel_threshold=self.parallel_threshold,
                        gemm_threshold=self.gemm_threshold, dot_columns=self.dot_columns,
                        fuses_epilogue=self.fuses_epilogue, writes_input_grad=self.writes_input_grad,
                        writes_param_grads=self.writes_param_grads),)

    # A single-variant op whose forward kernel applies an epilogue to each value as it writes its
    # output (the template reads node.epilogue, templates/c/lib/epilogue.j2): the ops after it
    # that `fuses_as` says can run there, in the network's order.
    fuses_epilogue: ClassVar[bool] = False
    # How a producer's kernel can apply this op as it writes (lower/plan.py decides when it may):
    # "activation" (an element-wise function of the value: relu …; then saves_for_backward is
    # {OUTPUT}, or {INPUTS} for one whose derivative its output does not give — silu, gelu —, which
    # training then keeps as the producer writes it), "residual" (the sum with one other tensor of the same shape: add), "scale"
    # (times a per-sample factor of its channel: scale). None: it runs as a kernel of its own.
    fuses_as: ClassVar[str | None] = None
    # Eval mode only: the op is a scale and shift per channel (batchnorm on its running
    # statistics), which a producer's kernel applies as it writes ("affine"), after this op's
    # template's `fold` kernel has made the (scale, shift) pairs. None: it folds nowhere.
    folds_in_eval: ClassVar[str | None] = None

    # What this op's backward reads besides the gradient of its output, which training memory
    # keeps alive for it (everything else a forward makes dies at its last forward reader):
    # INPUTS (every input value: conv and dense for the weight gradient, maxpool to find the
    # winner again), OUTPUT (its output value: relu, sigmoid, softmax), SAVED (what its forward
    # stored for it, `saved_elements`: dropout's mask); empty when its backward needs dy alone
    # (add, concat, flatten, avgpool, upsample). It must say what the backward template reads.
    # A fused step writes only its last result, and in training also each value in between
    # that a backward reads.
    saves_for_backward: ClassVar[frozenset[str]] = frozenset()

    def backward_reads(self, attrs: dict) -> frozenset[str]:
        """What this node's backward reads (see `saves_for_backward`), for its attributes: a
        frozen conv computes no weight gradient, so it reads no input."""
        return self.saves_for_backward

    # What a single-variant op's kernels split across threads (lowered program's ParallelSplit);
    # "none": one thread.
    parallel: ClassVar[str] = "none"
    # The least work for which a single-variant op's loops are split (Variant.parallel_threshold).
    parallel_threshold: ClassVar[int] = 65536
    # The least multiply-adds of one product for which the shared GEMM splits it across threads
    # (Variant.gemm_threshold), for a single-variant op whose kernels call it.
    gemm_threshold: ClassVar[int] = 65536
    # Up to this many run-time columns its GEMM runs as dot products of rows (Variant.dot_columns).
    dot_columns: ClassVar[int] = 0
    # Where a single-variant op's backward writes its input's gradient whole rather than adding
    # into it (Variant.writes_input_grad): (backend, rule) pairs.
    writes_input_grad: ClassVar[tuple] = ()
    # The backends where a single-variant op's backward writes its parameters' gradients whole
    # (Variant.writes_param_grads).
    writes_param_grads: ClassVar[tuple] = ()
    # Model state its kernels read besides their operands: "mode" (training or eval; a backward
    # gets the mode of its forward), "random" (the model's random stream, which a forward advances).
    kernel_state: ClassVar[tuple[str, ...]] = ()

    # -- semantics
    def infer(self, in_types: tuple[TensorType, ...], attrs: dict, ctx: OpContext) -> TensorType:
        return in_types[0]

    def param_specs(self, in_types: tuple[TensorType, ...], attrs: dict) -> tuple[ParamSpec, ...]:
        return ()

    def macs(self, in_types: tuple[TensorType, ...], out: TensorType, attrs: dict) -> Dim:
        return 0

    def window(self, in_types: tuple[TensorType, ...], attrs: dict):
        """(effective kernel per spatial axis, stride per axis) for the receptive field;
        None for ops that look at one position; "global" for global pooling."""
        return None

    def scratch_elements(self, in_types: tuple[TensorType, ...], out: TensorType, attrs: dict) -> Dim:
        """Per-sample scratch memory (elements) the kernel needs, e.g. im2col's column matrix."""
        return 0

    def buffer_specs(self, in_types: tuple[TensorType, ...], attrs: dict) -> tuple[BufferSpec, ...]:
        """Non-trainable state of the layer (one set per layer, shared like its parameters)."""
        return ()

    def saved_elements(self, in_types: tuple[TensorType, ...], out: TensorType, attrs: dict) -> Dim:
        """Per-sample memory (elements) a forward leaves for the backward of the same node,
        e.g. dropout's mask; the template sees it as `node.saved`."""
        return 0

    def training_guards(self, attrs: dict, in_types: tuple[TensorType, ...],
                        out: TensorType) -> tuple[TrainingGuard, ...]:
        """What a training-mode forward checks before running; one that fails makes forward fail
        with its message."""
        return ()

    def describe(self, attrs: dict) -> str:
        """The op with its key arguments, as `check` prints it."""
        return self.name

    # -- code generation (the backend decides where the template lives)
    def kernel_context(self, attrs: dict, in_types: tuple[TensorType, ...], out: TensorType,
                       c: Callable[[Dim], str]) -> dict:
        """Extra values the template needs, with dims rendered to C by `c`."""
        return {}

    # -- composite ops (separable = depthwise then 1×1) expand at build time
    def expand(self, builder, inputs, attrs: dict, ctx: OpContext):
        return None


_REGISTRY: dict[str, OpDef] = {}


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: one instance of each OpDef, found by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"op {cls.name} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    # Importing every module of convdsl.ops runs their @register decorators: a new layer
    # kind is a new file here, nothing else to edit.
    from .. import ops as package
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("base",):
            importlib.import_module(f"{package.__name__}.{info.name}")


def registry() -> dict[str, OpDef]:
    if not _REGISTRY:
        _load_all()
    return _REGISTRY


def lookup(name: str) -> OpDef | None:
    return registry().get(name)


_VOCABULARY: frozenset[str] | None = None


def symbol_vocabulary() -> frozenset[str]:
    """Every bare word an op's argument takes (`pad=same`, `init=he`, `algo=im2col`): what the
    builder reads as a symbol rather than a name. Each op declares its own on its Args."""
    global _VOCABULARY
    if _VOCABULARY is None:
        _VOCABULARY = frozenset(word for op in registry().values() for arg in op.args for word in arg.symbols)
    return _VOCABULARY


def normal_name(name: str) -> str:
    """A name as other libraries' spellings are compared: lower case, no underscores, no 1d/2d/3d
    (`MaxPool2d`, `max_pool_2d` and `maxpool` are one name)."""
    return re.sub(r"(?<=[a-z])[123]d", "", name.lower().replace("_", ""))


def op_alias(name: str) -> OpDef | None:
    """The op that another library's name stands for: `Linear` → dense, `Conv2d` → conv."""
    key = normal_name(name)
    for op in registry().values():
        if key == normal_name(op.name) or key in map(normal_name, op.aliases):
            return op
    return None


def op_relative(name: str) -> OpDef | None:
    """The closest op to one the language lacks: `relu6` → relu."""
    key = normal_name(name)
    return next((op for op in registry().values() if key in map(normal_name, op.relatives)), None)


def alias_names() -> dict[str, str]:
    """Every alias spelled as listed, with the op it stands for (for misspelling hints)."""
    return {alias: op.name for op in registry().values() for alias in op.aliases}


# ---- argument validators shared by many ops ----------------------------------------------

def expect_int(value, what: str, ctx: OpContext, arg: str, minimum: int | None = None,
               maximum: int = MAX_ATTRIBUTE) -> int:
    """An integer attribute; every one of them becomes a size in C, so it is capped (limits.py)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(f"`{arg}` must be an integer, got {describe_value(value)}", arg=arg)
    if minimum is not None and value < minimum:
        raise ctx.error(f"`{arg}` must be at least {minimum}, got {value}", arg=arg)
    check_attribute_size(value, ctx, arg, maximum)
    return value


def check_attribute_size(value: int, ctx: OpContext, arg: str, maximum: int = MAX_ATTRIBUTE) -> None:
    if value > maximum:
        raise ctx.error(f"`{arg}` must be at most {power_text(maximum)}, got {value:,}", arg=arg)


def expect_float(value, ctx: OpContext, arg: str, lo: float | None = None, hi: float | None = None,
                 hi_open: bool = False) -> float:
    """A float attribute: finite in the network's element type, and within [lo, hi] (or [lo, hi))."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(f"`{arg}` must be a number, got {describe_value(value)}", arg=arg)
    v = float(value)
    expect_finite(v, ctx, arg)
    # Written as "inside the range" so that a NaN, which compares false with everything, is outside.
    inside = (lo is None or v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if not inside:
        rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ctx.error(f"`{arg}` must be in {rng}, got {value}", arg=arg)
    return v


def expect_finite(v: float, ctx: OpContext, arg: str) -> None:
    limit = FLOAT_MAX.get(ctx.dtype, FLOAT_MAX["f64"])
    if not (math.isfinite(v) and abs(v) <= limit):
        raise ctx.error(f"`{arg}` must be a finite {ctx.dtype} number (at most {limit:.4g} in size), got {v}",
                        arg=arg)


def expect_bool(value, ctx: OpContext, arg: str) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(f"`{arg}` must be true or false, got {describe_value(value)}", arg=arg)
    return value


def expect_symbol(value, choices: tuple[str, ...], ctx: OpContext, arg: str) -> str:
    name = value.name if isinstance(value, Symbol) else value if isinstance(value, str) else None
    if name not in choices:
        hint = did_you_mean(name, choices) if name else None
        msg = f"`{arg}` must be one of {', '.join(choices)}, got {describe_value(value)}"
        if hint:
            msg += f"; did you mean `{hint}`?"
        raise ctx.error(msg, arg=arg)
    return name


def parse_init(value, ctx: OpContext, arg: str = "init") -> Init:
    if isinstance(value, Init):
        return value
    if isinstance(value, Symbol) and value.name in INIT_SYMBOLS:
        return Init(value.name)
    if isinstance(value, SymbolCall) and value.name in INIT_CALLS and len(value.args) == 1 \
            and isinstance(value.args[0], (int, float)) and not isinstance(value.args[0], bool) \
            and 0 < value.args[0] <= MAX_INIT_SCALE:       # so that a NaN is refused too
        return Init(value.name, float(value.args[0]))
    if isinstance(value, SymbolCall) and len(value.args) == 1 and isinstance(value.args[0], (int, float)) \
            and not isinstance(value.args[0], bool) and value.args[0] > MAX_INIT_SCALE:
        raise ctx.error(f"`{arg}`: {value.name}({value.args[0]}) would draw weights beyond what a float holds; "
                        f"the scale is at most {MAX_INIT_SCALE:g}", arg=arg)
    raise ctx.error(f"`{arg}` must be he, xavier, normal(std), uniform(a), zeros or ones, "
                    f"got {describe_value(value)}", arg=arg)


def describe_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Symbol):
        return f"`{value.name}`"
    if isinstance(value, SymbolCall):
        return f"`{value.name}(…)`"
    if isinstance(value, tuple):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    if isinstance(value, ConstTensor):
        return f"const `{value.name}`"
    if type(value).__name__ == "TensorRef":
        return "a tensor"
    return repr(value)


def spatial_rank_error(op: str, t: TensorType, ctx: OpContext) -> ConvDSLError:
    return ctx.error(f"{op} needs a 1-D, 2-D or 3-D feature map ([C, L], [C, H, W] or [C, D, H, W]); "
                     f"the input is {ctx.shape_text(t)}")
