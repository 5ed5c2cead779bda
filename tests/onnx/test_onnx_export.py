"""`convdsl export`: the ONNX model passes the checker's full check and its onnxruntime outputs
equal the compiled module's forward (inference mode) — on every example that ONNX can express,
and on networks written here that hold every exportable op, both layouts, run-time sizes, 1-D
and 3-D maps and f64."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import convdsl
from convdsl.cli import main
from convdsl.compiler import graph_from_file, graph_from_source, networks_in_file
from convdsl.errors import ConvDSLError
from convdsl.onnx.export import export_graph
from convdsl.onnx.importer import import_model_proto
from convdsl.passes.schedule import buffer_layout

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.cnn"))
NOT_EXPRESSIBLE = {"local_faces.cnn"}          # local and tiled: no ONNX form (tested below)
CASES = [(p, n) for p in EXAMPLES if p.name not in NOT_EXPRESSIBLE for n in networks_in_file(p)]

MAP_OPS = """
network OnnxMapOps {
    layout NHWC
    input x: [12, 12, 4]
    a = x -> conv(8, kernel=3, pad=same, flip=true) -> batchnorm -> leaky_relu(0.1)
    b = a -> depthwise(3, stride=2, pad=same) -> tanh -> maxpool(3, stride=1, pad=same)
    c = b -> avgpool(3, stride=1, pad=1) -> l2pool(2, stride=1, pad=((0, 1), (0, 1)))
    d = concat(c, b) -> maxout(2) -> shuffle(4) -> upsample(2) -> sigmoid
    r = add(d, a, a) -> dropout(0.2) -> relu
    s = r -> globalavgpool -> dense(4) -> relu -> dense(8) -> sigmoid
    y = scale(r, s) -> conv(6, kernel=3, stride=2, dilation=2, pad=2, groups=2) -> softmax
    z = y -> globalmaxpool -> flatten -> dense(5)
    v = y -> flatten -> maxout(3) -> shuffle(2) -> dense(3, bias=false)
    output y, z, v
}
"""

RUN_TIME_SIZES = """
network OnnxRunTime {
    input x: [3, H, W]
    a = x -> conv(8, kernel=3, stride=2, pad=same) -> relu -> separable(8, kernel=3, pad=same)
          -> maxout(2) -> shuffle(2)
          -> deconv(4, kernel=3, stride=2, pad=1, output_pad=1, groups=2)
          -> upsample(2, mode=bilinear) -> softmax
    output a
}
"""

ONE_AND_THREE_D = """
network OnnxRanks {
    input s: [4, 16]
    input v: [2, 6, 6, 6]
    p = s -> conv(6, kernel=3, pad=1) -> batchnorm -> relu -> maxpool(2) -> upsample(2, mode=linear)
          -> deconv(3, kernel=2, stride=2) -> globalavgpool
    q = v -> conv(4, kernel=3, pad=same) -> relu -> avgpool(2) -> upsample(2, mode=trilinear)
          -> conv(3, kernel=1) -> globalmaxpool
    output p, q
}
"""

# The ops the language gained with the vocabulary of real models: padding modes (a `pad` layer
# in front of the conv), pad, the activations, prelu, the three normalisations, sub and mul, reshape.
NEW_OPS = """
network OnnxNewOps {
    input x: [4, 10, 10]
    a = x -> conv(8, kernel=3, pad=1, pad_mode=reflect) -> groupnorm(2) -> relu6
    b = a -> depthwise(3, pad=1, pad_mode=replicate) -> instancenorm(eps=0.001) -> hardswish
    c = a -> pad(((1, 0), (0, 2)), mode=reflect) -> conv(8, kernel=(2, 3)) -> layernorm -> hardsigmoid
    s = sub(b, c)
    g = a -> silu
    d = mul(s, g) -> prelu -> elu(0.5) -> clip(-1, 2)
    e = d -> pad(1) -> conv(4, kernel=3) -> gelu
    f = e -> reshape([4, 100]) -> layernorm -> prelu(shared=true)
    v = e -> globalavgpool -> flatten -> dense(32) -> layernorm -> gelu -> reshape([2, 4, 4])
          -> conv(3, kernel=3, pad=1, pad_mode=replicate) -> groupnorm(3)
    output f, v
}
"""
NEW_OPS_NHWC = NEW_OPS.replace("network OnnxNewOps {\n    input x: [4, 10, 10]",
                               "network OnnxNewOpsNHWC {\n    layout NHWC\n    input x: [10, 10, 4]")


def randomised(net, seed=1):
    """A model's weights drawn at random (batchnorm statistics too, positive variances), so that
    a transposed or mis-ordered weight cannot pass."""
    rng = np.random.default_rng(seed)
    for name, arr in net.params.items():
        arr[...] = rng.standard_normal(arr.shape) * 0.4
    for name, arr in net.buffers.items():
        arr[...] = rng.uniform(0.5, 1.5, arr.shape) if name.endswith("running_var") else rng.standard_normal(arr.shape)
    return net


def ort_outputs(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_exported_equal(graph, net, model, shapes, dtype=np.float32):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ys = net.forward(*xs)
    ys = ys if isinstance(ys, tuple) else (ys,)
    outs = ort_outputs(model, {decl.name: x for decl, x in zip(graph.inputs, xs)})
    assert len(outs) == len(ys)
    for y, o in zip(ys, outs):
        assert o.shape == y.shape and o.dtype == y.dtype
        scale = max(1.0, float(np.abs(y).max()))
        np.testing.assert_allclose(o / scale, y / scale, rtol=1e-4, atol=1e-5)


def exported(graph, net):
    model = export_graph(graph, net.state_dict())
    assert model.opset_import[0].version >= 17
    onnx.checker.check_model(model, full_check=True)
    for value in model.graph.input:
        assert value.type.tensor_type.shape.dim[0].dim_param == "N"      # the batch is symbolic
    return model


def random_state(graph, seed=0):
    rng = np.random.default_rng(seed)
    state = {f"{layer.name}.{p.name}": rng.standard_normal(p.shape).astype(np.float32)
             for layer in graph.layers for p in layer.params}
    state.update({b.full_name: rng.uniform(0.5, 1.5, b.spec.shape).astype(np.float32) for b in buffer_layout(graph)})
    return state


@pytest.mark.parametrize("path,network", CASES, ids=[f"{p.stem}:{n}" for p, n in CASES])
def test_every_expressible_example_imports_back_with_its_weights(path, network):
    """export → import: the same layers (a shared `layer` stays one), under the same names (a block's
    `inception1.conv3` is `inception1_conv3`), with the same weights."""
    graph = graph_from_file(path, network)
    state = random_state(graph)
    text, weights = import_model_proto(export_graph(graph, state), "Back")
    back = graph_from_source(text)
    assert sum(len(layer.params) for layer in back.layers) == sum(len(layer.params) for layer in graph.layers)
    flipped = {f"{n.layer}.weight" for n in graph.nodes if n.attrs.get("flip")}   # written as cross-correlation
    expected = {name.rsplit(".", 1)[0].replace(".", "_") + "." + name.rsplit(".", 1)[1]:
                np.flip(value, axis=tuple(range(2, value.ndim))) if name in flipped else value
                for name, value in state.items()}
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_the_new_ops_import_back_with_their_weights():
    """export → import of the vocabulary ops: what the exporter writes for groupnorm (Reshape →
    InstanceNormalization → Reshape → Mul → Add), layernorm of a map (Transpose → LayerNormalization →
    Transpose) and gelu (Div → Erf → Add → Mul → Mul) reads back as those layers, with their weights."""
    graph = graph_from_source(NEW_OPS)
    state = random_state(graph)
    text, weights = import_model_proto(export_graph(graph, state), "Back")
    back = graph_from_source(text)
    # A Pad read by a Conv is that conv's `pad` (and `pad_mode`): a zero `pad` layer becomes the conv's padding.
    assert sorted(n.op for n in back.nodes if n.op != "pad") == sorted(n.op for n in graph.nodes if n.op != "pad")
    assert "conv(8, kernel=3, pad=1, pad_mode=reflect)" in text and "conv(4, kernel=3, pad=1)" in text
    assert weights.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_allclose(weights[name], value.reshape(weights[name].shape), rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_shared_layer_with_run_time_sizes_round_trips_through_onnx(tmp_path, optimised):
    path = REPO / "examples" / "refine.cnn"
    net = randomised(convdsl.load(path).Model(seed=0)).eval()
    text, weights = import_model_proto(export_graph(graph_from_file(path), net.state_dict()), "RefineBack")
    # U is declared once and used in each of the 4 rounds.
    assert text.count("layer U = conv(32, kernel=3, pad=1)") == 1 and text.count("-> U ") == 4
    back = convdsl.load_source(text).Model(seed=0)
    for name, value in weights.items():
        back.params[name][...] = value
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 13)).astype(np.float32)
    np.testing.assert_allclose(back.eval().forward(x), net.forward(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("path,network", CASES, ids=[f"{p.stem}:{n}" for p, n in CASES])
def test_every_expressible_example_exports_to_what_the_module_computes(path, network, optimised):
    # -O3 (`optimised`), as test_examples.py builds them: the same modules, compiled once per run.
    graph = graph_from_file(path, network)
    net = randomised(convdsl.load(path, network).Model(seed=0)).eval()
    model = exported(graph, net)
    shapes = [(2, *(d if isinstance(d, int) else 12 for d in decl.dims)) for decl in graph.inputs]
    assert_exported_equal(graph, net, model, shapes, np.float64 if graph.dtype == "f64" else np.float32)


# Each compiles a module; the run-time-sizes one stays in the quick subset (the CLI test reuses it).
@pytest.mark.parametrize("text,shapes", [
    pytest.param(MAP_OPS, [[(3, 12, 12, 4)]], marks=pytest.mark.slow),
    (RUN_TIME_SIZES, [[(2, 3, 10, 14)], [(1, 3, 7, 5)]]),
    pytest.param(ONE_AND_THREE_D, [[(2, 4, 16), (2, 2, 6, 6, 6)]], marks=pytest.mark.slow),
    pytest.param(NEW_OPS, [[(3, 4, 10, 10)]], marks=pytest.mark.slow),
    pytest.param(NEW_OPS_NHWC, [[(2, 10, 10, 4)]], marks=pytest.mark.slow),
], ids=["map-ops-nhwc", "run-time-sizes", "1d-3d", "new-ops", "new-ops-nhwc"])
def test_every_exportable_op_matches_the_module(text, shapes):
    graph = graph_from_source(text)
    net = randomised(convdsl.load_source(text).Model(seed=0)).eval()
    model = exported(graph, net)
    for batch_shapes in shapes:
        assert_exported_equal(graph, net, model, batch_shapes, np.float64 if graph.dtype == "f64" else np.float32)


def test_f64_networks_export_as_double():
    # onnxruntime's CPU provider has no double Conv, so this one is checked, not run.
    text = ONE_AND_THREE_D.replace("network OnnxRanks {", "network OnnxRanks {\n    dtype f64")
    graph = graph_from_source(text)
    state = {f"{layer.name}.{p.name}": np.ones(p.shape) for layer in graph.layers for p in layer.params}
    state.update({b.full_name: np.ones(b.spec.shape) for b in buffer_layout(graph)})
    model = export_graph(graph, state)
    onnx.checker.check_model(model, full_check=True)
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.DOUBLE}
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("weight")} == {onnx.TensorProto.DOUBLE}


@pytest.mark.parametrize("layer", ["local(4, kernel=3)", "tiled(4, kernel=3, tile=2)"])
def test_unshared_layers_are_refused_at_their_line(layer):
    graph = graph_from_source(f"network U {{\n    input x: [2, 8, 8]\n    y = x -> {layer}\n    output y\n}}\n")
    with pytest.raises(ConvDSLError) as err:
        export_graph(graph, {})
    text = str(err.value)
    assert text.startswith("<string>:3:14: error: export: `")
    assert "ONNX cannot express" in text


def test_cli_export_writes_a_checked_model_from_a_weight_file(tmp_path, capsys):
    source = tmp_path / "net.cnn"
    source.write_text(RUN_TIME_SIZES)
    graph = graph_from_file(source)
    net = randomised(convdsl.load_source(RUN_TIME_SIZES).Model(seed=0)).eval()   # the module built above
    net.save(tmp_path / "w.npz")
    assert main(["export", str(source), "-o", str(tmp_path / "net.onnx"), "--weights", str(tmp_path / "w.npz")]) == 0
    assert "wrote" in capsys.readouterr().out
    model = onnx.load(str(tmp_path / "net.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert_exported_equal(graph, net, model, [(2, 3, 9, 11)])


def test_cli_export_refuses_weights_of_another_network(tmp_path, capsys):
    source = tmp_path / "net.cnn"
    source.write_text(RUN_TIME_SIZES)
    np.savez(tmp_path / "w.npz", other=np.zeros(3))
    assert main(["export", str(source), "-o", str(tmp_path / "net.onnx"), "--weights", str(tmp_path / "w.npz")]) == 1
    err = capsys.readouterr().err
    assert "error: --weights" in err and "conv1.weight" in err and "Traceback" not in err
