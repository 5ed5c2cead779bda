"""Checked IR → lowered program: the kernel variant of every step, its operands in memory
regions, its epilogue, workspace and thread split. Every choice that trades speed or memory is
made here, once, and written into the Program that backends render.

Variant choice, strongest first: `algo=` on the layer in the file; a per-run override
(`convdsl.load(..., algo={"conv": "im2col"})`, `--algo conv=im2col`, or the environment
variable CONVDSL_ALGO=conv=im2col,depthwise=direct), used where that variant applies and
ignored where it does not; the variant measured fastest for the layer's shape (`--tune`,
convdsl/tune.py); otherwise the applicable variant of lowest estimated cost on the backend
(Variant.cost_on: a backend whose kernels for a variant differ from the C ones costs them in its
own terms).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from types import MappingProxyType
from typing import Mapping

from ..errors import ConvDSLError
from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph, Node, TensorType
from ..ops.base import INPUTS, OUTPUT, Variant, lookup, registry
from ..passes.schedule import make_plan
from .memory import inference_placement, lifetimes, place_guarded, training_placement, values_read_by_backward
from .program import (ACTIVATION, ACTIVATIONS, AFFINE, BATCHED_DERIVED, BATCHED_WORKSPACE, BUFFERS, DERIVED, GRADIENTS,
                      INFERENCE, PARAM_GRADS, RESIDUAL, SCALE, THREAD_WORKSPACE, PARAMS, SAVED, TRAINING, WORKSPACE,
                      Boundary, Epilogue, EpilogueStage, LossStep, Operand, ParallelSplit, Program, Region, Step, ValueInfo, Workspace)

ALGO_ENV = "CONVDSL_ALGO"
# Costs with run-time sizes are compared at this size of every named dim (as check's memory peak).
PROBE_SIZE = 64
# The optimizer's pass over one parameter block is split across threads from this many elements
# on: a handful of flops per element (Adam's are the most), so a block below it costs less than
# waking the threads.
OPTIMIZER_SPLIT = 32768


# ---- the per-run variant override ---------------------------------------------------------

def parse_algo(text: str, where: str = ALGO_ENV) -> dict[str, str]:
    """`conv=im2col,depthwise=direct` (or with `:`) → {"conv": "im2col", "depthwise": "direct"}."""
    out: dict[str, str] = {}
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        sep = "=" if "=" in item else ":"
        op, _, variant = item.partition(sep)
        if not variant:
            raise ConvDSLError(None, f"{where}: `{item}` is not OP=VARIANT, e.g. conv=im2col")
        out[op.strip()] = variant.strip()
    return out


def algo_override(explicit: Mapping[str, str] | str | None = None) -> dict[str, str]:
    """The run's override: CONVDSL_ALGO, then `explicit` on top; every name checked."""
    chosen = parse_algo(os.environ.get(ALGO_ENV, ""))
    if isinstance(explicit, str):
        explicit = parse_algo(explicit, "algo")
    chosen.update(explicit or {})
    ops = registry()
    for op_name, variant in chosen.items():
        op = ops.get(op_name)
        if op is None:
            raise ConvDSLError(None, f"algo override: there is no op `{op_name}`")
        names = [v.name for v in op.variants()]
        if variant not in names:
            raise ConvDSLError(None, f"algo override: {op_name} has no variant `{variant}`; "
                                     f"it has {', '.join(names)}")
    return chosen


def applicable_variants(op, attrs) -> tuple[Variant, ...]:
    return tuple(v for v in op.variants() if v.applies(attrs))


