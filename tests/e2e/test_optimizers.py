"""The optimizers of the generated train_step / update (issue 13): SGD with momentum, Nesterov and
weight decay, Adam and AdamW, and clipping by global norm, each equal to torch.optim (and
torch.nn.utils.clip_grad_norm_) over 20 steps of examples/digits_lenet.cnn; their state saved
and loaded with the weights (Python and C), so that training resumes on the same trajectory;
frozen parameters never updated; loss_grad; the arguments refused as torch refuses them.

Two modules serve every test: the example in f32, and in f64 with its first conv frozen; the
tests that take `f32_each` also run on the example built for OpenCL (the `backend` fixture),
whose update runs on the host mirrors of the parameters and must reach the device."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl

REPO = Path(__file__).resolve().parents[2]
SOURCE = (REPO / "examples" / "digits_lenet.cnn").read_text()
BATCH, STEPS = 8, 20


# The f32 modules run every conv as im2col, whose sums round as PyTorch's do within a few
# ulps. Adam and AdamW divide each gradient element by its running scale, so an element whose
# gradient is near zero turns a rounding-level difference into a whole step, of either sign:
# with Winograd (the plan's choice for conv2 from 8 samples on, inside the f32 tolerance on every
# gradient, tests/ops/test_conv.py) 3.6% of conv2's weights were 1e-3 off PyTorch's after 20 Adam
# steps, where SGD's stayed within 1e-4. The optimizers are what these tests check.
F32_ALGO = {"conv": "im2col"}


@pytest.fixture(scope="module")
def f32():
    return convdsl.load(REPO / "examples" / "digits_lenet.cnn", algo=F32_ALGO)


@pytest.fixture(scope="module")
def f32_each(backend):
    """The f32 example on each backend (tests/conftest.py)."""
    return convdsl.load(REPO / "examples" / "digits_lenet.cnn", backend=backend, algo=F32_ALGO)


@pytest.fixture(scope="module")
def f64_frozen():
    source = SOURCE.replace("network DigitsLeNet {", "network DigitsLeNet {\n    dtype f64")
    source = source.replace("conv(16, kernel=3, pad=same)", "conv(16, kernel=3, pad=same, frozen=true)")
    assert "frozen=true" in source and "dtype f64" in source
    return convdsl.load_source(source)


def batches(dtype, steps: int = STEPS, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, 1, 8, 8)).astype(dtype), rng.integers(0, 10, BATCH)) for _ in range(steps)]


def torch_logits(p: dict, x):
    """digits_lenet.cnn from torch.nn.functional primitives."""
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)), 2)
    h = F.relu(F.linear(h.flatten(1), p["dense1.weight"], p["dense1.bias"]))
    return F.linear(h, p["dense2.weight"], p["dense2.bias"])


def torch_optimizer(params, lr, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=None,
                    betas=(0.9, 0.999), eps=1e-8):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay or 0.0)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay or 0.0)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps,
                             **({} if weight_decay is None else {"weight_decay": weight_decay}))


def train_both(module, data, lr, max_grad_norm=None, **options):
    """The same steps in convdsl and in PyTorch, from the same parameters; both final states."""
    net = module.Model(seed=3)
    frozen = set(net.params) - set(net.grads)
    p = {name: torch.tensor(arr.copy(), requires_grad=name not in frozen) for name, arr in net.params.items()}
    opt = torch_optimizer([t for name, t in p.items() if name not in frozen], lr, **options)
    losses = []
    for x, labels in data:
        loss = net.train_step(x, labels, lr=lr, max_grad_norm=max_grad_norm, **options)
        opt.zero_grad()
        want = F.cross_entropy(torch_logits(p, torch.from_numpy(x)), torch.from_numpy(labels))
        want.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([t for name, t in p.items() if name not in frozen], max_grad_norm)
        opt.step()
        losses.append((loss, float(want.detach())))
    return net, {name: t.detach().numpy() for name, t in p.items()}, losses


def assert_same_params(net, want: dict, rtol: float, atol: float) -> None:
    for name, got in net.params.items():
        scale = max(1.0, float(np.abs(want[name]).max()))
        np.testing.assert_allclose(got / scale, want[name] / scale, rtol=rtol, atol=atol, err_msg=name)


CASES = {
    "sgd+momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd+weight_decay": dict(lr=0.1, weight_decay=1e-2),
    "adam": dict(lr=1e-3, optimizer="adam"),
    "adam+weight_decay": dict(lr=1e-3, optimizer="adam", weight_decay=1e-2, betas=(0.8, 0.99)),
    "adamw": dict(lr=1e-3, optimizer="adamw"),
    "adamw+clipping": dict(lr=2e-3, optimizer="adamw", weight_decay=0.1, max_grad_norm=0.5),
    "momentum+clipping": dict(lr=0.05, momentum=0.5, max_grad_norm=0.3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_optimizer_equals_pytorch_for_20_steps_f32(f32, case):
    net, want, losses = train_both(f32, batches(np.float32), **CASES[case])
    for got_loss, want_loss in losses:
        assert got_loss == pytest.approx(want_loss, rel=1e-4, abs=1e-5)
    assert_same_params(net, want, rtol=1e-4, atol=1e-5)
    # It trained: the parameters moved well beyond the tolerance.
    start = f32.Model(seed=3).params
    assert max(float(np.abs(net.params[n] - start[n]).max()) for n in start) > 1e-3


@pytest.mark.parametrize("case", ["momentum+clipping", "nesterov", "adamw+clipping"])
def test_optimizers_equal_pytorch_for_20_steps_on_each_backend(f32_each, case):
    """Each step's parameters reach the device before the next forward: else the losses part."""
    net, want, losses = train_both(f32_each, batches(np.float32), **CASES[case])
    for got_loss, want_loss in losses:
        assert got_loss == pytest.approx(want_loss, rel=1e-4, abs=1e-5)
    assert_same_params(net, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["nesterov", "adam+weight_decay", "adamw+clipping"])
