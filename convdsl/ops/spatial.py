"""What the convolution and pooling family shares: per-axis arguments, padding and output size.

The output-size rule is the chapter's (§2.4) with padding and dilation:
    out = floor((in + p_before + p_after − r·(k−1) − 1) / s) + 1
"""
from __future__ import annotations

from typing import Callable

from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import TensorType
from ..errors import ConvDSLError
from .base import Arg, OpContext, Symbol, check_attribute_size, describe_value, spatial_rank_error

PAD_FORMS = ("valid, same or full, an integer (that many zeros on every side), a tuple per axis such as "
             "(1, 2), or (before, after) pairs such as ((1, 0), (2, 1))")


PAD_MODES = ("zeros", "reflect", "replicate")
_LACKED_MODES = ("reflection", "replication", "circular", "symmetric", "edge", "wrap")
_LACKED_WHY = ("circular and symmetric padding are not in the language (padding adds zeros, or with "
               "pad_mode=reflect or replicate mirrors or repeats the border)")


def pad_arg(default=Symbol("valid")) -> Arg:
    """The `pad` argument of the conv and pool family, with what it takes for messages."""
    return Arg("pad", default, forms=PAD_FORMS, symbols=("valid", "same", "full"),
               lacks=_LACKED_MODES, lacks_why=_LACKED_WHY)


def pad_mode_arg(name: str = "pad_mode") -> Arg:
    """How padding is filled, as PyTorch's Conv2d(padding_mode=…) and F.pad(mode=…) have it:
    zeros, reflect (mirrored without repeating the border) or replicate (the border repeated)."""
    return Arg(name, Symbol("zeros"), forms=", ".join(PAD_MODES), symbols=PAD_MODES,
               lacks=_LACKED_MODES, lacks_why=_LACKED_WHY)


def mode_error(pad: Symbol, ctx: OpContext, arg: str) -> ConvDSLError:
    return ctx.error(f"`{arg}` says how much padding; {pad.name} is how it is filled: write `{arg}=1, "
                     f"pad_mode={pad.name}` (conv, depthwise and separable take pad_mode), or pad the map "
                     f"first with `pad(1, mode={pad.name})`", arg=arg)


def axes_text(rank: int) -> str:
    return f"{rank} spatial axis" if rank == 1 else f"{rank} spatial axes"


def per_axis(value, rank: int, ctx: OpContext, arg: str, minimum: int = 1) -> tuple[int, ...]:
    """An int for every axis, or a tuple with one int per axis."""
    items = value if isinstance(value, tuple) else (value,) * rank
    if len(items) != rank:
        raise ctx.error(f"`{arg}` has {len(items)} values but the input has {axes_text(rank)}", arg=arg)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ctx.error(f"`{arg}` must be an integer or a tuple of integers, got {describe_value(value)}",
                            arg=arg)
        if v < minimum:
            raise ctx.error(f"`{arg}` must be at least {minimum}, got {v}", arg=arg)
        check_attribute_size(v, ctx, arg)
    return tuple(items)


