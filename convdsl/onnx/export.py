"""A checked graph → an ONNX model (opset 17) whose onnxruntime outputs equal the module's forward.

Inside, tensors stay channel-first as in the IR ([N, C, *spatial]); a `layout NHWC` network gets a
Transpose after each input and before each output, so the ONNX model takes and gives what the
generated module takes and gives. The batch axis is symbolic (`N`), and so is every run-time size:
an input dim `H` is the ONNX dim parameter `H`. Each layer kind has one translation function in
EXPORTERS, which reads the node's normalised attributes; local and tiled have none (ONNX has no
unshared convolution) and are refused at their line.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ConvDSLError
from ..ir import dims as D
from ..ir.graph import Graph, Node
from . import OPSET, require_onnx

BATCH = "N"


class _Emitter:
    """Collects ONNX nodes and initializers for one graph, with fresh names for helper tensors."""

    def __init__(self, graph: Graph, state: dict[str, np.ndarray]):
        self.onnx = require_onnx()
        self.graph = graph
        self.state = state
        self.dtype = np.float64 if graph.dtype == "f64" else np.float32
        self.nodes = []
        self.initializers = []
        self.names: dict[int, str] = {}         # value id → ONNX tensor name
        self.params: dict[str, str] = {}        # layer.param → its initializer
        self._used: set[str] = set()

    def fresh(self, base: str) -> str:
        base = base.replace("/", "_") or "t"
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def node(self, op: str, inputs, outputs=None, name: str = "", **attrs) -> str:
        outputs = outputs or [self.fresh(f"{name or op}_out")]
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), list(outputs), name=self.fresh(name or op),
                                                     **attrs))
        return outputs[0]

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, base: str, values) -> str:
        return self.constant(base, np.asarray(list(values), dtype=np.int64))

    def param(self, n: Node, pname: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> str:
        key = f"{n.layer}.{pname}"
        if key in self.params:            # a shared layer: every use reads the one initializer
            return self.params[key]
        if key not in self.state:
            raise ConvDSLError(n.span, f"export: the weights have no `{key}`")
        arr = np.asarray(self.state[key], dtype=self.dtype)
        if transform is not None:
            arr = transform(arr)
        self.params[key] = self.constant(key, arr)
        return self.params[key]

    def x(self, n: Node, i: int = 0) -> str:
        return self.names[n.inputs[i]]

    def type(self, vid: int):
        return self.graph.value(vid).type

    def shape_with_channels(self, like: str, channels) -> str:
        """[N, *channels, *spatial of `like`] as an int64 tensor: the shape to reshape back to
        when the spatial sizes may be run-time sizes."""
        batch = self.node("Shape", [like], start=0, end=1)
        spatial = self.node("Shape", [like], start=2)
        return self.node("Concat", [batch, self.ints("channels", channels), spatial], axis=0)


def _pads(n: Node, pads) -> list[int]:
    for before, after in pads:
        if not isinstance(before, int) or not isinstance(after, int):
            raise ConvDSLError(n.span, "export: padding that depends on run-time sizes has no ONNX form "
                                       "except pad=same (auto_pad SAME_UPPER)")
    return [b for b, _ in pads] + [a for _, a in pads]


def _window_attrs(n: Node, with_dilation: bool = True) -> dict:
    a = n.attrs
    attrs = {"kernel_shape": list(a["kernel"]), "strides": list(a["stride"])}
    if with_dilation:
        attrs["dilations"] = list(a.get("dilation", (1,) * len(a["kernel"])))
    spec = a.get("pad_spec")
    if all(isinstance(p, int) for pair in a["pads"] for p in pair):
        attrs["pads"] = _pads(n, a["pads"])
    elif getattr(spec, "name", None) == "same":
        attrs["auto_pad"] = "SAME_UPPER"      # the language's `same` is ONNX's SAME_UPPER
    else:
        _pads(n, a["pads"])
    return attrs


def _conv(e: _Emitter, n: Node):
    a = n.attrs
    rank = len(a["kernel"])
    flip = (lambda w: np.ascontiguousarray(np.flip(w, axis=tuple(range(2, 2 + rank))))) if a["flip"] else None
    inputs = [e.x(n), e.param(n, "weight", flip)]
    if a["bias"]:
        inputs.append(e.param(n, "bias"))
    return e.node("Conv", inputs, name=n.label, group=a["groups"], **_window_attrs(n))


def _deconv(e: _Emitter, n: Node):
    a = n.attrs
    inputs = [e.x(n), e.param(n, "weight")]
    if a["bias"]:
        inputs.append(e.param(n, "bias"))
    return e.node("ConvTranspose", inputs, name=n.label, group=a["groups"], kernel_shape=list(a["kernel"]),
                  strides=list(a["stride"]), dilations=list(a["dilation"]), pads=list(a["pad"]) * 2,
                  output_padding=list(a["output_pad"]))


def _dense(e: _Emitter, n: Node):
    inputs = [e.x(n), e.param(n, "weight")]
    if n.attrs["bias"]:
        inputs.append(e.param(n, "bias"))
    return e.node("Gemm", inputs, name=n.label, transB=1)


def _pool(op: str, **extra):
    def export(e: _Emitter, n: Node):
        return e.node(op, [e.x(n)], name=n.label, **_window_attrs(n, with_dilation=False), **extra)
    return export


def _plain(op: str, **extra):
    def export(e: _Emitter, n: Node):
        return e.node(op, [e.names[i] for i in n.inputs], name=n.label, **extra)
    return export


def _leaky_relu(e: _Emitter, n: Node):
    return e.node("LeakyRelu", [e.x(n)], name=n.label, alpha=float(n.attrs["alpha"]))


def _batchnorm(e: _Emitter, n: Node):
    inputs = [e.x(n), e.param(n, "weight"), e.param(n, "bias"), e.param(n, "running_mean"),
              e.param(n, "running_var")]
    return e.node("BatchNormalization", inputs, name=n.label, epsilon=float(n.attrs["eps"]))


def _flatten(e: _Emitter, n: Node):
    x = e.x(n)
    t = e.type(n.inputs[0])
    if n.attrs["layout"] == "NHWC" and t.rank > 1:
        # The flatten order of NHWC is H, W, C: channels last.
        x = e.node("Transpose", [x], name=f"{n.label}_to_channels_last", perm=[0, *range(2, t.rank + 1), 1])
    return e.node("Flatten", [x], name=n.label, axis=1)


def _scale(e: _Emitter, n: Node):
    x, s = e.x(n, 0), e.x(n, 1)
    xt, st = e.type(n.inputs[0]), e.type(n.inputs[1])
    missing = xt.rank - st.rank
    if missing:
        # [N, C] (or [N, C, 1]) factors broadcast over the map once they have its rank.
        s = e.node("Unsqueeze", [s, e.ints("axes", range(st.rank + 1, xt.rank + 1))], name=f"{n.label}_factors")
    return e.node("Mul", [x, s], name=n.label)


def _maxout(e: _Emitter, n: Node):
    k = n.attrs["k"]
    x = e.x(n)
    t = e.type(n.inputs[0])
    cout = t.channels // k
    grouped = e.node("Reshape", [x, e.ints("shape", [0, cout, k, -1])], name=f"{n.label}_groups")
    best = e.node("ReduceMax", [grouped], name=f"{n.label}_max", axes=[2], keepdims=0)
    if t.rank == 1:
        return e.node("Reshape", [best, e.ints("shape", [0, cout])], name=n.label)
    return e.node("Reshape", [best, e.shape_with_channels(x, [cout])], name=n.label)


def _shuffle(e: _Emitter, n: Node):
    g = n.attrs["groups"]
    x = e.x(n)
    t = e.type(n.inputs[0])
    c = t.channels
    grouped = e.node("Reshape", [x, e.ints("shape", [0, g, c // g, -1])], name=f"{n.label}_groups")
    swapped = e.node("Transpose", [grouped], name=f"{n.label}_swap", perm=[0, 2, 1, 3])
    if t.rank == 1:
        return e.node("Reshape", [swapped, e.ints("shape", [0, c])], name=n.label)
    return e.node("Reshape", [swapped, e.shape_with_channels(x, [c])], name=n.label)


def _upsample(e: _Emitter, n: Node):
    a = n.attrs
    scales = e.constant("scales", np.asarray([1.0, 1.0, *a["factor"]], dtype=np.float32))
    if a["mode"] == "nearest":
        # Output cell o reads input cell floor(o / f).
        return e.node("Resize", [e.x(n), "", scales], name=n.label, mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return e.node("Resize", [e.x(n), "", scales], name=n.label, mode="linear",
                  coordinate_transformation_mode="half_pixel")


def _clip(e: _Emitter, n: Node):
    lo = e.constant("min", np.asarray(n.attrs["min"], dtype=e.dtype))
    hi = e.constant("max", np.asarray(n.attrs["max"], dtype=e.dtype))
    return e.node("Clip", [e.x(n), lo, hi], name=n.label)


def _elu(e: _Emitter, n: Node):
    return e.node("Elu", [e.x(n)], name=n.label, alpha=float(n.attrs["alpha"]))


def _silu(e: _Emitter, n: Node):
    x = e.x(n)
    return e.node("Mul", [x, e.node("Sigmoid", [x], name=f"{n.label}_sigmoid")], name=n.label)


def _gelu(e: _Emitter, n: Node):
    # Gelu is an ONNX op from opset 20 only; at opset 17 it is x · (1 + erf(x/√2)) / 2, as PyTorch exports it.
    x = e.x(n)
    scaled = e.node("Div", [x, e.constant("sqrt2", np.asarray(np.sqrt(2.0), dtype=e.dtype))], name=f"{n.label}_div")
    cdf = e.node("Add", [e.node("Erf", [scaled], name=f"{n.label}_erf"), e.constant("one", np.asarray(1, e.dtype))],
                 name=f"{n.label}_add")
    return e.node("Mul", [e.node("Mul", [x, cdf], name=f"{n.label}_mul"), e.constant("half", np.asarray(0.5, e.dtype))],
                  name=n.label)


def _per_channel(e: _Emitter, n: Node, pname: str) -> str:
    """A [C] parameter as [C, 1, …] so that it broadcasts along the channels of the node's input."""
    rank = e.type(n.inputs[0]).rank
    return e.param(n, pname, lambda w: w.reshape(-1, *(1,) * (rank - 1)))


