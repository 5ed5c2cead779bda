"""convdsl against onnxruntime (inference) and PyTorch (training), side by side in one process.

    python benchmarks/bench.py [--runs 20] [--only vgg3x3,resnet18] [--quick] [--opencl] [--out FILE | -]

Every config of issue 10's table: a .cnn network from benchmarks/nets/ (LeNet-5 is
examples/lenet5.cnn), compiled by this checkout of convdsl; the same network in PyTorch,
built layer by layer from convdsl's graph as torch.nn modules holding a copy of the convdsl
Model's parameters and batchnorm statistics; and that PyTorch module exported to ONNX
(torch.onnx.export, the TorchScript exporter) and run by onnxruntime. Before anything is
timed, convdsl and onnxruntime must agree with that PyTorch network run in float64 on the
output (eval mode), and convdsl on the input gradient and every parameter gradient (training
mode), within f32 tolerance (`agree`), so that a wrong kernel cannot look fast.

Timing: forward in eval mode for all three (PyTorch under no_grad; onnxruntime with
intra_op_num_threads = the thread count, sequential execution, all graph optimisations), and
forward+backward in training mode for convdsl and PyTorch (PyTorch's input requires grad, so
both compute the input gradient too). Median of --runs repetitions after warm-up, the sides
timed in alternation; a ratio is the median over the rounds of one side's time over the
other's in the same round. GFLOP/s counts 2 FLOPs per MAC as `convdsl check` counts MACs
(forward+backward: forward plus backward MACs), and is given as a share of the float32 FMA
peak the script measures on the same thread count (benchmarks/fma_peak.c).

--opencl adds the OpenCL backend (convdsl.load(..., backend="opencl") on the first OpenCL device,
or CONVDSL_OPENCL_DEVICE's): the same parameters, checked against the same float64 PyTorch
output and gradients, timed in the same rounds as the C backend and PyTorch.

The thread count is OMP_NUM_THREADS (else one per core): OpenMP's for convdsl,
torch.set_num_threads and intra_op_num_threads for the others. The table and what the machine
is go to the top of benchmarks/RESULTS.md, above its hand-written `##` sections.
"""
from __future__ import annotations

import argparse
import dataclasses
import ctypes
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Benchmark the checkout this script sits in, not whatever convdsl happens to be installed.
sys.path.insert(0, str(REPO))

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import convdsl
from convdsl.compiler import build_module, compile_graph, graph_from_file
from convdsl.passes.stats import collect

WARMUP = 3
# All three run thread pools whose idle threads spin for a while after each parallel region; a
# short pause before each timed call keeps one side's spinning threads from taking the cores
# the next side is being timed on.
PAUSE_S = 0.003
RTOL, ATOL_OF_SCALE = 1e-4, 1e-5
# A gradient outside the tolerance but within this share of its largest magnitude is reported,
# not fatal: rounding amplified by an ill-conditioned network, not a kernel computing the wrong
# thing (which is off by about the size of the values).
GROSS = 0.1
# When a float32 gradient is outside the tolerance, the same network is built in float64 and run
# on the same values: the same kernels then computing what PyTorch float64 computes, within this
# share of each gradient's largest magnitude, tells a network that amplifies float32 rounding
# (training-mode batchnorm over a few values, ReLUs whose input is within rounding of 0) from a
# kernel that computes something else, which is as wrong in float64. Amplified float64 rounding
# stays near 1e-10 where float32's reached 1e-2; a wrong kernel is off by its values' size. A
# gradient that is 0 in exact arithmetic (a batchnorm's bias whose output only reaches the next
# training-mode batchnorm through a linear layer: that batchnorm removes any shift) is rounding
# noise on both sides, so each gradient's scale is at least FLOAT64_SCALE_FLOOR of the largest
# gradient scale of the network.
FLOAT64_AGREE = 1e-8
FLOAT64_SCALE_FLOOR = 1e-4
# The targets: forward at most onnxruntime's time, forward+backward at most 0.67×
# PyTorch's.
TARGET_FWD, TARGET_TRAIN = 1.0, 0.67


# ---- the configs --------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    key: str                 # for --only
    title: str
    path: Path
    network: str | None
    batches: tuple[int, ...]


