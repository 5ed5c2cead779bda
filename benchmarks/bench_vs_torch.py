"""convdsl against PyTorch, side by side in one process: forward, forward+backward, train step.

    python benchmarks/bench_vs_torch.py [--runs 30] [--out benchmarks/RESULTS.md]

Each case is timed as the median of --runs repetitions after warm-up, the two frameworks in
alternation, with PyTorch limited to as many threads as OpenMP gives convdsl. GFLOP/s counts 2
FLOPs per MAC as `convdsl check` counts them (forward+backward: its forward plus backward MACs).
The ratio is the median over the pairs of convdsl's time over PyTorch's: below 1 means faster.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Benchmark the checkout this script sits in, not whatever convdsl happens to be installed.
sys.path.insert(0, str(HERE.parent))

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.passes.stats import collect


WARMUP = 3
# Both sides run OpenMP thread pools (PyTorch ships its own libgomp) whose idle threads spin for
# a while after each parallel region; a short pause before each timed call keeps one side's
# spinning threads from taking the cores the other side is being timed on.
PAUSE_S = 0.003


def timed(fn) -> float:
    time.sleep(PAUSE_S)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_times(ours, theirs, runs: int) -> tuple[float, float, float]:
    """Median wall time of each, timed in alternation, and the median of the pairs' ratios.
    This machine's speed shifts by up to ~1.35x for seconds at a time (the host's other load):
    the two calls of a pair see the same state, so the ratio of pairs is steadier than either
    median alone."""
    for _ in range(WARMUP):
        ours()
        theirs()
    a, b = [], []
    for _ in range(runs):
        a.append(timed(ours))
        b.append(timed(theirs))
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def copy_params(net, modules: dict) -> None:
    with torch.no_grad():
        for name, array in net.params.items():
            layer, param = name.rsplit(".", 1)
            getattr(modules[layer.replace(".", "_")], param).copy_(torch.from_numpy(array.copy()))


CASES = []


def case(fn):
    CASES.append(fn)
    return fn


@case
def lenet5():
    src = (HERE.parent / "examples" / "lenet5.cnn").read_text()
    torch_net = nn.ModuleDict({
        "conv1": nn.Conv2d(1, 6, 5, padding=2), "conv2": nn.Conv2d(6, 16, 5),
        "dense1": nn.Linear(400, 120), "dense2": nn.Linear(120, 84), "dense3": nn.Linear(84, 10)})

    def forward(x):
        h = F.max_pool2d(F.relu(torch_net["conv1"](x)), 2)
        h = F.max_pool2d(F.relu(torch_net["conv2"](h)), 2).flatten(1)
        return torch_net["dense3"](F.relu(torch_net["dense2"](F.relu(torch_net["dense1"](h)))))
    return "LeNet-5, batch 64", src, (64, 1, 28, 28), torch_net, forward, 10


def single(name, body, shape, module, forward):
    return name, f"network B {{\n input x: {list(shape[1:])}\n y = x -> {body}\n output y\n}}\n", shape, \
        nn.ModuleDict({body.split("(")[0] + "1": module}), forward, None


@case
def conv3x3():
    m = nn.Conv2d(64, 64, 3, padding=1)
    return single("conv 3×3 64→64, 56×56, batch 8", "conv(64, kernel=3, pad=same)", (8, 64, 56, 56), m, m)


@case
def conv1x1():
    m = nn.Conv2d(64, 128, 1)
    return single("conv 1×1 64→128, 28×28, batch 8", "conv(128, kernel=1)", (8, 64, 28, 28), m, m)


@case
def depthwise():
    m = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    return single("depthwise 3×3, 64 ch, 56×56, batch 8", "depthwise(3, pad=same)", (8, 64, 56, 56), m, m)


@case
def dense():
    m = nn.Linear(1024, 1024)
    return single("dense 1024→1024, batch 64", "dense(1024)", (64, 1024), m, m)


@case
def resnet_block():
    src = """block residual(x, c) {
    y = x -> conv(c, kernel=3, pad=same) -> relu -> conv(c, kernel=3, pad=same)
    return add(x, y) -> relu
}
network Res {
    input x: [64, 28, 28]
    y = x -> residual(64)
    output y
}
"""
    torch_net = nn.ModuleDict({"residual1_conv1": nn.Conv2d(64, 64, 3, padding=1),
                               "residual1_conv2": nn.Conv2d(64, 64, 3, padding=1)})

    def forward(x):
        y = torch_net["residual1_conv2"](F.relu(torch_net["residual1_conv1"](x)))
        return F.relu(x + y)
    return "ResNet basic block 64 ch, 28×28, batch 8", src, (8, 64, 28, 28), torch_net, forward, None


def run_case(spec, runs: int):
    name, src, shape, torch_net, forward, classes = spec
    module = convdsl.load_source(src)
    net = module.Model(seed=0)
    copy_params(net, torch_net)
    stats = collect(graph_from_source(src))
    fwd_flops = 2 * stats.macs * shape[0]
    train_flops = 2 * (stats.macs + stats.backward_macs) * shape[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x)
    y = net.forward(x)
    np.testing.assert_allclose(y, forward(xt).detach().numpy(), rtol=1e-3, atol=1e-3)
    dy = np.ones_like(y)
    dyt = torch.from_numpy(dy)
    rows = []

    def torch_forward():
        with torch.no_grad():
            forward(xt)
    rows.append((name, "forward", *median_times(lambda: net.forward(x), torch_forward, runs), fwd_flops))

    def ours_fb():
        net.forward(x)
        net.backward(dy)

    def torch_fb():
        torch_net.zero_grad(set_to_none=True)
        forward(xt.requires_grad_()).backward(dyt)
    rows.append((name, "forward+backward", *median_times(ours_fb, torch_fb, runs), train_flops))
    if classes:
        labels = rng.integers(0, classes, size=shape[0])
        lt = torch.from_numpy(labels)
        opt = torch.optim.SGD(torch_net.parameters(), lr=0.01)

        def torch_step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(xt), lt).backward()
            opt.step()
        rows.append((name, "train step", *median_times(lambda: net.train_step(x, labels, lr=0.01), torch_step, runs),
                     train_flops))
    return rows


def omp_threads() -> int:
    """The thread count OpenMP gives convdsl's kernels: OMP_NUM_THREADS, else one per core."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def command_line() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return " ".join(filter(None, [env, "python benchmarks/bench_vs_torch.py", *sys.argv[1:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file to (re)write; '-' for none")
    parser.add_argument("--only", default="", help="comma-separated case names to run (e.g. conv3x3,dense)")
    args = parser.parse_args()
    threads = omp_threads()
    torch.set_num_threads(threads)
    print(f"threads: {threads} (OpenMP for convdsl; torch.set_num_threads({threads}) for PyTorch)", flush=True)
    wanted = {w for w in args.only.split(",") if w}
    rows = [r for spec in CASES if not wanted or spec.__name__ in wanted for r in run_case(spec(), args.runs)]
    cpu = platform.processor() or platform.machine()
    try:
        info = open("/proc/cpuinfo").read().splitlines()
        cpu = next(l.split(":", 1)[1].strip() for l in info if l.startswith("model name"))
        flags = set(next(l.split(":", 1)[1] for l in info if l.startswith("flags")).split())
        widest = next((f for f in ("avx512f", "avx2", "avx", "sse2") if f in flags), None)
        if widest:
            cpu += f" ({widest.upper()})"
    except (OSError, StopIteration):
        pass
    lines = [
        "# convdsl vs PyTorch", "",
        f"Measured {date.today().isoformat()} on {cpu}, {os.cpu_count()} cores; {threads} threads for both "
        f"(OpenMP for convdsl, torch.set_num_threads for PyTorch {torch.__version__}). Median of {args.runs} runs "
        f"after {WARMUP} warm-up runs, the two timed in alternation; the ratio is the median of the pairs' "
        "ratios; float32; NCHW. GFLOP/s counts 2 FLOPs per MAC "
        "as `convdsl check` counts them (forward+backward and train step: forward + backward MACs).", "",
        "Produced by:", "", f"    {command_line()}", "",
        "| case | pass | convdsl ms | PyTorch ms | ratio (convdsl / PyTorch) | convdsl GFLOP/s | PyTorch GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, what, ours, theirs, ratio, flops in rows:
        lines.append(f"| {name} | {what} | {ours * 1e3:.3f} | {theirs * 1e3:.3f} | {ratio:.2f} | "
                     f"{flops / ours / 1e9:.2f} | {flops / theirs / 1e9:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out == "-":
        return
    out = Path(args.out)
    # Keep the hand-written sections (## headings) below the table when the table is refreshed.
    previous = out.read_text() if out.exists() else ""
    marker = "\n## "
    out.write_text(text + (previous[previous.index(marker):] if marker in previous else ""))


if __name__ == "__main__":
    main()
