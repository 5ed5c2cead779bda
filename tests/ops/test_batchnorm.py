"""batchnorm against torch.nn.functional.batch_norm: training mode (batch statistics, running
updates, the full batch-statistics gradient) and inference mode (running statistics), on
vectors and 1-D, 2-D, 3-D maps, NHWC, run-time sizes; buffers through save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from opcases import (Case, as_tuple, assert_c_compiles_cleanly, assert_error_at, compile_cases, finite_differences,
                     layer_stats, randomize,
                     source)
from reference import assert_close, to_nchw, to_nhwc

CASES = (
    Case("vector", (6,), "batchnorm()", dict(eps=1e-5, momentum=0.1)),
    Case("1d", (4, 9), "batchnorm()", dict(eps=1e-5, momentum=0.1)),
    Case("2d-momentum-eps", (3, 5, 7), "batchnorm(eps=1e-3, momentum=0.25)", dict(eps=1e-3, momentum=0.25)),
    Case("3d", (2, 3, 4, 5), "batchnorm(momentum=0)", dict(eps=1e-5, momentum=0.0)),
    Case("runtime-size", (3, 4, 6), "batchnorm(momentum=1)", dict(eps=1e-5, momentum=1.0),
         dims=(3, "H", "W"), shape2=(3, 2, 5)),
    Case("parallel", (32, 32, 32), "batchnorm()", dict(eps=1e-5, momentum=0.1)),   # batch 3: the OpenMP path
)
IDS = [c.id for c in CASES]


def shapes(variant: int):
    return [c.shape2 if variant and c.shape2 is not None else c.shape for c in CASES]


def run(net, xs, rng, layout="NCHW"):
    """Forward and backward; arrays channel-first."""
    to_file = to_nhwc if layout == "NHWC" else (lambda a: a)
    from_file = to_nchw if layout == "NHWC" else (lambda a: a)
    ys = [from_file(y) for y in as_tuple(net.forward(*[to_file(x) for x in xs]))]
    dys = [rng.standard_normal(y.shape).astype(y.dtype) for y in ys]
    dxs = [from_file(d) for d in as_tuple(net.backward(*[to_file(d) for d in dys]))]
    return ys, dys, dxs


def torch_case(net, index, x, dy, *, training, running):
    """The reference: F.batch_norm in float64 with the network's weights and the given running stats."""
    case = CASES[index]
    w = torch.tensor(net.params[f"L{index}.weight"], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(net.params[f"L{index}.bias"], dtype=torch.float64, requires_grad=True)
    rm = torch.tensor(running[0], dtype=torch.float64)
    rv = torch.tensor(running[1], dtype=torch.float64)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = F.batch_norm(xt, rm, rv, w, b, training=training, momentum=case.ref["momentum"], eps=case.ref["eps"])
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return y.detach().numpy(), xt.grad.numpy(), w.grad.numpy(), b.grad.numpy(), rm.numpy(), rv.numpy()


def check_against_torch(net, xs, ys, dys, dxs, grads, before, *, training):
    for i, case in enumerate(CASES):
        y, dx, dw, db, rm, rv = torch_case(net, i, xs[i], dys[i], training=training, running=before[i])
        assert_close(ys[i], y, what=f"{case.id}: forward")
        assert_close(dxs[i], dx, what=f"{case.id}: input gradient")
        assert_close(grads[f"L{i}.weight"], dw, what=f"{case.id}: gradient of weight")
        assert_close(grads[f"L{i}.bias"], db, what=f"{case.id}: gradient of bias")
        assert_close(net.buffers[f"L{i}.running_mean"], rm, what=f"{case.id}: running_mean")
        assert_close(net.buffers[f"L{i}.running_var"], rv, what=f"{case.id}: running_var")


def buffers_of(net):
    return [(net.buffers[f"L{i}.running_mean"].copy(), net.buffers[f"L{i}.running_var"].copy())
            for i in range(len(CASES))]


@pytest.mark.parametrize("layout", ("NCHW", "NHWC"))
@pytest.mark.parametrize("batch,variant", ((2, 0), (3, 1)))
def test_training_mode_matches_torch(layout, batch, variant, backend):
    module = compile_cases(CASES, layout=layout, backend=backend)
    net = module.Model(seed=0)
    rng = np.random.default_rng(7 + batch)
    randomize(net, rng)
    assert net.training
    for i in range(len(CASES)):      # start the running statistics away from 0 / 1
        net.buffers[f"L{i}.running_mean"][...] = rng.standard_normal(CASES[i].shape[0])
        net.buffers[f"L{i}.running_var"][...] = rng.uniform(0.5, 2.0, CASES[i].shape[0])
    before = buffers_of(net)
    xs = [(3.0 + 2.0 * rng.standard_normal((batch, *s))).astype(np.float32) for s in shapes(variant)]
    ys, dys, dxs = run(net, xs, rng, layout)
    grads = {k: v.copy() for k, v in net.grads.items()}
    check_against_torch(net, xs, ys, dys, dxs, grads, before, training=True)


@pytest.mark.parametrize("layout", ("NCHW", "NHWC"))
def test_inference_mode_uses_the_running_statistics(layout, backend):
    module = compile_cases(CASES, layout=layout, backend=backend)
    net = module.Model(seed=0)
    rng = np.random.default_rng(11)
    randomize(net, rng)
    for i in range(len(CASES)):
        net.buffers[f"L{i}.running_mean"][...] = rng.standard_normal(CASES[i].shape[0])
        net.buffers[f"L{i}.running_var"][...] = rng.uniform(0.5, 2.0, CASES[i].shape[0])
    before = buffers_of(net)
    net.eval()
    xs = [rng.standard_normal((1, *s)).astype(np.float32) for s in shapes(0)]   # batch 1 is fine here
    ys, dys, dxs = run(net, xs, rng, layout)
    grads = {k: v.copy() for k, v in net.grads.items()}
    check_against_torch(net, xs, ys, dys, dxs, grads, before, training=False)
    for (m0, v0), (m1, v1) in zip(before, buffers_of(net)):
        assert np.array_equal(m0, m1) and np.array_equal(v0, v1)


def test_finite_differences_float64_both_modes(backend):
    module = compile_cases(CASES, dtype="f64", backend=backend)
    rng = np.random.default_rng(13)
    for training in (True, False):
        net = module.Model(seed=0)
        randomize(net, rng)
        for i in range(len(CASES)):
            net.buffers[f"L{i}.running_var"][...] = rng.uniform(0.5, 2.0, CASES[i].shape[0])
        if not training:
            net.eval()
        finite_differences(module, CASES, rng, batch=3, net=net,
                           label=f" ({'training' if training else 'eval'})")


NET = """network N {
    input x: [3, 4, 4]
    y = x -> conv(4, kernel=3, pad=same) -> batchnorm -> relu -> flatten -> dense(5)
    output y
    loss softmax_cross_entropy(y)
}
"""


def torch_net(net):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(64, 5)).double()
    with torch.no_grad():
        for (name, p), t in zip(net.params.items(), model.parameters()):
            t.copy_(torch.tensor(p))
    return model


