"""Model.load_state_dict: a PyTorch ResNet-18-like model's state_dict loads by structural order
(BatchNorm buffers included, num_batches_tracked ignored) and the module then computes what
PyTorch computes; explicit maps, equal names and state_dict(mapping) round trips; anything that
does not pair off exactly is refused."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.passes.schedule import buffer_layout
from convdsl.runtime.state import as_arrays, correspondence

RESNET = """
block basic(x, c) {
    y = x -> conv(c, kernel=3, pad=1, bias=false) -> batchnorm -> relu
          -> conv(c, kernel=3, pad=1, bias=false) -> batchnorm
    return add(y, x) -> relu
}

block down(x, c) {
    y = x -> conv(c, kernel=3, stride=2, pad=1, bias=false) -> batchnorm -> relu
          -> conv(c, kernel=3, pad=1, bias=false) -> batchnorm
    s = x -> conv(c, kernel=1, stride=2, bias=false) -> batchnorm
    return add(y, s) -> relu
}

network ResNet18Like {
    input x: [3, 32, 32]
    f = x -> conv(8, kernel=7, stride=2, pad=3, bias=false) -> batchnorm -> relu -> maxpool(3, stride=2, pad=1)
          -> basic(8) -> basic(8) -> down(16) -> basic(16) -> down(32) -> basic(32) -> down(64) -> basic(64)
    y = f -> globalavgpool -> dense(10)
    output y
}
"""


class BasicBlock(nn.Module):
    def __init__(self, cin, c, stride, shortcut_first=False):
        super().__init__()
        if shortcut_first and stride != 1:      # the same modules registered in another order
            self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        if stride != 1 and not shortcut_first:
            self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))
        if stride == 1:
            self.downsample = None

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18Like(nn.Module):
    def __init__(self, shortcut_first=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(8, 8, 1), (8, 16, 2), (16, 32, 2), (32, 64, 2)]
        for i, (cin, c, stride) in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, c, stride, shortcut_first),
                                                     BasicBlock(c, c, 1)))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def trained_looking(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def our_names():
    """The network's parameters and buffers with their shapes, as a Model orders them, from the
    checked graph alone (no compile)."""
    graph = graph_from_source(RESNET)
    params = {f"{layer.name}.{p.name}": p.shape for layer in graph.layers for p in layer.params}
    buffers = {b.full_name: tuple(b.spec.shape) for b in buffer_layout(graph)}
    order = {}
    for layer in dict.fromkeys(n.rsplit(".", 1)[0] for n in list(params) + list(buffers)):
        order.update({n: s for n, s in {**params, **buffers}.items() if n.rsplit(".", 1)[0] == layer})
    return order


def test_structural_order_pairs_each_layer_with_its_module():
    pairs, how = correspondence(our_names(), as_arrays(ResNet18Like().state_dict()))
    assert how == "order"
    assert pairs["conv1.weight"] == "conv1.weight" and pairs["batchnorm1.running_mean"] == "bn1.running_mean"
    assert pairs["basic1.batchnorm2.weight"] == "layer1.0.bn2.weight"
    assert pairs["down1.conv3.weight"] == "layer2.0.downsample.0.weight"
    assert pairs["dense1.bias"] == "fc.bias"


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop("fc.bias"),
     "layer `dense1` has \\['bias', 'weight'\\] but its counterpart `fc` has \\['weight'\\]"),
    (lambda sd: sd.update({"extra.weight": np.zeros(3)}), "has 41 layers with weights, the state_dict 42 modules"),
    (lambda sd: sd.update({"conv1.weight": np.zeros((8, 3, 5, 5))}),
     "`conv1.weight` is \\[8, 3, 7, 7\\] but its counterpart `conv1.weight` is \\[8, 3, 5, 5\\]"),
])
def test_what_does_not_pair_off_by_order_is_refused(change, message):
    sd = dict(as_arrays(ResNet18Like().state_dict()))
    change(sd)
    with pytest.raises(ValueError, match=message):
        correspondence(our_names(), sd)


def test_modules_registered_in_another_order_do_not_line_up():
    with pytest.raises(ValueError, match="do not line up"):
        correspondence(our_names(), as_arrays(ResNet18Like(shortcut_first=True).state_dict()))


def test_an_explicit_map_must_cover_every_name_once():
    ours = our_names()
    theirs = {n: np.zeros(s) for n, s in ours.items()}
    full = {n: n for n in ours}
    assert correspondence(ours, theirs, full)[1] == "mapping"
    with pytest.raises(ValueError, match="no state_dict name for \\['conv1.weight'\\]"):
        correspondence(ours, theirs, {n: t for n, t in full.items() if n != "conv1.weight"})
    with pytest.raises(ValueError, match="would load into several parameters"):
        correspondence(ours, theirs, {**full, "dense1.bias": "conv1.weight"})
    # `convdsl import` names each layer after its PyTorch module: layer1.0.conv1 is layer1_0_conv1.
    imported = {"layer1_0_conv1.weight": (4, 2, 3, 3), "layer1_0_bn1.weight": (4,), "fc.weight": (3, 4)}
    pytorch = {"layer1.0.conv1.weight": np.zeros((4, 2, 3, 3)), "layer1.0.bn1.weight": np.zeros(4),
               "fc.weight": np.zeros((3, 4))}
    assert correspondence(imported, pytorch) == ({"layer1_0_conv1.weight": "layer1.0.conv1.weight",
                                                  "layer1_0_bn1.weight": "layer1.0.bn1.weight",
                                                  "fc.weight": "fc.weight"}, "names")


@pytest.fixture(scope="module")
def net():
    return convdsl.load_source(RESNET).Model(seed=0)


@pytest.mark.slow
def test_resnet18_state_dict_loads_by_order_and_computes_what_pytorch_does(net, capsys):
    model = trained_looking(ResNet18Like())
    sd = model.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in sd)
    pairs = net.load_state_dict(sd)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(pairs) == len(net.params) + len(net.buffers)
    assert printed[0].split() == ["conv1.weight", "←", "conv1.weight"]
    assert pairs["batchnorm1.running_var"] == "bn1.running_var"
    assert pairs["down1.conv3.weight"] == "layer2.0.downsample.0.weight"
    x = torch.randn(2, 3, 32, 32)
    expected = model(x).detach().numpy()
    got = net.eval().forward(x.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    # Back under PyTorch's names: the same tensors.
    back = net.state_dict(mapping=pairs)
    other = ResNet18Like()
    missing, unexpected = other.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    np.testing.assert_allclose(other.eval()(x).detach().numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_explicit_mapping_and_equal_names(net):
    model = trained_looking(ResNet18Like())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    pairs = net.load_state_dict(sd, verbose=False)
    changed = dict(sd)
    changed["fc.bias"] = np.arange(10, dtype=np.float32)
    net.load_state_dict(changed, mapping=pairs)
    np.testing.assert_array_equal(net.params["dense1.bias"], np.arange(10))
    same = net.state_dict()
    same["dense1.bias"] = -same["dense1.bias"]
    net.load_state_dict(same)           # our own names: no map, nothing printed
    np.testing.assert_array_equal(net.params["dense1.bias"], -np.arange(10))


@pytest.mark.slow
def test_what_does_not_pair_off_is_refused_and_nothing_changes(net):
    before = net.state_dict()
    sd = trained_looking(ResNet18Like()).state_dict()
    dropped = {k: v for k, v in sd.items() if k != "fc.bias"}
    with pytest.raises(ValueError, match="dense1"):
        net.load_state_dict(dropped, verbose=False)
    # The same modules registered in another order: the shapes show the layers do not line up.
    reordered = trained_looking(ResNet18Like(shortcut_first=True)).state_dict()
    with pytest.raises(ValueError, match="do not line up|has .* but its counterpart"):
        net.load_state_dict(reordered, verbose=False)
    pairs = {n: n for n in before}
    pairs["conv1.weight"] = "missing.weight"
    with pytest.raises(ValueError, match="no \\['missing.weight'\\]"):
        net.load_state_dict(before, mapping=pairs)
    with pytest.raises(ValueError, match="`conv1.weight` is \\[8, 3, 7, 7\\]"):
        net.load_state_dict({**before, "conv1.weight": np.zeros((8, 3, 3, 3))}, mapping={n: n for n in before})
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
