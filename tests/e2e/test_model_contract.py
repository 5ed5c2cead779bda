"""The generated Model's contract (§7): memory shared with numpy, every array checked,
nothing a caller passes can crash the process or be misread — on the C backend and on OpenCL
(the `backend` fixture of tests/conftest.py: every test here runs on both)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convdsl
from reference import assert_close

NET = """
network M {
    input x: [2, 6, 6]
    input z: [3]
    h = x -> conv(3, kernel=3, pad=same) -> relu
    v = h -> globalavgpool -> dense(3)
    w = add(v, z)
    output h, w
}
"""
SHARED = """
network R {
    input x: [2, H, W]
    layer U = conv(2, kernel=3, pad=same)
    repeat 3 {
        x = x -> U -> tanh
    }
    output x
}
"""


@pytest.fixture(scope="module")
def module(backend):
    return convdsl.load_source(NET, backend=backend)


@pytest.fixture
def net(module):
    return module.Model(seed=0)


def inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 2, 6, 6)).astype(np.float32),
            rng.standard_normal((batch, 3)).astype(np.float32))


def test_params_share_memory_with_the_model(net):
    x, z = inputs()
    h0, _ = net.forward(x, z)
    net.params["conv1.weight"][...] = 0
    net.params["conv1.bias"][...] = 1
    h1, _ = net.forward(x, z)
    np.testing.assert_array_equal(h1, np.ones_like(h0))
    with pytest.raises(TypeError):
        net.params["conv1.weight"] = np.zeros((3, 2, 3, 3))          # the mapping itself is read-only
    assert list(net.params) == ["conv1.weight", "conv1.bias", "dense1.weight", "dense1.bias"]


def test_grads_are_overwritten_by_each_backward(net):
    x, z = inputs()
    h, w = net.forward(x, z)
    net.backward(np.ones_like(h), np.ones_like(w))
    first = net.grads["conv1.weight"].copy()
    net.backward(np.ones_like(h), np.ones_like(w))
    np.testing.assert_array_equal(net.grads["conv1.weight"], first)


def test_several_inputs_and_outputs(net):
    x, z = inputs()
    out = net.forward(x, z)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 3, 6, 6), (2, 3)]
    grads = net.backward(*[np.ones_like(o) for o in out])
    assert isinstance(grads, tuple) and grads[0].shape == x.shape and grads[1].shape == z.shape
    np.testing.assert_array_equal(grads[1], np.ones_like(z))       # d(add)/dz = 1


def test_wrong_shapes_say_what_was_expected(net):
    x, z = inputs()
    with pytest.raises(ValueError, match=r"expected an array shaped \[N, 2, 6, 6\]"):
        net.forward(x[0], z)
    with pytest.raises(ValueError, match="axis 2 must be 6"):
        net.forward(np.zeros((2, 2, 5, 6), dtype=np.float32), z)
    with pytest.raises(ValueError, match="batch size"):
        net.forward(x, z[:1])
    with pytest.raises(TypeError, match="takes 2 input"):
        net.forward(x)
    with pytest.raises(ValueError, match="empty"):
        net.forward(x[:0], z[:0])


def test_other_dtypes_are_converted_or_refused(net):
    x, z = inputs()
    ref = net.forward(x, z)
    for a, b in zip(net.forward(x.astype(np.float64), z.astype(np.float64)), ref):
        np.testing.assert_array_equal(a, b)
    ints = net.forward(np.ones_like(x, dtype=np.int32), np.ones_like(z, dtype=np.int64))
    for a, b in zip(ints, net.forward(np.ones_like(x), np.ones_like(z))):
        np.testing.assert_array_equal(a, b)
    for bad in (x.astype(np.complex64), x.astype(object), np.full(x.shape, "a")):
        with pytest.raises(TypeError):
            net.forward(bad, z)
    with pytest.raises(TypeError):
        net.forward([[1, 2], [3]], z)


def test_non_contiguous_inputs_are_not_misread(net):
    x, z = inputs(batch=4)
    strided = np.asfortranarray(x)
    view = np.concatenate([x, x], axis=3)[:, :, :, ::2]           # every other column: a non-contiguous view
    for a, b in zip(net.forward(strided, z), net.forward(x, z)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(net.forward(view, z), net.forward(np.ascontiguousarray(view), z)):
        np.testing.assert_array_equal(a, b)
    reversed_batch = x[::-1]
    for a, b in zip(net.forward(reversed_batch, z), net.forward(reversed_batch.copy(), z)):
        np.testing.assert_array_equal(a, b)


def test_an_eval_backward_recomputes_the_forward_it_follows(module, net):
    """The calls after the first at a batch reuse what it worked out (shapes, pointer arrays,
    the buffers an eval forward copies its inputs into): that must follow a batch change, and
    the inputs a backward recomputes from are the forward's, not the caller's arrays later."""
    x, z = inputs(seed=1)
    dh, dw = np.ones((2, 3, 6, 6), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    ref = module.Model(seed=0)                     # no dropout or batchnorm: training = eval
    ref_out = ref.forward(x, z)
    ref_dx = ref.backward(dh, dw)
    ref_grads = {k: g.copy() for k, g in ref.grads.items()}
    # Another dtype and a strided view of the same shapes after a call that took the fast path.
    for a, b in zip(ref.backward(dh.astype(np.float64), np.asfortranarray(dw)), ref_dx):
        np.testing.assert_array_equal(a, b)
    net.eval()
    other_x, other_z = inputs(batch=3, seed=2)
    mine_x, mine_z = x.copy(), z.copy()
    net.forward(mine_x, mine_z)
    net.forward(other_x, other_z)                  # another batch in between
    out = net.forward(mine_x, mine_z)
    mine_x[...], mine_z[...] = other_x[:2], other_z[:2]   # the caller reuses its arrays
    dx = net.backward(dh, dw)
    for a, b in zip(out + dx, ref_out + ref_dx):
        np.testing.assert_array_equal(a, b)
    for k, g in net.grads.items():
        np.testing.assert_array_equal(g, ref_grads[k], err_msg=k)


def test_backward_is_checked(module):
    net = module.Model()
    with pytest.raises(RuntimeError, match="forward first"):
        net.backward(np.zeros((2, 3, 6, 6)), np.zeros((2, 3)))
    x, z = inputs()
    h, w = net.forward(x, z)
    with pytest.raises(ValueError, match="expected shape"):
        net.backward(np.zeros((2, 3, 6, 5)), w)
    with pytest.raises(TypeError, match="one gradient per output"):
        net.backward(h)


def test_save_and_load_round_trip(tmp_path, module):
    a, b = module.Model(seed=1), module.Model(seed=2)
    a.save(tmp_path / "w.npz")
    b.load(tmp_path / "w.npz")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    with np.load(tmp_path / "w.npz", allow_pickle=False) as data:
        assert sorted(data.files) == sorted(a.params)


def test_load_refuses_mismatches_without_writing_anything(tmp_path, module):
    net = module.Model(seed=3)
    before = {k: v.copy() for k, v in net.params.items()}
    good = {k: np.zeros_like(v) for k, v in net.params.items()}
    for name, broken in [("missing", {k: v for k, v in good.items() if k != "dense1.bias"}),
                         ("extra", {**good, "other.weight": np.zeros(2)}),
                         ("shape", {**good, "dense1.weight": np.zeros((2, 2))})]:
        path = tmp_path / f"{name}.npz"
        np.savez(path, **broken)
        with pytest.raises(ValueError):
            net.load(path)
        for k in before:
            np.testing.assert_array_equal(net.params[k], before[k])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**good, "dense1.bias": np.array([object()] * 3, dtype=object)})
    with pytest.raises(ValueError):
        net.load(pickled)


def test_train_and_eval_modes(net):
    assert net.training
    assert net.eval() is net and not net.training
    assert net.train() is net and net.training


def test_seeds(module):
    a, b, c = module.Model(seed=7), module.Model(seed=7), module.Model(seed=8)
    np.testing.assert_array_equal(a.params["conv1.weight"], b.params["conv1.weight"])
    assert not np.array_equal(a.params["conv1.weight"], c.params["conv1.weight"])
    with pytest.raises(ValueError):
        module.Model(seed=-1)


def test_shared_layer_over_repeat_and_run_time_sizes_match_torch(backend):
    net = convdsl.load_source(SHARED, backend=backend).Model(seed=0)
    rng = np.random.default_rng(9)
    for p in net.params.values():
        p[...] = rng.standard_normal(p.shape) * 0.5
    w = torch.tensor(net.params["U.weight"], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(net.params["U.bias"], dtype=torch.float64, requires_grad=True)
    for shape in [(2, 2, 5, 7), (1, 2, 9, 4)]:                    # one model, two sizes
        x = rng.standard_normal(shape).astype(np.float32)
        y = net.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = net.backward(dy)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        h = xt
        for _ in range(3):
            h = torch.tanh(F.conv2d(h, w, b, padding=1))
        w.grad = b.grad = None
        h.backward(torch.tensor(dy, dtype=torch.float64))
        assert_close(y, h.detach().numpy(), what=f"forward {shape}")
        assert_close(dx, xt.grad.numpy(), what=f"input gradient {shape}")
        assert_close(net.grads["U.weight"], w.grad.numpy(), what="shared weight gradient: summed over uses")
        assert_close(net.grads["U.bias"], b.grad.numpy(), what="shared bias gradient")


def test_run_time_sizes_too_small_are_errors_not_crashes(backend):
    module = convdsl.load_source("network V {\n input x: [1, H, W]\n y = x -> conv(2, kernel=5) -> maxpool(2)\n"
                                 " output y\n}\n", backend=backend)
    net = module.Model()
    with pytest.raises(ValueError, match="too small"):
        net.forward(np.zeros((1, 1, 4, 9), dtype=np.float32))
    assert net.forward(np.zeros((1, 1, 6, 9), dtype=np.float32)).shape == (1, 2, 1, 2)


def test_load_refuses_values_that_do_not_fit_the_models_dtype(tmp_path, module):
    net = module.Model(seed=3)
    before = {k: v.copy() for k, v in net.params.items()}
    state = {k: v.astype(np.float64) for k, v in net.params.items()}
    state["dense1.weight"][1, 2] = 1e300                          # finite in f64, inf in f32
    np.savez(tmp_path / "big.npz", **state)
    with pytest.raises(ValueError, match=r"`dense1.weight` holds 1e\+300, which does not fit in float32"):
        net.load(tmp_path / "big.npz")
    for k in before:
        np.testing.assert_array_equal(net.params[k], before[k])
    # Values that were not finite to begin with (a diverged run) load as they are.
    state["dense1.weight"][1, 2] = np.inf
    state["dense1.bias"][0] = np.nan
    np.savez(tmp_path / "diverged.npz", **state)
    net.load(tmp_path / "diverged.npz")
    assert np.isinf(net.params["dense1.weight"][1, 2]) and np.isnan(net.params["dense1.bias"][0])


def test_load_of_something_other_than_an_npz_says_what_it_takes(tmp_path, module):
    net = module.Model(seed=3)
    np.save(tmp_path / "one.npy", net.params["conv1.weight"])
    with pytest.raises(ValueError, match=r"one\.npy holds a single array \(\.npy\); load takes the \.npz file written by save"):
        net.load(tmp_path / "one.npy")
    (tmp_path / "junk.npz").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match=r"junk\.npz: not an \.npz file written by save"):
        net.load(tmp_path / "junk.npz")


def test_odd_inputs_give_clean_errors(net):
    x, z = inputs()
    with pytest.raises(ValueError, match=r"got shape \(\)"):               # was reported as (1,)
        net.forward(np.float32(1), z)
    with pytest.raises(ValueError, match=r"input `x`: 1e\+300 does not fit in float32"):
        net.forward(np.full(x.shape, 1e300), z)                          # was inf, silently
    with pytest.raises(TypeError, match="masked array"):
        net.forward(np.ma.masked_array(x, mask=x > 0), z)                # the mask was dropped
    h, w = net.forward(x, z)
    with pytest.raises(ValueError, match="gradient of output `w`: 1e\\+300 does not fit"):
        net.backward(np.ones_like(h), np.full(w.shape, 1e300))
    # A batch far larger than memory is refused by prepare before anything is copied
    # (numpy's copy of this broadcast view came first: a MemoryError).
    huge = np.broadcast_to(x[:1], (2 ** 40, *x.shape[1:]))
    with pytest.raises(ValueError, match="batch size|activations"):
        net.forward(huge, np.broadcast_to(z[:1], (2 ** 40, 3)))


def test_odd_inputs_that_are_fine_are_read_right(net):
    x, z = inputs()
    ref = net.forward(x, z)
    frozen = x.copy()
    frozen.flags.writeable = False
    raw = bytearray(x.nbytes + 1)                                      # a float array at an odd address
    unaligned = np.frombuffer(raw, dtype=np.uint8)[1:].view(np.float32).reshape(x.shape)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    for variant in (frozen, unaligned):
        for a, b in zip(net.forward(variant, z), ref):
            np.testing.assert_array_equal(a, b)
    half = x.astype(np.float16)
    for a, b in zip(net.forward(half, z), net.forward(half.astype(np.float32), z)):
        np.testing.assert_array_equal(a, b)
    ones = net.forward(np.ones(x.shape, dtype=bool), z)
    for a, b in zip(ones, net.forward(np.ones_like(x), z)):
        np.testing.assert_array_equal(a, b)


def test_train_step_learning_rates(module, backend):
    from fractions import Fraction
    net = convdsl.load_source(NET.replace("output h, w", "output h, w\n    loss mse(w)"), backend=backend).Model(seed=0)
    x, z = inputs()
    assert np.isfinite(net.train_step(x, z, np.zeros((2, 3)), lr=Fraction(1, 100)))
    for bad in (10 ** 400, float("nan"), "0.1", None, True):
        with pytest.raises(ValueError, match="lr must be a finite number"):
            net.train_step(x, z, np.zeros((2, 3)), lr=bad)
    with pytest.raises(TypeError, match="target"):
        net.train_step(x, z, None, lr=0.1)


EDGES = """
network E {
    input x: [2, 5, 5]
    h = x -> relu
    s = h -> globalavgpool
    output x, h, s
}
"""


def test_outputs_that_are_an_input_or_read_later_are_whole_in_both_modes(backend):
    # An eval forward writes an output straight into the caller's array and reads the inputs
    # where they are (lower/plan.py, eval_in_place): an output that is an input and one that a
    # later layer reads must still come back whole, and the input untouched.
    net = convdsl.load_source(EDGES, backend=backend).Model()
    x = np.random.default_rng(3).standard_normal((3, 2, 5, 5)).astype(np.float32)
    before = x.copy()
    for mode in (net.eval, net.train, net.eval):
        mode()
        a, b, s = net.forward(x)
        np.testing.assert_array_equal(a, x)
        np.testing.assert_array_equal(b, np.maximum(x, 0))
        np.testing.assert_allclose(s[:, :, 0, 0], np.maximum(x, 0).mean(axis=(2, 3)), rtol=1e-6)
        assert not np.shares_memory(a, x)
    np.testing.assert_array_equal(x, before)


UNREAD = """
network U {
    input x: [2, 5, 5]
    input unused: [3]
    y = x -> relu
    output y
}
"""


def test_backward_seeds_and_input_gradients_at_the_edges(backend):
    # backward copies each output's gradient over its place and has the pass write an input's
    # gradient into the caller's array (the C module's module.c.j2): an output that is an input
    # (seeded, then added into by the layers that read it), an output read later, and an input
    # nobody reads (its gradient zeros, in an array that came uninitialised) must all be whole,
    # on every call.
    net = convdsl.load_source(EDGES, backend=backend).Model()
    net.train()
    rng = np.random.default_rng(4)
    for _ in range(2):
        x = rng.standard_normal((3, 2, 5, 5)).astype(np.float32)
        shapes = ((3, 2, 5, 5), (3, 2, 5, 5), (3, 2, 1, 1))
        dx_out, dh, ds = (rng.standard_normal(s).astype(np.float32) for s in shapes)
        net.forward(x)
        kept = dx_out.copy()
        dx = net.backward(dx_out, dh, ds)
        np.testing.assert_allclose(dx, dx_out + (x > 0) * (dh + ds / 25), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(dx_out, kept)
    two = convdsl.load_source(UNREAD, backend=backend).Model()
    two.train()
    for _ in range(2):
        x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
        two.forward(x, np.ones((2, 3), np.float32))
        dy = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
        dx, d_unused = two.backward(dy)
        np.testing.assert_array_equal(dx, (x > 0) * dy)
        np.testing.assert_array_equal(d_unused, np.zeros((2, 3), np.float32))


def test_the_loss_reads_the_last_forwards_output_in_both_modes(backend):
    # Forwards write outputs straight into the caller's arrays where nothing reads them after
    # the call (lower/plan.py: eval_in_place, train_in_place); the loss's output is read by
    # loss() and loss_grad() after it, and must be kept in its place in either mode.
    src = "network L {\n input x: [4]\n y = x -> dense(3)\n output y\n loss mse(y)\n}\n"
    net = convdsl.load_source(src, backend=backend).Model(seed=0)
    rng = np.random.default_rng(5)
    for mode in (net.eval, net.train, net.eval):
        mode()
        x, t = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
        y = net.forward(x)
        np.testing.assert_allclose(net.loss(t), ((y - t) ** 2).mean(), rtol=1e-5)
        np.testing.assert_allclose(net.loss_grad(), 2 * (y - t) / y.size, rtol=1e-5, atol=1e-7)
