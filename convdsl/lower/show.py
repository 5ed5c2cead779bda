"""The lowered program as text, one line per step: what `convdsl plan` and `--emit lowered` print.

A step's line: its index and phase, the layer and its line in the file, the kernel variant,
its operands as region[offset:+size] (with those its fused epilogue reads and keeps; per-sample
offsets and sizes in elements; act, grad and saved offsets are into the training block, where
they share memory by lifetime; run-time sizes stay symbolic), the fused epilogue, the workspace
and the thread split; a backward step then names the gradients it zeroes first (it is the first
to add into them). A step with a `batched` alternative is followed by a line `from batch K:` with
that alternative's kernel, operands, workspace and split.
"""
from __future__ import annotations

from ..ir import dims as D
from ..ir.dims import Dim
from ..ops.losses import LOSSES
from .program import BATCHED_DERIVED, BATCHED_WORKSPACE, DERIVED, Operand, Program, Step

_REGION_SHORT = {"inference": "eval", "training": "train", "activations": "act", "gradients": "grad", "saved": "saved", "params": "params",
                 "param_grads": "pgrad", "buffers": "buf", "workspace": "ws", "thread_workspace": "tws",
                 "derived": "drv", "batched_derived": "bdrv", "batched_workspace": "bws"}


def _dim(d: Dim) -> str:
    return D.to_text(d)


def operand_text(o: Operand) -> str:
    return f"{o.role}={_REGION_SHORT[o.region]}[{_dim(o.offset)}:+{_dim(o.size)}]"


def step_text(step: Step) -> str:
    where = f"{step.label} (line {step.line})"
    text = f"{step.index:3d} {step.phase:<8} {where:<24} {_kernel_text(step)}"
    if step.batched is not None:
        # The alternative a batch of at least min_batch samples runs: on its own line, its kernel.
        text += f"\n    from batch {step.batched.min_batch}: {_kernel_text(step.batched)}"
    return text


def _kernel_text(step: Step) -> str:
    """A step's kernel, operands, epilogue, workspace and split: its line after the layer."""
    operands = [operand_text(o) for o in step.inputs + step.outputs]
    if step.phase == "forward":
        # What the fused stages read (a residual, a scale's factors) and keep for a backward.
        operands += [operand_text(o) for o in step.epilogue.operands]
    if step.phase != "update":
        operands += [operand_text(p) for p in step.params]
        operands += [operand_text(b) for b in step.buffers]
        if step.saved is not None:
            operands.append(operand_text(step.saved))
        if step.derived is not None and step.phase == "forward":
            operands.append(operand_text(step.derived))
    work = _dim(step.workspace.elements) if step.workspace.elements != 0 else "0"
    if step.workspace.per_thread != 0:
        work += f" + {_dim(step.workspace.per_thread)} per thread"
    kernel = f"{step.op}/{'fold' if step.folds_into is not None else step.variant}"
    tile = "".join(f"; {name} in {t.text()}" for name, t in step.parallel.tiles)
    zero = f" | zeroes {' '.join(o.role for o in step.zero_first)} first" if step.zero_first else ""
    written = [o.role for o in step.writes_first]
    written += [f"d{p.role}" for p in step.params if p.trainable] if step.writes_param_grads else []
    zero += f" | writes {' '.join(written)} whole" if written else ""
    return (f"{kernel:<18} {' '.join(operands)} | epilogue {step.epilogue.text()} | workspace {work} "
            f"| threads {step.parallel.axis}{tile}{zero}")


def program_text(program: Program) -> str:
    lines = [f"lowered program of network {program.name} ({program.dtype}, {program.layout} at the boundary; "
             f"buffers channel-first)"]
    lines.append("regions (elements; per sample where marked):")
    for r in program.regions:
        if r.name == DERIVED and r.size == 0:
            continue            # only Winograd steps keep memory across calls: said where there is some
        if r.name in (BATCHED_DERIVED, BATCHED_WORKSPACE) and program.batched_from == 0:
            continue            # only programs with batched alternatives have these
        lines.append(f"  {_REGION_SHORT[r.name]:<7} {r.name:<12} {_dim(r.size):>10}{' per sample' if r.per_sample else ''}"
                     f"  {r.doc}")
    lines.append("inputs:  " + ", ".join(f"{b.name}=act[{_dim(program.activations[b.value].offset)}:+"
                                         f"{_dim(program.activations[b.value].size)}]" for b in program.inputs))
    lines.append("outputs: " + ", ".join(f"{b.name}=act[{_dim(program.activations[b.value].offset)}:+"
                                         f"{_dim(program.activations[b.value].size)}]" for b in program.outputs))
    lines.append("eval mode (forward only, values sharing memory by lifetime): "
                 + " ".join(f"v{o.value}=eval[{_dim(o.offset)}:+{_dim(o.size)}]" for o in program.inference))
    if program.zero_at_start:
        lines.append("backward start: zeroes " + " ".join(f"{o.role}=grad[{_dim(o.offset)}:+{_dim(o.size)}]"
                                                         for o in program.zero_at_start) + " (then seeds the outputs')")
    lines.append("steps (training mode's places; eval mode reads and writes the same values at their eval places):")
    lines.extend(step_text(s) for s in program.steps)
    if program.eval_forward:
        lines.append("eval mode's forward (no backward follows; batchnorms folded into the kernel before them, "
                     "each after a step that makes its scale and shift per channel):")
        lines.extend(step_text(s) for s in program.eval_forward)
    if program.loss is not None:
        call = LOSSES[program.loss.kind].describe(program.loss.output_name, program.loss.attrs)
        lines.append(f"loss: {call} (line {program.loss.line})")
    return "\n".join(lines) + "\n"
