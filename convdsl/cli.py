"""The `convdsl` command: check, compile, plan, graph, convert, export, import."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from .errors import ConvDSLError


def _graphs(path: str, network: str | None):
    from .compiler import graphs_from_file
    return list(graphs_from_file(path, network))


def _warnings(graph, args) -> tuple:
    """The lint warnings of a graph, less the codes allowed on the command line."""
    from .passes.lints import CODES, lint
    allowed = frozenset(code.upper() for group in (args.allow or []) for code in group.replace(",", " ").split())
    unknown = sorted(allowed - set(CODES))
    if unknown:
        raise ConvDSLError(None, f"--allow: unknown warning code(s) {', '.join(unknown)}; known: {', '.join(CODES)}")
    return lint(graph, allowed)


def _report_warnings(warnings, args) -> int:
    severity = "error" if args.werror else "warning"
    for w in warnings:
        print(w.render(severity), file=sys.stderr)
    return 1 if warnings and args.werror else 0


def cmd_check(args) -> int:
    if args.json:
        return _check_json(args)
    from .targets import target
    from .passes.memory import plan_memory
    from .passes.stats import collect
    from .report import text_report
    status = 0
    backend = target(args.backend)
    for i, graph in enumerate(_graphs(args.file, args.network)):
        backend.check_supported(graph)
        warnings = _warnings(graph, args)
        if i:
            print()
        print(text_report(graph, collect(graph), plan_memory(graph)))
        status = max(status, _report_warnings(warnings, args))
    return status


def _check_json(args) -> int:
    """The report as one JSON document on stdout, errors included; stderr as without --json."""
    import json
    from .targets import target
    from .passes.memory import plan_memory
    from .passes.stats import collect
    from .report import json_document, json_network
    documents, errors, status = [], [], 0
    try:
        backend = target(args.backend)
        for graph in _graphs(args.file, args.network):
            backend.check_supported(graph)
            warnings = _warnings(graph, args)
            documents.append(json_network(graph, collect(graph), plan_memory(graph), warnings,
                                          "error" if args.werror else "warning"))
            status = max(status, _report_warnings(warnings, args))
    except ConvDSLError as e:
        errors.append(e)
        print(str(e), file=sys.stderr)
        status = 1
    print(json.dumps(json_document(documents, errors), indent=2, ensure_ascii=False))
    return status


def cmd_graph(args) -> int:
    from .graphviz import write_graph
    for path in write_graph(_graphs(args.file, args.network), Path(args.output), rankdir=args.rankdir,
                            fold=not args.no_fold, collapse=args.collapse):
        print(f"wrote {path}")
    return 0


def _algo(args) -> dict:
    """--algo conv=im2col (repeatable, or comma-separated) on top of CONVDSL_ALGO."""
    from .lower.plan import algo_override, parse_algo
    asked: dict[str, str] = {}
    for item in args.algo or []:
        asked.update(parse_algo(item, "--algo"))
    return algo_override(asked)


def cmd_plan(args) -> int:
    """The lowered program of every network of the file for the backend, one line per step (with
    `compile --tune --emit lowered`, after timing the variants)."""
    from .compiler import compile_graph
    from .lower import lower
    from .lower.show import program_text
    from .targets import target
    algo = _algo(args)
    backend = target(args.backend)
    for i, graph in enumerate(_graphs(args.file, args.network)):
        if _tuning(args)[0]:
            compiled = compile_graph(graph, algo, backend.name, *_tuning(args))
            _report_tuning(compiled)
            program = compiled.program
        else:
            backend.check_supported(graph)
            program = lower(graph, algo, lacks=backend.lacks_variants, backend=backend.name)
        if i:
            print()
        print(program_text(program), end="")
    return 0


def _tuning(args) -> tuple[bool, int]:
    return getattr(args, "tune", False), getattr(args, "tune_batch", 1)


def _report_tuning(compiled) -> None:
    from .tune import describe
    for line in describe(list(compiled.tuned)):
        print(line, file=sys.stderr)


def cmd_compile(args) -> int:
    from .compiler import compile_graph, module_meta
    from .codegen.render import comment_safe, environment
    from .runtime.build import C_FLAGS, build_library, file_digest
    import shutil
    if args.emit == "lowered":
        return cmd_plan(args)
    out = Path(args.output)
    status = 0
    algo = _algo(args)
    written = []
    graphs = _graphs(args.file, args.network)
    if args.weights and len(graphs) > 1:
        raise ConvDSLError(None, f"compile --weights: {args.file} holds {len(graphs)} networks "
                                 f"({', '.join(g.name for g in graphs)}); say which with --network")
    builtin = set()
    for graph in graphs:
        status = max(status, _report_warnings(_warnings(graph, args), args))
        if status:
            continue
        compiled = compile_graph(graph, algo, args.backend, *_tuning(args))
        _report_tuning(compiled)
        src = compiled.source
        weights_c = None
        if args.weights:          # checked before anything is written
            from .codegen.weights import checked_state, render_weights
            state = checked_state(compiled.program, _weights_file(args.weights, graph), f"--weights {args.weights}")
            weights_c = render_weights(compiled.program, src.prefix, graph.name, state, Path(args.weights).name)
        so_path = build_library(src.prefix, src.c, src.h, src.cdef, compiled.backend, src.kernels)
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{src.prefix}.c").write_text(src.c)
            (out / f"{src.prefix}.h").write_text(src.h)
            if src.kernels is not None:       # the same file for every network of its element type
                (out / f"{src.kernels.name}.c").write_text(src.kernels.c)
            shutil.copyfile(so_path, out / so_path.name)
            size, sha256 = file_digest(out / so_path.name)
            py = environment().get_template("python/module.py.j2").render(
                network=graph.name, source_name=comment_safe(Path(graph.source_path).name), prefix=src.prefix,
                meta_literal=repr(module_meta(graph, compiled.backend)), cdef_literal=repr(src.cdef),
                so_name_literal=repr(so_path.name), so_size=size, so_sha256_literal=repr(sha256))
            (out / f"{src.prefix}.py").write_text(py)
            if weights_c is not None:
                (out / f"{src.prefix}_weights.c").write_text(weights_c)
                builtin.add(src.prefix)
        kernels = src.kernels.name if src.kernels is not None else None
        written.append((graph.name, src.prefix, kernels))
        print(f"{graph.name}: wrote {out / (src.prefix + '.c')}, {src.prefix}.h, "
              + (f"{kernels}.c (the kernel library it calls), " if kernels else "")
              + f"{src.prefix}.py and {so_path.name}"
              + (f"; {src.prefix}_weights.c holds the weights of {args.weights}, built into the C library"
                 if src.prefix in builtin else ""))
    if written:
        with _writing(out):
            _write_makefile(out, Path(args.file).name, written, C_FLAGS, args.backend, builtin)
    return status


@contextlib.contextmanager
def _writing(out: Path):
    """An output folder that cannot be written (a file of that name, no space left, a name
    too long for the system) is an error message, not a traceback."""
    try:
        yield
    except OSError as e:
        where = e.filename or out
        reason = "it is a file, not a folder" if out.is_file() else (e.strerror or str(e))
        raise ConvDSLError(None, f"cannot write the compiled network to {where}: {reason}") from None


def _write_makefile(out: Path, source: str, written: list[tuple[str, str, str | None]], c_flags: tuple[str, ...],
                    backend: str = "c", builtin: set = frozenset()) -> None:
    """A Makefile beside the C files: static and shared libraries and a demo program, built with
    the flags of convdsl's own builds (OpenMP, OpenCL and PIC are the Makefile's business).
    `written` holds (network, prefix, kernel library stem or None) for each network."""
    from .codegen.render import comment_safe, environment
    one = len(written) == 1
    networks = [{"name": name, "prefix": prefix, "demo_target": "demo" if one else f"{prefix}_demo",
                 "builtin_weights": prefix in builtin, "kernels": kernels} for name, prefix, kernels in written]
    libraries = [f"lib{prefix}.{kind}" for _, prefix, _ in written for kind in ("a", "so")]
    kernel_libraries = sorted({kernels for _, _, kernels in written if kernels})
    text = environment().get_template("c/Makefile.j2").render(
        networks=networks, libraries=libraries, kernel_libraries=kernel_libraries,
        source_name=comment_safe(source), backend=backend,
        optimise_flags=[f for f in c_flags if f not in ("-fopenmp", "-fPIC") and not f.startswith("-fvisibility")])
    (out / "Makefile").write_text(text)
    print(f"wrote {out / 'Makefile'}: `make -C {out}` builds {', '.join(libraries)}; "
          f"`make -C {out} {networks[0]['demo_target']} DEMO=program.c` links a C program against it")


def cmd_convert(args) -> int:
    from .rewrite.fc_to_conv import convert_file
    if not args.fc_to_conv:
        raise ConvDSLError(None, "convert: say which transformation (--fc-to-conv)")
    if args.weights_out and not args.weights:
        raise ConvDSLError(None, "convert: --weights-out needs --weights")
    out = Path(args.output)
    conversion = convert_file(args.file, out, network=args.network, weights=args.weights,
                              weights_out=args.weights_out)
    done = ", ".join(f"{d.label} -> {conversion.new_label(d.label)}" for d in conversion.dense)
    print(f"{conversion.network}: wrote {out} ({done})")
    if args.weights:
        target = Path(args.weights_out) if args.weights_out else out.with_suffix(".npz")
        print(f"{conversion.network}: wrote {target} ({len(conversion.moves)} arrays)")
    return 0


def _weights_file(path: str, graph) -> dict:
    """The arrays of an .npz weight file (Model.save), or a clear error when it cannot be read."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise ConvDSLError(None, f"--weights {path}: cannot read the weights of {graph.name} ({e})") from None