def test_each_optimizer_equals_pytorch_in_f64_and_never_moves_a_frozen_parameter(f64_frozen, case):
    net, want, _ = train_both(f64_frozen, batches(np.float64), **CASES[case])
    assert_same_params(net, want, rtol=1e-9, atol=1e-11)
    seed = f64_frozen.Model(seed=3).params
    for name in ("conv1.weight", "conv1.bias"):
        assert name not in net.grads
        np.testing.assert_array_equal(net.params[name], seed[name])
        assert not any(key.startswith(f"optim.{name}.") for key in net.optimizer_state)


def test_clipping_scales_the_gradients_to_the_global_norm(f32_each):
    """clip_grad_norm_ semantics: the factor max_norm / (norm + 1e-6), applied only when it is
    below 1, and `grads` keep the clipped values."""
    [(x, labels)] = batches(np.float32, 1)
    net = f32_each.Model(seed=3)
    net.compute_grads(x, labels)
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in net.grads.values()))
    before = {n: g.copy() for n, g in net.grads.items()}
    net.update(0.0, max_grad_norm=norm / 4)
    for name, g in net.grads.items():
        np.testing.assert_allclose(g, before[name] * (norm / 4) / (norm + 1e-6), rtol=1e-6, atol=1e-9)
    net.compute_grads(x, labels)
    net.update(0.0, max_grad_norm=norm * 2)           # under the norm: left as they are
    for name, g in net.grads.items():
        np.testing.assert_array_equal(g, before[name])


def test_compute_grads_then_update_is_train_step(f32_each):
    data = batches(np.float32, 3)
    one, two = f32_each.Model(seed=5), f32_each.Model(seed=5)
    for x, labels in data:
        loss = one.train_step(x, labels, lr=1e-3, optimizer="adam", max_grad_norm=1.0)
        assert two.compute_grads(x, labels) == loss
        before = {n: p.copy() for n, p in two.params.items()}
        assert all(np.array_equal(before[n], p) for n, p in two.params.items())
        two.update(1e-3, optimizer="adam", max_grad_norm=1.0)
    for name in one.params:
        np.testing.assert_array_equal(one.params[name], two.params[name])
    for name, value in one.optimizer_state.items():
        np.testing.assert_array_equal(value, two.optimizer_state[name])


def test_compute_grads_leaves_the_parameters_and_gives_torchs_gradients(f32_each):
    [(x, labels)] = batches(np.float32, 1)
    net = f32_each.Model(seed=3)
    before = {n: p.copy() for n, p in net.params.items()}
    loss = net.compute_grads(x, labels)
    p = {name: torch.tensor(arr.copy(), requires_grad=True) for name, arr in net.params.items()}
    want = F.cross_entropy(torch_logits(p, torch.from_numpy(x)), torch.from_numpy(labels))
    want.backward()
    assert loss == pytest.approx(float(want.detach()), rel=1e-5)
    for name, g in net.grads.items():
        np.testing.assert_array_equal(net.params[name], before[name])
        scale = max(1.0, float(p[name].grad.abs().max()))
        np.testing.assert_allclose(g / scale, p[name].grad.numpy() / scale, rtol=1e-4, atol=1e-5, err_msg=name)


