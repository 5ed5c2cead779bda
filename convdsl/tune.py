"""`--tune`: each layer's kernel variant measured on this machine instead of estimated.

For every layer with more than one usable variant (the conv family: im2col, pointwise,
blocked, Winograd, direct; see `convdsl plan`), the tuner builds a network of that layer alone
for each variant, with the layer's own input shapes, and times it: a training-mode forward and
backward when the network declares a loss (what `train_step` runs), an eval-mode forward
otherwise. The variants are timed in alternating rounds and the median wins; the plan then
takes that variant for the layer (convdsl/lower/plan.py: after `algo=` and a per-run override,
before the cost estimate).

A result is kept in the build cache (`tuning/<key>.json` under the cache root), keyed by
everything that changes the timing: the op, its attributes, its input and output shapes, the
dtype and layout, the batch tuned for, training or inference, the backend, the compiler flags,
the CPU, and convdsl's own sources and templates (other kernels are timed again). The next build of a layer of that shape reads it and times nothing; a file that
cannot be read, or that names a variant the layer no longer has, is measured again.

Not tuned: a layer whose variant the file fixes (`algo=`), one with run-time sizes (its shape,
and so the fastest variant, is not known before the run), one with a single usable variant;
nor a variant that differs from another only in what the plan fuses into it (`Variant.timed_alone`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .errors import ConvDSLError
from .ir.graph import Graph, InputDecl, Node, OutputDecl, Value
from .lower.plan import applicable_variants
from .ops.base import lookup

TUNE_VERSION = "convdsl-tune-1"
ROUNDS = 7                # alternating rounds of every variant; the median of each wins
ROUND_SECONDS = 0.01      # a round times as many calls in a row as take about this long


@dataclass(frozen=True)
class Measured:
    """The tuning of one layer: the variant chosen, the median seconds per call of each one timed,
    and whether it came from the cache."""
    node: int                 # its node id
    label: str
    variant: str
    seconds: MappingProxyType
    cached: bool


def tunable_nodes(graph: Graph, lacks: frozenset[str] = frozenset(),
                  backend: str = "c") -> list[tuple[Node, tuple[str, ...]]]:
    """The layers tuning times, with the names of their variants usable on `backend`."""
    out = []
    for node in graph.nodes:
        if node.attrs.get("algo") not in (None, "auto"):
            continue
        types = [graph.values[v].type for v in (*node.inputs, node.output)]
        if not all(t.is_static() for t in types):
            continue
        usable = tuple(v.name for v in applicable_variants(lookup(node.op), node.attrs)
                       if v.name not in lacks and (not v.backends or backend in v.backends) and v.timed_alone)
        if len(usable) > 1:
            out.append((node, usable))
    return out


def layer_alone(graph: Graph, node: Node, variant: str) -> Graph:
    """A network of `node` alone, forced to `variant`: its inputs are the network's inputs, its
    output the network's output, its layer (parameters) its own."""
    sources = tuple(dict.fromkeys(node.inputs))
    renumber = {vid: i for i, vid in enumerate(sources)}
    values = tuple(Value(i, graph.values[vid].type, None, f"x{i}") for i, vid in enumerate(sources))
    out = Value(len(values), graph.values[node.output].type, 0, "y")
    alone = replace(node, id=0, inputs=tuple(renumber[v] for v in node.inputs), output=out.id,
                    attrs={**node.attrs, "algo": variant}, scope=(), block_calls=())

    def written(shape):
        return tuple(shape[1:]) + tuple(shape[:1]) if graph.layout == "NHWC" and len(shape) > 1 else tuple(shape)
    inputs = tuple(InputDecl(v.name, v.id, written(v.type.shape), node.span) for v in values)
    return replace(graph, name=f"tune_{node.op}", inputs=inputs, outputs=(OutputDecl("y", out.id, node.span),),
                   nodes=(alone,), values=values + (out,), layers=(graph.layer(node.layer),), loss=None,
                   sym_dims=())


