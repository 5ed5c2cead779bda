"""An ONNX model → a readable .cnn network and its weights (`convdsl import MODEL.onnx -o OUT.cnn`).

The model's nodes are read in their (topological) order. Each tensor is either a constant (an
initializer, a Constant node, or shape arithmetic folded from the known shapes: Shape → Gather →
Unsqueeze → Concat → Reshape, Cast, Div …, with the batch and the run-time sizes carried as
names) or a value of the network, with its per-sample shape. Each ONNX op has one translation
function in TRANSLATORS that reads its attributes and inputs and appends language steps; a
parameterised step becomes a `layer NAME = …` declaration (NAME from the ONNX weight's name), so
the weights land under `NAME.weight`, `NAME.bias`, `NAME.running_mean` … in OUT.npz. The steps
are then written as chains, one line per layer, each with a comment naming the ONNX node.

Anything the language cannot say is a ConvDSLError naming the node (its name, op type and index)
and the attribute, or the op the language lacks.
"""
from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConvDSLError
from ..frontend.unparse import number
from . import require_onnx

BATCH = "<batch>"          # the batch dim in folded shapes; never a dim of a sample


@dataclass
class Const:
    """A tensor known when importing: numbers, or a shape whose entries may be dim names."""
    value: np.ndarray


@dataclass
class Val:
    """A tensor of the network: `ref` is the language value (an input name or a step index),
    `shape` its per-sample ONNX shape (ints, run-time dim names, None where unknown) and `lang`
    the language's shape when it differs ([C] for an ONNX [C, 1, 1] gate)."""
    ref: object
    shape: tuple
    lang: tuple | None = None

    @property
    def lang_shape(self) -> tuple:
        return self.shape if self.lang is None else self.lang


@dataclass
class Step:
    call: str                         # the op as written after an arrow: `conv(16, kernel=3)`, `relu`
    inputs: list                      # refs of the language values it reads (the first is piped)
    comment: str                      # the ONNX node it comes from
    layer: str | None = None          # its `layer` declaration's name, when it has weights
    declares: bool = True             # False for a second use of a shared layer
    weights: dict = field(default_factory=dict)     # param/buffer name → array
    consts: list = field(default_factory=list)      # (name, text) const declarations it needs


class _Node:
    """One ONNX node with what errors need to name it."""

    def __init__(self, proto, index: int, onnx):
        self.proto = proto
        self.index = index
        self.op = proto.op_type
        self.name = proto.name or f"#{index}"
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
        for k, v in list(self.attrs.items()):
            if isinstance(v, bytes):
                self.attrs[k] = v.decode()

    @property
    def where(self) -> str:
        return f"node {self.index} `{self.name}` ({self.op})"

    def error(self, message: str, attribute: str | None = None) -> ConvDSLError:
        attr = f", attribute `{attribute}`" if attribute else ""
        return ConvDSLError(None, f"import: {self.where}{attr}: {message}")

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)


def _identifier(text: str, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    name = re.sub(r"_+", "_", name)
    if not name:
        name = fallback
    if name[0].isdigit():
        name = f"{fallback}_{name}"
    return name[:100]


_LANGUAGE_WORDS = frozenset({"network", "block", "use", "input", "layer", "const", "repeat", "output", "loss",
                             "layout", "dtype", "return", "true", "false", "channels", "height", "width", "depth"})


class _Importer:
    def __init__(self, model, source: str, network: str, loss: str | None = None):
        self.onnx = require_onnx()
        self.loss = loss
        self.model = model
        self.source = source
        self.network = network
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.env: dict[str, object] = {}
        self.steps: list[Step] = []
        self.inputs: list[tuple[str, tuple]] = []
        self.names: set[str] = set()
        self.done: set[int] = set()            # nodes already translated as part of a pattern
        self.shared: dict[tuple, str] = {}      # (call, weight initializers) → the layer that has them
        # A normalisation step whose per-channel scale and shift a following Mul / Add by
        # constants can still take in: step index → the ONNX tensor that is its output.
        self.affine_open: dict[int, str] = {}
        self.named_by_node: set[int] = set()    # such steps, named after a node: renamed after their weight
        # A Pad read only by a Conv of no padding of its own: the conv's `pad` and `pad_mode`
        # (PyTorch's Conv2d(padding_mode=…)): the Pad's output tensor → (pairs, language mode).
        self.conv_pads: dict[str, tuple] = {}
        self.fixed_batch: int | None = None
        self.dtype = "f32"
        nodes = [_Node(p, i, self.onnx) for i, p in enumerate(self.graph.node)]
        self.nodes = nodes
        self.consumers: dict[str, list[_Node]] = {}
        for n in nodes:
            for t in n.inputs:
                if t:
                    self.consumers.setdefault(t, []).append(n)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.producer = {t: n for n in nodes for t in n.outputs if t}

    # ---- names ------------------------------------------------------------------------
    def fresh(self, base: str, fallback: str = "v") -> str:
        from ..ops.base import registry
        base = _identifier(base, fallback)
        if keyword.iskeyword(base) or base in _LANGUAGE_WORDS or base in registry():
            base = f"{base}_"
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def layer_name(self, n: _Node, weight_input: str | None) -> str:
        """The layer's name from its weight's (PyTorch: `layer1.0.conv1.weight` → layer1_0_conv1),
        else from the node's."""
        if weight_input and weight_input.endswith((".weight", ".bias")) and weight_input.count(".") >= 1:
            return self.fresh(weight_input.rsplit(".", 1)[0], n.op.lower())
        return self.fresh(self.node_base(n), n.op.lower())

    @staticmethod
    def node_base(n: _Node) -> str:
        parts = [p for p in re.split(r"[/]", n.name) if p]
        if parts and parts[-1].split("_")[0] == n.op:
            parts = parts[:-1]
        # PyTorch repeats each scope: /layer1/layer1.0/conv1 → layer1.0/conv1
        kept = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
        return "_".join(kept) or n.op.lower()

    # ---- tensors ----------------------------------------------------------------------
    def get(self, n: _Node, name: str):
        if name not in self.env:
            raise n.error(f"input `{name}` is not produced by any earlier node, initializer or graph input")
        v = self.env[name]
        if isinstance(v, _Shuffling) and n.op not in ("Transpose", "Reshape"):
            raise v.nodes[0].error("channel groups transposed and read by another node than a Reshape back: the "
                                   "language has no transpose (a channel shuffle's Reshape-Transpose-Reshape is "
                                   "read as `shuffle`)")
        if isinstance(v, _GroupNorming) and n.op != ("InstanceNormalization" if v.eps is None else "Reshape"):
            raise v.nodes[0].error(f"channels in groups for a group normalisation whose result is read by {n.where}: "
                                   f"the language's groupnorm keeps its groups inside")
        return v

    def val(self, n: _Node, i: int) -> Val:
        v = self.get(n, n.inputs[i])
        if not isinstance(v, Val):
            raise n.error(f"input {i} (`{n.inputs[i]}`) is a constant; the language applies this op to "
                          f"network values only")
        return v

    def const(self, n: _Node, i: int, what: str = "", numeric: bool = True) -> np.ndarray | None:
        if i >= len(n.inputs) or not n.inputs[i]:
            return None
        v = self.get(n, n.inputs[i])
        if not isinstance(v, Const):
            raise n.error(f"input {i} (`{n.inputs[i]}`{', ' + what if what else ''}) must be a constant "
                          f"(an initializer or foldable from known shapes), but it is computed by the network")
        if numeric and v.value.dtype == object:
            raise n.error(f"input {i} (`{n.inputs[i]}`) depends on a run-time size and must be known when importing")
        return v.value

    def emit(self, n: _Node, call: str, inputs: list, shape: tuple, lang: tuple | None = None,
             layer: str | None = None, weights: dict | None = None, output: int = 0, consts=None) -> Val:
        step = Step(call, inputs, f"{n.name} ({n.op})", layer=layer, weights=weights or {}, consts=consts or [])
        self.steps.append(step)
        v = Val(len(self.steps) - 1, tuple(shape), None if lang is None else tuple(lang))
        self.env[n.outputs[output]] = v
        return v

    def alias(self, n: _Node, v: Val, shape: tuple | None = None, lang: tuple | None = None, output: int = 0):
        self.env[n.outputs[output]] = Val(v.ref, v.shape if shape is None else tuple(shape),
                                          v.lang if lang is None else tuple(lang))

    def share(self, n: _Node, name: str, call: str, weight_inputs: list[str]):
        """A layer whose weight tensors (the same initializers) an earlier node of the same call
        already has is that node's layer, used again: one set of weights, as `layer` means."""
        key = (call, tuple(weight_inputs))
        first = self.shared.get(key)
        if first is None:
            self.shared[key] = name
            return
        step = self.steps[-1]
        self.names.discard(name)
        step.layer, step.declares, step.weights = first, False, {}

    def weight(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr, dtype=np.float64 if self.dtype == "f64" else np.float32)

    # ---- the whole model ----------------------------------------------------------------
    def run(self):
        onnx = self.onnx
        init_names = set()
        for t in self.graph.initializer:
            self.env[t.name] = Const(onnx.numpy_helper.to_array(t))
            init_names.add(t.name)
        for vi in self.graph.input:
            if vi.name in init_names:
                continue
            self.add_input(vi)
        for n in self.nodes:
            if n.index in self.done:
                continue
            translate = TRANSLATORS.get(n.op)
            if n.proto.domain not in ("", "ai.onnx"):
                raise n.error(f"ops of the domain `{n.proto.domain}` are not ONNX operators the importer knows")
            if translate is None:
                raise n.error(f"the language has no counterpart of {n.op}")
            try:
                translate(self, n)
            except ConvDSLError:
                raise
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
                # A node the ONNX checker would refuse (an attribute missing or of the wrong kind):
                # said at the node, not as a traceback.
                raise n.error(f"malformed node ({type(e).__name__}: {e})") from None
        outputs = []
        for o in self.graph.output:
            v = self.env.get(o.name)
            if not isinstance(v, Val):
                raise ConvDSLError(None, f"import: graph output `{o.name}` is a constant; a network's outputs are "
                                         f"computed from its inputs")
            outputs.append((o.name, v))
        return outputs

    def add_input(self, vi):
        t = vi.type.tensor_type
        elem = t.elem_type
        if elem == self.onnx.TensorProto.DOUBLE:
            self.dtype = "f64"
        elif elem != self.onnx.TensorProto.FLOAT:
            raise ConvDSLError(None, f"import: graph input `{vi.name}` has element type "
                                     f"{self.onnx.TensorProto.DataType.Name(elem)}; the language's inputs are "
                                     f"float (f32) or double (f64)")
        if t.HasField("shape") and len(t.shape.dim) == 1:
            raise ConvDSLError(None, f"import: graph input `{vi.name}` has rank 1: with the batch axis taken out, "
                                     f"each sample would be a scalar; the language's tensors are [C, …] per sample")
        if not t.HasField("shape") or len(t.shape.dim) < 2:
            raise ConvDSLError(None, f"import: graph input `{vi.name}` needs a shape [batch, channels, …] "
                                     f"(rank 2 to 5)")
        dims = list(t.shape.dim)
        if len(dims) > 5:
            raise ConvDSLError(None, f"import: graph input `{vi.name}` has rank {len(dims)}; the language's maps have "
                                     f"at most 3 spatial axes")
        batch = dims[0]
        if batch.HasField("dim_value"):
            if self.fixed_batch not in (None, batch.dim_value):
                raise ConvDSLError(None, f"import: graph inputs have different fixed batch sizes")
            self.fixed_batch = batch.dim_value
        sample = []
        for i, d in enumerate(dims[1:], start=1):
            if d.HasField("dim_value"):
                sample.append(int(d.dim_value))
            else:
                base = d.dim_param if d.HasField("dim_param") and d.dim_param else f"{vi.name}_{i}"
                sample.append(_identifier(base, "S").capitalize() if not re.fullmatch(r"[A-Za-z_]\w*", base)
                              else base)
        if not isinstance(sample[0], int):
            raise ConvDSLError(None, f"import: graph input `{vi.name}` has a run-time channel count "
                                     f"`{sample[0]}`; convolutions need a fixed one")
        name = self.fresh(vi.name, "x")
        self.inputs.append((name, tuple(sample)))
        self.env[vi.name] = Val(name, tuple(sample))

    def onnx_shape_of(self, v: Val) -> list:
        return [BATCH, *(d if d is not None else f"<unknown {i}>" for i, d in enumerate(v.shape))]


# ---- shape helpers ----------------------------------------------------------------------

def _static(n: _Node, dims, what: str) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in dims):
        raise n.error(f"{what} needs fixed sizes here, but the input's are {list(dims)}")
    return tuple(dims)


