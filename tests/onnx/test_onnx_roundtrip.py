"""Round trips: small PyTorch models written here → torch.onnx.export (the TorchScript exporter,
dynamo=False, offline) with a dynamic batch axis → `convdsl import` → compile → forward equals
onnxruntime and PyTorch; among them a MobileNetV2 block (ReLU6) and a network of the other ops the
language took from real models (PReLU, ELU, GELU, hard sigmoid and swish, SiLU, group, instance and
layer norm, reflect and replicate padding, element-wise Sub and Mul, a re-viewing reshape)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import convdsl
from convdsl.cli import main
from convdsl.errors import ConvDSLError
from convdsl.onnx.importer import import_model


class ResNetBlock(nn.Module):
    """A downsampling basic block: two 3×3 conv-BN, a strided 1×1 conv-BN shortcut, ReLU after the add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = F.relu(y + self.down(x))
        y = F.max_pool2d(y, 3, stride=2, padding=1, ceil_mode=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class SEBlock(nn.Module):
    def __init__(self, c=8, r=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1 = nn.Linear(c, c // r)
        self.fc2 = nn.Linear(c // r, c)

    def forward(self, x):
        x = torch.tanh(self.conv(x))
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s.view(s.size(0), -1, 1, 1)


class UNetPiece(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        m = F.leaky_relu(self.mid(F.max_pool2d(e, 2)), 0.2)
        d = torch.cat([self.up(m), e], dim=1)
        y = F.interpolate(self.dec(d), scale_factor=2, mode="bilinear", align_corners=False)
        return torch.softmax(y, dim=1)


class Net1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 5, padding=2, dilation=1)
        self.bn = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 6, 3, groups=3, padding="same")
        self.fc = nn.Linear(6 * 4, 4)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.avg_pool1d(y, 3, stride=2, padding=1, count_include_pad=True)
        y = F.max_pool1d(torch.sigmoid(self.conv2(y)), 2)
        return self.fc(self.drop(y.reshape(y.shape[0], -1)))


class Net3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.deconv = nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        y = F.leaky_relu(self.conv(x), 0.1)
        y = F.avg_pool3d(y, 2)
        y = F.interpolate(self.deconv(y), scale_factor=2, mode="nearest")
        return torch.amax(y, dim=(2, 3, 4), keepdim=True)


class ChannelShuffle(nn.Module):
    def __init__(self, groups=4):
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(8, 8, 1, groups=groups)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 1, groups=groups)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        n, c, h, w = y.size()
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y = self.conv2(self.dw(y))
        return F.relu(x + y)


class FullyConvolutional(nn.Module):
    """Exported with run-time height and width: they become the .cnn's run-time sizes H and W."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.b(F.max_pool2d(F.relu(self.a(x)), 2))
        return F.interpolate(y, scale_factor=2, mode="nearest")


class MobileNetV2Block(nn.Module):
    """An inverted residual: 1×1 expansion, 3×3 depthwise, 1×1 linear projection, each with batch
    norm, ReLU6 after the first two, and the residual add."""

    def __init__(self, c=8, expand=4):
        super().__init__()
        h = c * expand
        self.expand = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.project = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(y))


class Vocabulary(nn.Module):
    """The other ops real models use, as PyTorch writes them to ONNX at opset 17."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.act1 = nn.PReLU(8)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate")
        self.norm2 = nn.InstanceNorm2d(8, affine=True)
        self.conv_c = nn.Conv2d(8, 8, 3)
        self.gate = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv1d(8, 4, 3)
        self.norm = nn.LayerNorm(4 * 47)
        self.act = nn.PReLU()
        self.fc = nn.Linear(4 * 47, 5)

    def forward(self, x):
        a = self.gn(self.act1(self.conv1(x)))
        b = self.ln(self.norm2(self.conv2(a)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)        # channels last
        b = F.hardswish(b)
        c = F.elu(self.conv_c(F.pad(a, (1, 1, 1, 1), mode="reflect")), 0.5)
        g = torch.sigmoid(self.gate(c)) * F.silu(b - c)
        y = torch.clamp(F.hardsigmoid(F.pad(g, (0, 1, 1, 0), mode="replicate")), 0.1, 0.9)
        z = self.conv3(y.reshape(y.shape[0], 8, 49))
        return self.fc(F.gelu(self.act(self.norm(z.flatten(1)))))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export(model, shape, path, fold=True, spatial=False):
    axes = {0: "batch", **({2: "H", 3: "W"} if spatial else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], do_constant_folding=fold,
                          dynamic_axes={"x": axes, "y": {0: "batch"}})


CASES = {
    "resnet-block": (ResNetBlock, (2, 4, 16, 16), True),
    "se-block": (SEBlock, (2, 3, 8, 8), False),
    "unet-piece": (UNetPiece, (2, 3, 8, 8), True),
    "net-1d": (Net1D, (2, 2, 16), False),
    "net-3d": (Net3D, (2, 2, 6, 6, 6), True),
    "channel-shuffle": (ChannelShuffle, (2, 8, 6, 6), False),
    "mobilenet-v2-block": (MobileNetV2Block, (2, 8, 6, 6), False),
    "vocabulary": (Vocabulary, (2, 3, 6, 6), True),
}


@pytest.mark.slow
def test_run_time_sizes_round_trip(tmp_path):
    model = randomised(FullyConvolutional())
    export(model, (2, 3, 16, 16), tmp_path / "m.onnx", spatial=True)
    text, weights, _ = import_model(tmp_path / "m.onnx", tmp_path / "fcn.cnn")
    assert "input x: [3, H, W]" in text
    net = convdsl.load_source(text).Model(seed=0)
    for name, value in weights.items():
        net.params[name][...] = value
    x = torch.randn(3, 3, 12, 20)                   # not the export's size
    np.testing.assert_allclose(net.forward(x.numpy()), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


# Each compiles a module (5–10 s on a loaded machine): slow, but for the U-Net piece, which keeps a
# round trip in the quick subset.
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == "unet-piece" else pytest.mark.slow)
                                  for c in CASES])
