"""--tune (convdsl/tune.py): each layer's kernel variant timed on this machine, the fastest built,
the result cached. Speed is never asserted here: a fake timer decides which variant "wins" where
the test needs to know, and one real run checks that what tuning builds computes the same."""
from __future__ import annotations

import json

import numpy as np
import pytest

import convdsl
from convdsl import tune
from convdsl.errors import ConvDSLError

NET = """
network Tuned {
    input x: [6, 9, 9]
    y = x -> conv(8, kernel=3, pad=same) -> relu -> conv(4, kernel=1) -> depthwise(kernel=3, algo=direct)
    output y
    loss mse(y)
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A build cache of the test's own, so that no earlier tuning is found."""
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_timer(monkeypatch, fastest: dict[str, str]):
    """measure() replaced: every variant of a layer takes 2 ms but the one `fastest` names for its
    label, 1 ms. Returns the list of (label, variants, batch, training) it was asked to time."""
    asked = []

    def measure(graph, node, variants, batch, training, backend):
        asked.append((node.label, variants, batch, training))
        return {v: 1e-3 if v == fastest.get(node.label) else 2e-3 for v in variants}
    monkeypatch.setattr(tune, "measure", measure)
    return asked


def variants_of(module) -> dict[str, str]:
    return {s.label: s.variant for s in module.program.forward}


def test_the_variant_timed_fastest_is_built(cache, monkeypatch):
    asked = fake_timer(monkeypatch, {"conv1": "im2col", "conv2": "blocked"})
    module = convdsl.load_source(NET, tune=True)
    assert variants_of(module)["conv1"] == "im2col"
    assert variants_of(module)["conv2"] == "blocked"
    # Timed: the two convs, each in every usable variant, in training (the network has a loss),
    # at batch 1; not the depthwise layer, whose variant the file fixes.
    assert [label for label, *_ in asked] == ["conv1", "conv2"]
    assert {"im2col", "blocked", "winograd2", "winograd4"} <= set(asked[0][1])
    assert "pointwise" in asked[1][1]
    assert all(batch == 1 and training for *_, batch, training in asked)
    assert [(r.label, r.variant, r.cached) for r in module.tuned] == [("conv1", "im2col", False),
                                                                     ("conv2", "blocked", False)]
    fake_timer(monkeypatch, {"conv1": "winograd2", "conv2": "pointwise"})
    other = convdsl.load_source(NET.replace("network Tuned", "network Other"), tune=True, tune_batch=4)
    assert variants_of(other)["conv1"] == "winograd2"          # a batch of its own: timed again
    untuned = convdsl.load_source(NET)
    assert variants_of(untuned)["depthwise1"] == "direct"


def test_a_tuned_shape_is_read_from_the_cache_and_timed_once(cache, monkeypatch):
    asked = fake_timer(monkeypatch, {"conv1": "im2col", "conv2": "blocked"})
    convdsl.load_source(NET, tune=True)
    asked.clear()
    again = convdsl.load_source(NET, tune=True)
    assert asked == []
    assert variants_of(again)["conv1"] == "im2col"
    assert all(r.cached for r in again.tuned)


def test_a_tuning_made_with_other_kernels_is_measured_again(cache, monkeypatch):
    """The cache key holds a digest of convdsl's sources and templates: a timing of the kernels
    an earlier convdsl generated is not taken for those of this one."""
    asked = fake_timer(monkeypatch, {"conv1": "im2col"})
    convdsl.load_source(NET, tune=True)
    first = len(asked)
    convdsl.load_source(NET, tune=True)
    assert len(asked) == first                      # the same code: read from the cache
    monkeypatch.setattr(tune, "kernels_digest", lambda: "other kernels")
    convdsl.load_source(NET, tune=True)
    assert len(asked) == 2 * first


