"""dropout: identity in inference mode; in training mode inverted dropout (keep with probability
1 − p, kept values scaled by 1/(1 − p)) whose backward applies the forward's mask, with masks
that the model's seed makes reproducible."""
from __future__ import annotations

import numpy as np
import pytest

import convdsl
from opcases import assert_c_compiles_cleanly, assert_error_at, layer_stats

SRC = """network D {{
    dtype {dtype}
    layout {layout}
    input x: {dims}
    y = x -> dropout({p})
    output y
}}
"""


def load(p=0.3, dims="[4, 50, 60]", dtype="f32", layout="NCHW", backend="c"):
    return convdsl.load_source(SRC.format(p=p, dims=dims, dtype=dtype, layout=layout), backend=backend)


@pytest.fixture(scope="module")
def module(backend):
    """On both backends: the OpenCL kernels draw the C backend's masks (one seed, the same masks)."""
    return load(backend=backend)


def positive_input(rng, shape, dtype=np.float32):
    # No zeros, so that y == 0 exactly where the value was dropped.
    return (rng.uniform(0.5, 2.0, shape) * rng.choice((-1, 1), shape)).astype(dtype)


def test_inference_mode_is_the_identity(module):
    net = module.Model(seed=0).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 50, 60)).astype(np.float32)
    assert np.array_equal(net.forward(x), x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    assert np.array_equal(net.backward(dy), dy)


def test_training_mode_keeps_a_fraction_1_minus_p_scaled_and_backward_uses_the_same_mask(module):
    net = module.Model(seed=0)
    assert net.training
    rng = np.random.default_rng(1)
    x = positive_input(rng, (3, 4, 50, 60))           # 36 000 values: more than the OpenMP threshold
    y = net.forward(x)
    kept = y != 0
    n = kept.size
    # Binomial(n, 0.7): the fraction lies within 5 standard deviations.
    assert abs(kept.mean() - 0.7) < 5 * np.sqrt(0.7 * 0.3 / n)
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = net.backward(dy)
    np.testing.assert_allclose(dx, np.where(kept, dy / 0.7, 0), rtol=1e-6, atol=0)
    # The masks are independent of the channel: no channel is all-kept or all-dropped.
    per_channel = kept.mean(axis=(0, 2, 3))
    assert np.all(np.abs(per_channel - 0.7) < 0.05)


def test_same_seed_same_masks_different_seed_different_masks(module):
    rng = np.random.default_rng(2)
    x = positive_input(rng, (2, 4, 50, 60))
    a, b, c = module.Model(seed=7), module.Model(seed=7), module.Model(seed=8)
    masks_a = [a.forward(x) != 0 for _ in range(3)]
    masks_b = [b.forward(x) != 0 for _ in range(3)]
    masks_c = [c.forward(x) != 0 for _ in range(3)]
    for ma, mb, mc in zip(masks_a, masks_b, masks_c):
        assert np.array_equal(ma, mb)
        assert not np.array_equal(ma, mc)
    assert not np.array_equal(masks_a[0], masks_a[1])      # every forward draws a new mask
    # An eval-mode forward draws nothing: the training masks after it are unchanged.
    d = module.Model(seed=7)
    d.forward(x)
    d.eval()
    d.forward(x)
    d.train()
    assert np.array_equal(d.forward(x) != 0, masks_a[1])


def splitmix_at(key: int, i: np.ndarray) -> np.ndarray:
    """The (i+1)-th output of SplitMix64 started at `key`, as documented in docs/language.md."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (i.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def test_masks_follow_the_documented_generator(backend):
    seed, p = 12345, 0.4
    net = load(p=p, dims="[3, 5]", dtype="f64", backend=backend).Model(seed=seed)
    x = positive_input(np.random.default_rng(3), (2, 3, 5), np.float64)
    stream = seed ^ 0xA0761D6478BD642F
    for _ in range(2):
        key = int(splitmix_at(stream, np.array([0]))[0])
        stream = (stream + 0x9E3779B97F4A7C15) % 2 ** 64
        u = ((splitmix_at(key, np.arange(x.size)) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0 ** 53
        expected = (u >= p).reshape(x.shape)
        assert np.array_equal(net.forward(x) != 0, expected)


def test_p_zero_keeps_everything_and_nhwc_works(backend):
    net = load(p=0, dims="[5, 6, 3]", layout="NHWC", backend=backend).Model(seed=0)
    x = np.random.default_rng(4).standard_normal((2, 5, 6, 3)).astype(np.float32)
    assert np.array_equal(net.forward(x), x)
    net = load(p=0.5, dims="[5, 6, 3]", layout="NHWC", backend=backend).Model(seed=0)
    x = positive_input(np.random.default_rng(5), (2, 5, 6, 3))
    y = net.forward(x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 2 * x[kept], rtol=1e-6)
    dy = np.ones_like(x)
    np.testing.assert_array_equal(net.backward(dy), np.where(kept, 2.0, 0.0).astype(np.float32))


def test_train_step_with_dropout_trains():
    src = """network T {
        input x: [8]
        y = x -> dense(16) -> relu -> dropout(0.2) -> dense(3)
        output y
        loss softmax_cross_entropy(y)
    }"""
    net = convdsl.load_source(src).Model(seed=0)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    first = np.mean([net.train_step(x, labels, lr=0.1) for _ in range(5)])
    for _ in range(100):
        net.train_step(x, labels, lr=0.1)
    last = np.mean([net.train_step(x, labels, lr=0.1) for _ in range(5)])
    assert last < 0.5 * first


def test_check_row():
    row = layer_stats("input x: [3, 5, 7]\n y = x -> dropout(0.25)\n output y")["dropout1"]
    assert row.shape == "[3, 5, 7]" and row.params == 0 and row.macs == 0 and row.describe == "dropout(0.25)"


@pytest.mark.parametrize("body, needle, fragments", [
    ("input x: [3, 4]\n y = x -> dropout(1)\n output y", "1)", ("[0.0, 1.0)",)),
    ("input x: [3, 4]\n y = x -> dropout(-0.1)\n output y", "-0.1", ("[0.0, 1.0)",)),
    ("input x: [3, 4]\n y = x -> dropout\n output y", "dropout", ("needs the argument `p`",)),
    ("input x: [3, 4]\n y = x -> dropout(rate=0.5)\n output y", "0.5", ("no argument `rate`",)),
], ids=["one", "negative", "missing", "unknown-arg"])
def test_errors_point_at_the_argument(body, needle, fragments):
    assert_error_at(body, needle, *fragments)


def test_generated_c_has_no_warnings(tmp_path):
    for dtype in ("f32", "f64"):
        assert_c_compiles_cleanly(SRC.format(p=0.5, dims="[3, H, W]", dtype=dtype, layout="NHWC"), tmp_path)