def test_running_statistics_follow_torch_over_training_steps_and_only_training_forwards(backend):
    net = convdsl.load_source(NET, backend=backend).Model(seed=3)
    model = torch_net(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
        labels = rng.integers(0, 5, size=4)
        loss = net.train_step(x, labels, lr=0.1)
        opt.zero_grad()
        ref = F.cross_entropy(model(torch.tensor(x, dtype=torch.float64)), torch.tensor(labels))
        ref.backward()
        opt.step()
        assert abs(loss - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))
    bn = model[1]
    assert_close(net.buffers["batchnorm1.running_mean"], bn.running_mean.numpy(), what="running_mean")
    assert_close(net.buffers["batchnorm1.running_var"], bn.running_var.numpy(), what="running_var")
    # A backward never moves them; an eval-mode forward never moves them.
    snapshot = {k: v.copy() for k, v in net.buffers.items()}
    net.eval()
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    y = net.forward(x)
    net.backward(np.ones_like(y))
    assert all(np.array_equal(snapshot[k], v) for k, v in net.buffers.items())
    model.eval()
    assert_close(y, model(torch.tensor(x, dtype=torch.float64)).detach().numpy(), what="eval forward")


def test_backward_follows_the_mode_of_its_forward(backend):
    module = convdsl.load_source(NET, backend=backend)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    dy = rng.standard_normal((3, 5)).astype(np.float32)
    a, b = module.Model(seed=1), module.Model(seed=1)
    a.forward(x)
    dx_a = a.backward(dy)
    b.forward(x)
    b.eval()                         # switched after the forward: the backward is still training-mode
    dx_b = b.backward(dy)
    assert np.array_equal(dx_a, dx_b)
    assert all(np.array_equal(a.grads[k], b.grads[k]) for k in a.grads)