def choose_variant(op, in_types: tuple[TensorType, ...], out: TensorType, attrs, override: Mapping[str, str],
                   sym_dims: tuple[str, ...] = (), lacks: frozenset[str] = frozenset(), backend: str = "c",
                   measured: str | None = None) -> Variant:
    """`lacks`: variants the target has no kernels for (Target.lacks_variants); never chosen, and
    an `algo=` naming one gives way to the cheapest of the others. A variant of other backends
    only (Variant.backends, OpenCL's `tiled`) is not there for `backend` at all. `measured`: the
    variant that tuning timed fastest for this layer, which replaces the cost estimate where it
    is usable."""
    there = tuple(v for v in applicable_variants(op, attrs) if not v.backends or backend in v.backends)
    usable = tuple(v for v in there if v.name not in lacks) or there
    asked = attrs.get("algo")
    if asked not in (None, "auto") and any(v.name == asked for v in usable):
        # normalize() already refused an algo= that does not apply here.
        return next(v for v in usable if v.name == asked)
    forced = override.get(op.name)
    if forced is not None:
        match = next((v for v in usable if v.name == forced), None)
        if match is not None:
            return match
    fastest = next((v for v in usable if v.name == measured), None)
    if fastest is not None:
        return fastest
    probe = {name: PROBE_SIZE for name in sym_dims}
    return min(usable, key=lambda v: D.evaluate(v.cost_on(backend)(in_types, out, attrs), probe))


# ---- building the program -------------------------------------------------------------------

def _epilogue(op, attrs, params) -> Epilogue:
    # The kernels of conv, dense, deconv and local add their bias as they write the output.
    return Epilogue(bias="bias" in params)


def chosen_variants(g: Graph, override: Mapping[str, str], lacks: frozenset[str] = frozenset(),
                    backend: str = "c", measured: Mapping[int, str] = MappingProxyType({})) -> dict[int, Variant]:
    chosen = {}
    for node in g.nodes:
        in_types = tuple(g.values[v].type for v in node.inputs)
        chosen[node.id] = choose_variant(lookup(node.op), in_types, g.values[node.output].type, node.attrs,
                                         override, g.sym_dims, lacks, backend, measured.get(node.id))
    return chosen


# A step's variant is chosen for one sample's shape. Some kernels work across the samples of a
# batch: Winograd's tiles fill its panels across samples, a small map's forward runs packed GEMMs
# over several samples' columns. On a batch, as training runs it, another variant can then cost
# much less per sample than the one chosen: the plan compares the variants at each batch of
# BATCHED_PLAN_BATCHES in turn (Variant.cost_of_batch), and at the first where the cheapest costs
# at most BATCHED_GAIN of the chosen one's, the step gets it as its `batched` alternative
# (Step.batched), which a call on at least `min_batch` samples runs: the least power of two from 2
# at which it costs no more. Measured with --tune and alone (training forward + backward, one
# core of an AMD EPYC, ResNet-18's 3×3 convs), per call at batch 1 / 2 / 4 / 8: 256 channels on
# 8² im2col 2.6 / 5.5 ms, winograd2 3.3 / 3.9, winograd4 6.9 / 8.8; 128 channels on 16²
# winograd2 1.5 / 2.7, winograd4 1.8 / 2.1; 512 channels on 4² broadcast - / - / 15.3 / 22.3,
# winograd2 - / - / 16.5 / 18.0. The model counts none of what a Winograd backward pays per call
# whatever the batch (the transformed kernels of dX, the weight gradient's last transform): at
# 16 samples first it would take winograd4 for the 256 channels, whose cost from 2 samples on it
# puts below im2col's, where it is 1.6× slower. At 4 it takes winograd2 for the 256 channels and
# winograd4 for the 128, each from 2 samples on, each then the fastest measured; at 16 (nothing at
# 4) winograd2 for the 512 channels, from 8 samples on.
BATCHED_PLAN_BATCHES = (4, 16)
BATCHED_GAIN = 0.8