def test_loss_grad_is_the_gradient_of_the_loss_at_the_output(f32_each):
    [(x, labels)] = batches(np.float32, 1)
    net = f32_each.Model(seed=3)
    with pytest.raises(RuntimeError, match="loss_grad needs a loss"):
        net.loss_grad()
    logits = net.forward(x)
    net.loss(labels)
    y = torch.tensor(logits, requires_grad=True)
    F.cross_entropy(y, torch.from_numpy(labels)).backward()
    np.testing.assert_allclose(net.loss_grad(), y.grad.numpy(), rtol=1e-5, atol=1e-7)
    # After compute_grads too, and backward from it gives compute_grads' parameter gradients.
    net.compute_grads(x, labels)
    grads = {n: g.copy() for n, g in net.grads.items()}
    dy = net.loss_grad()
    np.testing.assert_allclose(dy, y.grad.numpy(), rtol=1e-5, atol=1e-7)
    net.backward(dy)
    for name, g in net.grads.items():
        np.testing.assert_array_equal(g, grads[name])
    net.forward(x)                                    # a new forward: the old loss no longer applies
    with pytest.raises(RuntimeError, match="loss_grad needs a loss"):
        net.loss_grad()


def test_plain_sgd_keeps_no_state_and_each_optimizer_only_its_own(f32_each):
    net = f32_each.Model(seed=0)
    [(x, labels)] = batches(np.float32, 1)
    net.train_step(x, labels, lr=0.01)
    assert net.optimizer_state == {}
    net.train_step(x, labels, lr=0.01, momentum=0.9)
    names = set(net.optimizer_state)
    assert names == {f"optim.{n}.momentum_buffer" for n in net.grads}
    assert not names & set(net.buffers)                  # layer state and optimizer state stay apart
    net.train_step(x, labels, lr=0.01, optimizer="adam")
    state = net.optimizer_state
    assert {f"optim.{n}.exp_avg" for n in net.grads} <= set(state) and float(state["optim.step"]) == 1
    net.reset_optimizer()
    assert net.optimizer_state == {}


@pytest.mark.parametrize("options", [dict(optimizer="adam", max_grad_norm=0.5),
                                     dict(momentum=0.9, nesterov=True, weight_decay=1e-3)])
def test_save_and_load_mid_training_resume_the_same_trajectory(f32_each, tmp_path, options):
    data = batches(np.float32, 12)
    lr = 1e-3 if options.get("optimizer") == "adam" else 0.05
    straight = f32_each.Model(seed=1)
    for x, labels in data:
        straight.train_step(x, labels, lr=lr, **options)
    first = f32_each.Model(seed=1)
    for x, labels in data[:6]:
        first.train_step(x, labels, lr=lr, **options)
    path = tmp_path / "mid.npz"
    first.save(path)
    with np.load(path) as saved:
        assert set(saved.files) == set(first.params) | set(first.optimizer_state)
    for loader in ("python", "c"):
        resumed = f32_each.Model(seed=9)
        if loader == "python":
            resumed.load(path)
        else:
            assert getattr(resumed._lib, f"{resumed._meta['prefix']}_load_weights")(resumed._m, str(path).encode()) == 0
        for name, value in first.optimizer_state.items():
            np.testing.assert_array_equal(resumed.optimizer_state[name], value, err_msg=name)
        for x, labels in data[6:]:
            resumed.train_step(x, labels, lr=lr, **options)
        for name in straight.params:
            np.testing.assert_array_equal(resumed.params[name], straight.params[name], err_msg=(loader, name))


def test_a_file_without_optimizer_state_starts_a_fresh_optimizer(f32_each, tmp_path):
    [(x, labels)] = batches(np.float32, 1)
    fresh = f32_each.Model(seed=1)
    fresh.save(tmp_path / "weights.npz")
    used = f32_each.Model(seed=1)
    for _ in range(3):
        used.train_step(x, labels, lr=1e-3, optimizer="adam")
    for loader in ("python", "c"):
        target = f32_each.Model(seed=1)
        target.train_step(x, labels, lr=1e-3, optimizer="adam", momentum=0.0)
        if loader == "python":
            target.load(tmp_path / "weights.npz")
        else:
            assert getattr(target._lib, f"{target._meta['prefix']}_load_weights")(
                target._m, str(tmp_path / "weights.npz").encode()) == 0
        assert target.optimizer_state == {}
        target.train_step(x, labels, lr=1e-3, optimizer="adam")
        fresh_step = f32_each.Model(seed=1)
        fresh_step.train_step(x, labels, lr=1e-3, optimizer="adam")
        for name in target.params:
            np.testing.assert_array_equal(target.params[name], fresh_step.params[name])


