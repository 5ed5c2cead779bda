"""The pipeline in one place: text → AST → IR → checked IR → plan → C → module."""
from __future__ import annotations

import types
from dataclasses import dataclass

from .codegen.render import CSource, check_module_names, render_c
from .errors import ConvDSLError
from .ir import dims as D
from .ir.build import build_graph, load_program
from .ir.graph import Graph
from .frontend.parser import file_end, parse, parse_file
from .ops.losses import LOSSES
from .lower import Program, lower
from .passes.schedule import buffer_layout
from .passes.verify import verify


def _program(module):
    """A parsed file's program, refused when its networks' module names would break imports."""
    program = load_program(module)
    check_module_names(program.networks)
    return program


def graph_from_source(text: str, path: str = "<string>", network: str | None = None) -> Graph:
    return verify(build_graph(_program(parse(text, path)), network))


def graph_from_file(path, network: str | None = None) -> Graph:
    return verify(build_graph(_program(parse_file(path)), network))


def graphs_from_file(path, network: str | None = None) -> tuple[Graph, ...]:
    """The named network of a file, or every one of them, from one parse of the file (and of the
    files it uses): a file of many networks is not re-read once per network."""
    program = _program(parse_file(path))
    if network is not None:
        return (verify(build_graph(program, network)),)
    if not program.networks:
        raise ConvDSLError(file_end(program.module), "no `network` in this file; a file that only defines "
                                                     "blocks is brought into another with `use`")
    return tuple(verify(build_graph(program, n.name)) for n in program.networks)


def networks_in_file(path) -> tuple[str, ...]:
    return tuple(n.name for n in _program(parse_file(path)).networks)


# Elements (per sample in the activation blocks) between tensors in a sanitizer build: 64 bytes
# of float32, past which a kernel that overruns its tensor by a little is caught.
SANITIZER_GUARD = 16


@dataclass(frozen=True)
class Compiled:
    graph: Graph
    program: Program
    source: CSource
    backend: str = "c"
    tuned: tuple = ()            # tune.Measured of each tuned layer (compile_graph(tune=True))


def compile_graph(graph: Graph, algo=None, backend: str = "c", tune: bool = False, tune_batch: int = 1) -> Compiled:
    """Lower (with `algo`, the per-run kernel variant override: {"conv": "im2col"} or
    "conv=im2col,depthwise=direct"; CONVDSL_ALGO too) and render the source for `backend`
    (`c`, or `opencl`: kernels in OpenCL C, host code in C over the OpenCL API). An op the
    backend has no kernels for is refused at its line. `tune`: each layer's variant as timed on
    this machine at batch `tune_batch` (convdsl/tune.py), where the file and `algo` leave it open."""
    from .runtime.build import sanitizing
    from .targets import target
    chosen = target(backend)
    chosen.check_supported(graph)
    # A sanitizer build of a target whose module poisons guard zones keeps every tensor apart,
    # behind one.
    guard = SANITIZER_GUARD if sanitizing() and chosen.poisons_guard_zones else 0
    tuned, measured = (), {}
    if tune:
        from .tune import measured_choice, tune as time_variants
        tuned = tuple(time_variants(graph, chosen.name, tune_batch, chosen.lacks_variants))
        measured = measured_choice(tuned)
    program = lower(graph, algo, guard=guard, lacks=chosen.lacks_variants, backend=chosen.name, measured=measured)
    return Compiled(graph, program, render_c(program, chosen), chosen.name, tuned)


def module_meta(graph: Graph, backend: str = "c") -> dict:
    """What the Python side needs to check arrays: names and shapes, nothing executable."""
    def dim(d):
        return d if isinstance(d, int) else D.to_text(d)
    inputs = [{"name": i.name, "dims": [dim(d) for d in i.dims]} for i in graph.inputs]
    outputs = [{"name": o.name} for o in graph.outputs]
    params = [(f"{layer.name}.{p.name}", tuple(p.shape), p.trainable) for layer in graph.layers for p in layer.params]
    buffers = [(b.full_name, tuple(b.spec.shape)) for b in buffer_layout(graph)]
    loss = None
    if graph.loss is not None:
        target = LOSSES[graph.loss.kind].target(graph.loss.attrs)
        loss = {"kind": graph.loss.kind, "target_kind": target.kind, "ignore_index": target.ignore_index,
                "output_index": graph.loss.output_index}
    from .codegen.render import module_name
    return {"network": graph.name, "prefix": module_name(graph.name), "dtype": graph.dtype, "backend": backend,
            "layout": graph.layout, "inputs": inputs, "outputs": outputs, "sym_dims": list(graph.sym_dims),
            "params": params, "buffers": buffers, "loss": loss}


def build_module(compiled: Compiled) -> types.ModuleType:
    """Compile (or reuse from the cache) and return a module object with `Model`."""
    from .runtime.build import build_library, load_library
    from .runtime.model import make_model_class
    src = compiled.source
    path = build_library(src.prefix, src.c, src.h, src.cdef, compiled.backend, src.kernels)
    ext = load_library(path, src.cdef)
    meta = module_meta(compiled.graph, compiled.backend)
    module = types.ModuleType(src.prefix, f"Network {compiled.graph.name}, compiled by convdsl.")
    module.Model = make_model_class(ext, meta)
    module.META = meta
    module.graph = compiled.graph
    module.program = compiled.program
    module.tuned = compiled.tuned
    module.library_path = path
    return module


def load(path, network: str | None = None, algo=None, backend: str = "c", tune: bool = False,
         tune_batch: int = 1) -> types.ModuleType:
    """Compile a .cnn file (or reuse a cached build) and return its module; writes nothing beside it.
    `algo` picks kernel variants for this build: {"conv": "im2col"} (see convdsl/lower/plan.py).
    `backend="opencl"` builds it for an OpenCL device (Model(seed, device=…) picks one).
    `tune=True` times each layer's kernel variants on this machine first (at batch `tune_batch`;
    cached, see convdsl/tune.py) and builds the fastest."""
    return build_module(compile_graph(graph_from_file(path, network), algo, backend, tune, tune_batch))


def load_source(text: str, network: str | None = None, path: str = "<string>", algo=None,
                backend: str = "c", tune: bool = False, tune_batch: int = 1) -> types.ModuleType:
    return build_module(compile_graph(graph_from_source(text, path, network), algo, backend, tune, tune_batch))