def _prelu(e: _Emitter, n: Node):
    return e.node("PRelu", [e.x(n), _per_channel(e, n, "weight")], name=n.label)


def _instancenorm(e: _Emitter, n: Node):
    return e.node("InstanceNormalization", [e.x(n), e.param(n, "weight"), e.param(n, "bias")], name=n.label,
                  epsilon=float(n.attrs["eps"]))


def _groupnorm(e: _Emitter, n: Node):
    # [N, G, C/G · positions], each group normalised as an instance (unit scale), then the
    # language's scale and shift per channel on the map.
    x = e.x(n)
    g = n.attrs["groups"]
    grouped = e.node("Reshape", [x, e.ints("shape", [0, g, -1])], name=f"{n.label}_groups")
    normal = e.node("InstanceNormalization", [grouped, e.constant("ones", np.ones(g, e.dtype)),
                                              e.constant("zeros", np.zeros(g, e.dtype))],
                    name=f"{n.label}_normalise", epsilon=float(n.attrs["eps"]))
    back = e.node("Reshape", [normal, e.node("Shape", [x], name=f"{n.label}_shape")], name=f"{n.label}_map")
    scaled = e.node("Mul", [back, _per_channel(e, n, "weight")], name=f"{n.label}_scale")
    return e.node("Add", [scaled, _per_channel(e, n, "bias")], name=n.label)