NETS = HERE / "nets"
CONFIGS = (
    Config("lenet-conv1", "LeNet conv1 5×5 valid, 1→6, 32²", NETS / "layers.cnn", "LeNetConv1", (1, 64)),
    Config("vgg3x3", "VGG 3×3 64→64 56² same", NETS / "layers.cnn", "VGG3x3", (1,)),
    Config("resnet-s2", "ResNet 3×3 s2 128→256 28²", NETS / "layers.cnn", "ResNetStride2", (1,)),
    Config("conv1x1", "1×1 256→64 28²", NETS / "layers.cnn", "Pointwise", (1,)),
    Config("depthwise", "depthwise 3×3 128ch 56²", NETS / "layers.cnn", "Depthwise", (1,)),
    Config("dilated", "dilated 3×3 r2 64→64 64²", NETS / "layers.cnn", "Dilated", (1,)),
    Config("large-kernel", "large kernel 9×9 32→32 64² same", NETS / "layers.cnn", "LargeKernel", (1,)),
    Config("maxpool", "maxpool 2×2 s2 64ch 112²", NETS / "layers.cnn", "MaxPool", (1,)),
    Config("lenet5", "LeNet-5 whole (28²)", REPO / "examples" / "lenet5.cnn", None, (1, 64)),
    Config("resnet18", "ResNet-18 (32²) whole", NETS / "resnet18_cifar.cnn", None, (1, 8)),
    Config("mobilenetv2", "MobileNetV2 1.0 (96², ReLU) whole", NETS / "mobilenet_v2.cnn", None, (1,)),
)


# ---- the machine --------------------------------------------------------------------------

def omp_threads() -> int:
    """The thread count OpenMP gives convdsl's kernels: OMP_NUM_THREADS, else one per core."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def cpu_description() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    vector = [f for f in ("avx512f", "avx2", "fma", "avx", "sse2", "neon", "asimd") if f in flags]
    cores = info.get("cpu cores", "?")
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "flags": ", ".join(vector) or "none of avx512f/avx2/fma",
        "cpus": f"{os.cpu_count()} logical CPUs ({cores} cores per socket, {info.get('siblings', '?')} "
                f"threads per socket as /proc/cpuinfo says); {len(os.sched_getaffinity(0))} usable by this process",
    }


def compiler_version() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return f"{cc} (version unknown)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class FmaPeak:
    """The float32 FMA peak of this machine on a thread count, by benchmarks/fma_peak.c compiled
    with -O3 -march=native. On a shared machine another process can hold a core during a
    measurement, which only ever makes it read low: the peak is the best of many short bursts,
    taken again between configs (`sample`)."""

    def __init__(self, threads: int):
        self.threads = threads
        self._dir = tempfile.TemporaryDirectory(prefix="convdsl-fma-")
        lib_path = Path(self._dir.name) / "fma_peak.so"
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(HERE / "fma_peak.c"),
                        "-o", str(lib_path), "-lm"], check=True)
        self._lib = ctypes.CDLL(str(lib_path))
        self._lib.fma_peak_seconds.restype = ctypes.c_double
        self._lib.fma_peak_seconds.argtypes = [ctypes.c_int, ctypes.c_long]
        self.lanes = self._lib.fma_peak_lanes()
        self.accumulators = self._lib.fma_peak_accumulators()
        self._iterations = self._calibrate()
        self.best = {1: 0.0, threads: 0.0}

    def _flops(self, threads: int) -> float:
        return 2.0 * self.lanes * self.accumulators * self._iterations * threads

    def _calibrate(self) -> int:
        """Iterations for a burst of ~20 ms on one thread."""
        iterations = 10_000
        while self._lib.fma_peak_seconds(1, iterations) < 0.02:
            iterations *= 2
        return iterations

    def sample(self, bursts: int = 20) -> None:
        for threads in sorted({1, self.threads}):
            for _ in range(bursts):
                seconds = self._lib.fma_peak_seconds(threads, self._iterations)
                self.best[threads] = max(self.best[threads], self._flops(threads) / seconds)

    @property
    def gflops(self) -> float:
        return self.best[self.threads] / 1e9


# ---- the same network in PyTorch ----------------------------------------------------------

def _symmetric(pads, what: str) -> tuple[int, ...]:
    if any(before != after for before, after in pads):
        raise SystemExit(f"{what}: padding {pads} is not the same on both sides; PyTorch's layer cannot "
                         f"take it without a separate pad, so write the padding out (pad=1)")
    return tuple(before for before, _ in pads)


def _spatial_2d(node, in_types) -> None:
    if len(in_types[0].shape) != 3:
        raise SystemExit(f"{node.label}: the PyTorch side is written for 2-D maps only")


class Add(nn.Module):
    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Dense(nn.Linear):
    """convdsl's dense flattens a map input first."""
    def forward(self, x):
        return super().forward(x.flatten(1))