def batched_variants(g: Graph, chosen: Mapping[int, Variant], override: Mapping[str, str],
                     lacks: frozenset[str] = frozenset(), backend: str = "c",
                     measured: Mapping[int, str] = MappingProxyType({})) -> dict[int, tuple[int, Variant]]:
    """node id → (the least batch, the variant) of each step's `batched` alternative. A layer
    whose variant the file, a per-run override or tuning fixed has none (that variant holds for
    every batch), and a variant that fuses otherwise than the chosen one is never one (the
    fusions are the program's, made for the chosen variants)."""
    alternatives = {}
    probe = {name: PROBE_SIZE for name in g.sym_dims}
    for node in g.nodes:
        op, base = lookup(node.op), chosen[node.id]
        if node.attrs.get("algo") not in (None, "auto") or op.name in override or node.id in measured:
            continue
        in_types = tuple(g.values[v].type for v in node.inputs)
        out = g.values[node.output].type
        usable = [v for v in applicable_variants(op, node.attrs)
                  if (not v.backends or backend in v.backends) and v.name not in lacks
                  and v.fuses_epilogue == base.fuses_epilogue]

        def cost(v: Variant, batch: int) -> float:
            return D.evaluate(v.cost_of_batch(backend, in_types, out, node.attrs, batch), probe)
        for batch in BATCHED_PLAN_BATCHES:
            best = min(usable, key=lambda v: cost(v, batch), default=base)
            if best.name != base.name and cost(best, batch) <= BATCHED_GAIN * cost(base, batch):
                least = 2
                while least < batch and cost(best, least) > cost(base, least):
                    least *= 2
                alternatives[node.id] = (least, best)
                break
    return alternatives


def fusions_of(g: Graph, algo=None, eval_mode: bool = False) -> dict[int, tuple[int, ...]]:
    """producer node → the nodes fused into its kernel, as lower() fuses them under `algo` (in
    eval mode's schedule: with the batchnorms folded)."""
    variants = chosen_variants(g, algo_override(algo))
    fusions = _fusions(g, variants)
    return _fusions(g, variants, fusions) if eval_mode else fusions


def _fusions(g: Graph, variants: dict[int, Variant],
             train: Mapping[int, tuple[int, ...]] | None = None) -> dict[int, tuple[int, ...]]:
    """producer node → the chain of nodes whose forward runs in its kernel's epilogue, in order.

    The producer's variant applies epilogues (`fuses_epilogue`: conv and depthwise in every
    variant, deconv, dense). The chain grows one
    node at a time while the next node is the only reader of the value so far, that value is no
    network output (the last one may be), and the node can run there (`OpDef.fuses_as`): an
    activation; an add of exactly two tensors whose other addend has the same shape and is made
    before the producer runs; a scale whose x is the value so far and whose factors are made
    before the producer runs. The values in between are never written in eval mode; in training
    the step writes those that a backward reads (lower() marks them).

    `train` given (training's chains, from a call without it): the chains of eval mode's
    schedule, where a batchnorm (`OpDef.folds_in_eval`)
    that runs as a fusing kernel (its variant applies epilogues: the C target's) is a scale and
    shift per channel, and folds into the producer before it with the chain fused into it in
    training, taken whole: when a stage of that chain cannot run in the producer (its other
    tensor is made after the producer runs), the batchnorm does not fold at all, so that every
    node keeps a kernel that runs it. A folded batchnorm is no producer of its own."""
    eval_mode = train is not None
    readers: dict[int, list[int]] = {}
    for node in g.nodes:
        for vid in node.inputs:
            readers.setdefault(vid, []).append(node.id)
    outputs = {o.value for o in g.outputs} | ({g.loss.value} if g.loss is not None else set())

    def made_before(vid: int, step: int) -> bool:
        maker = g.values[vid].producer
        return maker is None or maker < step          # nodes run in id order (passes/schedule.py)

    fused: dict[int, tuple[int, ...]] = {}
    absorbed: set[int] = set()          # nodes in a chain already: a folded batchnorm makes none of its own
    for node in g.nodes:
        # A producer whose backward reads its own output never fuses: its kernel writes only the
        # chain's last value (and what the stages' backwards read).
        if node.id in absorbed or not variants[node.id].fuses_epilogue \
                or OUTPUT in lookup(node.op).backward_reads(node.attrs):
            continue
        def runs_here(nxt: Node, value: int) -> bool:
            """Whether node `nxt`, the only reader of `value`, can run in `node`'s epilogue."""
            kind = lookup(nxt.op).fuses_as
            shape = g.values[value].type.shape
            if kind == ACTIVATION:
                return True
            if kind == RESIDUAL:
                others = [v for v in nxt.inputs if v != value]
                return len(nxt.inputs) == 2 and len(others) == 1 and g.values[others[0]].type.shape == shape \
                    and made_before(others[0], node.id)
            if kind == SCALE:
                return nxt.inputs[0] == value and nxt.inputs[1] != value and made_before(nxt.inputs[1], node.id) \
                    and g.values[nxt.output].type.shape == shape
            return False

        chain: list[int] = []
        value = node.output
        while value not in outputs:
            after = readers.get(value, [])
            if len(after) != 1:
                break
            nxt = g.nodes[after[0]]
            if eval_mode and lookup(nxt.op).folds_in_eval and variants[nxt.id].fuses_epilogue:
                # The batchnorm and its own chain (which made the same checks against the
                # batchnorm's place in the order, not the producer's): whole, or not at all.
                block = [nxt.id, *train.get(nxt.id, ())]
                before = nxt.output
                for nid in block[1:]:
                    if not runs_here(g.nodes[nid], before):
                        break
                    before = g.nodes[nid].output
                else:
                    chain.extend(block)
                    value = before
                    continue
                break
            if not runs_here(nxt, value):
                break
            chain.append(nxt.id)
            value = nxt.output
        if chain:
            fused[node.id] = tuple(chain)
            absorbed.update(chain)
    return fused