@functools.lru_cache(maxsize=1)
def kernels_digest() -> str:
    """A digest of what generates the kernels: convdsl's Python sources and its templates. A
    timing measured with other kernels (an earlier or later convdsl) is measured again."""
    from . import resources
    digest = hashlib.sha256()
    for root in (Path(__file__).parent, resources.templates_dir()):
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".j2") and p.is_file()):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _key(graph: Graph, node: Node, variants: tuple[str, ...], batch: int, training: bool, backend: str) -> str:
    from .runtime.build import _compiler_version, _cpu_id, c_flags, compiler
    attrs = sorted((k, repr(v)) for k, v in node.attrs.items() if k != "algo")
    types = [graph.values[v].type.shape for v in (*node.inputs, node.output)]
    parts = (TUNE_VERSION, node.op, repr(attrs), repr(types), graph.dtype, graph.layout, str(batch),
             str(training), backend, " ".join(c_flags(backend)), _compiler_version(compiler()), _cpu_id(),
             ",".join(variants), kernels_digest())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _cache_file(key: str) -> Path:
    from .runtime.build import cache_root
    return cache_root() / "tuning" / f"{key[:32]}.json"


def _read(path: Path, variants: tuple[str, ...]) -> dict[str, float] | None:
    try:
        data = json.loads(path.read_text())
        seconds = {str(k): float(v) for k, v in data["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return seconds if set(seconds) == set(variants) else None


def _write(path: Path, seconds: dict[str, float]) -> None:
    """Published whole (a temporary file renamed into place), or not at all: the cache is a help."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune-")
        with os.fdopen(fd, "w") as f:
            json.dump({"seconds": seconds}, f)
        os.replace(tmp, path)


def time_calls(calls: dict, rounds: int = ROUNDS, round_seconds: float = ROUND_SECONDS) -> dict[str, float]:
    """Median seconds per call of each of `calls` (name → a function of no arguments), timed in
    alternating rounds after one warm-up call each."""
    for call in calls.values():
        call()
    repeats = {}
    for name, call in calls.items():          # as many calls per round as take round_seconds
        start = time.perf_counter()
        call()
        repeats[name] = max(1, int(round_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            samples[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def _one_call(module, graph: Graph, batch: int, training: bool):
    """A function running what is timed on the layer-alone module: forward (+ backward)."""
    rng = np.random.default_rng(0)
    net = module.Model(seed=0)
    dtype = np.float32 if graph.dtype == "f32" else np.float64
    xs = [rng.standard_normal((batch, *decl.dims)).astype(dtype) for decl in graph.inputs]
    if not training:
        net.eval()
        return lambda: net.forward(*xs)
    dy = np.ones_like(net.forward(*xs))

    def step():
        net.forward(*xs)
        net.backward(dy)
    return step


def measure(graph: Graph, node: Node, variants: tuple[str, ...], batch: int, training: bool,
            backend: str) -> dict[str, float]:
    """Median seconds per call of the layer alone in each variant."""
    from .compiler import build_module, compile_graph
    calls = {}
    for variant in variants:
        alone = layer_alone(graph, node, variant)
        calls[variant] = _one_call(build_module(compile_graph(alone, None, backend)), alone, batch, training)
    return time_calls(calls)


def tune(graph: Graph, backend: str = "c", batch: int = 1, lacks: frozenset[str] = frozenset()) -> list[Measured]:
    """Each tunable layer's fastest variant on this machine, from the cache or measured now."""
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096:
        raise ConvDSLError(None, f"tune: the batch to tune for must be an integer from 1 to 4096, got {batch!r}")
    training = graph.loss is not None
    results = []
    for node, variants in tunable_nodes(graph, lacks, backend):
        path = _cache_file(_key(graph, node, variants, batch, training, backend))
        seconds = _read(path, variants)
        cached = seconds is not None
        if not cached:
            seconds = measure(graph, node, variants, batch, training, backend)
            _write(path, seconds)
        fastest = min(variants, key=lambda v: (seconds[v], variants.index(v)))
        results.append(Measured(node.id, node.label, fastest, MappingProxyType(dict(seconds)), cached))
    return results


def measured_choice(results: list[Measured]) -> dict[int, str]:
    """node id → variant, what lower() takes as `measured`."""
    return {r.node: r.variant for r in results}


def describe(results: list[Measured]) -> list[str]:
    """One line per tuned layer, for `convdsl compile --tune`."""
    lines = []
    for r in results:
        times = ", ".join(f"{v} {s * 1e3:.3f} ms" for v, s in sorted(r.seconds.items(), key=lambda kv: kv[1]))
        lines.append(f"tune: {r.label}: {r.variant} ({times}{'; from the cache' if r.cached else ''})")
    return lines
