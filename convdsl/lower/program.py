"""The lowered program: every decision the plan made, written down as immutable data.

A backend target renders this and nothing else: which kernel variant runs each step, where
each operand lives (a named region, an offset and a size in elements), the epilogue fused into
the step, its workspace and how its work is split across threads. Sizes are Dims
(convdsl/ir/dims.py), so run-time sizes stay symbolic until the module's prepare.

Eval mode runs forward only, in the `inference` region, where values whose lifetimes do not
overlap share memory, and by a schedule of its own (`Program.eval_forward`): with no batch
statistics to compute, a batchnorm is a scale and shift per channel, which its producer's kernel
applies as it writes (an AFFINE epilogue stage) from a table a small step makes each call.
An eval-mode forward whose activations are kept for a backward runs the training forward.
Training mode keeps what the backward reads (a conv's input, a relu's output, dropout's mask)
and the gradients, all in the one `training` block, sharing memory by lifetime too: an
operand's region `activations`, `gradients` or `saved` says what it holds, and its offset is
into that block (lower/memory.py says how long each lives).

Offsets and sizes in the per-sample regions (`inference`, `training`) count elements of one
sample; a region of a batch of N holds N samples one after the other per value (value v of
sample n starts at N·offset(v) + n·size(v)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import Span
from ..ir.dims import Dim
from ..ir.graph import TensorType
from ..ops.base import WorkGroupTile
from ..passes.schedule import BufferSlot, ParamSlot, slots_by_layer   # the parameter and buffer blocks' layout

# Region names. Per-sample regions scale with the batch; the others are fixed at create.
INFERENCE = "inference"              # eval mode: activations sharing memory by lifetime
TRAINING = "training"                # training mode: the block the next three share by lifetime
ACTIVATIONS = "activations"          # values of a training forward (in the training block)
GRADIENTS = "gradients"              # their gradients (in the training block)
SAVED = "saved"                      # what a forward keeps for its backward (in the training block)
TRAINING_PARTS = (ACTIVATIONS, GRADIENTS, SAVED)
PARAMS = "params"
PARAM_GRADS = "param_grads"
BUFFERS = "buffers"
WORKSPACE = "workspace"
THREAD_WORKSPACE = "thread_workspace"   # per thread; the module multiplies by its thread count
DERIVED = "derived"                  # per step, kept across calls: what a kernel derives from the weights
# The batched alternatives' (Step.batched) own: their derived memory, allocated by the first
# prepare of a batch that runs one (Program.batched_from), so that a model that never does pays
# none of it; and the workspace of such a batch (at least the workspace's size).
BATCHED_DERIVED = "batched_derived"
BATCHED_WORKSPACE = "batched_workspace"
PER_SAMPLE_REGIONS = (INFERENCE, TRAINING)


@dataclass(frozen=True)
class Region:
    """A named block of memory: its size in elements (per sample for a per-sample region)."""
    name: str
    size: Dim
    per_sample: bool
    doc: str
    # Sanitizer builds only (lower(guard=…)): (offset, elements) of every gap between tensors,
    # poisoned by the module so that a kernel running past one tensor into the next is reported.
    guards: tuple[tuple[Dim, Dim], ...] = ()


@dataclass(frozen=True)
class Operand:
    """One tensor a step reads or writes: where it lives and how big it is."""
    role: str                        # x0, x1, y, dx0, dy, weight, bias, running_mean, mask …
    region: str                      # one of the region names above
    offset: Dim                      # elements from the start of the region (per sample if per-sample)
    size: Dim                        # elements (per sample if per-sample)
    value: int | None = None         # the IR value it holds (activations and gradients)
    shape: tuple[Dim, ...] = ()      # per sample, channel-first (parameters: their own shape)
    trainable: bool = True           # parameters: whether a gradient exists


ACTIVATION, RESIDUAL, SCALE = "activation", "residual", "scale"   # the kinds of epilogue stage
AFFINE = "affine"                    # eval mode only: a batchnorm folded into its producer


@dataclass(frozen=True)
class EpilogueStage:
    """One op whose forward runs inside the producer's kernel, applied to each value as the
    kernel writes it: an activation, a residual add of one other tensor of the same shape, a
    scale by a per-sample factor of each channel, or (eval mode's schedule only) a batchnorm's
    v·scale[c] + shift[c], read as pairs from the table its fold step writes. Its backward
    stays a step of its own."""
    kind: str                        # activation | residual | scale | affine
    node: int                        # the fused IR node
    op: str
    label: str
    describe: str
    attrs: Mapping[str, Any]
    operand: Operand | None = None   # residual: the other addend; scale: the factors (one per channel);
                                     # affine: the (scale, shift) pair of each channel
    # Training mode: the value this stage reads, written there as well, because a backward reads
    # it (relu's output before an add, conv's output before a scale); eval mode never writes it.
    keep_input: Operand | None = None

    def __post_init__(self):
        if not isinstance(self.attrs, MappingProxyType):
            object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))

    def text(self) -> str:
        what = {ACTIVATION: self.describe, RESIDUAL: f"add(v{self.operand.value if self.operand else '?'})",
                SCALE: f"scale(v{self.operand.value if self.operand else '?'})", AFFINE: self.describe}[self.kind]
        return f"{what} ({self.label} fused)"


@dataclass(frozen=True)
class Epilogue:
    """What a step applies to its result before writing it: the bias, then its stages in the
    network's order (conv → add → relu and conv → relu → add are both one kernel). Empty when
    the step writes its raw result."""
    bias: bool = False
    stages: tuple[EpilogueStage, ...] = ()

    def text(self) -> str:
        parts = ["bias"] if self.bias else []
        for stage in self.stages:
            if stage.keep_input is not None:
                # The value before this stage is written too in training: say so where it is made.
                kept = f"v{stage.keep_input.value} kept in training"
                if parts:
                    parts[-1] = parts[-1][:-1] + f", {kept})" if parts[-1].endswith(")") else f"{parts[-1]} ({kept})"
                else:
                    parts.append(f"({kept})")
            parts.append(stage.text())
        return "+".join(parts) or "-"

    @property
    def operands(self) -> tuple[Operand, ...]:
        """The other tensors the stages read, and the values they keep in training."""
        return tuple(o for s in self.stages for o in (s.operand, s.keep_input) if o is not None)


@dataclass(frozen=True)
class Workspace:
    """Scratch memory a step needs while it runs (im2col columns), in elements per sample;
    all steps share the one workspace region, sized for the largest."""
    elements: Dim = 0
    doc: str = ""
    per_thread: Dim = 0              # elements each thread needs of its own when the batch is split


@dataclass(frozen=True)
class ParallelSplit:
    """How the step's work is split across threads (or, on other targets, work-items)."""
    axis: str                        # batch | batch×channels | elements | gemm | none
    doc: str = ""
    # The least work (elements, or multiply-adds where a kernel says so) for which the step's
    # loops are split at all; below it one thread runs them. 0: always split. The shared
    # im2col / col2im helpers take it too: their loops over the column matrix are the step's.
    threshold: int = 0
    # A step that multiplies matrices with the shared GEMM (conv, dense, deconv): the least
    # multiply-adds of one product for which the GEMM splits it across threads.
    gemm_threshold: int = 0
    # A conv's batch loop: from this many multiply-adds per sample on, each sample's GEMMs are
    # split across the threads; below it each thread takes whole samples.
    batch_threshold: int = 0
    # Device kernels of matrix-shaped products (OpenCL's `tiled` conv): each product's work-group
    # tile, register block and reduction chunk, as (product, tile) pairs ("forward", "dx",
    # "dw"); each launch's local size is made from its product's.
    tiles: tuple[tuple[str, WorkGroupTile], ...] = ()
    # A product whose columns are known at run time only (dense: the batch): up to this many
    # columns it runs as dot products of rows (lib/gemm's cdsl_gemm_dot), which copy none of
    # the weights, instead of the packed GEMM; 0: always the packed GEMM.
    dot_columns: int = 0


@dataclass(frozen=True)
class Step:
    """One kernel launch of the forward, backward or update phase."""
    index: int
    phase: str                       # forward | backward | update
    node: int                        # the IR node it runs (-1 for the update)
    op: str
    label: str                       # conv1, inception1.conv3
    line: int                        # line of the .cnn file
    layer: str                       # owner of its parameters
    describe: str                    # the op with its key arguments, as check prints it
    variant: str                     # the kernel variant chosen by the plan
    variant_template: str            # the template stem that holds the variant's kernels
    attrs: Mapping[str, Any]
    in_types: tuple[TensorType, ...]
    out_type: TensorType
    inputs: tuple[Operand, ...]      # x0, x1, … (forward) / dy, then x0 … it reads (backward)
    outputs: tuple[Operand, ...]     # y (forward) / dx0 … (backward)
    params: tuple[Operand, ...] = ()
    buffers: tuple[Operand, ...] = ()
    saved: Operand | None = None     # what the forward keeps for this step's backward
    # A forward's memory kept across calls, derived from its weights (Variant.derived): Winograd's
    # transformed kernels and the copy of the weights they were made from.
    derived: Operand | None = None
    epilogue: Epilogue = Epilogue()
    workspace: Workspace = Workspace()
    parallel: ParallelSplit = ParallelSplit("none")
    fused_into: int | None = None    # a node whose forward runs inside that node's step (its epilogue)
    # Backward: the gradients this step is the first to touch, zeroed just before it runs (it adds
    # into them, and in the training block their memory held another tensor before).
    zero_first: tuple[Operand, ...] = ()
    # Backward: the gradients this step is the first to touch and writes whole instead of adding
    # into (its variant can: Variant.writes_input_grad), so they are not zeroed before it.
    writes_first: tuple[Operand, ...] = ()
    # Backward: this step's kernel writes its parameters' gradients whole at their first
    # contribution (its variant can: Variant.writes_param_grads; no other step touches them), so
    # the backward's start does not zero them (Program.zeroed_param_grads).
    writes_param_grads: bool = False
    # Eval mode's schedule only: this step computes nothing of the network but its op's scale and
    # shift per channel (a batchnorm's, from its parameters and running statistics) into
    # `derived`, for the step of node `folds_into`, which applies them (an AFFINE stage).
    folds_into: int | None = None
    # A forward or backward step whose variant was chosen for one sample's shape, where another
    # variant costs clearly less on a batch (lower/plan.py, Variant.batch_costs): that variant's
    # step, which a call on at least its `min_batch` samples runs instead of this one (the same
    # operands; its own variant, workspace, derived memory, split and first-touched gradients).
    batched: "Step | None" = None
    min_batch: int = 0               # a `batched` alternative: the least batch that runs it

    def __post_init__(self):
        if not isinstance(self.attrs, MappingProxyType):
            object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))