def test_pytorch_model_round_trips(case, tmp_path):
    cls, shape, fold = CASES[case]
    model = randomised(cls())
    export(model, shape, tmp_path / "m.onnx", fold=fold)
    out = tmp_path / "m.cnn"
    assert main(["import", str(tmp_path / "m.onnx"), "-o", str(out)]) == 0
    text = out.read_text()
    assert "# " in text and "network M {" in text
    net = convdsl.load(out).Model(seed=0)
    net.load(tmp_path / "m.npz")
    net.eval()
    x = torch.randn(3, *shape[1:])                 # another batch than the export's: the batch is implicit
    expected = model(x).detach().numpy()
    got = net.forward(x.numpy())
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (from_ort,) = session.run(None, {"x": x.numpy()})
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got / scale, expected / scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got / scale, from_ort / scale, rtol=1e-4, atol=1e-5)


def test_batchnorm_and_layers_keep_pytorch_names(tmp_path):
    # do_constant_folding=False keeps the BatchNormalization nodes (folding merges them into the convs).
    export(randomised(ResNetBlock()), (2, 4, 16, 16), tmp_path / "m.onnx", fold=False)
    text, weights, name = import_model(tmp_path / "m.onnx", tmp_path / "res_block.cnn")
    assert name == "ResBlock"
    assert "layer bn1 = batchnorm" in text and "layer down_0 = conv(8, kernel=1, stride=2, bias=false)" in text
    assert {"bn1.running_mean", "bn1.running_var", "conv1.weight", "fc.bias"} <= set(weights)
    # ceil_mode=1 keeps a last window that starts inside the map: one more zero at the end.
    assert "-> maxpool(3, stride=2, pad=((1, 2), (1, 2)))" in text


def test_mobilenet_v2_block_imports_relu6(tmp_path):
    export(randomised(MobileNetV2Block()), (2, 8, 6, 6), tmp_path / "m.onnx", fold=False)
    text, weights, _ = import_model(tmp_path / "m.onnx", tmp_path / "m.cnn")
    assert text.count("-> relu6") == 2 and "clip" not in text
    assert "layer dw = depthwise(3, pad=1, bias=false)" in text
    assert {"bn3.running_var", "project.weight"} <= set(weights)


@pytest.mark.slow
def test_the_readme_path_import_check_compile_train(tmp_path, capsys):
    export(randomised(SEBlock()), (2, 3, 8, 8), tmp_path / "model.onnx")
    out = tmp_path / "net.cnn"
    assert main(["import", str(tmp_path / "model.onnx"), "-o", str(out), "--loss", "mse"]) == 0
    assert "loss mse(y)" in out.read_text()
    assert main(["check", str(out)]) == 0
    assert "Net" in capsys.readouterr().out
    net = convdsl.load(out).Model(seed=0)
    net.load(tmp_path / "net.npz")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    target = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)
    first = net.train_step(x, target, lr=0.05)
    for _ in range(5):
        last = net.train_step(x, target, lr=0.05)
    assert last < first


@pytest.mark.parametrize("content,message", [
    (b"not a protobuf at all", "is not an ONNX model"),
    (None, "no such file"),
])
def test_unreadable_models_are_errors_not_tracebacks(tmp_path, capsys, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["import", str(path), "-o", str(tmp_path / "m.cnn")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unsupported_node_is_named_with_its_index_op_and_attribute(tmp_path):
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 5, 5])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="first"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], dilations=[2, 2])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ConvDSLError) as err:
        import_model(tmp_path / "m.onnx", tmp_path / "m.cnn")
    assert str(err.value).splitlines()[0] == ("convdsl: error: import: node 1 `pool` (MaxPool), attribute "
                                              "`dilations`: dilated pooling is not in the language")


