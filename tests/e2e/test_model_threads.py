"""One Model shared between threads (§7): calls run one at a time, results are the
single-threaded ones, and a backward never silently pairs with another thread's forward."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import convdsl

REPO = Path(__file__).resolve().parents[2]
NET = """
network Shared {
    input x: [3, 10, 10]
    y = x -> conv(6, kernel=3, pad=same) -> relu -> maxpool(2) -> conv(6, kernel=3, pad=same) -> tanh
          -> globalavgpool -> dense(4)
    output y
    loss mse(y)
}
"""

# Run in a child process: before the lock, a prepare in one thread freed the arena another
# thread was computing in (SIGSEGV, malloc assertions), which would have killed pytest itself.
HAMMER = r'''
import threading, numpy as np, convdsl
net = convdsl.load_source(NET).Model(seed=0)
rng = np.random.default_rng(0)
batches = [1, 3, 5, 8]
xs = {b: rng.standard_normal((b, 3, 10, 10)).astype(np.float32) for b in batches}
dys = {b: rng.standard_normal((b, 4)).astype(np.float32) for b in batches}

def step(b):
    y = net.forward(xs[b])
    dx = net.backward(dys[b])
    return y, dx, {k: g.copy() for k, g in net.grads.items()}

reference = {b: step(b) for b in batches}
results = {b: [] for b in batches}
inference = {b: [] for b in batches}

def work(b):
    for _ in range(ROUNDS):
        with net.lock:                  # forward + backward + reading grads as one unit
            results[b].append(step(b))
        inference[b].append(net.forward(xs[b]))      # one call: the model's own lock suffices

threads = [threading.Thread(target=work, args=(b,)) for b in batches]
for t in threads: t.start()
for t in threads: t.join()
# Compared only now, after every thread is done: a later call cannot have changed what an
# earlier one returned.
wrong = 0
for b in batches:
    y_ref, dx_ref, g_ref = reference[b]
    assert len(results[b]) == len(inference[b]) == ROUNDS
    for (y, dx, g), y_alone in zip(results[b], inference[b]):
        ok = (np.array_equal(y, y_ref) and np.array_equal(dx, dx_ref) and np.array_equal(y_alone, y_ref)
              and all(np.array_equal(g[k], g_ref[k]) for k in g_ref))
        wrong += not ok
print("wrong", wrong)
'''


def test_four_threads_with_different_batches_on_one_model_get_single_threaded_results():
    script = f"NET = {NET!r}\nROUNDS = 150\n" + HAMMER
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.split() == ["wrong", "0"]


@pytest.fixture(scope="module")
def module(backend):
    """The network on each backend: a backward pairs with the last forward there too."""
    return convdsl.load_source(NET, backend=backend)


def run_in_thread(fn):
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:          # handed back to the test's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_backward_after_another_threads_forward_is_refused(module):
    """Thread A's backward would use thread B's activations: the gradient of the wrong batch."""
    net = module.Model(seed=0)
    rng = np.random.default_rng(1)
    xa, xb = (rng.standard_normal((2, 3, 10, 10)).astype(np.float32) for _ in range(2))
    dy = np.ones((2, 4), dtype=np.float32)
    net.forward(xa)                                  # this thread
    run_in_thread(lambda: net.forward(xb))           # another thread, same batch size
    with pytest.raises(RuntimeError, match="another thread"):
        net.backward(dy)
    with pytest.raises(RuntimeError, match="another thread"):
        net.loss(np.zeros((2, 4), dtype=np.float32))
    net.forward(xa)                                  # a new forward here pairs again
    alone = module.Model(seed=0)
    alone.forward(xa)
    np.testing.assert_array_equal(net.backward(dy), alone.backward(dy))


def test_a_backward_in_another_thread_pairs_with_the_last_forward(module):
    """Handing a model to a worker thread is fine: that thread made no forward of its own."""
    net, alone = module.Model(seed=0), module.Model(seed=0)
    x = np.random.default_rng(2).standard_normal((3, 3, 10, 10)).astype(np.float32)
    dy = np.ones((3, 4), dtype=np.float32)
    net.forward(x)
    alone.forward(x)
    np.testing.assert_array_equal(run_in_thread(lambda: net.backward(dy)), alone.backward(dy))


# ---- the OpenMP threads of each call (Model(threads=), and the share of the cores) ----------

def one_step(net, x):
    y = net.forward(x)
    dx = net.backward(np.ones_like(y))
    return y, dx, {k: g.copy() for k, g in net.grads.items()}


@pytest.fixture(scope="module")
def c_module():
    return convdsl.load_source(NET)


def test_threads_sets_the_count_each_call_computes_with(c_module):
    """The C model runs its passes on `threads` threads: it plans a per-thread workspace for each
    (the conv backward gives each thread whole samples), and the results are the one-thread
    results (per-thread weight gradients summed in a fixed order: within rounding)."""
    from convdsl.runtime.model import _usable_cores
    many = _usable_cores() + 2
    x = np.random.default_rng(3).standard_normal((8, 3, 10, 10)).astype(np.float32)
    alone, wide = c_module.Model(seed=0, threads=1), c_module.Model(seed=0, threads=many)
    assert (alone.threads, wide.threads) == (1, many)
    y1, dx1, g1 = one_step(alone, x)
    y2, dx2, g2 = one_step(wide, x)
    assert wide.memory()["workspace"] > alone.memory()["workspace"]
    np.testing.assert_array_equal(y2, y1)
    np.testing.assert_array_equal(dx2, dx1)
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2", 10 ** 6])
def test_threads_must_be_a_positive_count(module, bad):
    with pytest.raises(ValueError, match="threads must be None or an integer from 1 to 4096"):
        module.Model(seed=0, threads=bad)
    net = module.Model(seed=0)
    with pytest.raises(ValueError, match="threads must be None or an integer"):
        net.threads = bad
    assert net.threads is None


def test_calls_running_at_once_share_the_cores(module, monkeypatch):
    """With threads=None a call takes cores // (calls running, itself included) threads, at least
    one: as if two other models' calls ran in other Python threads, this one gets a third. The
    model is told every core before its first prepare, and a count again only when it changes."""
    from convdsl.runtime import model as runtime
    monkeypatch.setattr(runtime, "_usable_cores", lambda: 6)
    net = module.Model(seed=0)
    assert net._threads_set == 6                      # told at creation: every core
    told = []
    real_set = net._c_set_threads
    net._c_set_threads = lambda m, n: (told.append(n), real_set(m, n))[1]
    x = np.zeros((2, 3, 10, 10), np.float32)
    net.forward(x)                                    # alone: every core, as told already
    monkeypatch.setattr(runtime, "_CALLS_RUNNING", [None, None])
    net.forward(x)                                    # two others running: 6 // 3
    monkeypatch.setattr(runtime, "_CALLS_RUNNING", [None] * 9)
    net.forward(x)                                    # nine others: still one thread
    net.forward(x)                                    # the same count again: not told twice
    assert told == [2, 1]
    net.threads = 4                                   # a count of its own: told at once, then kept
    monkeypatch.setattr(runtime, "_CALLS_RUNNING", [])
    net.forward(x)
    assert told == [2, 1, 4]
    assert runtime._CALLS_RUNNING == []               # every call took its entry out again