def _stages(g: Graph, producer: Node, chain: tuple[int, ...], act,
            tables: Mapping[int, Operand] | None = None) -> tuple[EpilogueStage, ...]:
    """The epilogue stages of a fused chain, each with the other tensor it reads and, when a
    backward reads the value it is given (its own backward reads its inputs, or the node before
    it is read by its backward through its output), where training mode keeps that value.
    `tables`, for eval mode's schedule (None: training's): folded batchnorm node → its (scale,
    shift) table; that schedule keeps nothing."""
    stages = []
    before = producer
    for nid in chain:
        node = g.nodes[nid]
        op = lookup(node.op)
        value = before.output
        if tables is not None and nid in tables:
            stages.append(EpilogueStage(kind=AFFINE, node=nid, op=node.op, label=node.label,
                                        describe=op.describe(node.attrs), attrs=node.attrs, operand=tables[nid]))
            before = node
            continue
        # Training keeps the value this stage reads when a backward reads it: this stage's own
        # (it reads its input) or that of the op that made it (it reads its output).
        keep = INPUTS in op.backward_reads(node.attrs) or OUTPUT in lookup(before.op).backward_reads(before.attrs)
        other = next((v for v in node.inputs if v != value), None)
        role = {RESIDUAL: "residual", SCALE: "factors"}.get(op.fuses_as)
        stages.append(EpilogueStage(
            kind=op.fuses_as, node=nid, op=node.op, label=node.label, describe=op.describe(node.attrs),
            attrs=node.attrs, operand=act(other, role) if role is not None else None,
            keep_input=act(value, "kept") if keep and tables is None else None))
        before = node
    return tuple(stages)


