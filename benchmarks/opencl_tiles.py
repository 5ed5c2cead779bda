"""The OpenCL conv kernels against each other: the plan's `tiled` variant (work-groups over
channel × position tiles, the reduction staged in local memory) and the one-work-item-per-output
kernel (forced as `im2col`, which is that kernel on OpenCL), built from the same layer and timed
in alternating rounds in one process, forward and forward + backward. Each pair is first checked
to agree (forward and every gradient, rtol 1e-4 after scale), so a timing is of two correct kernels.

    python benchmarks/opencl_tiles.py [--runs 5] [--only vgg3x3,conv1x1] [--batch 1]

Prints a markdown table; benchmarks/RESULTS.md (OpenCL) says what a run on this machine showed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convdsl.compiler import build_module, compile_graph, graph_from_file   # noqa: E402

NETS = REPO / "benchmarks" / "nets" / "layers.cnn"
LAYERS = {                                        # key → (network in layers.cnn, what it is)
    "lenet-conv1": ("LeNetConv1", "LeNet conv1 5×5 valid, 1→6, 32²"),
    "vgg3x3": ("VGG3x3", "VGG 3×3 64→64 56² same"),
    "resnet-s2": ("ResNetStride2", "ResNet 3×3 s2 128→256 28²"),
    "conv1x1": ("Pointwise", "1×1 256→64 28²"),
}
KERNELS = {"tiled": "tiled", "one work-item per output": "im2col"}


def build(network: str, variant: str):
    """The layer's OpenCL model with its conv forced to `variant`, and one sample's input shape."""
    graph = graph_from_file(NETS, network)
    compiled = compile_graph(graph, algo={"conv": variant}, backend="opencl")
    chosen = {s.variant for s in compiled.program.forward}
    if chosen != {variant}:
        raise SystemExit(f"{network}: asked for {variant}, the plan runs {chosen}")
    return build_module(compiled).Model(seed=0), tuple(graph.inputs[0].dims)


def agree(a, b, what: str) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    if not np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale):
        raise SystemExit(f"{what}: the two kernels disagree (max |diff| {np.abs(a - b).max():.3g})")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per kernel (default 5)")
    parser.add_argument("--only", default=",".join(LAYERS), help="comma-separated keys: " + ",".join(LAYERS))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print("| layer | batch | kernel | forward ms | forward + backward ms |")
    print("|---|---|---|---|---|")
    for key in args.only.split(","):
        network, title = LAYERS[key]
        built = {name: build(network, variant) for name, variant in KERNELS.items()}
        nets = {name: net for name, (net, _) in built.items()}
        shape = next(iter(built.values()))[1]
        first = next(iter(nets.values()))
        rng = np.random.default_rng(0)
        for name, p in first.params.items():
            p[...] = rng.standard_normal(p.shape) * 0.1
            for other in nets.values():
                other.params[name][...] = p
        x = rng.standard_normal((args.batch, *shape)).astype(np.float32)
        outs = {name: net.forward(x) for name, net in nets.items()}
        dy = rng.standard_normal(next(iter(outs.values())).shape).astype(np.float32)
        grads = {}
        for name, net in nets.items():
            net.train()
            net.forward(x)
            dx = net.backward(dy)
            grads[name] = (dx, {k: v.copy() for k, v in net.grads.items()})
        (ref_name, ref), *others = outs.items()
        for name, y in others:
            agree(y, ref, f"{key} forward")
            agree(grads[name][0], grads[ref_name][0], f"{key} dX")
            for k in grads[name][1]:
                agree(grads[name][1][k], grads[ref_name][1][k], f"{key} d{k}")
        times = {name: ([], []) for name in nets}
        for _ in range(args.runs):                # alternating rounds: the machine's load falls on both
            for name, net in nets.items():
                net.eval()
                times[name][0].append(timed(lambda: net.forward(x)))
                net.train()
                times[name][1].append(timed(lambda: (net.forward(x), net.backward(dy))))
        for name, (fwd, both) in times.items():
            print(f"| {title} | {args.batch} | {name} | {statistics.median(fwd) * 1e3:.1f} | "
                  f"{statistics.median(both) * 1e3:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
