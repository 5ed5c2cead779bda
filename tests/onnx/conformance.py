"""The ONNX backend node tests of the ops the importer reads, generated from the installed onnx
package's case generators (onnx.backend.test.case.node: the data files are not in the wheel).

Importing a generator module runs its `export*` functions, which record each case (a one-node
model, its inputs and expected outputs) in onnx's list of node cases; only the modules of the
ops below are imported (importing all of them takes ~40 s). The harness makes every input of a
node but its data inputs (DATA_INPUTS) an initializer with the case's values: weights, shapes
and scales are constants in the models the importer reads.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import numpy as np

# The generator module of each op the importer translates, and how many of its first inputs are
# network values (None: all of them).
MODULES = {
    "Conv": ("conv", 1), "ConvTranspose": ("convtranspose", 1), "MaxPool": ("maxpool", 1),
    "AveragePool": ("averagepool", 1), "LpPool": ("lppool", 1), "GlobalAveragePool": ("globalaveragepool", 1),
    "GlobalMaxPool": ("globalmaxpool", 1), "Gemm": ("gemm", 1), "MatMul": ("matmul", 1), "Relu": ("relu", 1),
    "LeakyRelu": ("leakyrelu", 1), "Sigmoid": ("sigmoid", 1), "Tanh": ("tanh", 1), "Softmax": ("softmax", 1),
    "Clip": ("clip", 1), "BatchNormalization": ("batch_normalization", 1), "Flatten": ("flatten", 1),
    "Concat": ("concat", None), "Add": ("add", None), "Sum": ("sum", None), "Mul": ("mul", None),
    "ReduceMean": ("reducemean", 1), "ReduceMax": ("reducemax", 1), "Dropout": ("dropout", 1),
    "Identity": ("identity", 1), "Resize": ("resize", 1), "Upsample": ("upsample", 1), "Reshape": ("reshape", 1),
    "HardSigmoid": ("hardsigmoid", 1), "HardSwish": ("hardswish", 1), "Elu": ("elu", 1), "PRelu": ("prelu", 1),
    "Gelu": ("gelu", 1), "Sub": ("sub", None), "Pad": ("pad", 1),
    "InstanceNormalization": ("instance_normalization", 1),
    "GroupNormalization": ("groupnormalization", 1), "LayerNormalization": ("layernormalization", 1),
}


@functools.cache
def node_cases():
    """Every case of the ops above: ((op, TestCase), …), in the generators' order (once per process:
    a generator module records its cases when it is first imported)."""
    import onnx.backend.test.case.node as registry
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op, (module, _) in MODULES.items():
            start = len(registry._NodeTestCases)
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
            found += [(c.model.graph.node[0].op_type, c) for c in registry._NodeTestCases[start:]]
    return tuple((op, c) for op, c in found if op in MODULES)


def as_import_model(op: str, case):
    """The case's model with its non-data inputs made initializers, its inputs and expected outputs."""
    import onnx
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    (inputs, outputs), = case.data_sets[:1]
    data = MODULES[op][1]
    graph = model.graph
    names = [i.name for i in graph.input]
    kept = []
    feeds = {}
    for i, (vi, value) in enumerate(zip(list(graph.input), inputs)):
        value = onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
        if data is None or i < data:
            kept.append(vi)
            feeds[vi.name] = value
        else:
            graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), vi.name))
    del graph.input[:]
    graph.input.extend(kept)
    expected = [onnx.numpy_helper.to_array(o) if isinstance(o, onnx.TensorProto) else np.asarray(o) for o in outputs]
    return model, feeds, expected, names


def merged(group):
    """One model holding the nodes of several cases (their tensors renamed c<i>_…), so that one
    compiled module runs them all: [(op, case, model, feeds, expected)] of one batch size; the
    model's opset is the newest of theirs."""
    import onnx
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (op, case, model, feeds, expected) in enumerate(group):
        g = model.graph
        rename = lambda t, i=i: f"c{i}_{t}" if t else t  # noqa: E731
        for node in g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"c{i}_{node.name or node.op_type}"
            copy.input[:] = [rename(t) for t in node.input]
            copy.output[:] = [rename(t) for t in node.output]
            nodes.append(copy)
        for src, dst in ((g.input, inputs), (g.output, outputs)):
            for vi in src:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(vi)
                copy.name = rename(vi.name)
                dst.append(copy)
        for t in g.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = rename(t.name)
            inits.append(copy)
    opset = max(model.opset_import[0].version for _, _, model, _, _ in group)
    graph = onnx.helper.make_graph(nodes, "conformance", inputs, outputs, inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def tables() -> str:
    """The pass count and the tables of docs/onnx.md's conformance section, from this onnx
    package: `PYTHONPATH=. python tests/onnx/conformance.py` after onnx or the importer changes."""
    import re
    from collections import defaultdict

    from convdsl.errors import ConvDSLError
    from convdsl.onnx.importer import import_model_proto
    counts = defaultdict(lambda: [0, 0])
    refused = {}
    for op, case in node_cases():
        model, _, _, _ = as_import_model(op, case)
        try:
            import_model_proto(model, "OnnxCase")
            counts[op][0] += 1
        except ConvDSLError as e:
            counts[op][1] += 1
            reason = re.sub(r"^convdsl: error: import: ", "", str(e).splitlines()[0])
            reason = re.sub(r"^node 0 `#0` \(\w+\)(, attribute `(\w+)`)?: ",
                            lambda m: f"`{m.group(2)}`: " if m.group(2) else "", reason)
            refused[case.name] = (op, reason.replace("|", "\\|"))
    passed = sum(p for p, _ in counts.values())
    lines = [f"{passed} of the {passed + len(refused)} cases pass", "",
             "| ONNX op | cases that pass | excluded |", "|---|---|---|"]
    lines += [f"| {op} | {p} | {r} |" for op, (p, r) in counts.items()]
    lines += ["", "| case | op | why it is excluded |", "|---|---|---|"]
    lines += [f"| `{name}` | {op} | {reason} |" for name, (op, reason) in refused.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables())