def _initial_state(graph, algo=None) -> dict:
    """A network's weights as a new Model(seed=0) has them (the C demo's, with no weight file)."""
    from .compiler import build_module, compile_graph
    return build_module(compile_graph(graph, algo)).Model(seed=0).state_dict()


def cmd_export(args) -> int:
    from .onnx import require_onnx
    from .onnx.export import export_graph
    onnx = require_onnx()
    graphs = _graphs(args.file, args.network)
    if len(graphs) > 1:
        raise ConvDSLError(None, f"export: {args.file} holds {len(graphs)} networks "
                                 f"({', '.join(g.name for g in graphs)}); say which with --network")
    (graph,) = graphs
    if args.weights:
        state = _weights_file(args.weights, graph)
        expected = {f"{layer.name}.{p.name}" for layer in graph.layers for p in layer.params}
        missing = sorted(expected - set(state))
        if missing:
            raise ConvDSLError(None, f"--weights {args.weights}: no {', '.join(missing[:5])}"
                                     + (" …" if len(missing) > 5 else "") + f" for {graph.name}")
    else:
        state = _initial_state(graph)
    model = export_graph(graph, state)
    out = Path(args.output)
    with _writing(out.parent if str(out.parent) else Path(".")):
        onnx.save(model, str(out))
    where = f"the weights of {args.weights}" if args.weights else "the weights of Model(seed=0)"
    print(f"{graph.name}: wrote {out} (opset {model.opset_import[0].version}, {len(model.graph.node)} nodes, {where})")
    return 0