def test_a_shared_layer_updates_its_statistics_at_every_use(backend):
    src = """network S {
        dtype f64
        input x: [2, 3, 3]
        layer BN = batchnorm(momentum=0.3)
        y = x -> BN -> relu -> BN
        output y
    }"""
    net = convdsl.load_source(src, backend=backend).Model(seed=0)
    assert list(net.buffers) == ["BN.running_mean", "BN.running_var"]
    rng = np.random.default_rng(2)
    net.params["BN.weight"][...] = rng.standard_normal(2)
    net.params["BN.bias"][...] = rng.standard_normal(2)
    x = rng.standard_normal((4, 2, 3, 3))
    y = net.forward(x)
    bn = torch.nn.BatchNorm2d(2, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(net.params["BN.weight"]))
        bn.bias.copy_(torch.tensor(net.params["BN.bias"]))
    ref = bn(torch.relu(bn(torch.tensor(x))))
    assert_close(y, ref.detach().numpy(), what="forward")
    assert_close(net.buffers["BN.running_mean"], bn.running_mean.numpy(), what="running_mean")
    assert_close(net.buffers["BN.running_var"], bn.running_var.numpy(), what="running_var")


def test_buffers_start_at_zeros_and_ones_and_travel_with_save_and_load(tmp_path, backend):
    module = convdsl.load_source(NET, backend=backend)
    net = module.Model(seed=0)
    assert list(net.buffers) == ["batchnorm1.running_mean", "batchnorm1.running_var"]
    assert net.buffers["batchnorm1.running_mean"].tolist() == [0.0] * 4
    assert net.buffers["batchnorm1.running_var"].tolist() == [1.0] * 4
    assert net.params["batchnorm1.weight"].tolist() == [1.0] * 4
    assert net.params["batchnorm1.bias"].tolist() == [0.0] * 4
    with pytest.raises(TypeError):
        net.buffers["x"] = np.zeros(4)                  # the mapping itself is read-only
    net.forward(np.random.default_rng(0).standard_normal((3, 3, 4, 4)))
    net.save(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as data:
        assert set(data.files) == set(net.params) | set(net.buffers)
        assert np.array_equal(data["batchnorm1.running_var"], net.buffers["batchnorm1.running_var"])
    other = module.Model(seed=5)
    other.load(tmp_path / "w.npz")
    for name in (*net.params, *net.buffers):
        state = other.params if name in other.params else other.buffers
        mine = net.params if name in net.params else net.buffers
        assert np.array_equal(state[name], mine[name]), name
    # A file without the buffers (or with a wrong shape) is refused, and nothing is changed.
    with np.load(tmp_path / "w.npz") as data:
        partial = {k: data[k] for k in data.files if k != "batchnorm1.running_mean"}
        bad = {k: (data[k][:2] if k == "batchnorm1.running_var" else data[k]) for k in data.files}
    np.savez(tmp_path / "partial.npz", **partial)
    np.savez(tmp_path / "bad.npz", **bad)
    fresh = module.Model(seed=5)
    with pytest.raises(ValueError, match="missing.*batchnorm1.running_mean"):
        fresh.load(tmp_path / "partial.npz")
    with pytest.raises(ValueError, match="batchnorm1.running_var"):
        fresh.load(tmp_path / "bad.npz")
    assert fresh.buffers["batchnorm1.running_var"].tolist() == [1.0] * 4


def test_one_value_per_channel_is_refused_in_training_mode_only(backend):
    net = convdsl.load_source("network V {\n input x: [4]\n y = x -> batchnorm\n output y\n}\n",
                              backend=backend).Model()
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(RuntimeError, match=r"batchnorm batchnorm1 \(line 3\) needs more than one value per channel"):
        net.forward(x)
    net.eval()
    assert net.forward(x).shape == (1, 4)


def test_check_row():
    row = layer_stats("input x: [3, 5, 7]\n y = x -> batchnorm(eps=0.001)\n output y")["batchnorm1"]
    assert row.shape == "[3, 5, 7]" and row.params == 6 and row.macs == 105 and row.receptive_field == "1×1"
    assert row.describe == "batchnorm(eps=0.001)"
    assert layer_stats("input x: [3, 5]\n y = x -> batchnorm\n output y")["batchnorm1"].describe == "batchnorm"


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, 4]\n y = x -> batchnorm(eps=0)\n output y", "0)", ("greater than 0",)),
    ("input x: [3, 4]\n y = x -> batchnorm(momentum=1.5)\n output y", "1.5", ("[0.0, 1.0]",)),
    ("input x: [3, 4]\n y = x -> batchnorm(momentum=true)\n output y", "true", ("must be a number",)),
    ("input x: [3, 4]\n y = x -> batchnorm(affine=false)\n output y", "false", ("no argument `affine`",)),
], ids=["eps-zero", "momentum-range", "momentum-bool", "unknown-arg"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings_in_f64(tmp_path):
    # f32 (NCHW, at -O3) is tests/e2e/test_compiler_warnings.py's, for every op file's CASES.
    assert_c_compiles_cleanly(source(CASES, "f64"), tmp_path)
