"""Trained weights as C data: `<prefix>_weights.c` for `convdsl compile --weights W.npz`.

The numbers go in two arrays laid out as the parameter and buffer blocks of the lowered program
(offsets and order from `Program.params` / `Program.buffers`), a fixed count per line with a
comment heading each tensor, so that a 100 MB model is a long file of short lines, which every
compiler and editor reads, not one line of 100 MB. f32 numbers are written with 9 significant
digits and f64 with 17: each reads back as exactly the number saved.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConvDSLError
from ..lower.program import Program
from ..targets.base import comment_safe

PER_LINE = 8


def _lines(values: np.ndarray, f64: bool) -> list[str]:
    fmt = "{:.17g}" if f64 else "{:.9g}f"
    texts = []
    for v in values.reshape(-1).tolist():
        text = fmt.format(v)
        if "." not in text and "e" not in text and "n" not in text:
            text = text.replace("f", ".0f") if not f64 else text + ".0"
        texts.append(text)
    return [", ".join(texts[i:i + PER_LINE]) for i in range(0, len(texts), PER_LINE)]


def checked_state(program: Program, state: dict, where: str) -> dict[str, np.ndarray]:
    """The arrays of `state` for every parameter and buffer of the program, names and shapes
    checked as Model.load checks them; an error names what does not fit."""
    expected = {s.full_name: tuple(s.spec.shape) for s in program.params}
    expected.update({b.full_name: tuple(b.spec.shape) for b in program.buffers})
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ConvDSLError(None, f"{where}: the weights do not match this network"
                                 + (f"; missing {missing[:5]}" if missing else "")
                                 + (f"; unexpected {extra[:5]}" if extra else ""))
    out = {}
    for name, shape in expected.items():
        arr = np.asarray(state[name])
        if arr.shape != shape:
            raise ConvDSLError(None, f"{where}: `{name}` has shape {list(arr.shape)}, expected {list(shape)}")
        if arr.dtype.kind not in "biuf":
            raise ConvDSLError(None, f"{where}: `{name}` has dtype {arr.dtype}, expected real numbers")
        dtype = np.float64 if program.dtype == "f64" else np.float32
        with np.errstate(over="ignore"):
            value = arr.astype(dtype)
        if not np.all(np.isfinite(value)):
            raise ConvDSLError(None, f"{where}: `{name}` holds a value that is not a finite {np.dtype(dtype).name}")
        out[name] = value
    return out


def render_weights(program: Program, prefix: str, network: str, state: dict, weights_name: str) -> str:
    from .render import environment
    f64 = program.dtype == "f64"

    def tensors(slots):
        out, at = [], 0
        for s in sorted(slots, key=lambda s: s.offset):
            if s.offset > at:          # a gap in the block (none today): zeros keep the offsets right
                out.append({"name": "(unused)", "shape": [s.offset - at], "size": s.offset - at, "offset": at,
                            "lines": _lines(np.zeros(s.offset - at), f64)})
            out.append({"name": comment_safe(s.full_name), "shape": list(s.spec.shape), "size": s.size,
                        "offset": s.offset, "lines": _lines(state[s.full_name], f64)})
            at = s.offset + s.size
        return out
    return environment().get_template("c/weights.c.j2").render(
        prefix=prefix, network=comment_safe(network), weights_name=comment_safe(weights_name), per_line=PER_LINE,
        params=tensors(program.params), param_total=program.param_total,
        buffers=tensors(program.buffers), buffer_total=program.buffer_total)
