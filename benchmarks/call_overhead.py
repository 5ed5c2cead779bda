"""The cost of one call from Python: Model.forward / backward / train_step next to the bare C call.

    OMP_NUM_THREADS=1 python benchmarks/call_overhead.py [--batches 31] [--run-ms 20] [--profile]

Two networks at batch 1: one relu over 4 floats (all of its time is the call's overhead) and
LeNet-5 (examples/lenet5.cnn). For each it times, with time.perf_counter_ns, runs of as many
calls in a row as take about `--run-ms`, `--batches` runs each, the Model's and the bare C
call's in alternation, and prints the median time per call (and the fastest run's), for:

- `Model.forward` in eval and in training mode, `Model.backward` (training mode, after one
  forward), `Model.train_step`;
- the same C function called directly through cffi (`lib.<net>_forward(m, ins, outs)`) with its
  pointer arrays built once: what the kernel costs without any Python around it.

The difference between the two columns is what the Model's checks and conversions cost per
call. Issue 10's targets: a relu forward ≤ 5 µs, LeNet-5's forward at N=1 ≤ 15 µs in total.
`--profile` also prints cProfile's top entries for the relu network's eval forward.

It benchmarks the checkout it sits in (not an installed convdsl); benchmarks are never part of
the test suite. On a machine shared with other work, take the medians, not single runs.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import convdsl  # noqa: E402

RELU = """
network OneRelu {
    input x: [4]
    y = x -> relu
    output y
}
"""


def per_call_ns(model_call, c_call, batches: int, budget_s: float) -> tuple[float, float, float, float]:
    """(Model median, Model fastest, C median, C fastest) nanoseconds per call. The two are timed
    in alternating runs of the same number of calls (about `budget_s` seconds per run, found
    by a warm-up), so that a machine shared with other work slows both alike."""
    clock = time.perf_counter_ns
    start, warm = clock(), 0
    while clock() - start < budget_s * 1e9 or warm < 10:    # caches, branch predictors, prepare
        model_call()
        c_call()
        warm += 1
    calls = warm
    times = ([], [])
    for _ in range(batches):
        for fn, out in zip((model_call, c_call), times):
            start = clock()
            for _ in range(calls):
                fn()
            out.append((clock() - start) / calls)
    return statistics.median(times[0]), min(times[0]), statistics.median(times[1]), min(times[1])


def bare_calls(net):
    """The C functions called through cffi directly, with every argument built once."""
    ffi, lib, p, m = net._ffi, net._lib, net._p, net._m
    forward = getattr(lib, f"{p}_forward")
    backward = getattr(lib, f"{p}_backward")
    train_step = getattr(lib, f"{p}_train_step")
    set_training = getattr(lib, f"{p}_set_training")

    def ptrs(arrays, writable):
        return ffi.new(f"{p}_real *[]", [ffi.cast(f"{p}_real *", ffi.from_buffer(a, require_writable=writable))
                                         for a in arrays])
    return ffi, m, forward, backward, train_step, set_training, ptrs


def measure(module, x, target, batches: int, budget_s: float) -> list[tuple[str, float, float, float, float]]:
    """Rows of (what, Model median, Model fastest, C median, C fastest) in ns per call."""
    net = module.Model(seed=0)
    ffi, m, c_forward, c_backward, c_train_step, c_set_training, ptrs = bare_calls(net)
    net.train()
    y = net.forward(x)
    dy = np.ones_like(y)
    outs = np.empty_like(y)
    dx = np.empty_like(x)
    ins_p, outs_p = ptrs([x], False), ptrs([outs], True)
    dy_p, dx_p = ptrs([dy], False), ptrs([dx], True)
    rows = []

    def row(what, model_call, c_call):
        rows.append((what, *per_call_ns(model_call, c_call, batches, budget_s)))

    net.eval()
    c_set_training(m, 0)
    row("forward, eval", lambda: net.forward(x), lambda: c_forward(m, ins_p, outs_p))
    net.train()
    c_set_training(m, 1)
    row("forward, training", lambda: net.forward(x), lambda: c_forward(m, ins_p, outs_p))
    net.forward(x)
    row("backward, training", lambda: net.backward(dy), lambda: c_backward(m, dy_p, dx_p))
    if target is not None:
        lr = 1e-6
        loss = ffi.new("double *")
        target_p = ffi.cast("void *", ffi.from_buffer(target))
        sgd = ffi.new(f"{net._p}_optimizer *", getattr(net._lib, f"{net._p}_optimizer_defaults")(
            getattr(net._lib, f"{net._p}_sgd"), lr))
        row("train_step", lambda: net.train_step(x, target, lr=lr),
            lambda: c_train_step(m, ins_p, target_p, sgd, loss))
    return rows


def profile(module, x, calls: int) -> None:
    net = module.Model(seed=0).eval()
    net.forward(x)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        net.forward(x)
    prof.disable()
    print(f"\ncProfile of {calls} eval forwards of the one-relu network:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=31, help="timed runs per row (median taken)")
    ap.add_argument("--run-ms", type=float, default=20.0, help="about how long one timed run takes")
    ap.add_argument("--profile", action="store_true", help="cProfile the relu network's eval forward")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    relu = convdsl.load_source(RELU, path="one_relu.cnn")
    lenet = convdsl.load(REPO / "examples" / "lenet5.cnn")
    cases = [("one relu [1, 4]", relu, rng.standard_normal((1, 4)).astype(np.float32), None),
             ("LeNet-5 [1, 1, 28, 28]", lenet, rng.standard_normal((1, 1, 28, 28)).astype(np.float32),
              np.array([3], dtype=np.int64))]

    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, {os.cpu_count()} CPUs, "
          f"median (fastest) of {args.batches} runs, µs per call")
    print(f"| network | call | Model | bare C | Model − C |")
    print(f"|---|---|---|---|---|")
    for name, module, x, target in cases:
        for what, med, fast, c_med, c_fast in measure(module, x, target, args.batches, args.run_ms / 1e3):
            print(f"| {name} | {what} | {med / 1e3:.2f} ({fast / 1e3:.2f}) | {c_med / 1e3:.2f} ({c_fast / 1e3:.2f}) "
                  f"| {(med - c_med) / 1e3:.2f} |")
    if args.profile:
        profile(relu, cases[0][2], 20000)


if __name__ == "__main__":
    main()
