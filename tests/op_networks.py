"""Run every op test file's networks, built as its tests build them, for a memory checker.

    tests/sanitize.sh -- python tests/op_networks.py               # every op file, under ASan/UBSan
    tests/sanitize.sh -- python tests/op_networks.py test_conv     # some of them
    tests/sanitize.sh -- python tests/op_networks.py --part 2/4    # a quarter of all the builds

For each file of tests/ops that lists its CASES (and MAP_CASES): the network of all its cases
(tests/ops/opcases.py: one input and one output per case) as the plan builds it, and, where the
file tests kernel variants the plan would not pick (a VariantPlan), each forcing build with its
cases. Each network runs forward and backward in training mode at batch 1 and at batch 3 (the
cases' second run-time sizes, so that prepare re-places the arena; batch 2 instead of 1 where
batchnorm refuses one value a channel), then forward in eval mode (the shared inference
placement) at batch 1. Nothing is compared here: the op tests compare the
same runs with PyTorch in the plain build. Under tests/sanitize.sh every kernel of every case
runs with AddressSanitizer and UBSan watching, in the sanitizer build's separated, poisoned
layout; the first report aborts the run (the caller, tests/e2e/test_sanitizers.py, checks).

Nearly all of the time is the sanitized compiles (test_conv's network of 66 cases: 44 s to
build with all of UBSan, 23 s with the suite's checks, 0.2 s to run). `--part I/N` runs the I-th of N parts of all the builds, balanced by their
cases (`parts`), so that the suite can run them side by side. The checks are CONVDSL_SANITIZE's
(the suite names its list: tests/e2e/test_sanitizers.py, SWEEP_CHECKS).

The op tests themselves, run whole under the sanitizers (`tests/sanitize.sh tests/ops -k "not
opencl"`), took 7 min 17 s on two cores (868 s of CPU) with 0 reports on 2026-12-02; this covers
their kernels in a fraction of that: f32 NCHW only (the NHWC and float64 builds are the same
kernels, with a layout conversion at the boundary or `double` for `real`).
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

OPS = Path(__file__).resolve().parent / "ops"


def op_files(names=()) -> list[Path]:
    """The op test files with CASES, or those named (`test_conv` or `test_conv.py`)."""
    files = sorted(p for p in OPS.glob("test_*.py") if "\nCASES = (" in p.read_text())
    if names:
        wanted = {n.removesuffix(".py") for n in names}
        files = [p for p in files if p.stem in wanted]
        missing = wanted - {p.stem for p in files}
        if missing:
            raise SystemExit(f"op_networks.py: no op test file with CASES named {', '.join(sorted(missing))}")
    return files


def load(path: Path):
    """An op test file, imported from its path (tests/ops on the path for its own imports)."""
    if str(OPS) not in sys.path:
        sys.path.insert(0, str(OPS))
    spec = importlib.util.spec_from_file_location(f"_op_file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def builds(module):
    """(label, cases, algo) of every build the file's tests make on the C backend in f32 NCHW."""
    from opcases import VariantPlan
    cases = tuple(module.CASES) + tuple(getattr(module, "MAP_CASES", ()))
    yield "plan", cases, None
    for plan in (v for v in vars(module).values() if isinstance(v, VariantPlan)):
        for variant, indices in plan.forced.items():
            if indices:
                yield variant, [module.CASES[i] for i in indices], plan.force(variant)
        # test_conv's `blocked` cases as the packed GEMM, the form their short reductions do not
        # take by the plan (test_blocked_as_the_gemm_*): built with BLOCKED_DIRECT_DEPTH at 0.
        if getattr(module, "BLOCKED_CASES", None) and "blocked" in plan.forced:
            yield "blocked-gemm", [module.CASES[i] for i in module.BLOCKED_CASES], plan.force("blocked")


def all_builds(names=()) -> list[tuple[str, str, list, dict | None]]:
    """(file stem, label, cases, algo) of every build of the op files (or those named)."""
    return [(path.stem, label, cases, algo) for path in op_files(names) for label, cases, algo in builds(load(path))]


def parts(builds_: list, n: int) -> list[list]:
    """The builds dealt into n parts of about equal cases (a sanitized compile's time grows with
    them): the largest first, each to the part with the fewest cases so far; in order within a
    part. Deterministic, so that --part 1/n … n/n run every build once."""
    loads, dealt = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(builds_)), key=lambda i: (-len(builds_[i][2]), i)):
        least = min(range(n), key=lambda p: (loads[p], p))
        loads[least] += len(builds_[i][2])
        dealt[least].append(i)
    return [[builds_[i] for i in sorted(part)] for part in dealt]


def exercise(cases, algo, seed: int, label: str = "") -> None:
    from opcases import compile_cases, randomize, run_cases
    if label == "blocked-gemm":
        from convdsl.ops import conv as conv_op
        depth, conv_op.BLOCKED_DIRECT_DEPTH = conv_op.BLOCKED_DIRECT_DEPTH, 0
        try:
            module = compile_cases(cases, algo=algo)
        finally:
            conv_op.BLOCKED_DIRECT_DEPTH = depth
    else:
        module = compile_cases(cases, algo=algo)
    rng = np.random.default_rng(seed)
    net = module.Model(seed=0)
    randomize(net, rng)
    try:
        run_cases(module, cases, 1, rng, net=net)
    except RuntimeError as refused:      # batchnorm in training mode needs two values a channel
        assert "more than one value per channel" in str(refused), refused
        run_cases(module, cases, 2, rng, net=net)
    run_cases(module, cases, 3, rng, net=net, variant=1)
    net.eval()
    net.forward(*[rng.standard_normal((1, *c.shape)).astype(np.float32) for c in cases])


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Run the op test files' networks (for a memory checker).")
    parser.add_argument("names", nargs="*", help="op test files (test_conv or test_conv.py); all by default")
    parser.add_argument("--part", default="1/1", help="I/N: the I-th of N balanced parts of the builds")
    args = parser.parse_args(argv)
    i, n = (int(v) for v in args.part.split("/"))
    if not 1 <= i <= n:
        raise SystemExit(f"op_networks.py: --part {args.part}: want I/N with 1 <= I <= N")
    started = time.perf_counter()
    count = 0
    for stem, label, cases, algo in parts(all_builds(args.names), n)[i - 1]:
        t = time.perf_counter()
        exercise(cases, algo, seed=count, label=label)
        count += 1
        print(f"{stem}: {label}: {len(cases)} cases ran ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"op_networks: {count} networks ran in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