def effective_kernel(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(r * (k - 1) + 1 for k, r in zip(kernel, dilation))


def resolve_padding(pad, sizes: tuple[Dim, ...], kernel, stride, dilation, ctx: OpContext,
                    arg: str = "pad") -> tuple[tuple[Dim, Dim], ...]:
    """(before, after) zeros on each axis for valid | same | full | int | tuple | ((b, a), …)."""
    rank = len(sizes)
    keff = effective_kernel(kernel, dilation)
    if isinstance(pad, Symbol):
        if pad.name == "valid":
            return tuple((0, 0) for _ in range(rank))
        if pad.name == "full":
            return tuple((k - 1, k - 1) for k in keff)
        if pad.name == "same":
            out = []
            for size, k, s in zip(sizes, keff, stride):
                # TensorFlow/ONNX SAME_UPPER: output = ceil(in / s), the odd zero goes at the end.
                want = D.ceildiv(size, s)
                total = D.maximum(D.sub(D.add(D.mul(D.sub(want, 1), s), k), size), 0)
                if isinstance(total, int):
                    out.append((total // 2, total - total // 2))
                else:
                    before = D.floordiv(total, 2)
                    out.append((before, D.sub(total, before)))
            return tuple(out)
        if pad.name in PAD_MODES:
            raise mode_error(pad, ctx, arg)
        raise ctx.error(f"`{arg}` is {PAD_FORMS}; got `{pad.name}`", arg=arg)
    if isinstance(pad, bool):
        raise ctx.error(f"`{arg}` is {PAD_FORMS}; got {describe_value(pad)}", arg=arg)
    if isinstance(pad, int):
        if pad < 0:
            raise ctx.error(f"`{arg}` cannot be negative, got {pad}", arg=arg)
        check_attribute_size(pad, ctx, arg)
        return tuple((pad, pad) for _ in range(rank))
    if isinstance(pad, tuple):
        if len(pad) != rank:
            if rank == 1 and len(pad) == 2 and all(isinstance(p, int) and not isinstance(p, bool) for p in pad):
                # ((4, 0)) is (4, 0) in brackets: two axes' padding, not one (before, after) pair.
                raise ctx.error(f"`{arg}` has 2 entries but the input has 1 spatial axis; a single (before, after) "
                                f"pair is written `(({pad[0]}, {pad[1]}),)`: the trailing comma makes a tuple of "
                                f"one pair, where (({pad[0]}, {pad[1]})) is ({pad[0]}, {pad[1]}) in brackets",
                                arg=arg)
            raise ctx.error(f"`{arg}` has {len(pad)} entries but the input has {axes_text(rank)}", arg=arg)
        out = []
        for p in pad:
            if isinstance(p, tuple) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            and v >= 0 for v in p):
                out.append((p[0], p[1]))
            elif isinstance(p, int) and not isinstance(p, bool) and p >= 0:
                out.append((p, p))
            else:
                raise ctx.error(f"`{arg}` entries must be non-negative integers or (before, after) pairs, "
                                f"got {describe_value(p)}", arg=arg)
            for v in out[-1]:
                check_attribute_size(v, ctx, arg)
        return tuple(out)
    raise ctx.error(f"`{arg}` is {PAD_FORMS}; got {describe_value(pad)}", arg=arg)


def output_size(size: Dim, pads: tuple[Dim, Dim], k_eff: int, stride: int) -> Dim:
    return D.add(D.floordiv(D.sub(D.add(D.add(size, pads[0]), pads[1]), k_eff), stride), 1)


def output_sizes(op: str, t: TensorType, pads, kernel, stride, dilation, ctx: OpContext,
                 pad_spec=None) -> tuple[Dim, ...]:
    """Output spatial sizes; a static size below 1 is an error that says what would fix it.

    With pad=same the size is ceil(in / stride) by definition; saying so directly keeps
    run-time sizes readable ((H + 1)//2 rather than the padding formula spelled out)."""
    keff = effective_kernel(kernel, dilation)
    if isinstance(pad_spec, Symbol) and pad_spec.name == "same":
        outs = tuple(D.ceildiv(s, st) for s, st in zip(t.spatial, stride))
    else:
        outs = tuple(output_size(s, p, k, st) for s, p, k, st in zip(t.spatial, pads, keff, stride))
    if any(isinstance(o, int) and o < 1 for o in outs):
        shown = "×".join(str(max(o, 0)) if isinstance(o, int) else D.to_text(o) for o in outs)
        insz = "×".join(D.to_text(s) for s in t.spatial)
        kern = "×".join(str(k) for k in kernel) if len(set(kernel)) > 1 else str(kernel[0])
        extra = ""
        if any(r > 1 for r in dilation):
            extra = f" (dilated to {'×'.join(str(k) for k in keff)})"
        raise ctx.error(f"{op}: output would be {shown}: input {insz}, kernel {kern}{extra}; "
                        f"use pad=same or a smaller kernel")
    return outs


def input_rank_check(op: str, t: TensorType, ctx: OpContext) -> int:
    rank = len(t.spatial)
    if rank not in (1, 2, 3):
        raise spatial_rank_error(op, t, ctx)
    return rank


def as3d(values: tuple, fill) -> tuple:
    """Kernels are written once for (D, H, W); 1-D and 2-D maps get size-1 leading axes."""
    return (fill,) * (3 - len(values)) + tuple(values)


def window_context(attrs: dict, t_in: TensorType, out: TensorType, c: Callable[[Dim], str]) -> dict:
    """The per-axis numbers a conv/pool template needs, padded to 3-D and rendered to C."""
    kernel, stride = attrs["kernel"], attrs["stride"]
    dilation = attrs.get("dilation", (1,) * len(kernel))
    pads = attrs["pads"]
    return {
        "K": as3d(kernel, 1), "S": as3d(stride, 1), "R": as3d(dilation, 1),
        "P": tuple(c(p[0]) for p in as3d(pads, (0, 0))),
        "I": tuple(c(d) for d in as3d(t_in.spatial, 1)),
        "O": tuple(c(d) for d in as3d(out.spatial, 1)),
    }