def _conv(node, in_types):
    _spatial_2d(node, in_types)
    a = node.attrs
    if a["flip"]:
        raise SystemExit(f"{node.label}: flip=true has no PyTorch twin here")
    return nn.Conv2d(a["in"], a["out"], a["kernel"], stride=a["stride"], padding=_symmetric(a["pads"], node.label),
                     dilation=a["dilation"], groups=a["groups"], bias=a["bias"])


def _pool(cls, **extra):
    def make(node, in_types):
        _spatial_2d(node, in_types)
        a = node.attrs
        return cls(a["kernel"], stride=a["stride"], padding=_symmetric(a["pads"], node.label), **extra)
    return make


TORCH_MODULES = {
    "conv": _conv,
    "depthwise": _conv,
    "maxpool": _pool(nn.MaxPool2d),
    "avgpool": _pool(nn.AvgPool2d, count_include_pad=False),
    "batchnorm": lambda node, in_types: nn.BatchNorm2d(node.attrs["C"], eps=node.attrs["eps"],
                                                       momentum=node.attrs["momentum"])
    if len(in_types[0].shape) == 3 else nn.BatchNorm1d(node.attrs["C"], eps=node.attrs["eps"],
                                                       momentum=node.attrs["momentum"]),
    "relu": lambda node, in_types: nn.ReLU(),
    "sigmoid": lambda node, in_types: nn.Sigmoid(),
    "tanh": lambda node, in_types: nn.Tanh(),
    "add": lambda node, in_types: Add(),
    "globalavgpool": lambda node, in_types: nn.AdaptiveAvgPool2d(1),
    "flatten": lambda node, in_types: nn.Flatten(1),
    "dense": lambda node, in_types: Dense(node.attrs["in"], node.attrs["out"], bias=node.attrs["bias"]),
}


class TorchTwin(nn.Module):
    """The network of a convdsl graph as torch.nn modules, one per layer (a shared `layer` is one
    module), run in the graph's order: what a PyTorch user would write by hand."""

    def __init__(self, graph, net):
        super().__init__()
        self.layers = nn.ModuleDict()
        self._plan = []                  # (module key, input value ids, output value id)
        for node in graph.nodes:
            make = TORCH_MODULES.get(node.op)
            if make is None:
                raise SystemExit(f"{graph.name}: op `{node.op}` ({node.label}) has no PyTorch twin in bench.py")
            key = node.layer.replace(".", "__")
            if key not in self.layers:
                self.layers[key] = make(node, tuple(graph.values[v].type for v in node.inputs))
            self._plan.append((key, node.inputs, node.output))
        self._input = graph.inputs[0].value
        self._output = graph.outputs[0].value
        with torch.no_grad():
            for name, array in {**net.params, **net.buffers}.items():
                layer, attr = name.rsplit(".", 1)
                getattr(self.layers[layer.replace(".", "__")], attr).copy_(torch.from_numpy(array.copy()))

    def forward(self, x):
        values = {self._input: x}
        for key, inputs, output in self._plan:
            values[output] = self.layers[key](*(values[v] for v in inputs))
        return values[self._output]

    def grads(self) -> dict[str, torch.Tensor]:
        """Parameter gradients by convdsl's names."""
        return {f"{key.replace('__', '.')}.{name}": p.grad for key, module in self.layers.items()
                for name, p in module.named_parameters(recurse=False)}


def randomize_batchnorm(net, rng) -> None:
    """Batchnorm starts as an identity (weight 1, bias 0, statistics 0 and 1), which would let a
    kernel that ignores them pass the agreement check: give them values of their own."""
    with_statistics = {name.rsplit(".", 1)[0] for name in net.buffers}
    for name, array in {**net.params, **net.buffers}.items():
        layer, kind = name.rsplit(".", 1)
        if layer not in with_statistics:
            continue                     # a conv's or dense's parameters, not a batchnorm's
        if kind in ("weight", "running_var"):
            array[...] = rng.uniform(0.5, 1.5, array.shape)
        elif kind in ("bias", "running_mean"):
            array[...] = rng.normal(0.0, 0.2, array.shape)


