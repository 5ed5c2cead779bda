"""The first-call cost: Model(), the first forward, a steady forward, and a forward after the
batch size changes (a training loop's last, smaller batch), median of several fresh runs.

Run from the repository root (it benchmarks this checkout, not an installed convdsl):

    OMP_NUM_THREADS=2 python benchmarks/first_call.py [--runs 5] [--batch 32] [--last 20] [FILE.cnn]

FILE.cnn (default benchmarks/mobilenet_v2_like.cnn, MobileNetV2's layout at 96×96) needs one
input of fixed size and one output.

Each run starts a fresh Model in a fresh process, so the allocator and the OpenMP thread pool
start cold as they do for a user; the module itself is compiled (or found in the cache) first.
Besides wall time (median, min, max over the runs) it prints each step's minor page faults (the
memory it touched for the first time) and the kernel time they cost: on a busy machine those
two are the numbers that do not move from run to run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "benchmarks" / "mobilenet_v2_like.cnn"
PAGE = os.sysconf("SC_PAGE_SIZE")
STEPS = ("Model()", "first forward", "second forward", "forward after batch change",
         "forward back at the first batch", "first backward", "second backward",
         "train_step", "train_step after batch change", "eval: forward at a new batch")


def one_run(path: str, batch: int, last: int) -> dict[str, float]:
    """One cold run in this process: (wall seconds, page faults, kernel seconds) of each step."""
    import numpy as np
    import convdsl
    module = convdsl.load(path)
    dims = module.Model._meta["inputs"][0]["dims"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *dims)).astype(np.float32)
    x_last = x[:last].copy()
    times = {}

    def timed(step, fn):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        result = fn()
        after = resource.getrusage(resource.RUSAGE_SELF)
        times[step] = (time.perf_counter() - start, after.ru_minflt - before.ru_minflt,
                       after.ru_stime - before.ru_stime)
        return result

    net = timed("Model()", lambda: module.Model(seed=0))
    y = timed("first forward", lambda: net.forward(x))
    timed("second forward", lambda: net.forward(x))
    timed("forward after batch change", lambda: net.forward(x_last))
    y = timed("forward back at the first batch", lambda: net.forward(x))
    dy = np.ones_like(y)
    timed("first backward", lambda: net.backward(dy))
    net.forward(x)
    timed("second backward", lambda: net.backward(dy))
    loss = module.Model._meta["loss"]
    if loss is not None:                     # a network without a loss has no train_step
        if loss["target_kind"] == "labels":  # a class per sample, or per position of a map
            target = rng.integers(0, y.shape[1], size=(batch, *y.shape[2:]))
        else:
            target = rng.standard_normal(y.shape).astype(np.float32)
        timed("train_step", lambda: net.train_step(x, target, lr=0.01))
        timed("train_step after batch change", lambda: net.train_step(x_last, target[:last], lr=0.01))
    net.eval()
    timed("eval: forward at a new batch", lambda: net.forward(x[: batch // 2 + 1]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=str(DEFAULT))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--last", type=int, default=20, help="the smaller batch of the batch change")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.file, args.batch, args.last)))
        return
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = [sys.executable, __file__, args.file, "--one", "--batch", str(args.batch), "--last", str(args.last)]
    subprocess.run(child, env=env, check=True, capture_output=True)          # compile or fill the cache
    runs = [json.loads(subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout)
            for _ in range(args.runs)]
    print(f"{Path(args.file).name}: batch {args.batch}, then {args.last}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; median of {args.runs} fresh processes")
    print(f"  {'step':32s} {'median':>9s}    {'min':>7s} {'max':>8s}   {'page faults':>11s} {'(MiB)':>6s}"
          f"   {'kernel time':>11s}")
    for step in (s for s in STEPS if s in runs[0]):
        values = [r[step][0] for r in runs]
        faults = statistics.median(r[step][1] for r in runs)
        kernel = statistics.median(r[step][2] for r in runs)
        print(f"  {step:32s} {statistics.median(values) * 1e3:9.1f} ms {min(values) * 1e3:7.1f} {max(values) * 1e3:8.1f}"
              f"   {faults:11.0f} {faults * PAGE / 2**20:6.0f}   {kernel * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