@dataclass(frozen=True)
class ValueInfo:
    """A tensor of the network: its per-sample type and, for messages, who makes it."""
    id: int
    type: TensorType
    maker: str                       # "an input" or "conv1 (line 4)"
    producer_label: str | None = None    # the layer that makes it; None for an input
    span: Span | None = None         # where it is made (the network for an input), for errors


@dataclass(frozen=True)
class Boundary:
    """A network input or output: its name, the value it is, and its dims as declared.
    `transposed`: the caller's array is channels last (NHWC) and is converted at the edge.
    `eval_in_place`: an eval-mode forward reads this input from the caller's array, or writes this
    output into it, instead of copying it through the arena (the plan: lower/plan.py).
    `train_in_place`: a training-mode forward writes this output into the caller's array too (no
    backward, and not the loss, reads it after the forward).
    `grad_in_place`: a backward writes this input's gradient straight into the caller's array
    (not where the edge converts the layout, nor for an input that is an output too, whose
    gradient's place is seeded before the pass)."""
    name: str
    value: int
    type: TensorType
    transposed: bool = False
    eval_in_place: bool = False
    train_in_place: bool = False
    grad_in_place: bool = False


@dataclass(frozen=True)
class LossStep:
    kind: str
    value: int                       # the value the loss reads
    output_index: int
    output_name: str
    line: int
    type: TensorType
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Program:
    """The whole lowered network: its boundary, its memory and its steps in order."""
    name: str
    source_path: str
    line: int
    layout: str
    dtype: str
    sym_dims: tuple[str, ...]
    inputs: tuple[Boundary, ...]
    outputs: tuple[Boundary, ...]
    values: tuple[ValueInfo, ...]
    regions: tuple[Region, ...]
    activations: tuple[Operand, ...]     # value v's place in training mode (training block), by value id
    inference: tuple[Operand, ...]       # value v's place in eval mode, shared by lifetime
    gradients: tuple[Operand, ...]       # value v's gradient (training block), by value id
    params: tuple[ParamSlot, ...]
    param_total: int
    buffers: tuple[BufferSlot, ...]
    buffer_total: int
    steps: tuple[Step, ...]
    # The forward of an eval-mode call that keeps nothing for a backward (the module's inference
    # placement): the training forward's steps, except that a batchnorm whose producer applies
    # epilogues is folded into it (a fold step, then the producer with the batchnorm and what
    # was fused after it in its epilogue). Empty: the same steps as `forward`.
    eval_forward: tuple[Step, ...] = ()
    loss: LossStep | None = None
    # The gradients zeroed as a backward starts, before any step: the outputs' (then seeded with
    # the caller's gradients or the loss's) and any no step touches (an input nobody reads).
    zero_at_start: tuple[Operand, ...] = ()
    # The least batch that runs a step's batched alternative (the least Step.batched.min_batch);
    # 0: no step has one.
    batched_from: int = 0
    # The parameters' gradients, as (offset, size) in param_grads, that their backward steps
    # write whole (Step.writes_param_grads): a backward's start zeroes every other one.
    written_param_grads: tuple[tuple[int, int], ...] = ()

    def zeroed_param_grads(self) -> tuple[tuple[int, int], ...]:
        """The runs of param_grads, as (offset, size), that a backward's start zeroes: all of it
        but written_param_grads, adjacent parameters' gradients merged."""
        runs, start = [], 0
        for offset, size in self.written_param_grads:
            if offset > start:
                runs.append((start, offset - start))
            start = max(start, offset + size)
        if start < self.param_total:
            runs.append((start, self.param_total - start))
        return tuple(runs)

    def region(self, name: str) -> Region:
        """The region `name`; activations, gradients and saved masks lie in the training block."""
        name = TRAINING if name in TRAINING_PARTS else name
        return next(r for r in self.regions if r.name == name)

    def phase(self, phase: str) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.phase == phase)

    @property
    def forward(self) -> tuple[Step, ...]:
        return self.phase("forward")

    @property
    def eval_steps(self) -> tuple[Step, ...]:
        """The steps an eval-mode forward runs (eval_forward, or the training forward's)."""
        return self.eval_forward or self.forward

    @property
    def backward(self) -> tuple[Step, ...]:
        return self.phase("backward")

    def layer_params(self, layer_name: str) -> dict[str, ParamSlot]:
        return dict(self._params_of.get(layer_name, {}))

    @cached_property
    def _params_of(self) -> dict[str, dict[str, ParamSlot]]:
        # Built once: asking for every layer's parameters stays linear in the number of layers.
        return slots_by_layer(self.params, lambda p: p.layer.name)