def onnx_session(twin: nn.Module, xt: torch.Tensor, threads: int) -> ort.InferenceSession:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is the legacy one; the dynamo exporter would
        # need onnxscript, which is not a dependency.
        warnings.simplefilter("ignore")
        torch.onnx.export(twin.eval(), (xt,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Agreement:
    what: str
    within: bool          # every element within the tolerance
    error: float          # our largest error, as a share of the reference's largest magnitude
    torch_error: float    # PyTorch float32's own largest error, the same measure
    scale: float = 1.0    # the reference's largest magnitude

    def gross(self, floor: float) -> bool:
        """Off by more than GROSS of its scale, the scale taken as at least `floor` (a gradient
        that is 0 in exact arithmetic is rounding noise on every side; FLOAT64_SCALE_FLOOR)."""
        return not self.within and self.error * self.scale / max(self.scale, floor) > GROSS


def agree(what: str, ours: np.ndarray, f32_reference: np.ndarray, f64_reference: np.ndarray,
          strict: bool = True) -> Agreement:
    """Refuse to time anything that computes something else. The yardstick is PyTorch in float64:
    `ours` must be within rtol 1e-4 and atol 1e-5 of its largest magnitude, or, where the network
    itself amplifies rounding (training-mode batchnorm over a handful of values), within twice
    what PyTorch's own float32 run is off by. A strict check (outputs) stops the benchmark; a
    gradient outside that is reported beside the row instead (run_config then asks the float64
    build, float64_check, and stops at a gross one where that build disagrees too)."""
    scale = float(np.max(np.abs(f64_reference))) or 1.0
    torch_error = float(np.max(np.abs(f32_reference - f64_reference))) / scale
    atol = max(ATOL_OF_SCALE, 2 * torch_error) * scale
    difference = np.abs(ours - f64_reference)
    error = float(np.max(difference)) / scale
    within = bool(np.all(difference <= atol + RTOL * np.abs(f64_reference)))
    if not within and strict:
        np.testing.assert_allclose(ours, f64_reference, rtol=RTOL, atol=atol, err_msg=what)
    return Agreement(what, within, error, torch_error, scale)


def float64_check(graph, net, statistics_at_start, x, dy, dx64: np.ndarray, grads64: dict) -> tuple[float, str]:
    """The network built in float64 (the same templates with `real` as double), given net's
    parameters and the batch's starting statistics, run in training mode on x and dy: its largest
    error against PyTorch float64's gradients (dx64, grads64), as a share of each one's largest
    magnitude (at least FLOAT64_SCALE_FLOOR of the largest of them all), and which gradient."""
    net64 = build_module(compile_graph(dataclasses.replace(graph, dtype="f64"))).Model(seed=0)
    for name, array in net.params.items():
        net64.params[name][...] = array
    for name, array in statistics_at_start.items():
        net64.buffers[name][...] = array
    net64.train()
    net64.forward(x.astype(np.float64))
    pairs = [("dx", net64.backward(dy.astype(np.float64)), dx64)]
    pairs += [(f"d{n}", net64.grads[n], g) for n, g in grads64.items()]
    floor = FLOAT64_SCALE_FLOOR * max(float(np.max(np.abs(reference))) for _, _, reference in pairs)
    worst, which = 0.0, ""
    for name, ours, reference in pairs:
        scale = max(float(np.max(np.abs(reference))), floor) or 1.0
        error = float(np.max(np.abs(ours - reference))) / scale
        if error >= worst:
            worst, which = error, name
    return worst, which


# ---- timing -------------------------------------------------------------------------------

def alternate(fns, runs: int, warmup: int) -> list[list[float]]:
    """Wall times of each function, timed in turn round after round: the calls of one round see
    the same state of a machine whose speed shifts for seconds at a time."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


@dataclass
class Row:
    title: str
    key: str
    batch: int
    fwd_flops: float
    train_flops: float
    ms: dict[str, float] = field(default_factory=dict)     # convdsl, onnxruntime, torch, convdsl_train, torch_train
    fwd_ratio: float = 0.0        # convdsl / onnxruntime, forward
    fwd_torch_ratio: float = 0.0  # convdsl / PyTorch, forward
    train_ratio: float = 0.0      # convdsl / PyTorch, forward+backward
    error: float = 0.0            # the largest error of an output, as a share of its largest magnitude
    off: list = field(default_factory=list)   # gradients outside the tolerance (Agreement)
    float64_error: float | None = None   # where some are: the float64 build's largest gradient error
    device: str = ""              # the OpenCL device, with --opencl


def variants_of(program) -> list[tuple[str, str]]:
    """The plan's choice for each step of an eval-mode forward (what the forward rows time; the
    training forward differs where a batchnorm folds into the kernel before it): kernel variant,
    what is fused into it, the split. A batchnorm's fold step, which makes its scale and shift
    per channel, is not listed: the kernel that applies them says so. As (kernel, text) pairs:
    the kernel, with a batched alternative's, is what the summary counts."""
    out = []
    for step in program.eval_steps:
        if step.fused_into is not None or step.folds_into is not None:
            continue                 # runs inside its producer's step, or only makes its table
        epilogue = step.epilogue.text()
        extra = f" + {epilogue}" if epilogue != "-" else ""
        kernel, also, batched = f"{step.op}/{step.variant}", "", step.batched
        if batched is not None:
            also = f", from batch {batched.min_batch} {batched.op}/{batched.variant} (threads: {batched.parallel.axis})"
            kernel += f" (from batch {batched.min_batch} {batched.op}/{batched.variant})"
        out.append((kernel, f"{step.label} {step.op}/{step.variant}{extra} (threads: {step.parallel.axis}){also}"))
    return out


def run_config(config: Config, batches, runs: int, warmup: int, threads: int, opencl: bool = False):
    graph = graph_from_file(config.path, config.network)
    compiled = compile_graph(graph)
    module = build_module(compiled)
    cl_net = build_module(compile_graph(graph, backend="opencl")).Model(seed=0) if opencl else None
    stats = collect(graph)
    rng = np.random.default_rng(0)
    net = module.Model(seed=0)
    randomize_batchnorm(net, rng)
    statistics_at_start = {name: array.copy() for name, array in net.buffers.items()}
    in_shape = tuple(graph.inputs[0].dims)
    rows = []
    for batch in batches:
        row = Row(config.title, config.key, batch, 2.0 * stats.macs * batch,
                  2.0 * (stats.macs + stats.backward_macs) * batch)
        # Every batch starts from the same batchnorm statistics on all sides (the previous
        # batch's training rounds moved them).
        for name, array in statistics_at_start.items():
            net.buffers[name][...] = array
        twin = TorchTwin(graph, net)
        twin64 = TorchTwin(graph, net).double()
        x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
        xt = torch.from_numpy(x)
        session = onnx_session(twin, xt, threads)

        # Eval mode: the three must compute what PyTorch in float64 computes.
        net.eval()
        twin.eval()
        twin64.eval()
        with torch.no_grad():
            y32 = twin(xt).numpy()
            y64 = twin64(xt.double()).numpy()
        errors = [agree(f"{config.key} N={batch}: convdsl forward", net.forward(x), y32, y64),
                  agree(f"{config.key} N={batch}: onnxruntime forward", session.run(None, {"x": x})[0], y32, y64)]

        def torch_forward():
            with torch.no_grad():
                twin(xt)
        fwd = alternate([lambda: net.forward(x), lambda: session.run(None, {"x": x}), torch_forward], runs, warmup)
        if cl_net is not None:
            # The same parameters and statistics on the device (the mirrors sync at the next call).
            for name, array in net.params.items():
                cl_net.params[name][...] = array
            for name, array in statistics_at_start.items():
                cl_net.buffers[name][...] = array
            cl_net.eval()
            errors.append(agree(f"{config.key} N={batch}: OpenCL forward", cl_net.forward(x), y32, y64))
            row.device = cl_net.device
            cl_fwd = alternate([lambda: net.forward(x), lambda: cl_net.forward(x)], runs, warmup)
            row.ms["opencl"] = statistics.median(cl_fwd[1]) * 1e3
            row.ms["opencl_c_fwd"] = statistics.median(cl_fwd[0]) * 1e3

        # Training mode: batchnorm on the batch's statistics; forward then backward, computing
        # the input's gradient and every parameter's.
        net.train()
        twin.train()
        twin64.train()
        y = net.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dyt = torch.from_numpy(dy)
        xg = xt.clone().requires_grad_(True)
        xg64 = xt.double().requires_grad_(True)
        yt, yt64 = twin(xg), twin64(xg64)
        errors.append(agree(f"{config.key} N={batch}: convdsl training forward", y, yt.detach().numpy(),
                            yt64.detach().numpy()))
        yt.backward(dyt)
        yt64.backward(dyt.double())
        gradients = [agree(f"{config.key} N={batch}: convdsl dx", net.backward(dy), xg.grad.numpy(),
                           xg64.grad.numpy(), strict=False)]
        grads32, grads64 = twin.grads(), twin64.grads()
        for name, grad in net.grads.items():
            gradients.append(agree(f"{config.key} N={batch}: convdsl d{name}", grad, grads32[name].numpy(),
                                   grads64[name].numpy(), strict=False))

        floor = FLOAT64_SCALE_FLOOR * max(a.scale for a in gradients)
        if any(not a.within for a in gradients):
            # Rounding amplified by the network, or a wrong kernel? The same kernels in float64.
            row.float64_error, which = float64_check(graph, net, statistics_at_start, x, dy, xg64.grad.numpy(),
                                                     {name: g.numpy() for name, g in grads64.items()})
            print(f"  float64 build: gradients within {row.float64_error:.1e} of PyTorch float64's (the "
                  f"largest: {which})", flush=True)
            if row.float64_error > FLOAT64_AGREE and any(a.gross(floor) for a in gradients):
                worst = max(gradients, key=lambda a: a.error)
                raise AssertionError(f"{worst.what} is off by {worst.error:.1e} of its scale in float32, and the "
                                     f"float64 build's {which} by {row.float64_error:.1e}: a kernel computes "
                                     "something else")
            for name, array in statistics_at_start.items():      # the float32 run's starting point again
                net.buffers[name][...] = array

        def ours_train():
            net.forward(x)
            net.backward(dy)

        if cl_net is not None:
            cl_net.train()
            for name, array in statistics_at_start.items():
                cl_net.buffers[name][...] = array
            cl_net.forward(x)
            cl_gradients = [agree(f"{config.key} N={batch}: OpenCL dx", cl_net.backward(dy), xg.grad.numpy(),
                                  xg64.grad.numpy(), strict=False)]
            for name, grad in cl_net.grads.items():
                cl_gradients.append(agree(f"{config.key} N={batch}: OpenCL d{name}", grad, grads32[name].numpy(),
                                          grads64[name].numpy(), strict=False))
            # The float64 check ran the C kernels only: a gross OpenCL gradient stops the config.
            gross = [a for a in cl_gradients if a.gross(floor)]
            if gross:
                raise AssertionError(f"{gross[0].what} is off by {gross[0].error:.1e} of its scale")
            gradients += cl_gradients

            def opencl_train():
                cl_net.forward(x)
                cl_net.backward(dy)
            cl_train = alternate([ours_train, opencl_train], runs, warmup)
            row.ms["opencl_train"] = statistics.median(cl_train[1]) * 1e3
            row.ms["opencl_c_train"] = statistics.median(cl_train[0]) * 1e3

        def torch_train():
            twin.zero_grad(set_to_none=True)
            xg.grad = None
            twin(xg).backward(dyt)
        train = alternate([ours_train, torch_train], runs, warmup)

        row.ms.update({name: statistics.median(t) * 1e3 for name, t in
                       zip(("convdsl", "onnxruntime", "torch", "convdsl_train", "torch_train"), fwd + train)})
        row.fwd_ratio = median_ratio(fwd[0], fwd[1])
        row.fwd_torch_ratio = median_ratio(fwd[0], fwd[2])
        row.train_ratio = median_ratio(train[0], train[1])
        row.error = max(a.error for a in errors)
        row.off = sorted((a for a in gradients if not a.within), key=lambda a: -a.error / max(a.torch_error, 1e-12))
        rows.append(row)
        print(f"  N={batch}: convdsl/onnxruntime fwd {row.fwd_ratio:.2f}, convdsl/PyTorch fwd+bwd "
              f"{row.train_ratio:.2f}", flush=True)
        for a in row.off:
            print(f"  warning: {a.what} is off by {a.error:.1e} of its scale (PyTorch float32: "
                  f"{a.torch_error:.1e}), outside the tolerance", flush=True)
    return rows, variants_of(compiled.program)


# ---- the report ---------------------------------------------------------------------------

def command_line() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return " ".join(filter(None, [env, "python benchmarks/bench.py", *sys.argv[1:]]))


def rate(flops: float, ms: float, peak: float) -> str:
    if flops == 0:
        return "–"
    gflops = flops / (ms * 1e-3) / 1e9
    return f"{gflops:.1f} ({100 * gflops / peak:.0f}%)"


def mark(ratio: float, target: float) -> str:
    return f"**{ratio:.2f}**" if ratio <= target else f"{ratio:.2f}"


def report(rows, variants, peak: FmaPeak, threads: int, runs: int, warmup: int, started: datetime,
           refused=()) -> str:
    cpu = cpu_description()
    p = peak.gflops
    lines = [
        "# convdsl vs onnxruntime and PyTorch", "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `benchmarks/bench.py` on convdsl {convdsl.__version__} "
        f"(commit {git_commit()}). Produced by:", "",
        f"    {command_line()}", "",
        "### Machine", "",
        f"- CPU: {cpu['model']}; vector flags: {cpu['flags']}",
        f"- {cpu['cpus']}; **{threads} thread{'s' if threads > 1 else ''}** for every side (OpenMP for convdsl, "
        f"torch.set_num_threads({threads}), onnxruntime intra_op_num_threads={threads}, sequential execution, "
        "all graph optimisations)",
        f"- float32 FMA peak measured by `benchmarks/fma_peak.c` (-O3 -march=native, {peak.lanes} lanes × "
        f"{peak.accumulators} accumulators): **{p:.0f} GFLOP/s on {threads} thread{'s' if threads > 1 else ''}** "
        "(the best of all its bursts in the run" + (f"; {peak.best[1] / 1e9:.0f} GFLOP/s on 1 thread)" if threads > 1 else ")"),
        f"- torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}, {compiler_version()} (convdsl's kernels)",
        "",
        f"Median of {runs} rounds after {warmup} warm-up rounds, the sides timed in alternation; a ratio is "
        "the median over the rounds of convdsl's time over the other's in the same round (below 1: convdsl "
        f"is faster; **bold**: issue 10's target met, forward ≤ {TARGET_FWD:g}× onnxruntime, forward+backward "
        f"≤ {TARGET_TRAIN:g}× PyTorch). Forward: eval mode, PyTorch under no_grad. Forward+backward: training "
        "mode (batchnorm on the batch's statistics), both computing the input gradient and every parameter "
        "gradient. GFLOP/s counts 2 FLOPs per MAC as `convdsl check` counts them (forward+backward: forward + "
        "backward MACs); in brackets, the share of the FMA peak above. float32, NCHW, N = batch. Before "
        "timing, convdsl and onnxruntime agreed with PyTorch in float64 on the output (eval and training "
        f"mode), and convdsl on the input gradient and every parameter gradient, within rtol {RTOL:g} and atol "
        f"{ATOL_OF_SCALE:g} × the largest magnitude (or twice PyTorch float32's own error, where that is larger: "
        "training-mode batchnorm over a few values amplifies rounding; † marks gradients outside that); the "
        f"largest error of an output was {max((r.error for r in rows), default=0.0):.1e} of its largest magnitude.", "",
        "### Summary (issue 10's table)", "",
        "| config | N | convdsl / onnxruntime fwd | convdsl / PyTorch fwd+bwd |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.title} | {r.batch} | {mark(r.fwd_ratio, TARGET_FWD)} | "
                     f"{mark(r.train_ratio, TARGET_TRAIN)}{' †' if r.off else ''} |")
    off = [r for r in rows if r.off]
    if off:
        lines += ["", "† some float32 gradients there are outside the tolerance; the same network built in "
                      f"float64 (the same kernels with double for float) then agreed with PyTorch float64 within "
                      f"{FLOAT64_AGREE:g} of each gradient's scale (at least {FLOAT64_SCALE_FLOOR:g} of the largest "
                      "gradient scale), so the float32 error is the network amplifying "
                      "rounding, not a kernel computing something else, and the row is timed. The worst float32 "
                      "ones, as a share of each one's largest magnitude, against PyTorch float32's own error, and "
                      "the float64 build's largest error:", ""]
        for r in off:
            worst = "; ".join(f"{a.what.split(': ', 1)[1]} {a.error:.1e} (PyTorch {a.torch_error:.1e})"
                              for a in r.off[:3])
            f64 = f"; float64 build {r.float64_error:.1e}" if r.float64_error is not None else ""
            lines.append(f"- {r.title}, N={r.batch}: {len(r.off)} gradients; {worst}{f64}")
    if refused:
        lines += ["", f"Not timed: these configs' outputs differ from PyTorch float64 beyond the tolerance, or "
                      f"their gradients by more than {GROSS:g} of their scale with the float64 build off too:", ""]
        lines += [f"- {title}: {reason}" for title, reason in refused]
    lines += [
        "", "### Forward (inference)", "",
        "| config | N | GFLOP | convdsl ms | onnxruntime ms | PyTorch ms | convdsl / onnxruntime | "
        "convdsl / PyTorch | convdsl GFLOP/s (% peak) | onnxruntime GFLOP/s (% peak) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.title} | {r.batch} | {r.fwd_flops / 1e9:.3g} | {r.ms['convdsl']:.3f} | "
                     f"{r.ms['onnxruntime']:.3f} | {r.ms['torch']:.3f} | {r.fwd_ratio:.2f} | "
                     f"{r.fwd_torch_ratio:.2f} | {rate(r.fwd_flops, r.ms['convdsl'], p)} | "
                     f"{rate(r.fwd_flops, r.ms['onnxruntime'], p)} |")
    lines += [
        "", "### Forward + backward (training)", "",
        "| config | N | GFLOP | convdsl ms | PyTorch ms | convdsl / PyTorch | convdsl GFLOP/s (% peak) | "
        "PyTorch GFLOP/s (% peak) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.title} | {r.batch} | {r.train_flops / 1e9:.3g} | {r.ms['convdsl_train']:.3f} | "
                     f"{r.ms['torch_train']:.3f} | {r.train_ratio:.2f} | "
                     f"{rate(r.train_flops, r.ms['convdsl_train'], p)} | {rate(r.train_flops, r.ms['torch_train'], p)} |")
    cl_rows = [r for r in rows if "opencl" in r.ms]
    if cl_rows:
        lines += [
            "", f"### OpenCL backend ({cl_rows[0].device})", "",
            "Timed in rounds alternating with the C backend (its times in these rounds beside them); the "
            "OpenCL side's forward includes writing the input to the device and reading the output back, "
            "its forward+backward the gradients' reads too.", "",
            "| config | N | OpenCL fwd ms | C fwd ms | OpenCL / C fwd | OpenCL fwd+bwd ms | C fwd+bwd ms | "
            "OpenCL / C fwd+bwd | OpenCL / PyTorch fwd+bwd |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in cl_rows:
            m = r.ms
            lines.append(f"| {r.title} | {r.batch} | {m['opencl']:.3f} | {m['opencl_c_fwd']:.3f} | "
                         f"{m['opencl'] / m['opencl_c_fwd']:.2f} | {m['opencl_train']:.3f} | {m['opencl_c_train']:.3f} | "
                         f"{m['opencl_train'] / m['opencl_c_train']:.2f} | {m['opencl_train'] / m['torch_train']:.2f} |")
    lines += ["", "### What the plan chose (eval-mode forward steps of each convdsl config)", ""]
    for (title, key), steps in variants.items():
        if len(steps) <= 3:
            lines.append(f"- {title}: " + "; ".join(text for _, text in steps))
            continue
        counts: dict[str, int] = {}
        for kernel, _ in steps:
            counts[kernel] = counts.get(kernel, 0) + 1
        lines.append(f"- {title}: {len(steps)} steps, " + ", ".join(f"{k} ×{n}" for k, n in counts.items()))
        lines += ["  <details><summary>per layer</summary>", "", *(f"  - {text}" for _, text in steps), "",
                  "  </details>"]
    return "\n".join(lines) + "\n"


def write_results(text: str, out: Path) -> None:
    # Keep the hand-written sections (## headings) below the table when the table is refreshed.
    previous = out.read_text() if out.exists() else ""
    marker = "\n## "
    out.write_text(text + (previous[previous.index(marker):] if marker in previous else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per measurement (default 20)")
    parser.add_argument("--only", default="", help="comma-separated config keys: " + ",".join(c.key for c in CONFIGS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every config at its smallest batch, 2 rounds after 1 warm-up; "
                             "writes nothing unless --out is given")
    parser.add_argument("--opencl", action="store_true",
                        help="also time the OpenCL backend (on CONVDSL_OPENCL_DEVICE, else the first device)")
    parser.add_argument("--out", default=None, help="markdown file to (re)write (default benchmarks/RESULTS.md); "
                                                    "'-' for none")
    args = parser.parse_args()
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(wanted) - {c.key for c in CONFIGS})
    if unknown:
        parser.error(f"unknown config {', '.join(unknown)}; the configs are {', '.join(c.key for c in CONFIGS)}")
    configs = [c for c in CONFIGS if not wanted or c.key in wanted]
    runs, warmup = (2, 1) if args.quick else (args.runs, WARMUP)
    out = args.out if args.out is not None else ("-" if args.quick else str(HERE / "RESULTS.md"))

    started = datetime.now(timezone.utc)
    threads = omp_threads()
    torch.set_num_threads(threads)
    print(f"threads: {threads} (OpenMP for convdsl, torch.set_num_threads, onnxruntime intra_op_num_threads)",
          flush=True)
    peak = FmaPeak(threads)
    peak.sample()
    print(f"FMA peak so far: {peak.gflops:.0f} GFLOP/s on {threads} thread(s)", flush=True)
    rows, variants, refused = [], {}, []
    for config in configs:
        batches = config.batches[:1] if args.quick else config.batches
        print(f"{config.key}: {config.title}", flush=True)
        try:
            config_rows, steps = run_config(config, batches, runs, warmup, threads, args.opencl)
        except AssertionError as e:
            # A config whose results disagree with PyTorch is not timed (a wrong kernel must not
            # look fast), and the others still are; the table says which and why.
            reason = " ".join(line.strip() for line in str(e).strip().splitlines()[:4] if line.strip())
            print(f"  not timed: {reason}", flush=True)
            refused.append((config.title, reason))
            continue
        rows += config_rows
        variants[(config.title, config.key)] = steps
        peak.sample(bursts=5)
    peak.sample()
    text = report(rows, variants, peak, threads, runs, warmup, started, refused)
    print(text)
    if out != "-":
        write_results(text, Path(out))
        print(f"wrote the table to the top of {out}")


if __name__ == "__main__":
    main()