def _layernorm(e: _Emitter, n: Node):
    # Over the channels at each position: ONNX normalises the last axes, so a map goes channels last and back.
    rank = e.type(n.inputs[0]).rank
    x = e.x(n)
    if rank > 1:
        x = e.node("Transpose", [x], name=f"{n.label}_to_channels_last", perm=_channels_last(rank))
    y = e.node("LayerNormalization", [x, e.param(n, "weight"), e.param(n, "bias")], name=f"{n.label}_normalise"
               if rank > 1 else n.label, axis=-1, epsilon=float(n.attrs["eps"]))
    if rank > 1:
        y = e.node("Transpose", [y], name=n.label, perm=_channels_first(rank))
    return y


_ONNX_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge"}


def _pad(e: _Emitter, n: Node):
    pads = _pads(n, n.attrs["pads"])
    rank = len(n.attrs["pads"])
    full = [0, 0, *pads[:rank], 0, 0, *pads[rank:]]
    return e.node("Pad", [e.x(n), e.ints("pads", full)], name=n.label, mode=_ONNX_PAD_MODES[n.attrs["mode"]])


def _reshape(e: _Emitter, n: Node):
    # The values in the layout's order: NHWC reads and writes maps channels last, as the module does.
    t, out = e.type(n.inputs[0]), e.type(n.output)
    nhwc = n.attrs["layout"] == "NHWC"
    x = e.x(n)
    if nhwc and t.rank > 1:
        x = e.node("Transpose", [x], name=f"{n.label}_to_channels_last", perm=_channels_last(t.rank))
    shape = list(out.shape) if not (nhwc and out.rank > 1) else [*out.spatial, out.channels]
    y = e.node("Reshape", [x, e.ints("shape", [0, *shape])], name=n.label if not (nhwc and out.rank > 1)
               else f"{n.label}_reshape")
    if nhwc and out.rank > 1:
        y = e.node("Transpose", [y], name=n.label, perm=_channels_first(out.rank))
    return y


def _not_expressible(why: str):
    def export(e: _Emitter, n: Node):
        raise ConvDSLError(n.span, f"export: `{n.label}` is a {n.op} layer, which ONNX cannot express ({why})")
    return export