def test_part_of_an_optimizers_state_is_refused(f32_each, tmp_path):
    [(x, labels)] = batches(np.float32, 1)
    net = f32_each.Model(seed=1)
    net.train_step(x, labels, lr=1e-3, optimizer="adam")
    state = {**net.state_dict(), **net.optimizer_state}
    del state["optim.dense2.bias.exp_avg_sq"]
    np.savez(tmp_path / "part.npz", **state)
    with pytest.raises(ValueError, match=r"missing \['optim.dense2.bias.exp_avg_sq'\]"):
        net.load(tmp_path / "part.npz")
    rc = getattr(net._lib, f"{net._meta['prefix']}_load_weights")(net._m, str(tmp_path / "part.npz").encode())
    error = net._ffi.string(getattr(net._lib, f"{net._meta['prefix']}_last_error")(net._m)).decode()
    assert rc == -1 and "optim.dense2.bias.exp_avg_sq` is missing" in error
    state = {**net.state_dict(), **net.optimizer_state, "optim.step": np.array(1.5)}
    np.savez(tmp_path / "step.npz", **state)
    with pytest.raises(ValueError, match="not a count of steps"):
        net.load(tmp_path / "step.npz")


@pytest.mark.parametrize("options, message", [
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
    (dict(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum"),
    (dict(lr=0.1, weight_decay=-1e-4), "Invalid weight_decay value"),
    (dict(lr=0.1, optimizer="adam", betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(lr=0.1, optimizer="adamw", betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    (dict(lr=0.1, optimizer="adam", eps=-1e-8), "Invalid epsilon value"),
    (dict(lr=0.1, optimizer="adam", momentum=0.9), "momentum and nesterov are SGD's"),
    (dict(lr=0.1, optimizer="rmsprop"), "optimizer must be one of 'sgd', 'adam', 'adamw'"),
    (dict(lr=0.1, max_grad_norm=0.0), "Invalid max_grad_norm"),
    (dict(lr=0.1, max_grad_norm=float("inf")), "Invalid max_grad_norm"),
    (dict(lr=0.1, betas=0.9), "betas must be a pair"),
])
def test_arguments_torch_refuses_are_refused_and_change_nothing(f32_each, options, message):
    options = dict(options)            # the parameter's own dict serves the run on each backend
    [(x, labels)] = batches(np.float32, 1)
    net = f32_each.Model(seed=0)
    before = {n: p.copy() for n, p in net.params.items()}
    with pytest.raises(ValueError, match=message):
        net.train_step(x, labels, **options)
    lr = options.pop("lr")
    with pytest.raises(ValueError, match=message):
        net.update(lr, **options)
    for name, p in net.params.items():
        np.testing.assert_array_equal(p, before[name])
    assert net.optimizer_state == {}


def test_the_c_update_refuses_what_python_would(f32_each):
    """The C API checks its optimizer struct too (a C caller has no Python in front of it)."""
    net = f32_each.Model(seed=0)
    lib, ffi, p = net._lib, net._ffi, net._meta["prefix"]
    opt = ffi.new(f"{p}_optimizer *", getattr(lib, f"{p}_optimizer_defaults")(getattr(lib, f"{p}_adamw"), 1e-3))
    assert opt.weight_decay == pytest.approx(1e-2) and opt.beta2 == pytest.approx(0.999) and opt.eps == 1e-8
    before = {n: a.copy() for n, a in net.params.items()}
    for field, value, words in (("lr", -1.0, "learning rate"), ("beta1", 1.0, "beta1"), ("kind", 7, "kind")):
        bad = ffi.new(f"{p}_optimizer *", opt[0])
        setattr(bad, field, value)
        assert getattr(lib, f"{p}_update")(net._m, bad) == -1
        assert words in ffi.string(getattr(lib, f"{p}_last_error")(net._m)).decode()
    for name, a in net.params.items():
        np.testing.assert_array_equal(a, before[name])


def test_update_follows_a_backward_on_a_network_without_a_loss():
    """A custom loop: forward, backward from its own output gradients, update (a network
    without a loss has no compute_grads or train_step, but its optimizer is there)."""
    module = convdsl.load_source("network NoLoss {\n    input x: [3]\n    y = x -> dense(2)\n    output y\n}\n")
    net = module.Model(seed=0)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    net.forward(x)
    net.backward(np.ones((4, 2), np.float32))
    before = {n: p.copy() for n, p in net.params.items()}
    grads = {n: g.copy() for n, g in net.grads.items()}
    net.update(0.1, momentum=0.9)                        # the first momentum step is plain SGD
    for name, p in net.params.items():
        np.testing.assert_allclose(p, before[name] - np.float32(0.1) * grads[name], rtol=1e-6, atol=1e-7)
    assert set(net.optimizer_state) == {"optim.dense1.weight.momentum_buffer", "optim.dense1.bias.momentum_buffer"}
    with pytest.raises(RuntimeError, match="declares no loss"):
        net.compute_grads(x, np.zeros((4, 2), np.float32))