@pytest.mark.parametrize("damage", ["not json", '{"seconds": {"im2col": 1}}', '{"seconds": 3}', ""])
def test_a_damaged_tuning_file_is_measured_again(cache, monkeypatch, damage):
    asked = fake_timer(monkeypatch, {"conv1": "im2col", "conv2": "blocked"})
    convdsl.load_source(NET, tune=True)
    files = sorted((cache / "tuning").glob("*.json"))
    assert len(files) == 2
    for f in files:
        f.write_text(damage)
    asked = fake_timer(monkeypatch, {"conv1": "blocked", "conv2": "im2col"})
    module = convdsl.load_source(NET, tune=True)
    assert [label for label, *_ in asked] == ["conv1", "conv2"]
    assert variants_of(module)["conv1"] == "blocked"
    for f in files:
        assert set(json.loads(f.read_text())["seconds"]) >= {"im2col", "blocked"}


def test_an_explicit_override_beats_the_measurement(cache, monkeypatch):
    fake_timer(monkeypatch, {"conv1": "winograd4", "conv2": "blocked"})
    module = convdsl.load_source(NET, tune=True, algo={"conv": "im2col"})
    assert variants_of(module)["conv1"] == "im2col"
    assert variants_of(module)["conv2"] == "im2col"


def test_layers_with_run_time_sizes_are_not_tuned(cache, monkeypatch):
    asked = fake_timer(monkeypatch, {})
    src = NET.replace("input x: [6, 9, 9]", "input x: [6, H, W]")
    convdsl.load_source(src, tune=True)
    assert asked == []


def test_a_batchnorm_is_not_timed_and_still_fuses(cache, monkeypatch):
    """batchnorm's `fusing` differs from `default` only in what follows it, which a layer timed
    alone lacks: it is not timed (a tie there would decide the fusion), and it still fuses. Also
    a real --tune of a network with a batchnorm: it once failed with a KeyError."""
    src = NET.replace("-> relu ->", "-> batchnorm -> relu ->")
    asked = fake_timer(monkeypatch, {"conv1": "im2col"})
    module = convdsl.load_source(src, tune=True)
    assert [a[0] for a in asked] == ["conv1", "conv2"]
    steps = {s.label: s for s in module.program.forward}
    assert steps["batchnorm1"].variant == "fusing" and "relu1" not in steps
    monkeypatch.undo()
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(cache))
    assert [r.label for r in convdsl.load_source(src, tune=True).tuned] == ["conv1", "conv2"]


def test_the_batch_to_tune_for_is_checked(cache):
    with pytest.raises(ConvDSLError, match="batch to tune for"):
        convdsl.load_source(NET, tune=True, tune_batch=0)


def test_real_tuning_builds_a_module_that_computes_what_the_untuned_one_does(cache):
    """The timer for real, once: whatever it picks computes the same forward and gradients."""
    small = NET.replace("conv(4, kernel=1) -> depthwise(kernel=3, algo=direct)", "conv(4, kernel=1)")
    tuned = convdsl.load_source(small, tune=True)
    assert [r.label for r in tuned.tuned] == ["conv1", "conv2"]
    for r in tuned.tuned:
        assert r.variant in r.seconds and all(s > 0 for s in r.seconds.values())
        assert r.seconds[r.variant] == min(r.seconds.values())
    plain = convdsl.load_source(small, algo={"conv": "im2col"})
    a, b = tuned.Model(seed=3), plain.Model(seed=3)
    x = np.random.default_rng(0).standard_normal((2, 6, 9, 9)).astype(np.float32)
    ya, yb = a.forward(x), b.forward(x)
    np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-5 * np.abs(yb).max())
    dy = np.ones_like(ya)
    np.testing.assert_allclose(a.backward(dy), b.backward(dy), rtol=1e-4, atol=1e-4)
    for k in a.grads:
        np.testing.assert_allclose(a.grads[k], b.grads[k], rtol=1e-4, atol=1e-4 * np.abs(b.grads[k]).max(), err_msg=k)


def test_compile_tune_prints_what_it_chose(cache, monkeypatch, tmp_path, capsys):
    from convdsl.cli import main
    fake_timer(monkeypatch, {"conv1": "im2col", "conv2": "blocked"})
    net = tmp_path / "net.cnn"
    net.write_text(NET)
    assert main(["compile", str(net), "--tune", "--emit", "lowered"]) == 0
    out, err = capsys.readouterr()
    assert "tune: conv1: im2col (im2col 1.000 ms" in err
    assert "tune: conv2: blocked" in err
    assert "conv1 (line 4)" in out and "conv/im2col" in out
