"""One model, many batch sizes: whatever batch a model was prepared for before (larger, smaller,
the same again), a forward, a backward and a training step give what a fresh model gives.

prepare lays the activations out first and the gradients after them, and reuses a large
arena for a smaller batch; these tests make sure no stale activation, gradient or scratch
value from an earlier batch leaks into a later one — on both backends (on OpenCL the arena is
a device buffer, grown and reused the same way).
"""
from __future__ import annotations

import numpy as np
import pytest

import convdsl
from reference import assert_close

# Every kind of buffer a prepare places: activations, their gradients, the scratch space (the
# 3×3 conv's column matrix in backward, the deconv's in forward and backward), with batchnorm's
# batch statistics and a residual add whose gradients sum.
NET = """
network Switch {
    input x: [3, 8, 8]
    a = x -> conv(6, kernel=3, pad=same) -> batchnorm -> relu                   # [6, 8, 8]
    b = a -> depthwise(kernel=3, pad=same) -> relu -> conv(6, kernel=1)
    c = add(a, b) -> maxpool(2) -> deconv(4, kernel=2, stride=2) -> relu        # [4, 8, 8]
    logits = c -> globalavgpool -> flatten -> DROPOUT dense(5)
    output logits
    loss softmax_cross_entropy(logits)
}
"""
# A training-mode dropout draws a new mask at every forward, so a fresh model would draw other
# masks: the dropout variant (its mask is the saved buffer a forward leaves for backward) runs
# in eval mode, where the mask is all ones but still written and read.
WITH_DROPOUT = NET.replace("DROPOUT", "dropout(0.5) ->")
NET = NET.replace("DROPOUT ", "")
# Up, down, up beyond every size before (a new, larger arena), down, and back.
BATCHES = (4, 2, 7, 1, 3, 7, 4)


@pytest.fixture(scope="module")
def module(backend):
    return convdsl.load_source(NET, backend=backend)


@pytest.fixture(scope="module")
def dropout_module(backend):
    return convdsl.load_source(WITH_DROPOUT, backend=backend)


def batch_data(batch: int):
    rng = np.random.default_rng(100 + batch)
    x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
    dy = rng.standard_normal((batch, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=batch)
    return x, dy, labels


def forward_backward(net, batch: int):
    x, dy, _ = batch_data(batch)
    y = net.forward(x)
    dx = net.backward(dy)
    return y, dx, {name: g.copy() for name, g in net.grads.items()}


def fresh_model(module, seed: int, training: bool):
    net = module.Model(seed=seed)
    return net if training else net.eval()


@pytest.mark.parametrize("mode", ["training", "eval with dropout"])
def test_forward_and_backward_after_batch_changes_equal_a_fresh_model(mode, module, dropout_module):
    training = mode == "training"
    module = module if training else dropout_module
    net = fresh_model(module, 3, training)
    for batch in BATCHES:
        y, dx, grads = forward_backward(net, batch)
        fresh_y, fresh_dx, fresh_grads = forward_backward(fresh_model(module, 3, training), batch)
        np.testing.assert_array_equal(y, fresh_y, err_msg=f"forward at batch {batch}")
        np.testing.assert_array_equal(dx, fresh_dx, err_msg=f"input gradient at batch {batch}")
        for name in grads:
            np.testing.assert_array_equal(grads[name], fresh_grads[name], err_msg=f"{name} at batch {batch}")


def test_train_steps_after_batch_changes_equal_a_fresh_model(module):
    net = module.Model(seed=5)
    for batch in BATCHES:
        x, _, labels = batch_data(batch)
        fresh = module.Model(seed=5)
        for name, p in net.params.items():          # the same weights as the reused model now has
            fresh.params[name][...] = p
        for name, b in net.buffers.items():
            fresh.buffers[name][...] = b
        loss = net.train_step(x, labels, lr=0.05)
        fresh_loss = fresh.train_step(x, labels, lr=0.05)
        assert loss == fresh_loss, f"loss at batch {batch}"
        for name in net.params:
            np.testing.assert_array_equal(net.params[name], fresh.params[name], err_msg=f"{name} at batch {batch}")


def test_eval_forward_at_a_larger_batch_after_training_at_a_smaller_one(module):
    net = module.Model(seed=1)
    x, _, labels = batch_data(2)
    net.train_step(x, labels, lr=0.05)
    net.eval()
    big, _, _ = batch_data(7)
    fresh = module.Model(seed=1)
    for name, p in net.params.items():
        fresh.params[name][...] = p
    for name, b in net.buffers.items():
        fresh.buffers[name][...] = b
    fresh.eval()
    np.testing.assert_array_equal(net.forward(big), fresh.forward(big))
    np.testing.assert_array_equal(net.forward(big[:3]), fresh.forward(big[:3]))


def test_a_batch_is_its_samples_run_one_by_one(dropout_module):
    """In eval mode the samples of a batch are independent: each sample's output and input
    gradient are what it gets alone, and the weight gradients are the per-sample sums. A buffer
    that overlaps another in some layout (the scratch space over a gradient, say) breaks this
    where comparing with a fresh model, which has the same layout, cannot tell."""
    net = fresh_model(dropout_module, 2, training=False)
    x, dy, _ = batch_data(7)
    y = net.forward(x)
    dx = net.backward(dy)
    grads = {name: g.copy() for name, g in net.grads.items()}
    sums = {name: np.zeros(g.shape, np.float64) for name, g in grads.items()}
    for i in range(len(x)):
        yi = net.forward(x[i:i + 1])
        dxi = net.backward(dy[i:i + 1])
        assert_close(y[i:i + 1], yi, what=f"output of sample {i}")
        assert_close(dx[i:i + 1], dxi, what=f"input gradient of sample {i}")
        for name, g in net.grads.items():
            sums[name] += g
    for name in grads:
        assert_close(grads[name], sums[name], what=f"{name}: the sum over the samples")