def _tuple_text(values) -> str:
    values = tuple(values)
    if len(set(values)) == 1:
        return str(values[0])
    return "(" + ", ".join(str(v) for v in values) + ")"


def _pad_text(pairs) -> str:
    if all(b == a for b, a in pairs):
        return _tuple_text([b for b, _ in pairs])
    return "(" + ", ".join(f"({b}, {a})" for b, a in pairs) + (",)" if len(pairs) == 1 else ")")


def _pool_out(size, before, after, keff, stride):
    if not isinstance(size, int):
        return None
    return (size + before + after - keff) // stride + 1


def _window(imp: _Importer, n: _Node, x: Val, kernel, allow_ceil: bool, dilation=None):
    """(stride, pad text, output spatial sizes) of a conv or pool node from its attributes."""
    rank = len(x.shape) - 1
    imp.ceil_padded = False
    if len(kernel) != rank:
        raise n.error(f"kernel {list(kernel)} does not fit an input of {rank} spatial axes", "kernel_shape")
    strides = tuple(n.attr("strides", [1] * rank))
    dil = tuple(dilation if dilation is not None else [1] * rank)
    keff = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    auto = n.attr("auto_pad", "NOTSET")
    spatial = x.shape[1:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if auto == "SAME_UPPER" or all(isinstance(s, int) for s in spatial):
            if auto == "SAME_UPPER":
                outs = [-(-s // st) if isinstance(s, int) else None for s, st in zip(spatial, strides)]
                if not all(isinstance(s, int) for s in spatial):
                    return strides, "same", outs
            pairs = []
            for s, k, st in zip(_static(n, spatial, "auto_pad"), keff, strides):
                total = max((-(-s // st) - 1) * st + k - s, 0)
                small = total // 2
                pairs.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        else:
            raise n.error("SAME_LOWER with run-time sizes: the language's `same` puts the odd zero at the end",
                          "auto_pad")
    elif auto == "VALID":
        pairs = [(0, 0)] * rank
    elif auto == "NOTSET":
        pads = list(n.attr("pads", [0] * (2 * rank)))
        if len(pads) != 2 * rank:
            raise n.error(f"{len(pads)} pads for {rank} spatial axes", "pads")
        if any(p < 0 for p in pads):
            raise n.error("negative padding (cropping) is not in the language", "pads")
        pairs = list(zip(pads[:rank], pads[rank:]))
    else:
        raise n.error(f"auto_pad={auto} is not an ONNX value", "auto_pad")
    if n.attr("ceil_mode", 0):
        if not allow_ceil:
            raise n.error("ceil_mode=1", "ceil_mode")
        # ceil_mode keeps a last window that starts inside the (padded) input: the same as more
        # padding at the end for a pool that never counts padded cells.
        sizes = _static(n, spatial, "ceil_mode=1")
        new = []
        for s, (b, a), k, st in zip(sizes, pairs, keff, strides):
            out = -(-(s + b + a - k) // st) + 1
            if (out - 1) * st >= s + b:         # ONNX/PyTorch drop a window that starts in the end padding
                out -= 1
            extra = max((out - 1) * st + k - (s + b + a), 0)
            new.append((b, a + extra))
        if new != list(pairs):
            imp.ceil_padded = True
        pairs = new
    outs = [_pool_out(s, b, a, k, st) for s, (b, a), k, st in zip(spatial, pairs, keff, strides)]
    if all(b == 0 and a == 0 for b, a in pairs):
        pad = None
    else:
        pad = _pad_text(pairs)
    return strides, pad, outs


def _window_args(kernel, strides, pad, dilation=None, stride_default=None) -> list[str]:
    args = []
    if stride_default is None:
        if any(s != 1 for s in strides):
            args.append(f"stride={_tuple_text(strides)}")
    elif tuple(strides) != tuple(stride_default):
        args.append(f"stride={_tuple_text(strides)}")
    if pad is not None:
        args.append(f"pad={pad}")
    if dilation is not None and any(d != 1 for d in dilation):
        args.append(f"dilation={_tuple_text(dilation)}")
    return args


# ---- translators --------------------------------------------------------------------------

def _conv(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    w = imp.const(n, 1, "the weight")
    b = imp.const(n, 2, "the bias")
    rank = len(x.shape) - 1
    if w.ndim != rank + 2:
        raise n.error(f"weight of shape {list(w.shape)} for an input of {rank} spatial axes")
    cin = x.shape[0]
    out = w.shape[0]
    group = int(n.attr("group", 1))
    kernel = tuple(int(k) for k in w.shape[2:])
    if "kernel_shape" in n.attrs and tuple(n.attrs["kernel_shape"]) != kernel:
        raise n.error(f"kernel_shape {list(n.attrs['kernel_shape'])} differs from the weight's {list(kernel)}",
                      "kernel_shape")
    if w.shape[1] * group != cin:
        raise n.error(f"weight {list(w.shape)} with group={group} does not fit {cin} input channels", "group")
    dilation = tuple(n.attr("dilations", [1] * rank))
    strides, pad, outs = _window(imp, n, x, kernel, allow_ceil=False, dilation=dilation)
    padded = imp.conv_pads.get(n.inputs[0])
    mode = "zeros"
    if padded is not None:
        pairs, mode, pad_node = padded
        pad = _pad_text(pairs)
    name = imp.layer_name(n, n.inputs[1])
    args = []
    if group == cin and group > 1:
        op = "depthwise"
        args.append(_tuple_text(kernel))
        if out != cin:
            args.append(f"multiplier={out // cin}")
    else:
        op = "conv"
        args += [str(out), f"kernel={_tuple_text(kernel)}"]
    args += _window_args(kernel, strides, pad, dilation)
    if op == "conv" and group > 1:
        args.append(f"groups={group}")
    if mode != "zeros":
        args.append(f"pad_mode={mode}")
    weights = {"weight": imp.weight(w)}
    if b is None:
        args.append("bias=false")
    else:
        weights["bias"] = imp.weight(b.reshape(-1))
    call = f"{op}({', '.join(args)})"
    imp.emit(n, name, [x.ref], (out, *outs), layer=name, weights=weights)
    imp.steps[-1].call = call
    if padded is not None:
        imp.steps[-1].comment = f"{pad_node.name} ({pad_node.op}) + {imp.steps[-1].comment}"
    imp.share(n, name, call, [n.inputs[1], *(n.inputs[2:3] if b is not None else [])])


def _conv_transpose(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    w = imp.const(n, 1, "the weight")
    b = imp.const(n, 2, "the bias")
    rank = len(x.shape) - 1
    group = int(n.attr("group", 1))
    cin = x.shape[0]
    if w.ndim != rank + 2 or w.shape[0] != cin:
        raise n.error(f"weight of shape {list(w.shape)} does not fit the input {[cin, *x.shape[1:]]}")
    out = w.shape[1] * group
    kernel = tuple(int(k) for k in w.shape[2:])
    strides = tuple(n.attr("strides", [1] * rank))
    dilation = tuple(n.attr("dilations", [1] * rank))
    keff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    output_padding = list(n.attr("output_padding", [0] * rank))
    auto = n.attr("auto_pad", "NOTSET")
    if "output_shape" in n.attrs or auto in ("SAME_UPPER", "SAME_LOWER"):
        sizes = _static(n, x.shape[1:], "output_shape / auto_pad")
        want = list(n.attrs.get("output_shape", [s * st for s, st in zip(sizes, strides)]))[-rank:]
        pairs = []
        for s, st, k, op_, o in zip(sizes, strides, keff, output_padding, want):
            total = st * (s - 1) + op_ + k - o      # below 0: cells added at the end
            if auto == "SAME_UPPER":
                pairs.append((total // 2, total - total // 2))
            else:
                pairs.append((total - total // 2, total // 2))
    elif auto == "VALID":
        pairs = [(0, 0)] * rank
    else:
        pads = list(n.attr("pads", [0] * (2 * rank)))
        pairs = list(zip(pads[:rank], pads[rank:]))
    # The language trims `pad` cells from both ends and adds output_pad at the end: (b, a) is
    # pad=b with output_pad + (b − a) when b ≥ a.
    pad, opad = [], []
    for (bef, aft), op_, st, d in zip(pairs, output_padding, strides, dilation):
        extra = op_ + bef - aft
        if bef < aft or extra >= max(st, d):
            raise n.error(f"padding {bef} before and {aft} after with output_padding {op_} cannot be written as the "
                          f"language's deconv (pad trims both ends equally; output_pad < stride adds at the end)",
                          "pads")
        pad.append(bef)
        opad.append(extra)
    outs = [(s - 1) * st - 2 * p + k + op_ if isinstance(s, int) else None
            for s, st, p, k, op_ in zip(x.shape[1:], strides, pad, keff, opad)]
    name = imp.layer_name(n, n.inputs[1])
    args = [str(out), f"kernel={_tuple_text(kernel)}"]
    if any(s != 1 for s in strides):
        args.append(f"stride={_tuple_text(strides)}")
    if any(pad):
        args.append(f"pad={_tuple_text(pad)}")
    if any(opad):
        args.append(f"output_pad={_tuple_text(opad)}")
    if group > 1:
        args.append(f"groups={group}")
    if any(d != 1 for d in dilation):
        args.append(f"dilation={_tuple_text(dilation)}")
    weights = {"weight": imp.weight(w)}
    if b is None:
        args.append("bias=false")
    else:
        weights["bias"] = imp.weight(b.reshape(-1))
    imp.emit(n, name, [x.ref], (out, *outs), layer=name, weights=weights)
    imp.steps[-1].call = f"deconv({', '.join(args)})"


def _pool(kind: str):
    def translate(imp: _Importer, n: _Node):
        x = imp.val(n, 0)
        if len(n.outputs) > 1 and n.outputs[1]:
            raise n.error("the second output (the indices of the maxima) is not in the language")
        if "kernel_shape" not in n.attrs:
            raise n.error("a pool needs its kernel_shape", "kernel_shape")
        kernel = tuple(n.attr("kernel_shape"))
        rank = len(x.shape) - 1
        if any(d != 1 for d in n.attr("dilations", [1] * rank)):
            raise n.error("dilated pooling is not in the language", "dilations")
        if n.attr("storage_order", 0):
            raise n.error("storage_order=1", "storage_order")
        op = kind
        if kind == "lppool":
            p = n.attr("p", 2)
            if p != 2:
                raise n.error(f"p={p}: the language has the p=2 pool (`l2pool`) only", "p")
            op = "l2pool"
        strides, pad, outs = _window(imp, n, x, kernel, allow_ceil=kind != "lppool")
        if kind == "avgpool" and n.attr("count_include_pad", 0) and pad is not None:
            if imp.ceil_padded:
                raise n.error("count_include_pad=1 with a ceil_mode window that reaches past the padding: that "
                              "window's divisor counts the padding but not the cells past it", "ceil_mode")
            return _avgpool_counting_padding(imp, n, x, kernel, strides, pad, outs)
        args = [_tuple_text(kernel)] + _window_args(kernel, strides, pad, stride_default=kernel)
        imp.emit(n, f"{op}({', '.join(args)})", [x.ref], (x.shape[0], *outs))
    return translate


def _avgpool_counting_padding(imp: _Importer, n: _Node, x: Val, kernel, strides, pad, outs):
    """count_include_pad=1: every window divides by its full size, padding included. The
    language's avgpool counts real cells only, so this is a frozen depthwise convolution whose
    taps are all 1/window (a `const`): the same sum over the zero-padded window, the same divisor."""
    c = x.shape[0]
    taps = 1.0 / math.prod(kernel)
    name = imp.layer_name(n, None)
    const = imp.fresh(f"{name}_taps", "taps")
    one = _nested(number(taps), kernel)           # one channel's window, on one line
    text = "[\n" + ",\n".join(f"        [{one}]" for _ in range(c)) + "\n    ]"
    args = [_tuple_text(kernel)] + _window_args(kernel, strides, pad) + [
        "bias=false", f"weight={const}", "frozen=true"]
    w = np.full((c, 1, *kernel), taps)
    imp.emit(n, f"depthwise({', '.join(args)})", [x.ref], (c, *outs), layer=name,
             weights={"weight": imp.weight(w)}, consts=[(const, text)])


def _nested(value: str, shape) -> str:
    if len(shape) == 1:
        return "[" + ", ".join([value] * shape[0]) + "]"
    return "[" + ", ".join([_nested(value, shape[1:])] * shape[0]) + "]"


def _global_pool(op: str):
    def translate(imp: _Importer, n: _Node):
        x = imp.val(n, 0)
        if len(x.shape) < 2:
            raise n.error(f"needs a map, but its input is a vector {list(x.shape)}")
        imp.emit(n, op, [x.ref], (x.shape[0], *(1 for _ in x.shape[1:])))
    return translate


def _dense_from(imp: _Importer, n: _Node, x: Val, w_out_in: np.ndarray, bias, weight_name: str | None,
                output_of: _Node | None = None):
    if len(x.lang_shape) != 1 and not all(isinstance(d, int) for d in x.lang_shape):
        raise n.error(f"a fully connected layer needs a fixed-size input, but it is {list(x.shape)}")
    features = math.prod(x.lang_shape)
    if w_out_in.shape[1] != features:
        raise n.error(f"weight {list(w_out_in.shape)} does not fit {features} input features")
    out = w_out_in.shape[0]
    name = imp.layer_name(n, weight_name)
    weights = {"weight": imp.weight(w_out_in)}
    args = [str(out)]
    if bias is None:
        args.append("bias=false")
    else:
        bias = np.broadcast_to(np.asarray(bias, dtype=np.float64).reshape(-1) if np.size(bias) != 1
                               else np.full(out, float(np.asarray(bias).reshape(-1)[0])), (out,))
        weights["bias"] = imp.weight(bias)
    target = output_of or n
    v = imp.emit(target, f"dense({', '.join(args)})", [x.ref], (out,), layer=name, weights=weights)
    imp.steps[-1].comment = (f"{n.name} ({n.op})" if output_of is None
                             else f"{n.name} ({n.op}) + {output_of.name} ({output_of.op})")
    return v


def _gemm(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    if n.attr("transA", 0):
        raise n.error("transA=1: the input is the left factor, samples in rows", "transA")
    if len(x.shape) != 1:
        raise n.error(f"Gemm needs a flat input [batch, features], but it is [batch, {', '.join(map(str, x.shape))}]")
    b = imp.const(n, 1, "the weight")
    c = imp.const(n, 2, "the bias")
    w = b if n.attr("transB", 0) else b.T
    w = w * float(n.attr("alpha", 1.0))
    if c is not None:
        if c.size not in (1, w.shape[0]):
            raise n.error(f"a bias of shape {list(c.shape)}: the language's bias has one value per output")
        c = c * float(n.attr("beta", 1.0))
    _dense_from(imp, n, x, w, c, n.inputs[1])


def _matmul(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    w = imp.const(n, 1, "the weight")
    if len(x.shape) != 1 or w.ndim != 2:
        raise n.error(f"MatMul of [batch, {', '.join(map(str, x.shape))}] by {list(w.shape)}: the language has "
                      f"the [batch, features] × [features, out] product only (a dense layer)")
    readers = imp.consumers.get(n.outputs[0], [])
    bias, add = None, None
    if len(readers) == 1 and readers[0].op == "Add" and n.outputs[0] not in imp.graph_outputs:
        other = [t for t in readers[0].inputs if t != n.outputs[0]]
        if len(other) == 1 and isinstance(imp.env.get(other[0]), Const) and \
                imp.env[other[0]].value.size == w.shape[1] and imp.env[other[0]].value.dtype != object:
            bias, add = imp.env[other[0]].value, readers[0]
    if add is not None:
        imp.done.add(add.index)
    _dense_from(imp, n, x, w.T, bias, n.inputs[1], output_of=add)


def _unary(op: str):
    def translate(imp: _Importer, n: _Node):
        x = imp.val(n, 0)
        imp.emit(n, op, [x.ref], x.shape, x.lang)
    return translate


def _sigmoid(imp: _Importer, n: _Node):
    """Sigmoid, or with the Mul of its input by it (x · sigmoid(x), how SiLU is written) silu."""
    x = imp.val(n, 0)
    readers = imp.consumers.get(n.outputs[0], [])
    if len(readers) == 1 and readers[0].op == "Mul" and n.outputs[0] not in imp.graph_outputs and \
            sorted(readers[0].inputs) == sorted([n.inputs[0], n.outputs[0]]):
        mul = readers[0]
        imp.done.add(mul.index)
        imp.emit(mul, "silu", [x.ref], x.shape, x.lang)
        imp.steps[-1].comment = f"{n.name} ({n.op}) + {mul.name} ({mul.op})"
        return
    imp.emit(n, "sigmoid", [x.ref], x.shape, x.lang)


def _leaky_relu(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    alpha = float(n.attr("alpha", 0.01))
    if alpha < 0:
        raise n.error(f"alpha={alpha}: the language's leaky_relu takes alpha ≥ 0", "alpha")
    imp.emit(n, f"leaky_relu({number(float(np.float32(alpha)))})", [x.ref], x.shape, x.lang)


def _softmax(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    rank = len(x.shape) + 1
    axis = n.attr("axis", -1 if imp.opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    if axis != 1 and not (imp.opset < 13 and axis == 1):
        raise n.error(f"softmax over axis {axis} of a rank-{rank} tensor: the language's softmax is over the "
                      f"channels (axis 1)", "axis")
    if imp.opset < 13 and rank > 2:
        raise n.error("before opset 13 Softmax(axis=1) is over all of C·H·W; the language's is over the channels",
                      "axis")
    imp.emit(n, "softmax", [x.ref], x.shape, x.lang)


def _lacks(what: str):
    def translate(imp: _Importer, n: _Node):
        raise n.error(f"the language lacks {what}")
    return translate


def _float_text(v: float) -> str:
    """A float attribute as the .cnn file writes it: the shortest decimal that is its f32 value
    (Clip(0.1, 0.9)'s bounds are f32 tensors: 0.1, not 0.10000000149011612)."""
    return number(float(str(np.float32(v))))


def _clip(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    lo = imp.const(n, 1, "min") if len(n.inputs) > 1 else n.attrs.get("min")
    hi = imp.const(n, 2, "max") if len(n.inputs) > 2 else n.attrs.get("max")
    lo = None if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = None if hi is None else float(np.asarray(hi).reshape(-1)[0])
    lo = None if lo is not None and math.isinf(lo) and lo < 0 else lo
    hi = None if hi is not None and math.isinf(hi) and hi > 0 else hi
    if lo == 0.0 and hi is None:
        return imp.emit(n, "relu", [x.ref], x.shape, x.lang)
    if lo == 0.0 and hi == 6.0:
        return imp.emit(n, "relu6", [x.ref], x.shape, x.lang)
    if lo is not None and hi is not None and lo < hi:
        return imp.emit(n, f"clip({_float_text(lo)}, {_float_text(hi)})", [x.ref], x.shape, x.lang)
    shown = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if lo is not None and hi is not None:
        raise n.error(f"Clip{shown}: the language's clip needs min < max", "max")
    raise n.error(f"Clip{shown} bounded on one side only: the language has clip(min, max) with both bounds "
                  f"finite, and Clip(0, ∞) = relu")


def _hardsigmoid(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    # The language's hardsigmoid is PyTorch's, max(0, min(1, x/6 + 1/2)); ONNX's default alpha is 0.2.
    for attr, default, want in (("alpha", 0.2, 1.0 / 6.0), ("beta", 0.5, 0.5)):
        got = float(n.attr(attr, default))
        if np.float32(got) != np.float32(want):
            raise n.error(f"{attr}={got}: the language's hardsigmoid is max(0, min(1, x/6 + 1/2)), "
                          f"alpha=1/6 and beta=0.5 (PyTorch's Hardsigmoid)", attr)
    imp.emit(n, "hardsigmoid", [x.ref], x.shape, x.lang)


def _elu(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    alpha = float(n.attr("alpha", 1.0))
    if alpha < 0:
        raise n.error(f"alpha={alpha}: the language's elu takes alpha ≥ 0", "alpha")
    imp.emit(n, "elu" if alpha == 1.0 else f"elu({_float_text(alpha)})", [x.ref], x.shape, x.lang)


def _gelu(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    approximate = n.attr("approximate", "none")
    if approximate != "none":
        raise n.error(f"approximate={approximate}: the language's gelu is the exact one (by erf)", "approximate")
    imp.emit(n, "gelu", [x.ref], x.shape, x.lang)


def _channel_values(x: Val, value: np.ndarray) -> np.ndarray | None:
    """A constant that broadcasts (ONNX's right-aligned rule) to [N, C, *S] varying along the
    channels only: its C values, or one value when it is the same everywhere (shape [1] or []);
    None otherwise."""
    rank = len(x.shape) + 1
    if value.ndim > rank:
        return None
    full = (1,) * (rank - value.ndim) + tuple(value.shape)
    if all(d == 1 for d in full):
        return value.reshape(1)
    if full[0] == 1 and full[1] == x.shape[0] and all(d == 1 for d in full[2:]):
        return value.reshape(-1)
    return None


def _scalar_const(imp: _Importer, name: str) -> float | None:
    """The number a tensor holds when it is a known scalar, read ahead from its Constant node
    (exporters put a Constant just before the node that reads it), else None."""
    maker = imp.producer.get(name)
    if name not in imp.env and maker is not None and maker.op == "Constant":
        _constant(imp, maker)
    v = imp.env.get(name)
    if isinstance(v, Const) and v.value.dtype != object and v.value.size == 1:
        return float(v.value.reshape(-1)[0])
    return None


def _div(imp: _Importer, n: _Node):
    """Div(x, √2) → Erf → Add 1 → Mul x → Mul 0.5: the exact GELU as exporters write it before
    Gelu (opset 20); PyTorch's for nn.GELU at opset 17. Any other Div of a value is refused."""
    x = imp.get(n, n.inputs[0])
    chain, ops = [n], [("Erf", None), ("Add", 1.0), ("Mul", "x"), ("Mul", 0.5)]
    if isinstance(x, Val) and _scalar_const(imp, n.inputs[1]) is not None and \
            abs(_scalar_const(imp, n.inputs[1]) - math.sqrt(2.0)) < 1e-6:
        for op, other in ops:
            last = chain[-1]
            readers = imp.consumers.get(last.outputs[0], [])
            if len(readers) != 1 or readers[0].op != op or last.outputs[0] in imp.graph_outputs:
                break
            r = readers[0]
            rest = [t for t in r.inputs if t != last.outputs[0]]
            if other is None:
                ok = not rest
            elif other == "x":
                ok = rest == [n.inputs[0]]
            else:
                ok = len(rest) == 1 and _scalar_const(imp, rest[0]) == other
            if not ok:
                break
            chain.append(r)
        else:
            imp.done.update(m.index for m in chain[1:])
            imp.emit(chain[-1], "gelu", [x.ref], x.shape, x.lang)
            imp.steps[-1].comment = " + ".join(f"{m.name} ({m.op})" for m in chain)
            return
    raise n.error("the language lacks element-wise division (x / √2 → Erf → … is read as gelu)")


def _per_channel(n: _Node, x: Val, value: np.ndarray, what: str) -> np.ndarray:
    found = _channel_values(x, value)
    if found is not None:
        return found
    raise n.error(f"{what} of shape {list(value.shape)} broadcast to [N, {', '.join(map(str, x.shape))}] varies "
                  f"along other axes than the channels: the language's is one value per channel or one for all")


def _prelu(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    slope = _per_channel(n, x, imp.const(n, 1, "the slope"), "a slope")
    name = imp.layer_name(n, n.inputs[1])
    call = "prelu(shared=true)" if slope.size == 1 and x.shape[0] != 1 else "prelu"
    imp.emit(n, name, [x.ref], x.shape, x.lang, layer=name, weights={"weight": imp.weight(slope)})
    imp.steps[-1].call = call
    imp.share(n, name, call, [n.inputs[1]])


def _affine_norm(imp: _Importer, n: _Node, x: Val, call: str, scale, bias, output: int = 0):
    c = x.shape[0]
    weights = {}
    for pname, value, what in (("weight", scale, "scale"), ("bias", bias, "B")):
        if value is None:
            value = np.ones(c) if pname == "weight" else np.zeros(c)
        value = np.asarray(value).reshape(-1)
        if value.size == 1:
            value = np.full(c, float(value[0]))
        if value.size != c:
            raise n.error(f"{what} has {value.size} values; the language's has one per channel ({c})")
        weights[pname] = imp.weight(value)
    name = imp.layer_name(n, n.inputs[1] if len(n.inputs) > 1 and n.inputs[1] else None)
    v = imp.emit(n, name, [x.ref], x.shape, x.lang, layer=name, weights=weights, output=output)
    imp.steps[-1].call = call
    imp.affine_open[v.ref] = n.outputs[output]
    return v


def _absorb_affine(imp: _Importer, n: _Node) -> bool:
    """Mul or Add of a normalisation's output by a per-channel constant, read by nothing else:
    its scale or shift (PyTorch writes GroupNorm's affine so: InstanceNormalization, then Mul
    and Add). True when taken in."""
    kinds = [isinstance(imp.env.get(t), Const) for t in n.inputs[:2]]
    if len(n.inputs) != 2 or sorted(kinds) != [False, True]:
        return False
    name = n.inputs[kinds.index(False)]
    x = imp.env.get(name)
    if not isinstance(x, Val) or imp.affine_open.get(x.ref) != name or imp.consumers.get(name) != [n] \
            or name in imp.graph_outputs:
        return False
    c = imp.env[n.inputs[kinds.index(True)]].value
    if c.dtype == object:
        return False
    values = _channel_values(x, c)
    if values is None:
        return False
    step = imp.steps[x.ref]
    values = np.broadcast_to(values.astype(np.float64), step.weights["bias"].shape)
    if n.op == "Mul":
        step.weights = {k: imp.weight(w * values) for k, w in step.weights.items()}
    else:
        step.weights = {**step.weights, "bias": imp.weight(step.weights["bias"] + values)}
    step.comment += f" + {n.name} ({n.op})"
    constant = n.inputs[kinds.index(True)]
    if x.ref in imp.named_by_node and constant.endswith((".weight", ".bias")):
        # The layer's weights were written by name (`convdsl export`'s `groupnorm1.weight`): its name.
        imp.names.discard(step.layer)
        step.layer = imp.fresh(constant.rsplit(".", 1)[0], "norm")
        imp.named_by_node.discard(x.ref)
    del imp.affine_open[x.ref]
    imp.alias(n, x)
    imp.affine_open[x.ref] = n.outputs[0]
    return True


def _eps_args(n: _Node) -> list[str]:
    eps = float(n.attr("epsilon", 1e-5))
    return [] if abs(eps - 1e-5) <= 1e-12 else [f"eps={_float_text(eps)}"]


def _call(op: str, args: list[str]) -> str:
    return f"{op}({', '.join(args)})" if args else op


def _statistics_outputs(n: _Node, imp: _Importer, what: str):
    for o in n.outputs[1:]:
        if o and (imp.consumers.get(o) or o in imp.graph_outputs):
            raise n.error(f"the {what} output is used; the language's normalisation keeps its statistics inside")


def _instancenorm(imp: _Importer, n: _Node):
    g = imp.get(n, n.inputs[0])
    if isinstance(g, _GroupNorming):
        scale, bias = imp.const(n, 1, "scale"), imp.const(n, 2, "B")
        if np.any(scale != 1) or np.any(bias != 0):
            raise n.error("a group normalisation's InstanceNormalization with a scale or shift per group: the "
                          "language's groupnorm has them per channel")
        imp.env[n.outputs[0]] = _GroupNorming(g.x, g.groups, [*g.nodes, n], float(n.attr("epsilon", 1e-5)))
        return
    x = imp.val(n, 0)
    if len(x.shape) < 2:
        raise n.error(f"InstanceNormalization of a vector [batch, {x.shape[0]}]: one value per channel")
    _affine_norm(imp, n, x, _call("instancenorm", _eps_args(n)), imp.const(n, 1, "scale"), imp.const(n, 2, "B"))


def _groupnorm(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    c = x.shape[0]
    groups = int(n.attr("num_groups"))
    if groups < 1 or c % groups:
        raise n.error(f"num_groups={groups} does not divide the {c} channels", "num_groups")
    scale, bias = imp.const(n, 1, "scale"), imp.const(n, 2, "bias")
    # Opset 18's scale and bias are per group (opset 21's per channel): a group's value for each of its channels.
    scale, bias = (None if v is None else np.repeat(np.asarray(v).reshape(-1), c // groups)
                   if np.size(v) == groups and groups != c else v for v in (scale, bias))
    _affine_norm(imp, n, x, _call("groupnorm", [str(groups), *_eps_args(n)]), scale, bias)


def _layernorm(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    _statistics_outputs(n, imp, "Mean / InvStdDev")
    rank = len(x.shape) + 1
    axis = int(n.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    scale, bias = imp.const(n, 1, "scale"), imp.const(n, 2, "B")
    if axis == 1 and rank == 2:
        # A vector's features are its channels: the language's layernorm.
        return _affine_norm(imp, n, x, _call("layernorm", _eps_args(n)), scale, bias)
    if axis == 1:
        # Over all of C and the positions: groupnorm(1), when the scale and shift are per channel.
        sample = _static(n, x.shape, "LayerNormalization over C and the positions")
        per = []
        for what, v in (("scale", scale), ("B", bias)):
            if v is None:
                per.append(None)
                continue
            full = np.broadcast_to(np.asarray(v), sample)
            if not np.all(full == full.reshape(sample[0], -1)[:, :1].reshape(sample[0], *(1,) * (rank - 2))):
                raise n.error(f"{what} varies over the positions; the language's groupnorm(1) has a scale and "
                              f"shift per channel")
            per.append(full.reshape(sample[0], -1)[:, 0])
        return _affine_norm(imp, n, x, _call("groupnorm", ["1", *_eps_args(n)]), *per)
    raise n.error(f"normalising over axes {list(range(axis, rank))} of a rank-{rank} tensor: the language's "
                  f"layernorm normalises over the channels at each position (axis 1 of [batch, features], or "
                  f"groupnorm(1) for axis 1 of a map)", "axis")


_PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate"}


def _pad(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    rank = len(x.shape) + 1
    mode = n.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise n.error(f"mode={mode}: the language pads with zeros, reflect or replicate (ONNX's constant, "
                      f"reflect, edge)", "mode")
    if "pads" in n.attrs:                    # before opset 11
        pads, value = list(n.attrs["pads"]), float(n.attr("value", 0.0))
        axes = list(range(rank))
    else:
        pads = [int(p) for p in imp.const(n, 1, "pads").reshape(-1)]
        value = imp.const(n, 2, "constant_value")
        value = 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0])
        axes = imp.const(n, 3, "axes")
        axes = list(range(rank)) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes.reshape(-1)]
    if len(pads) != 2 * len(axes):
        raise n.error(f"{len(pads)} pads for {len(axes)} axes", "pads")
    pairs = [(0, 0)] * rank
    for a, b, e in zip(axes, pads[:len(axes)], pads[len(axes):]):
        pairs[a] = (b, e)
    if any(p < 0 for pair in pairs for p in pair):
        raise n.error("negative padding (cropping) is not in the language", "pads")
    if any(pairs[0]) or any(pairs[1]):
        raise n.error("padding the batch or channel axis: the language's pad pads the spatial axes", "pads")
    if mode == "constant" and value != 0.0:
        raise n.error(f"constant_value={value}: the language pads with zeros", "constant_value")
    if rank < 3:
        raise n.error("padding a vector: the language's pad pads the spatial axes of a map")
    spatial = pairs[2:]
    if all(p == (0, 0) for p in spatial):
        return imp.alias(n, x)
    outs = [s + b + a if isinstance(s, int) else None for s, (b, a) in zip(x.shape[1:], spatial)]
    readers = imp.consumers.get(n.outputs[0], [])
    if len(readers) == 1 and readers[0].op == "Conv" and readers[0].inputs[0] == n.outputs[0] and \
            n.outputs[0] not in imp.graph_outputs and readers[0].attr("auto_pad", "NOTSET") in ("NOTSET", "VALID") \
            and not any(readers[0].attr("pads", [])):
        imp.conv_pads[n.outputs[0]] = (spatial, _PAD_MODES[mode], n)
        imp.env[n.outputs[0]] = Val(x.ref, (x.shape[0], *outs), x.lang and (x.lang[0], *outs))
        return
    args = [_pad_text(spatial)] + ([] if mode == "constant" else [f"mode={_PAD_MODES[mode]}"])
    imp.emit(n, f"pad({', '.join(args)})", [x.ref], (x.shape[0], *outs))


def _batchnorm(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    if n.attr("training_mode", 0) or len([o for o in n.outputs if o]) > 1:
        raise n.error("training mode (the running statistics as outputs)", "training_mode")
    scale, bias, mean, var = (imp.const(n, i, w) for i, w in
                              ((1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")))
    c = x.shape[0]
    if any(a is None or a.size != c for a in (scale, bias, mean, var)):
        raise n.error(f"scale, B, mean and var need one value per channel ({c})")
    eps = float(n.attr("epsilon", 1e-5))
    momentum = 1.0 - float(n.attr("momentum", 0.9))
    args = []
    if abs(eps - 1e-5) > 1e-12:
        args.append(f"eps={number(float(np.float32(eps)))}")
    if abs(momentum - 0.1) > 1e-6 and 0.0 <= momentum <= 1.0:
        args.append(f"momentum={number(round(momentum, 6))}")
    name = imp.layer_name(n, n.inputs[1])
    weights = {"weight": imp.weight(scale.reshape(-1)), "bias": imp.weight(bias.reshape(-1)),
               "running_mean": imp.weight(mean.reshape(-1)), "running_var": imp.weight(var.reshape(-1))}
    imp.emit(n, name, [x.ref], x.shape, x.lang, layer=name, weights=weights)
    imp.steps[-1].call = "batchnorm" + (f"({', '.join(args)})" if args else "")


def _flatten(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    axis = n.attr("axis", 1)
    if axis != 1:
        raise n.error(f"axis={axis}: the language flattens each sample (axis 1)", "axis")
    _to_flat(imp, n, x)


def _to_flat(imp: _Importer, n: _Node, x: Val):
    if len(x.lang_shape) == 1:
        # Already a vector in the language (an ONNX [C, 1, 1] gate kept as [C]): nothing to do.
        return imp.alias(n, x, shape=(math.prod(x.shape) if all(isinstance(d, int) for d in x.shape) else None,),
                         lang=x.lang_shape)
    size = math.prod(x.shape) if all(isinstance(d, int) for d in x.shape) else None
    imp.emit(n, "flatten", [x.ref], (size,))


def _concat(imp: _Importer, n: _Node):
    xs = [imp.val(n, i) for i in range(len(n.inputs))]
    rank = len(xs[0].shape) + 1
    axis = n.attr("axis")
    axis = axis + rank if axis < 0 else axis
    if axis != 1:
        raise n.error(f"concatenation along axis {axis}: the language's concat joins channels (axis 1)", "axis")
    if len(xs) == 1:
        return imp.alias(n, xs[0])
    channels = sum(v.shape[0] for v in xs) if all(isinstance(v.shape[0], int) for v in xs) else None
    imp.emit(n, "concat", [v.ref for v in xs], (channels, *xs[0].shape[1:]))


def _add(imp: _Importer, n: _Node):
    items = [imp.get(n, t) for t in n.inputs]
    if all(isinstance(v, Const) for v in items):
        return _fold(imp, n)
    if n.op == "Add" and _absorb_affine(imp, n):
        return
    if any(isinstance(v, Const) for v in items):
        raise n.error("adding a constant to a value: the language lacks a bias add outside conv/dense layers "
                      "(and element-wise broadcasting)")
    shapes = {v.lang_shape for v in items}
    if len(shapes) != 1:
        raise n.error(f"adding tensors of shapes {[list(v.shape) for v in items]}: the language's add needs equal "
                      f"shapes (no broadcasting)")
    if len(items) == 1:
        return imp.alias(n, items[0])
    imp.emit(n, "add", [v.ref for v in items], items[0].shape, items[0].lang)


def _mul(imp: _Importer, n: _Node):
    a, b = imp.get(n, n.inputs[0]), imp.get(n, n.inputs[1])
    if isinstance(a, Const) and isinstance(b, Const):
        return _fold(imp, n)
    if _absorb_affine(imp, n):
        return
    if isinstance(a, Val) and isinstance(b, Val):
        if a.lang_shape == b.lang_shape:
            return imp.emit(n, "mul", [a.ref, b.ref], a.shape, a.lang)
        for x, s in ((a, b), (b, a)):
            if len(x.shape) >= 2 and s.shape[0] == x.shape[0] and all(d == 1 for d in s.shape[1:]) \
                    and len(s.shape) in (1, len(x.shape)):
                return imp.emit(n, "scale", [x.ref, s.ref], x.shape, x.lang)
        raise n.error(f"Mul of shapes {list(a.shape)} and {list(b.shape)}: the language multiplies tensors of "
                      f"equal shapes (`mul`) or a map by a per-channel gate ([C] or [C, 1, 1], `scale`); it has "
                      f"no other broadcasting")
    raise n.error("multiplying a value by a constant: the language lacks `mul` by constants")


def _sub(imp: _Importer, n: _Node):
    a, b = imp.get(n, n.inputs[0]), imp.get(n, n.inputs[1])
    if not (isinstance(a, Val) and isinstance(b, Val)):
        raise n.error("subtracting a constant: the language's sub takes two network values")
    if a.lang_shape != b.lang_shape:
        raise n.error(f"Sub of shapes {list(a.shape)} and {list(b.shape)}: the language's sub needs equal shapes "
                      f"(no broadcasting)")
    imp.emit(n, "sub", [a.ref, b.ref], a.shape, a.lang)


def _reduce(op: str):
    def translate(imp: _Importer, n: _Node):
        x = imp.val(n, 0)
        rank = len(x.shape) + 1
        axes = n.attrs.get("axes")
        if axes is None and len(n.inputs) > 1 and n.inputs[1]:
            axes = [int(a) for a in imp.const(n, 1, "axes").reshape(-1)]
        if axes is None:
            raise n.error("a reduction over every axis, batch included, is not in the language", "axes")
        axes = sorted(a + rank if a < 0 else a for a in axes)
        if axes != list(range(2, rank)) or rank < 3:
            raise n.error(f"a reduction over axes {axes}: the language reduces over every spatial axis "
                          f"({list(range(2, rank))}) only (global pooling)", "axes")
        v = imp.emit(n, op, [x.ref], (x.shape[0], *(1 for _ in x.shape[1:])))
        if not n.attr("keepdims", 1):          # [N, C]: the pooled map flattened
            imp.steps.append(Step("flatten", [v.ref], f"{n.name} ({n.op}, keepdims=0)"))
            imp.env[n.outputs[0]] = Val(len(imp.steps) - 1, (x.shape[0],))
    return translate


def _dropout(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    if len(n.outputs) > 1 and n.outputs[1] and (imp.consumers.get(n.outputs[1]) or n.outputs[1] in imp.graph_outputs):
        raise n.error("the mask output is used; the language's dropout keeps its mask inside")
    ratio = n.attrs.get("ratio", 0.5)
    if len(n.inputs) > 1 and n.inputs[1]:
        ratio = float(imp.const(n, 1, "ratio").reshape(-1)[0])
    if len(n.inputs) > 2 and n.inputs[2] and bool(imp.const(n, 2, "training_mode").reshape(-1)[0]):
        raise n.error("training_mode=true inside the graph", "training_mode")
    if not 0 < ratio < 1:
        return imp.alias(n, x)
    imp.emit(n, f"dropout({number(float(ratio))})", [x.ref], x.shape, x.lang)


def _identity(imp: _Importer, n: _Node):
    v = imp.get(n, n.inputs[0])
    imp.env[n.outputs[0]] = v


def _resize(imp: _Importer, n: _Node):
    x = imp.val(n, 0)
    rank = len(x.shape) + 1
    if n.op == "Upsample":
        scales = n.attrs.get("scales")
        if scales is None:
            scales = imp.const(n, 1, "scales")
        sizes = None
        coord, nearest = "asymmetric", "floor"
    else:
        scales = imp.const(n, 2, "scales") if len(n.inputs) > 2 and n.inputs[2] else None
        sizes = imp.const(n, 3, "sizes") if len(n.inputs) > 3 and n.inputs[3] else None
        if scales is not None and scales.size == 0:
            scales = None
        coord = n.attr("coordinate_transformation_mode", "half_pixel")
        nearest = n.attr("nearest_mode", "round_prefer_floor")
        if n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise n.error("keep_aspect_ratio_policy other than stretch changes the factors to keep the aspect "
                          "ratio; the language's factors are given per axis", "keep_aspect_ratio_policy")
        axes = n.attrs.get("axes")
        if axes is not None:
            # scales / sizes for these axes only: the others keep their size.
            axes = [a + rank if a < 0 else a for a in axes]
            if sorted(axes) != list(range(2, rank)):
                raise n.error(f"resizing axes {axes}: the language resizes every spatial axis "
                              f"({list(range(2, rank))}) and no other", "axes")
            if scales is not None:
                full = [1.0] * rank
                for a, v in zip(axes, np.asarray(scales).reshape(-1)):
                    full[a] = float(v)
                scales = np.asarray(full)
            if sizes is not None:
                full = [BATCH, x.shape[0], *x.shape[1:]]
                for a, v in zip(axes, np.asarray(sizes).reshape(-1)):
                    full[a] = int(v)
                sizes = np.asarray([0, *full[1:]], dtype=object)
    mode = n.attr("mode", "nearest")
    if scales is None and sizes is None:
        raise n.error("Resize needs scales or sizes")
    if scales is None:
        spatial = _static(n, x.shape[1:], "Resize by `sizes`")
        full = [int(s) for s in np.asarray(sizes).reshape(-1)]
        if len(full) != rank or any(o % i for o, i in zip(full[2:], spatial)):
            raise n.error(f"spatial sizes {full[2:]} are not whole multiples of the input's {list(spatial)}: "
                          f"the language's upsample takes whole factors", "sizes")
        factors = [o // i for o, i in zip(full[2:], spatial)]
        if full[1] != x.shape[0]:
            raise n.error("resizing the channel axis", "sizes")
    else:
        scales = [float(s) for s in np.asarray(scales).reshape(-1)]
        if len(scales) != rank or scales[0] != 1 or scales[1] != 1:
            raise n.error(f"scales {scales}: the language resizes the spatial axes only", "scales")
        if any(s < 1 or s != int(s) for s in scales[2:]):
            raise n.error(f"scales {scales}: the language's upsample takes whole factors ≥ 1", "scales")
        factors = [int(s) for s in scales[2:]]
    if mode == "nearest":
        floors = coord == "asymmetric" and nearest == "floor"
        rounds = coord in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn") and \
            nearest in ("round_prefer_floor", "round_prefer_ceil")
        if not (floors or rounds):
            raise n.error(f"nearest with coordinate_transformation_mode={coord}, nearest_mode={nearest}: with whole "
                          f"factors the language's nearest is asymmetric+floor (or half_pixel with rounding)",
                          "coordinate_transformation_mode")
        call_mode = ""
    elif mode in ("linear", "bilinear"):
        if coord not in ("half_pixel", "pytorch_half_pixel") and not all(f == 1 for f in factors):
            raise n.error(f"linear with coordinate_transformation_mode={coord}: the language's linear modes are "
                          f"half_pixel (align_corners=false)", "coordinate_transformation_mode")
        if n.attr("antialias", 0) and any(f < 1 for f in factors):
            raise n.error("antialias", "antialias")
        call_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(len(factors))
        if call_mode is None:
            raise n.error(f"linear resizing of {len(factors)} spatial axes")
        call_mode = f", mode={call_mode}"
    else:
        raise n.error(f"mode={mode}: the language's upsample is nearest or linear", "mode")
    out = (x.shape[0], *(s * f if isinstance(s, int) else None for s, f in zip(x.shape[1:], factors)))
    if all(f == 1 for f in factors):
        return imp.alias(n, x)
    imp.emit(n, f"upsample({_tuple_text(factors)}{call_mode})", [x.ref], out)


# ---- shapes, reshapes and the arithmetic that computes them ----------------------------------

def _shape(imp: _Importer, n: _Node):
    x = imp.get(n, n.inputs[0])
    if isinstance(x, Const):
        full = list(x.value.shape)
    else:
        full = imp.onnx_shape_of(x)
    start, end = n.attr("start", 0), n.attr("end", None)
    value = np.array(full[slice(start, end)], dtype=object)
    if all(isinstance(v, int) for v in value):
        value = value.astype(np.int64)
    imp.env[n.outputs[0]] = Const(value)


def _symbolic_ok(value: np.ndarray) -> np.ndarray:
    if value.dtype == object and all(isinstance(v, (int, np.integer)) for v in value.reshape(-1)):
        return value.astype(np.int64)
    return value


def _fold(imp: _Importer, n: _Node):
    """A node whose inputs are all known: computed now. Shape arithmetic over dim names is done
    here on object arrays; plain numbers go through onnx's reference implementation."""
    values = [imp.const(n, i, numeric=False) if n.inputs[i] else None for i in range(len(n.inputs))]
    symbolic = any(v is not None and v.dtype == object for v in values)
    if symbolic:
        result = [_as_object(v) for v in _fold_symbolic(imp, n, values)]
    else:
        result = _fold_numbers(imp, n, values)
    for name, value in zip(n.outputs, result):
        imp.env[name] = Const(_symbolic_ok(np.asarray(value)))


def _as_object(value) -> np.ndarray:
    """A folded shape as an object array (np.take of one entry gives a bare str or int)."""
    if isinstance(value, np.ndarray):
        return value.astype(object)
    out = np.empty((), dtype=object)
    out[()] = value
    return out


def _fold_symbolic(imp: _Importer, n: _Node, values):
    op = n.op
    a = values[0]
    if op == "Gather":
        idx = values[1].astype(np.int64)
        return [np.take(a, idx, axis=n.attr("axis", 0))]
    if op == "Unsqueeze":
        axes = n.attrs.get("axes") if "axes" in n.attrs else [int(v) for v in values[1].reshape(-1)]
        out = a
        for ax in sorted(axes):
            out = np.expand_dims(out, ax)
        return [out]
    if op == "Squeeze":
        return [a.reshape(-1) if a.size == 1 else a]
    if op == "Concat":
        return [np.concatenate([v.astype(object) for v in values], axis=n.attr("axis", 0))]
    if op in ("Cast", "Identity"):
        return [a]
    if op == "Slice":
        starts, ends = values[1].reshape(-1), values[2].reshape(-1)
        axes = values[3].reshape(-1) if len(values) > 3 and values[3] is not None else [0]
        steps = values[4].reshape(-1) if len(values) > 4 and values[4] is not None else [1]
        if list(axes) != [0] or len(starts) != 1:
            raise n.error("Slice of a shape along other axes than 0")
        return [a[int(starts[0]):int(min(ends[0], 2 ** 62)):int(steps[0])]]
    if op in ("Div", "Mul", "Add", "Sub"):
        b = values[1]
        fn = {"Div": lambda p, q: p // q, "Mul": lambda p, q: p * q, "Add": lambda p, q: p + q,
              "Sub": lambda p, q: p - q}[op]
        a2, b2 = np.broadcast_arrays(a.astype(object), b.astype(object))
        out = []
        for p, q in zip(a2.reshape(-1), b2.reshape(-1)):
            if isinstance(p, str) or isinstance(q, str):
                if op in ("Div", "Mul") and (q == 1 if not isinstance(q, str) else False):
                    out.append(p)
                    continue
                raise n.error(f"{op} of the run-time size `{p if isinstance(p, str) else q}`: shape arithmetic "
                              f"on run-time sizes other than passing them through is not folded")
            out.append(fn(int(p), int(q)))
        return [np.array(out, dtype=object).reshape(a2.shape)]
    raise n.error(f"{op} of a shape that holds run-time sizes cannot be folded")


def _fold_numbers(imp: _Importer, n: _Node, values):
    from onnx.reference import ReferenceEvaluator
    onnx = imp.onnx
    ins = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    node = onnx.helper.make_node(n.op, ins, [f"out{i}" for i in range(len(n.outputs))], **n.attrs)
    feeds = {f"in{i}": v for i, v in enumerate(values) if v is not None}
    try:
        graph = onnx.helper.make_graph(
            [node], "fold",
            [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for k, v in feeds.items()],
            [onnx.helper.make_tensor_value_info(f"out{i}", onnx.TensorProto.UNDEFINED, None)
             for i in range(len(n.outputs))])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", max(imp.opset, 7))])
        return ReferenceEvaluator(model).run(None, feeds)
    except ConvDSLError:
        raise
    except Exception as e:          # the reference implementation's own refusal
        raise n.error(f"cannot compute it from its constant inputs ({type(e).__name__}: {e})") from None


def _constant(imp: _Importer, n: _Node):
    onnx = imp.onnx
    a = n.proto.attribute[0] if n.proto.attribute else None
    if a is None:
        raise n.error("a Constant without a value")
    if a.name == "value":
        value = onnx.numpy_helper.to_array(a.t)
    elif a.name in ("value_float", "value_int"):
        value = np.array(onnx.helper.get_attribute_value(a))
    elif a.name in ("value_floats", "value_ints"):
        value = np.array(list(onnx.helper.get_attribute_value(a)))
    else:
        raise n.error(f"a Constant given by `{a.name}`", a.name)
    imp.env[n.outputs[0]] = Const(value)


def _maybe_fold(translate):
    """Ops that may also appear in shape arithmetic: folded when every input is known."""
    def wrapped(imp: _Importer, n: _Node):
        if all(not t or isinstance(imp.env.get(t), Const) for t in n.inputs):
            return _fold(imp, n)
        return translate(imp, n)
    return wrapped


def _reshape_target(imp: _Importer, n: _Node, x: Val, target) -> tuple | None:
    """The per-sample shape a Reshape (or Unsqueeze, Squeeze) gives, or None when it touches the batch."""
    source = imp.onnx_shape_of(x)
    dims = list(target)
    resolved = []
    for i, d in enumerate(dims):
        if isinstance(d, (int, np.integer)) and d == 0 and not n.attr("allowzero", 0):
            resolved.append(source[i] if i < len(source) else None)
        else:
            resolved.append(d if not isinstance(d, np.integer) else int(d))
    if not resolved:
        return None
    first = resolved[0]
    if not (first == BATCH or imp.fixed_batch is not None and first == imp.fixed_batch):
        if first == -1 and all(isinstance(d, int) and d > 0 for d in resolved[1:]) and \
                all(isinstance(d, int) for d in x.shape) and math.prod(x.shape) == math.prod(resolved[1:]):
            return tuple(resolved[1:])
        return None
    rest = resolved[1:]
    known = all(isinstance(d, int) for d in x.shape)
    if rest.count(-1) == 1:
        if not known or any(not isinstance(d, int) for d in rest):
            if len(rest) == 1:
                return (None,)
            return None
        others = math.prod(d for d in rest if d != -1)
        rest[rest.index(-1)] = math.prod(x.shape) // others
    return tuple(None if isinstance(d, str) and d.startswith("<") else d for d in rest)


def _reshape(imp: _Importer, n: _Node):
    x = imp.get(n, n.inputs[0])
    if isinstance(x, _Shuffling):
        return _shuffle_step(imp, n, x)
    if isinstance(x, _GroupNorming):
        return _group_norm_end(imp, n, x)
    if isinstance(x, Const):
        return _fold(imp, n)
    target = [v if isinstance(v, str) else int(v) for v in imp.const(n, 1, "the shape", numeric=False).reshape(-1)]
    shuffled = _channel_shuffle(imp, n, x, target)
    if shuffled or _group_norm_start(imp, n, x, target):
        return
    per_sample = _reshape_target(imp, n, x, target)
    _view(imp, n, x, per_sample, f"to {list(target)}")


def _view(imp: _Importer, n: _Node, x: Val, per_sample, what: str):
    if per_sample is None:
        raise n.error(f"a reshape {what} that moves the batch axis: the language keeps the batch implicit")
    if tuple(per_sample) == tuple(x.shape):
        return imp.alias(n, x)
    if len(per_sample) == 1:
        if per_sample[0] is None or all(isinstance(d, int) for d in x.shape) and per_sample[0] == math.prod(x.shape):
            return _to_flat(imp, n, x)
    lang = x.lang_shape
    # [C] ↔ [C, 1, 1]: the same values; the language keeps the vector (scale reads it as a gate).
    if len(lang) == 1 and per_sample and per_sample[0] == lang[0] and all(d == 1 for d in per_sample[1:]):
        return imp.alias(n, x, shape=per_sample, lang=lang)
    if not all(isinstance(d, int) for d in (*lang, *per_sample)):
        raise n.error(f"a reshape of [{', '.join(map(str, x.shape))}] {what}: the language's reshape needs fixed "
                      f"sizes (a run-time size is kept only by flatten)")
    if not 1 <= len(per_sample) <= 4:
        raise n.error(f"a reshape of [{', '.join(map(str, x.shape))}] {what}: the language's values have 1 to 4 "
                      f"axes per sample (a vector, or a map of 1 to 3 spatial axes)")
    imp.emit(n, f"reshape([{', '.join(map(str, per_sample))}])", [x.ref], per_sample)


def _unsqueeze(imp: _Importer, n: _Node):
    x = imp.get(n, n.inputs[0])
    if isinstance(x, Const):
        return _fold(imp, n)
    axes = n.attrs.get("axes")
    if axes is None:
        axes = [int(a) for a in imp.const(n, 1, "axes").reshape(-1)]
    full = [BATCH, *x.shape]
    rank = len(full) + len(axes)
    for a in sorted(ax + rank if ax < 0 else ax for ax in axes):
        full.insert(a, 1)
    if full[0] != BATCH:
        raise n.error("an axis before the batch", "axes")
    _view(imp, n, x, tuple(full[1:]), f"by Unsqueeze{list(axes)}")


def _squeeze(imp: _Importer, n: _Node):
    x = imp.get(n, n.inputs[0])
    if isinstance(x, Const):
        return _fold(imp, n)
    axes = n.attrs.get("axes")
    if axes is None and len(n.inputs) > 1 and n.inputs[1]:
        axes = [int(a) for a in imp.const(n, 1, "axes").reshape(-1)]
    full = [BATCH, *x.shape]
    if axes is None:
        axes = [i for i, d in enumerate(full) if d == 1]
    axes = {a + len(full) if a < 0 else a for a in axes}
    if 0 in axes:
        raise n.error("squeezing the batch axis", "axes")
    _view(imp, n, x, tuple(d for i, d in enumerate(full) if i not in axes and i > 0), f"by Squeeze{sorted(axes)}")


@dataclass
class _Shuffling:
    """A channel shuffle under way: x reshaped to [N, g, C/g, *S] (`swapped` once transposed)."""
    x: Val
    groups: int
    nodes: list
    swapped: bool = False


def _channel_shuffle(imp: _Importer, n: _Node, x: Val, target) -> bool:
    """Reshape [N, C, *S] → [N, g, C/g, *S], Transpose (0, 2, 1, …), Reshape back → shuffle(g).
    The shape of the last Reshape may be computed between the nodes, so the pattern is followed
    node by node: the first two leave a _Shuffling in place of a value, the third writes it."""
    readers = imp.consumers.get(n.outputs[0], [])
    if len(readers) != 1 or readers[0].op != "Transpose" or n.outputs[0] in imp.graph_outputs:
        return False
    c = x.shape[0]
    per_sample = _reshape_target(imp, n, x, target)
    if per_sample is None or len(per_sample) < 2 or not isinstance(c, int):
        return False
    g, cg = per_sample[0], per_sample[1]
    tail = tuple(per_sample[2:])
    flat = all(isinstance(d, int) for d in x.shape[1:]) and tail == (math.prod(x.shape[1:]),)
    if not (isinstance(g, int) and isinstance(cg, int) and g * cg == c and (tail == tuple(x.shape[1:]) or flat)):
        return False
    perm = list(readers[0].attrs.get("perm", []))
    if perm != [0, 2, 1, *range(3, len(per_sample) + 1)]:       # the spatial axes stay where they are
        return False
    imp.env[n.outputs[0]] = _Shuffling(x, g, [n])
    return True


def _shuffle_step(imp: _Importer, n: _Node, s: _Shuffling):
    if n.op == "Transpose" and not s.swapped:
        imp.env[n.outputs[0]] = _Shuffling(s.x, s.groups, [*s.nodes, n], True)
        return
    if n.op == "Reshape" and s.swapped:
        x = s.x
        swapped = Val(x.ref, (x.shape[0] // s.groups, s.groups, *x.shape[1:]))
        final = _reshape_target(imp, n, swapped, imp.const(n, 1, "the shape", numeric=False).reshape(-1))
        if final is not None and tuple(final) == tuple(x.shape):
            imp.emit(n, f"shuffle({s.groups})", [x.ref], x.shape)
            imp.steps[-1].comment = " + ".join(f"{m.name} ({m.op})" for m in [*s.nodes, n])
            return
    first = s.nodes[0]
    raise first.error("a reshape to channel groups that is not a channel shuffle (Reshape [N, g, C/g, …], "
                      "Transpose (0, 2, 1, …), Reshape [N, C, …]): the language has no transpose")


@dataclass
class _GroupNorming:
    """A group normalisation as exporters write it before opset 18 (GroupNormalization), under
    way: x reshaped to [N, G, -1], then (`eps` set) normalised by an InstanceNormalization of unit
    scale; the Reshape back to x's shape writes `groupnorm(G)`, whose scale and shift the Mul and
    Add after it give (_absorb_affine)."""
    x: Val
    groups: int
    nodes: list
    eps: float | None = None


def _group_norm_start(imp: _Importer, n: _Node, x: Val, target) -> bool:
    readers = imp.consumers.get(n.outputs[0], [])
    if len(readers) != 1 or readers[0].op != "InstanceNormalization" or n.outputs[0] in imp.graph_outputs:
        return False
    per_sample = _reshape_target(imp, n, x, target)
    c = x.shape[0]
    if per_sample is None or len(per_sample) != 2 or not isinstance(c, int) or not isinstance(per_sample[0], int):
        return False
    g = per_sample[0]
    if g < 1 or c % g or per_sample[1] is not None and all(isinstance(d, int) for d in x.shape) and \
            g * per_sample[1] != math.prod(x.shape):
        return False
    imp.env[n.outputs[0]] = _GroupNorming(x, g, [n])
    return True


def _group_norm_end(imp: _Importer, n: _Node, s: _GroupNorming):
    x = s.x
    grouped = Val(x.ref, (s.groups, None))
    final = _reshape_target(imp, n, grouped, imp.const(n, 1, "the shape", numeric=False).reshape(-1))
    first = s.nodes[0]
    if final is None or tuple(final) != tuple(x.shape):
        raise first.error("channels in groups, normalised, then reshaped to another shape than the input's: the "
                          "language's groupnorm gives its input's shape")
    args = [str(s.groups)] + ([] if abs(s.eps - 1e-5) <= 1e-12 else [f"eps={_float_text(s.eps)}"])
    v = _affine_norm(imp, n, x, _call("groupnorm", args), None, None)
    step = imp.steps[v.ref]
    imp.named_by_node.add(v.ref)
    step.comment = " + ".join(f"{m.name} ({m.op})" for m in [*s.nodes, n])


def _channels_last_layernorm(imp: _Importer, n: _Node, x: Val, perm) -> bool:
    """Transpose to channels last → LayerNormalization over the last axis → Transpose back: the
    language's layernorm of a map (ConvNeXt's; what `convdsl export` writes)."""
    rank = len(x.shape) + 1
    if rank < 3 or perm != [0, *range(2, rank), 1]:
        return False
    readers = imp.consumers.get(n.outputs[0], [])
    if len(readers) != 1 or readers[0].op != "LayerNormalization" or n.outputs[0] in imp.graph_outputs:
        return False
    norm = readers[0]
    if norm.attr("axis", -1) not in (-1, rank - 1):
        return False
    after = imp.consumers.get(norm.outputs[0], [])
    if len(after) != 1 or after[0].op != "Transpose" or norm.outputs[0] in imp.graph_outputs or \
            list(after[0].attrs.get("perm", [])) != [0, rank - 1, *range(1, rank - 1)]:
        return False
    _statistics_outputs(norm, imp, "Mean / InvStdDev")
    back = after[0]
    v = _affine_norm(imp, norm, x, _call("layernorm", _eps_args(norm)), imp.const(norm, 1, "scale"),
                     imp.const(norm, 2, "B"))
    imp.steps[v.ref].comment = f"{n.name} ({n.op}) + {norm.name} ({norm.op}) + {back.name} ({back.op})"
    imp.env[back.outputs[0]] = v
    imp.affine_open[v.ref] = back.outputs[0]
    imp.done.update((norm.index, back.index))
    return True


def _transpose(imp: _Importer, n: _Node):
    x = imp.get(n, n.inputs[0])
    if isinstance(x, _Shuffling):
        return _shuffle_step(imp, n, x)
    if isinstance(x, Const):
        return _fold(imp, n)
    perm = list(n.attr("perm", []))
    if perm == list(range(len(perm))):
        return imp.alias(n, x)
    if _channels_last_layernorm(imp, n, x, perm):
        return
    raise n.error(f"Transpose {perm}: the language keeps channels first and has no transpose (a channel "
                  f"shuffle's Reshape-Transpose-Reshape is read as `shuffle`)", "perm")


TRANSLATORS: dict[str, Callable[[_Importer, _Node], None]] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose,
    "MaxPool": _pool("maxpool"), "AveragePool": _pool("avgpool"), "LpPool": _pool("lppool"),
    "GlobalAveragePool": _global_pool("globalavgpool"), "GlobalMaxPool": _global_pool("globalmaxpool"),
    "Gemm": _gemm, "MatMul": _matmul,
    "Relu": _unary("relu"), "Sigmoid": _sigmoid, "Tanh": _unary("tanh"), "LeakyRelu": _leaky_relu,
    "Softmax": _softmax, "Clip": _clip,
    "HardSigmoid": _hardsigmoid, "HardSwish": _unary("hardswish"), "Elu": _elu,
    "PRelu": _prelu, "Selu": _lacks("selu"), "Gelu": _gelu,
    "Erf": _lacks("erf (gelu is read from Gelu, or from x / √2 → Erf → + 1 → · x → · 0.5)"),
    "LayerNormalization": _layernorm, "InstanceNormalization": _instancenorm,
    "GroupNormalization": _groupnorm, "Pad": _pad,
    "BatchNormalization": _batchnorm, "Flatten": _flatten, "Concat": _maybe_fold(_concat),
    "Add": _add, "Sum": _add, "Mul": _mul, "Sub": _maybe_fold(_sub),
    "Div": _maybe_fold(_div),
    "ReduceMean": _reduce("globalavgpool"), "ReduceMax": _reduce("globalmaxpool"),
    "Dropout": _dropout, "Identity": _identity, "Resize": _resize, "Upsample": _resize,
    "Constant": _constant, "Shape": _shape, "Gather": _maybe_fold(_lacks("gathering values of the network")),
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Cast": _maybe_fold(_lacks("a cast of network values")),
    "Slice": _maybe_fold(_lacks("slicing network values")), "Reshape": _reshape, "Transpose": _transpose,
    "ConstantOfShape": _maybe_fold(_lacks("ConstantOfShape of a computed shape")),
    "Range": _maybe_fold(_lacks("Range over network values")),
    "Floor": _maybe_fold(_lacks("floor")), "Ceil": _maybe_fold(_lacks("ceil")),
    "Sqrt": _maybe_fold(_lacks("sqrt")), "Pow": _maybe_fold(_lacks("pow")),
    "Equal": _maybe_fold(_lacks("comparisons")), "Where": _maybe_fold(_lacks("where")),
}


# ---- writing the .cnn file -------------------------------------------------------------------

COMMENT_COLUMN = 64


def _with_comment(code: str, comment: str) -> str:
    comment = comment.replace("\n", " ")
    return f"{code.ljust(COMMENT_COLUMN)}  # {comment}" if comment else code


def _write(imp: _Importer, outputs, model_path: str) -> tuple[str, dict]:
    steps = imp.steps
    readers: dict[object, int] = {}
    for s in steps:
        for r in s.inputs:
            readers[r] = readers.get(r, 0) + 1
    output_refs = {v.ref for _, v in outputs}
    for name, v in outputs:
        readers[v.ref] = readers.get(v.ref, 0) + 1
    # A step continues the chain of the step before it when it reads that step's value only,
    # as its first argument, and nothing else reads that value.
    continues = [i > 0 and len(s.inputs) == 1 and s.inputs[0] == i - 1 and readers.get(i - 1, 0) == 1
                 and (i - 1) not in output_refs for i, s in enumerate(steps)]
    ends = [i == len(steps) - 1 or not continues[i + 1] for i in range(len(steps))]
    bound: dict[object, str] = {name: name for name, _ in imp.inputs}
    out_name = {}
    for name, v in outputs:
        if v.ref not in out_name and not isinstance(v.ref, str):
            out_name[v.ref] = imp.fresh(name, "y")
    producer = " ".join(p for p in (imp.model.producer_name, imp.model.producer_version) if p) or "an unknown producer"
    lines = [f"# {imp.network}: imported from {Path(model_path).name} by `convdsl import` "
             f"(ONNX opset {imp.opset}, made by {producer}).",
             "# Each line names the ONNX node it comes from; the weights are in the .npz file beside this one.",
             f"network {imp.network} {{"]
    if imp.dtype == "f64":
        lines.append("    dtype f64")
    for (name, shape), vi in zip(imp.inputs, [i for i in imp.graph.input
                                              if i.name not in {t.name for t in imp.graph.initializer}]):
        lines.append(_with_comment(f"    input {name}: [{', '.join(map(str, shape))}]",
                                   f"ONNX input `{vi.name}` (the batch axis is implicit)"))
    for s in steps:
        for cname, text in s.consts:
            lines.append(f"    const {cname} = {text}")
    decls = [s for s in steps if s.layer and s.declares]
    if decls:
        lines.append("")
        for s in decls:
            lines.append(_with_comment(f"    layer {s.layer} = {s.call}", s.comment))
    lines.append("")
    chain: list[tuple[str, str]] = []
    for i, s in enumerate(steps):
        piece = s.layer or s.call
        if not continues[i]:
            first, *rest = s.inputs
            if rest:       # a join: add(a, b), concat(a, b, c), scale(x, s)
                op, _, inner = s.call.partition("(")
                chain = [(f"{op}({', '.join(bound[r] for r in s.inputs)}" + (f", {inner}" if inner else ")"),
                          s.comment)]
            else:
                chain = [(f"{bound[first]} -> {piece}", s.comment)]
        else:
            chain.append((f"-> {piece}", s.comment))
        if ends[i]:
            name = out_name.get(i) or imp.fresh(_step_value_name(s, imp), "v")
            bound[i] = name
            text = [f"    {name} = {chain[0][0]}"]
            indent = " " * (4 + len(name) + 3)
            text += [f"{indent}{piece}" for piece, _ in chain[1:]]
            lines += [_with_comment(t, c) for t, (_, c) in zip(text, chain)]
    lines.append("")
    lines.append("    output " + ", ".join(bound[v.ref] for _, v in outputs))
    if imp.loss:
        lines.append(f"    loss {imp.loss}({bound[outputs[0][1].ref]})" + "   # added by `convdsl import --loss`")
    lines.append("}")
    weights = {}
    for s in decls:
        for pname, arr in s.weights.items():
            weights[f"{s.layer}.{pname}"] = arr
    return "\n".join(lines) + "\n", weights


def _step_value_name(s: Step, imp: _Importer) -> str:
    """A chain's value is named after the scope of its last node: `layer1_0_relu`, else its op."""
    node, _, op = s.comment.partition(" (")
    op = op.split(")")[0]
    base = _identifier(_Importer.node_base(type("N", (), {"name": node, "op": op})()), "v")
    if base == op.lower() or base in imp.names:
        base = f"{base}_out"
    return base


def network_name(path: str) -> str:
    stem = _identifier(Path(path).stem, "Imported")
    return "".join(p[:1].upper() + p[1:] for p in stem.split("_") if p) or "Imported"


def import_model(model_path, out_path, network: str | None = None, loss: str | None = None) -> tuple[str, dict, str]:
    """(the .cnn text, the weights by parameter and buffer name, the network's name) of an ONNX
    file. The text is checked by building it, so what is written always compiles."""
    onnx = require_onnx()
    try:
        model = onnx.load(str(model_path))
    except FileNotFoundError:
        raise ConvDSLError(None, f"import: {model_path}: no such file") from None
    except Exception as e:
        raise ConvDSLError(None, f"import: {model_path} is not an ONNX model ({type(e).__name__}: {e})") from None
    name = network or network_name(str(out_path))
    text, weights = import_model_proto(model, name, str(model_path), str(out_path), loss)
    return text, weights, name


def import_model_proto(model, network: str, model_path: str = "model.onnx", out_path: str = "<import>",
                       loss: str | None = None):
    """(the .cnn text, the weights) of a loaded ONNX model, as the network `network`; `loss` (a
    loss of the language, on the first output) makes it trainable."""
    imp = _Importer(model, model_path, network, loss)
    imp.names.add(network)
    outputs = imp.run()
    text, weights = _write(imp, outputs, model_path)
    from ..compiler import graph_from_source
    try:
        graph_from_source(text, out_path)        # what is written always checks
    except ConvDSLError as e:
        # The quoted line ends with the comment naming the ONNX node it comes from.
        raise ConvDSLError(None, f"import: the network made from {Path(model_path).name} does not check, so "
                                 f"nothing was written:\n{e}") from None
    return text, weights