def cmd_import(args) -> int:
    import numpy as np
    from .onnx.importer import import_model
    out = Path(args.output)
    if out.suffix != ".cnn":
        raise ConvDSLError(None, f"import: the output is a .cnn file, got {out}")
    text, weights, name = import_model(args.model, out, args.network, args.loss)
    weights_path = out.with_suffix(".npz")
    with _writing(out.parent if str(out.parent) else Path(".")):
        out.write_text(text)
        np.savez(weights_path, **weights)
    print(f"{name}: wrote {out} and {weights_path} ({len(weights)} arrays; net.load({str(weights_path)!r}))")
    return 0


def _lint_options(p) -> None:
    p.add_argument("--allow", action="append", metavar="CODE", help="silence a warning code (repeatable)")
    p.add_argument("--werror", action="store_true", help="treat warnings as errors")


def _backend_option(p) -> None:
    p.add_argument("--backend", choices=("c", "opencl"), default="c",
                   help="c: C kernels with OpenMP (the default); opencl: OpenCL C kernels with C host code over "
                        "the OpenCL API (-lOpenCL), for any OpenCL device (CONVDSL_OPENCL_DEVICE picks one)")


def _algo_option(p) -> None:
    p.add_argument("--algo", action="append", metavar="OP=VARIANT",
                   help="run every OP layer with this kernel variant where it applies, e.g. conv=im2col "
                        "(repeatable or comma-separated; also the CONVDSL_ALGO environment variable)")