def _eval_schedule(g: Graph, forward: list[Step], fusions, eval_fusions, act, derived_total: int):
    """Eval mode's forward (Program.eval_forward) and the derived region's new size: each
    producer whose eval chain folds a batchnorm runs with that chain as its epilogue, after one
    fold step per batchnorm, which writes its (scale, shift) pairs into a table of its own in the
    derived region; every other step is the training forward's. Empty when nothing folds."""
    if eval_fusions == fusions:
        return (), derived_total
    eval_fused_into = {nid: producer for producer, chain in eval_fusions.items() for nid in chain}
    step_of = {f.node: f for f in forward}
    schedule: list[Step] = []
    for f in forward:
        if f.node in eval_fused_into:
            continue                                  # runs in its producer's kernel
        chain = eval_fusions.get(f.node)
        if chain == fusions.get(f.node):
            schedule.append(f)
            continue
        tables = {}
        for nid in chain:
            # A node that folds is in a chain only by folding: it never fuses in training.
            if lookup(g.nodes[nid].op).folds_in_eval is None:
                continue
            bn = step_of[nid]
            pairs = 2 * g.nodes[nid].attrs["C"]
            tables[nid] = Operand("affine", DERIVED, derived_total, pairs)
            derived_total += pairs
            schedule.append(replace(bn, inputs=(), outputs=(), saved=None, derived=tables[nid], epilogue=Epilogue(),
                                    workspace=Workspace(), parallel=ParallelSplit("none"), fused_into=None,
                                    folds_into=f.node))
        node = g.nodes[f.node]
        folded = {"outputs": (act(g.nodes[chain[-1]].output, "y"),),
                  "epilogue": Epilogue(bias=f.epilogue.bias, stages=_stages(g, node, chain, act, tables))}
        schedule.append(replace(f, **folded, batched=f.batched and replace(f.batched, **folded)))
    return tuple(replace(s, index=i, batched=s.batched and replace(s.batched, index=i))
                 for i, s in enumerate(schedule)), derived_total