EXPORTERS: dict[str, Callable[[_Emitter, Node], str]] = {
    "conv": _conv, "depthwise": _conv, "deconv": _deconv, "dense": _dense,
    "maxpool": _pool("MaxPool"), "avgpool": _pool("AveragePool", count_include_pad=0),
    "l2pool": _pool("LpPool", p=2),
    "globalavgpool": _plain("GlobalAveragePool"), "globalmaxpool": _plain("GlobalMaxPool"),
    "relu": _plain("Relu"), "sigmoid": _plain("Sigmoid"), "tanh": _plain("Tanh"), "leaky_relu": _leaky_relu,
    "softmax": _plain("Softmax", axis=1),
    "clip": _clip, "relu6": _clip, "hardsigmoid": _plain("HardSigmoid", alpha=1.0 / 6.0, beta=0.5),
    "hardswish": _plain("HardSwish"), "silu": _silu, "gelu": _gelu, "elu": _elu, "prelu": _prelu,
    "layernorm": _layernorm, "groupnorm": _groupnorm, "instancenorm": _instancenorm,
    "sub": _plain("Sub"), "mul": _plain("Mul"), "pad": _pad, "reshape": _reshape,
    "add": _plain("Sum"), "concat": _plain("Concat", axis=1), "scale": _scale,
    "batchnorm": _batchnorm, "dropout": _plain("Identity"),   # inference: dropout is the identity
    "flatten": _flatten, "maxout": _maxout, "shuffle": _shuffle, "upsample": _upsample,
    "local": _not_expressible("it has no unshared, locally connected convolution"),
    "tiled": _not_expressible("it has no tiled convolution with several kernel sets"),
}


def _dim_proto(d) -> str | int | None:
    if isinstance(d, int):
        return d
    if isinstance(d, D.Sym) and len(d.terms) == 1 and d.const == 0 and d.terms[0][1] == 1 \
            and d.terms[0][0].kind == "var":
        return d.terms[0][0].name
    return None              # a derived run-time size (H/2): unnamed


def _channels_last(rank: int) -> list[int]:
    return [0, *range(2, rank + 1), 1]


def _channels_first(rank: int) -> list[int]:
    return [0, rank, *range(1, rank)]


def export_graph(graph: Graph, state: dict[str, np.ndarray]) -> "onnx.ModelProto":
    """The ONNX model of a checked graph with the weights `state` (`Model.state_dict()` names)."""
    e = _Emitter(graph, state)
    onnx = e.onnx
    elem = onnx.TensorProto.DOUBLE if graph.dtype == "f64" else onnx.TensorProto.FLOAT
    e._used.update(i.name for i in graph.inputs)
    graph_inputs, graph_outputs = [], []
    nhwc = graph.layout == "NHWC"
    for decl in graph.inputs:
        graph_inputs.append(onnx.helper.make_tensor_value_info(decl.name, elem,
                                                               [BATCH, *(_dim_proto(d) for d in decl.dims)]))
        rank = len(decl.dims)
        if nhwc and rank > 1:
            e.names[decl.value] = e.node("Transpose", [decl.name], name=f"{decl.name}_to_channels_first",
                                         perm=_channels_first(rank))
        else:
            e.names[decl.value] = decl.name
    for n in graph.nodes:
        export = EXPORTERS.get(n.op)
        if export is None:
            raise ConvDSLError(n.span, f"export: `{n.label}` is a {n.op} layer, which the exporter does not know")
        e.names[n.output] = export(e, n)
    taken = {decl.name for decl in graph.inputs}
    for decl in graph.outputs:
        t = graph.value(decl.value).type
        name = decl.name if decl.name not in taken else e.fresh(f"{decl.name}_out")
        taken.add(name)
        e._used.add(name)
        inner = e.names[decl.value]
        if nhwc and t.rank > 1:
            e.node("Transpose", [inner], [name], name=f"{name}_to_channels_last", perm=_channels_last(t.rank))
            shape = [*t.spatial, t.channels]
        else:
            e.node("Identity", [inner], [name], name=f"{name}_output")
            shape = list(t.shape)
        graph_outputs.append(onnx.helper.make_tensor_value_info(name, elem, [BATCH, *(_dim_proto(d) for d in shape)]))
    g = onnx.helper.make_graph(e.nodes, graph.name, graph_inputs, graph_outputs, e.initializers)
    from .. import __version__
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="convdsl", producer_version=__version__,
                                   doc_string=f"{graph.name} from {graph.source_path}")
    model.ir_version = 8           # what opset 17 needs; onnxruntime reads it
    onnx.checker.check_model(model, full_check=True)
    return model