FILE_HELP = "a .cnn source file (the language: docs/language.md)"

ENVIRONMENT = """\
environment:
  OMP_NUM_THREADS    threads the compiled kernels run on (OpenMP; default: every core)
  CONVDSL_CACHE_DIR  where compiled modules are cached (default: $XDG_CACHE_HOME/convdsl,
                     else ~/.cache/convdsl); safe to delete
  CC                 the C compiler (default: cc); it needs OpenMP, as gcc has
  CONVDSL_OPT        the optimisation level of the builds (default: -O3; -O1 compiles faster)
  CONVDSL_ALGO       kernel variants to force, e.g. conv=im2col (as --algo)
  CONVDSL_MARCH      the instruction set of the builds, a gcc -march name (default: native;
                     e.g. x86-64-v3 for any AVX2 machine)
  CONVDSL_OPENCL_DEVICE  --backend opencl: the device, as P:D, an index or part of its name
                     (default: the first one found)
  CONVDSL_OPENCL_OPTIONS  --backend opencl: options added to the OpenCL compiler's
  CONVDSL_OPENCL_CACHE_DIR  --backend opencl: where device binaries are cached
                     (default: opencl/ in the module cache)
"""

EPILOG = """\
examples:
  convdsl check examples/lenet5.cnn          shapes, parameters, MACs, receptive fields, warnings
  convdsl compile examples/lenet5.cnn -o build/ && make -C build
  convdsl compile --help                     what compile writes

""" + ENVIRONMENT