def _one_node_model(op, inits=(), shape=("N", 4, 5, 5), **attrs):
    """A model of one node reading x and the initializers `inits` ((name, array) pairs)."""
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    node = helper.make_node(op, ["x", *(name for name, _ in inits)], ["y"], name="it", **attrs)
    tensors = [onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in inits]
    return helper.make_model(helper.make_graph([node], "g", [x], [y], tensors),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("op,inits,attrs,shape,expected", [
    ("HardSigmoid", (), {}, ("N", 4, 5, 5), "attribute `alpha`: alpha=0.2"),
    ("HardSigmoid", (), {"alpha": 1 / 6, "beta": 0.4}, ("N", 4, 5, 5), "attribute `beta`"),
    ("LayerNormalization", (("s", np.ones((5, 5), np.float32)),), {"axis": 2}, ("N", 4, 5, 5), "attribute `axis`"),
    ("Pad", (("p", np.array([0, 0, 1, 1, 0, 0, 1, 1])),), {"mode": "wrap"}, ("N", 4, 5, 5), "attribute `mode`"),
    ("Pad", (("p", np.array([0, 1, 0, 0, 0, 1, 0, 0])),), {}, ("N", 4, 5, 5), "attribute `pads`: padding the batch"),
    ("Clip", (("lo", np.float32(-1)),), {}, ("N", 4, 5, 5), "bounded on one side only"),
    ("PRelu", (("a", np.ones(5, np.float32)),), {}, ("N", 4, 5, 5), "varies along other axes than the channels"),
    ("Gelu", (), {"approximate": "tanh"}, ("N", 4, 5, 5), "attribute `approximate`"),
], ids=["hardsigmoid-alpha", "hardsigmoid-beta", "layernorm-axis", "pad-wrap", "pad-channels", "clip-one-side",
        "prelu-last-axis", "gelu-tanh"])
def test_what_the_new_ops_cannot_say_is_refused_naming_the_attribute(tmp_path, op, inits, attrs, shape, expected):
    onnx.save(_one_node_model(op, inits, shape, **attrs), str(tmp_path / "m.onnx"))
    with pytest.raises(ConvDSLError) as err:
        import_model(tmp_path / "m.onnx", tmp_path / "m.cnn")
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"convdsl: error: import: node 0 `it` ({op})") and expected in first, first


@pytest.mark.parametrize("op,inits,attrs,expected", [
    ("Clip", (("lo", np.float32(0)), ("hi", np.float32(6))), {}, "-> relu6"),
    ("Clip", (("lo", np.float32(-0.5)), ("hi", np.float32(0.25))), {}, "-> clip(-0.5, 0.25)"),
    ("HardSigmoid", (), {"alpha": 1 / 6}, "-> hardsigmoid"),
    ("Elu", (), {"alpha": 0.5}, "-> elu(0.5)"),
    ("PRelu", (("a", np.full((4, 1, 1), 0.1, np.float32)),), {}, "-> it"),
    ("InstanceNormalization", (("s", np.ones(4, np.float32)), ("b", np.zeros(4, np.float32))), {"epsilon": 1e-3},
     "layer it = instancenorm(eps=0.001)"),
    ("GroupNormalization", (("s", np.ones(2, np.float32)), ("b", np.zeros(2, np.float32))), {"num_groups": 2},
     "layer it = groupnorm(2)"),
    ("LayerNormalization", (("s", np.ones((4, 5, 5), np.float32)),), {"axis": 1}, "layer it = groupnorm(1)"),
    ("Pad", (("p", np.array([0, 0, 1, 0, 0, 0, 2, 3])),), {"mode": "edge"}, "-> pad(((1, 2), (0, 3)), mode=replicate)"),
    ("Reshape", (("shape", np.array([0, 4, 25])),), {}, "-> reshape([4, 25])"),
])
def test_the_new_ops_import_as_the_language_writes_them(tmp_path, op, inits, attrs, expected):
    onnx.save(_one_node_model(op, inits, **attrs), str(tmp_path / "m.onnx"))
    text, _, _ = import_model(tmp_path / "m.onnx", tmp_path / "m.cnn")
    assert expected in text, text


def test_a_model_whose_network_does_not_check_says_where_and_writes_nothing(tmp_path, capsys):
    helper = onnx.helper
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 5, 5]),
              helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 2, 4, 4])]
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    nodes = [helper.make_node("Concat", ["x", "z"], ["y"], name="join", axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert main(["import", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.cnn")]) == 1
    err = capsys.readouterr().err
    assert "does not check, so nothing was written" in err and "concat: channels may differ" in err
    assert "# join (Concat)" in err                  # the quoted line names the ONNX node
    assert not (tmp_path / "m.cnn").exists() and not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("cls,shape,expected", [
    (SEBlock, (2, 3, 8, 8), " = scale(tanh_out, sigmoid_out)"), (ChannelShuffle, (2, 8, 6, 6), "-> shuffle(4)"),
])
def test_a_fixed_batch_is_the_implicit_batch_too(tmp_path, cls, shape, expected):
    # Without dynamic axes the exporter writes the batch (2) into the shapes it computes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(randomised(cls()), (torch.randn(*shape),), str(tmp_path / "m.onnx"), dynamo=False,
                          opset_version=17, do_constant_folding=False)
    text, _, _ = import_model(tmp_path / "m.onnx", tmp_path / "m.cnn")
    assert expected in text and f"[{', '.join(map(str, shape[1:]))}]" in text