def lower(graph: Graph, algo: Mapping[str, str] | str | None = None, guard: int = 0,
          lacks: frozenset[str] = frozenset(), backend: str = "c",
          measured: Mapping[int, str] = MappingProxyType({})) -> Program:
    """The lowered program of a checked graph for `backend`; `algo` is the per-run variant
    override. `guard` (sanitizer builds): no tensor shares memory with another, and `guard`
    elements (per sample in the activation blocks) follow each one, which the module poisons
    (Region.guards). `lacks`: the variants the target has no kernels for
    (Target.lacks_variants), which are never chosen, nor is a variant of other backends only.
    `measured`: node id → the variant tuning timed fastest for it (convdsl/tune.py)."""
    g = graph
    override = algo_override(algo)
    plan = make_plan(g, guard)

    def numel(vid: int) -> Dim:
        return D.product(g.values[vid].type.shape)

    chosen = chosen_variants(g, override, lacks, backend, measured)
    fusions = _fusions(g, chosen)
    # Eval mode's schedule folds batchnorms into their producers: its placement gives the values
    # in between no memory either.
    eval_fusions = _fusions(g, chosen, fusions)
    eval_guards = ()
    if guard:
        eval_offsets, eval_total, eval_guards = place_guarded(lifetimes(g, eval_fusions), guard)
    else:
        eval_offsets, eval_total = inference_placement(g, eval_fusions)
    inference = tuple(Operand(f"v{v.id}", INFERENCE, eval_offsets[v.id], numel(v.id), v.id, v.type.shape)
                      for v in g.values)
    # Training: activations, gradients and saved masks in one block, sharing memory by lifetime.
    layout = training_placement(g, fusions, guard)
    activations = tuple(Operand(f"v{v.id}", ACTIVATIONS, layout.activation[v.id], numel(v.id), v.id, v.type.shape)
                        for v in g.values)
    gradients = tuple(Operand(f"d{v.id}", GRADIENTS, layout.gradient[v.id], numel(v.id), v.id, v.type.shape)
                      for v in g.values)

    def act(vid: int, role: str) -> Operand:
        a = activations[vid]
        return Operand(role, a.region, a.offset, a.size, a.value, a.shape)

    def grad(vid: int, role: str) -> Operand:
        a = gradients[vid]
        return Operand(role, a.region, a.offset, a.size, a.value, a.shape)

    saved_offset = layout.saved

    fused_into = {nid: producer for producer, chain in fusions.items() for nid in chain}

    batched = batched_variants(g, chosen, override, lacks, backend, measured)
    batched_from = min((least for least, _ in batched.values()), default=0)
    forward, works, owns, derived_total = [], [], [], 0
    batched_works, batched_derived_total = [], 0

    def forward_step(nid: int, variant: Variant, alternative: bool = False) -> Step:
        """`alternative`: a batched alternative's step, its workspace and derived memory counted
        in the batched regions."""
        nonlocal derived_total, batched_derived_total
        node: Node = g.nodes[nid]
        op = lookup(node.op)
        in_types = tuple(g.values[v].type for v in node.inputs)
        out_t = g.values[node.output].type
        work = variant.workspace(in_types, out_t, node.attrs)
        if work != 0:
            (batched_works if alternative else works).append(work)
        own = variant.thread_workspace(in_types, out_t, node.attrs)
        if own != 0:
            owns.append(own)
        params = tuple(Operand(local, PARAMS, slot.offset, slot.size, None, slot.spec.shape, slot.spec.trainable)
                       for local, slot in plan.layer_params(node.layer).items())
        buffers = tuple(Operand(local, BUFFERS, slot.offset, slot.size, None, slot.spec.shape, False)
                        for local, slot in plan.layer_buffers(node.layer).items())
        kept = variant.derived(in_types, out_t, node.attrs)
        derived = None
        if kept and alternative:
            derived = Operand("derived", BATCHED_DERIVED, batched_derived_total, kept)
            batched_derived_total += kept
        elif kept:
            derived = Operand("derived", DERIVED, derived_total, kept)
            derived_total += kept
        saved = None
        if nid in saved_offset:
            off, elems = saved_offset[nid]
            saved = Operand("saved", SAVED, off, elems, None)
        epilogue = _epilogue(op, node.attrs, {p.role for p in params})
        output = act(node.output, "y")
        chain = fusions.get(nid)
        if chain is not None:
            # One kernel writes the chain's last value; the values in between only where kept.
            epilogue = Epilogue(bias=epilogue.bias, stages=_stages(g, node, chain, act))
            output = act(g.nodes[chain[-1]].output, "y")
        return Step(
            index=len(forward), phase="forward", node=nid, op=node.op, label=node.label, line=node.span.line,
            layer=node.layer, describe=op.describe(node.attrs), variant=variant.name,
            variant_template=variant.template, attrs=node.attrs, in_types=in_types, out_type=out_t,
            inputs=tuple(act(v, f"x{i}") for i, v in enumerate(node.inputs)), outputs=(output,),
            params=params, buffers=buffers, saved=saved, derived=derived, epilogue=epilogue,
            workspace=Workspace(work, variant.doc if work != 0 else "", own),
            parallel=ParallelSplit(variant.parallel, threshold=variant.parallel_threshold,
                                   gemm_threshold=variant.gemm_threshold, batch_threshold=variant.batch_threshold,
                                   tiles=variant.tiles(in_types, out_t, node.attrs),
                                   dot_columns=variant.dot_columns),
            fused_into=fused_into.get(nid))

    for nid in plan.order:
        step = forward_step(nid, chosen[nid])
        if nid in batched:
            least, variant = batched[nid]
            step = replace(step, batched=replace(forward_step(nid, variant, alternative=True), min_batch=least))
        forward.append(step)
    steps = [f for f in forward if f.fused_into is None]
    eval_forward, derived_total = _eval_schedule(g, forward, fusions, eval_fusions, act, derived_total)

    # A parameter's gradient that one step alone touches (a layer not shared) can be written whole
    # by that step's kernel (Variant.writes_param_grads) instead of zeroed and added into.
    param_users = Counter(p.offset for f in forward for p in f.params if p.trainable)

    def writes_params(f: Step, variant: Variant) -> bool:
        own = [p for p in f.params if p.trainable]
        return bool(own) and variant.writes_param_grads_on(backend) and all(param_users[p.offset] == 1 for p in own)

    def backward_step(f: Step, variant: Variant, params_written: bool) -> Step:
        node = g.nodes[f.node]
        grads = tuple(Operand(f"d{p.role}", PARAM_GRADS, p.offset, p.size, None, p.shape, True)
                      for p in f.params if p.trainable)
        # It reads dy and what its op says its backward reads (the training block keeps exactly that).
        reads = lookup(f.op).backward_reads(f.attrs)
        read = ((tuple(act(v, f"x{i}") for i, v in enumerate(node.inputs)) if INPUTS in reads else ())
                + ((act(node.output, "y"),) if OUTPUT in reads else ()))
        # A gradient this step touches first is zeroed before it, unless its kernel writes it
        # whole (its first input's, once among its inputs): a pass over it, and the kernel's
        # reading it back, fewer.
        zeroed = layout.zeroed_before(f.node)
        first = node.inputs[0] if node.inputs else None
        written = (first in zeroed and node.inputs.count(first) == 1
                   and variant.writes_input_grad_on(backend, f.attrs))
        return Step(
            index=len(steps), phase="backward", node=f.node, op=f.op, label=f.label, line=f.line, layer=f.layer,
            describe=f.describe, variant=f.variant, variant_template=f.variant_template, attrs=f.attrs,
            in_types=f.in_types, out_type=f.out_type,
            inputs=(grad(node.output, "dy"), *read),
            outputs=tuple(grad(v, f"dx{i}") for i, v in enumerate(node.inputs)) + grads,
            params=f.params, buffers=f.buffers, saved=f.saved, epilogue=f.epilogue, workspace=f.workspace,
            derived=f.derived if variant.derived_in_backward else None,
            parallel=f.parallel, fused_into=f.fused_into,
            zero_first=tuple(grad(v, f"d{v}") for v in zeroed if not (written and v == first)),
            writes_first=(grad(first, f"d{first}"),) if written else (), min_batch=f.min_batch,
            writes_param_grads=params_written)

    for f in reversed(forward):
        # Both of a step's kernels write its parameters' gradients, or neither: which one runs is
        # the batch's, and what the backward's start zeroes is fixed.
        params_written = writes_params(f, chosen[f.node]) and (
            f.batched is None or writes_params(f.batched, batched[f.node][1]))
        step = backward_step(f, chosen[f.node], params_written)
        if f.batched is not None:
            step = replace(step, batched=backward_step(f.batched, batched[f.node][1], params_written))
        steps.append(step)
    steps = [replace(s, index=i, batched=s.batched and replace(s.batched, index=i)) for i, s in enumerate(steps)]
    trainable = tuple(Operand(p.full_name, PARAMS, p.offset, p.size, None, p.spec.shape, True)
                      for p in plan.params if p.spec.trainable)
    loss = None
    if g.loss is not None:
        loss = LossStep(g.loss.kind, g.loss.value, g.loss.output_index, g.outputs[g.loss.output_index].name,
                        g.loss.span.line, g.values[g.loss.value].type, dict(g.loss.attrs))
    # The optimizer's step, after a loss's backward or the caller's own (update from net.grads).
    update_line = g.loss.span.line if g.loss is not None else (g.span.line if g.span else 0)
    steps.append(Step(
        index=len(steps), phase="update", node=-1, op="optimizer", label="update", line=update_line,
        layer="", describe="optimizer step (sgd, adam or adamw, chosen per call): one fused pass a parameter",
        variant="fused", variant_template="", attrs={}, in_types=(), out_type=TensorType(()),
        inputs=tuple(Operand(f"d{p.role}", PARAM_GRADS, p.offset, p.size, None, p.shape) for p in trainable),
        outputs=trainable,
        parallel=ParallelSplit("elements", "each parameter block's pass", threshold=OPTIMIZER_SPLIT)))

    regions = (
        Region(INFERENCE, eval_total, True, "eval mode: the values of a forward, sharing memory by lifetime",
               eval_guards),
        Region(TRAINING, layout.total, True, "training mode: what backward reads, the gradients and saved masks, "
                                             "sharing memory by lifetime (act, grad and saved offsets are into it)",
               layout.guards),
        Region(WORKSPACE, D.maximum_of(works), False, "one step's scratch (im2col columns), shared by all steps"),
        Region(BATCHED_WORKSPACE, D.maximum_of(works + batched_works), False,
               "the workspace of a batch that runs the steps' batched alternatives (from batch "
               f"{batched_from})"),
        Region(THREAD_WORKSPACE, D.maximum_of(owns), False, "per thread, when a step splits the batch across threads"),
        Region(PARAMS, plan.param_total, False, "every parameter", plan.param_guards),
        Region(PARAM_GRADS, plan.param_total, False, "the gradients of the trainable parameters", plan.param_guards),
        Region(BUFFERS, plan.buffer_total, False, "layer state that is not trained (running statistics)"),
        Region(DERIVED, derived_total, False, "per step, kept across calls: kernels' transforms of their weights "
                                              "(Winograd), remade when the weights change; eval mode's folded "
                                              "batchnorm tables, made each call"),
        Region(BATCHED_DERIVED, batched_derived_total, False, "the batched alternatives' derived memory, allocated "
                                                              "by the first prepare of a batch that runs one"),
    )

    def maker(v) -> str:
        if v.producer is None:
            return "an input"
        node = g.nodes[v.producer]
        return f"{node.label} (line {node.span.line})"

    def channels_last(t: TensorType) -> bool:
        return g.layout == "NHWC" and t.rank > 1 and D.product(t.spatial) != 1

    # An eval-mode forward keeps nothing for a backward, so the kernels may read the inputs where
    # the caller has them and write the outputs straight into the caller's arrays: two copies of
    # each fewer (a cheap layer on a large map spent more time in them than computing). Not where
    # the edge converts the layout, nor an output that is an input too (its value lives in the
    # caller's input: it is copied from there), nor the loss's output (the loss reads it from its
    # place after the forward). Training mode copies the inputs, and the outputs a backward reads:
    # it reads them after the call, when the caller may have changed them.
    # A backward writes an input's gradient into the caller's array (no copy out after it), but
    # for an input that is an output too: its gradient's place is seeded before the pass.
    in_place = set()
    read_by_backward = values_read_by_backward(g)
    output_values = {o.value for o in g.outputs}

    def boundary(b, output: bool) -> Boundary:
        t = g.values[b.value].type
        transposed = channels_last(t)
        here = not transposed and b.value not in in_place and not (output and g.loss is not None
                                                                   and b.value == g.loss.value)
        if here:
            in_place.add(b.value)
        return Boundary(b.name, b.value, t, transposed, here, output and here and b.value not in read_by_backward,
                        not output and not transposed and b.value not in output_values)

    inputs = tuple(boundary(i, False) for i in g.inputs)
    outputs = tuple(boundary(o, True) for o in g.outputs)
    return Program(
        name=g.name, source_path=g.source_path, line=g.span.line if g.span else 0, layout=g.layout, dtype=g.dtype,
        sym_dims=g.sym_dims,
        inputs=inputs, outputs=outputs,
        values=tuple(ValueInfo(v.id, v.type, maker(v),
                               None if v.producer is None else g.nodes[v.producer].label,
                               g.span if v.producer is None else g.nodes[v.producer].span) for v in g.values),
        regions=regions, activations=activations, inference=inference, gradients=gradients,
        params=plan.params, param_total=plan.param_total, buffers=plan.buffers, buffer_total=plan.buffer_total,
        steps=tuple(steps), eval_forward=eval_forward, loss=loss,
        zero_at_start=tuple(grad(v, f"d{v}") for v in layout.zeroed_at_start()),
        batched_from=batched_from,
        written_param_grads=tuple(sorted((p.offset, p.size) for s in steps if s.writes_param_grads
                                         for p in s.params if p.trainable)))