COMPILE_EPILOG = """\
For each network NAME of FILE (lower-cased), OUTPUT receives:
  NAME.c, NAME.h       the C library, with no Python in it (examples/c_api_demo.c uses it)
  NAME_weights.c       with --weights W.npz: those weights as C data, built into the library by
                       the Makefile, so that NAME_create() starts from them
  NAME.py, _NAME_*.so  an importable Python module: sys.path.insert(0, OUTPUT); import NAME
  Makefile             `make -C OUTPUT` builds libNAME.a and libNAME.so (-O3 -march=native,
                       OpenMP); `make -C OUTPUT demo DEMO=program.c` builds OUTPUT/NAME_demo
                       from a C program (DEMO is relative to OUTPUT)

""" + ENVIRONMENT


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="convdsl", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Check .cnn network files and compile them to C kernels (forward, backward and\n"
                    "training), wrapped as a Python module and as a plain C library.")
    parser.add_argument("--version", action="version", version=f"convdsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check", help="check a file and report shapes, parameters, MACs, receptive fields",
                       description="Check FILE and print, per layer, shapes, parameters, MACs and receptive\n"
                                   "fields, then totals and warnings. Exit status 1 on an error (or on a\n"
                                   "warning, with --werror).",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ENVIRONMENT)
    p.add_argument("file", metavar="FILE", help=FILE_HELP)
    p.add_argument("--network", help="only this network of the file")
    p.add_argument("--json", action="store_true", help="the report as JSON (docs/check-report.schema.json)")
    _backend_option(p)
    _lint_options(p)
    p.set_defaults(run=cmd_check)
    p = sub.add_parser("compile", help="write the C library, a Makefile and an importable Python module",
                       description="Compile FILE to C and write it to OUTPUT with a Makefile and an importable\n"
                                   "Python module.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMPILE_EPILOG)
    p.add_argument("file", metavar="FILE", help=FILE_HELP)
    p.add_argument("-o", "--output", metavar="OUTPUT", default="build", help="output folder (default: build)")
    p.add_argument("--network", help="only this network of the file")
    p.add_argument("--weights", metavar="W.npz",
                   help="build these weights (saved by Model.save) into the C library: NAME_weights.c, and "
                        "NAME_create() starts from them")
    p.add_argument("--emit", choices=("module", "lowered"), default="module",
                   help="module: C, header and Python module (the default); lowered: print the lowered program "
                        "(as `convdsl plan`) and write nothing")
    _backend_option(p)
    _algo_option(p)
    p.add_argument("--tune", action="store_true",
                   help="time each layer's kernel variants on this machine and build the fastest (the result is "
                        "cached in the build cache; what was chosen is printed)")
    p.add_argument("--tune-batch", type=int, default=1, metavar="N",
                   help="the batch size --tune times at (default 1)")
    _lint_options(p)
    p.set_defaults(run=cmd_compile)
    p = sub.add_parser("export", help="write the network as an ONNX model (opset 17, a symbolic batch axis)",
                       description="Write the network of FILE as an ONNX model whose onnxruntime outputs equal\n"
                                   "the compiled module's forward in inference mode. local and tiled layers have\n"
                                   "no ONNX form. Needs the onnx extra: pip install 'convdsl[onnx]'.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help=FILE_HELP)
    p.add_argument("-o", "--output", required=True, metavar="NET.onnx", help="the ONNX file to write")
    p.add_argument("--weights", metavar="W.npz",
                   help="weights saved by Model.save (default: those of Model(seed=0), which needs a C compiler)")
    p.add_argument("--network", help="the network to export, when the file holds several")
    p.set_defaults(run=cmd_export)
    p = sub.add_parser("import", help="turn an ONNX model into a .cnn file and its weights (.npz)",
                       description="Write the network of an ONNX model as OUT.cnn (named layers, one line per\n"
                                   "layer, comments naming the ONNX nodes) and its weights as OUT.npz, under the\n"
                                   "compiled module's parameter names (Model.load). Needs the onnx extra.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX file to read")
    p.add_argument("-o", "--output", required=True, metavar="OUT.cnn",
                   help="the .cnn file to write (the weights beside it, as OUT.npz)")
    p.add_argument("--network", help="the network's name (default: from OUT's file name)")
    p.add_argument("--loss", metavar="LOSS", help="add `loss LOSS(first output)` (softmax_cross_entropy or mse), "
                                                  "so that the module has train_step")
    p.set_defaults(run=cmd_import)
    p = sub.add_parser("plan", help="print the lowered program: per step its kernel variant, operands, "
                                    "epilogue, workspace and threads")
    p.add_argument("file")
    p.add_argument("--network", help="only this network of the file")
    _algo_option(p)
    _backend_option(p)
    p.set_defaults(run=cmd_plan)
    p = sub.add_parser("graph", help="draw the network: DOT always, SVG/PNG/PDF with Graphviz installed")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, help="net.dot, net.svg, net.png or net.pdf")
    p.add_argument("--network", help="only this network of the file")
    p.add_argument("--rankdir", choices=("TB", "LR", "BT", "RL"), default="TB",
                   help="direction of the data flow: top to bottom (default), left to right, bottom to top, "
                        "right to left")
    p.add_argument("--collapse", action="store_true",
                   help="draw each block instance as one box with the shapes going in and out")
    p.add_argument("--no-fold", action="store_true",
                   help="a box for every op (by default relu, batchnorm, dropout and the other position-wise "
                        "ops are drawn in the box of the layer before them)")
    p.set_defaults(run=cmd_graph)
    p = sub.add_parser("convert", help="transform a network: --fc-to-conv turns its dense head into convolutions")
    p.add_argument("file", metavar="FILE", help=FILE_HELP)
    p.add_argument("--fc-to-conv", action="store_true",
                   help="the dense layers after the last spatial map become equivalent convolutions (§2.5)")
    p.add_argument("-o", "--output", required=True, help="the new .cnn file")
    p.add_argument("--weights", help="a weight file of the network (.npz from Model.save) to convert too")
    p.add_argument("--weights-out", help="where the converted weights go (default: OUTPUT with .npz)")
    p.add_argument("--network", help="the network to convert, when the file holds several")
    p.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConvDSLError as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
