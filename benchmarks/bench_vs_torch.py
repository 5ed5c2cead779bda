"""convdsl against PyTorch, side by side in one process: forward, forward+backward, train step.

    python benchmarks/bench_vs_torch.py [--runs 30] [--out benchmarks/RESULTS.md]

Each case is timed as the median of --runs repetitions after warm-up, for both frameworks,
with PyTorch limited to as many threads as OpenMP gives convdsl. GFLOP/s counts 2 FLOPs per
MAC of the forward pass (forward+backward: 3× the forward MACs, as `check` counts them for
layers with weights). The ratio is convdsl's time over PyTorch's: below 1 means faster.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import convdsl
from convdsl.compiler import graph_from_source
from convdsl.passes.stats import collect

HERE = Path(__file__).resolve().parent


def median_time(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_params(net, modules: dict) -> None:
    with torch.no_grad():
        for name, array in net.params.items():
            layer, param = name.rsplit(".", 1)
            getattr(modules[layer], param).copy_(torch.from_numpy(array.copy()))


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


def run_case(spec, runs: int):
    name, src, shape, torch_net, forward, classes = spec
    module = convdsl.load_source(src)
    net = module.Model(seed=0)
    copy_params(net, torch_net)
    stats = collect(graph_from_source(src))
    macs = stats.macs * shape[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x)
    y = net.forward(x)
    np.testing.assert_allclose(y, forward(xt).detach().numpy(), rtol=1e-3, atol=1e-3)
    dy = np.ones_like(y)
    dyt = torch.from_numpy(dy)
    rows = []
    ours = median_time(lambda: net.forward(x), runs)
    with torch.no_grad():
        theirs = median_time(lambda: forward(xt), runs)
    rows.append((name, "forward", ours, theirs, 2 * macs))

    def ours_fb():
        net.forward(x)
        net.backward(dy)

    def torch_fb():
        torch_net.zero_grad(set_to_none=True)
        forward(xt.requires_grad_()).backward(dyt)
    rows.append((name, "forward+backward", median_time(ours_fb, runs), median_time(torch_fb, runs), 6 * macs))
    if classes:
        labels = rng.integers(0, classes, size=shape[0])
        lt = torch.from_numpy(labels)
        opt = torch.optim.SGD(torch_net.parameters(), lr=0.01)

        def torch_step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(xt), lt).backward()
            opt.step()
        rows.append((name, "train step", median_time(lambda: net.train_step(x, labels, lr=0.01), runs),
                     median_time(torch_step, runs), 6 * macs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    rows = [r for spec in CASES for r in run_case(spec(), args.runs)]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# convdsl vs PyTorch", "",
        f"Measured {date.today().isoformat()} on {cpu}, {os.cpu_count()} cores; {threads} threads for both "
        f"(OpenMP for convdsl, torch.set_num_threads for PyTorch {torch.__version__}). Median of {args.runs} runs "
        "after 3 warm-up runs; float32; NCHW.", "",
        "Produced by:", "", f"    python benchmarks/bench_vs_torch.py --runs {args.runs}", "",
        "| case | pass | convdsl ms | PyTorch ms | ratio (convdsl / PyTorch) | convdsl GFLOP/s | PyTorch GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, what, ours, theirs, flops in rows:
        lines.append(f"| {name} | {what} | {ours * 1e3:.3f} | {theirs * 1e3:.3f} | {ours / theirs:.2f} | "
                     f"{flops / ours / 1e9:.2f} | {flops / theirs / 1e9:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    # Keep the hand-written analysis below the table when the table is refreshed.
    previous = out.read_text() if out.exists() else ""
    marker = "\n## Where this stands"
    Path(args.out).write_text(text + (previous[previous.index(marker):] if marker in previous else ""))


if __name__ == "__main__":
    main()
