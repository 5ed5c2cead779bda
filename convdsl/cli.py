"""The `convdsl` command: check, compile, graph, convert."""
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
    """The lowered program of every network of the file, one line per step."""
    from .targets import C
    from .lower import lower
    from .lower.show import program_text
    algo = _algo(args)
    for i, graph in enumerate(_graphs(args.file, args.network)):
        C.check_supported(graph)
        if i:
            print()
        print(program_text(lower(graph, algo)), end="")
    return 0


def cmd_compile(args) -> int:
    from .compiler import compile_graph, module_meta
    from .codegen.render import comment_safe, environment
    from .runtime.build import C_FLAGS, build_extension, file_digest
    import shutil
    if args.emit == "lowered":
        return cmd_plan(args)
    out = Path(args.output)
    status = 0
    algo = _algo(args)
    written = []
    for graph in _graphs(args.file, args.network):
        status = max(status, _report_warnings(_warnings(graph, args), args))
        if status:
            continue
        compiled = compile_graph(graph, algo, args.backend)
        src = compiled.source
        ext_name, so_path = build_extension(src.prefix, src.c, src.h, src.cdef, compiled.backend)
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{src.prefix}.c").write_text(src.c)
            (out / f"{src.prefix}.h").write_text(src.h)
            shutil.copyfile(so_path, out / so_path.name)
            size, sha256 = file_digest(out / so_path.name)
            py = environment().get_template("python/module.py.j2").render(
                network=graph.name, source_name=comment_safe(Path(graph.source_path).name), prefix=src.prefix,
                meta_literal=repr(module_meta(graph, compiled.backend)), ext_name_literal=repr(ext_name),
                so_name_literal=repr(so_path.name), so_size=size, so_sha256_literal=repr(sha256))
            (out / f"{src.prefix}.py").write_text(py)
        written.append((graph.name, src.prefix))
        print(f"{graph.name}: wrote {out / (src.prefix + '.c')}, {src.prefix}.h, {src.prefix}.py and {so_path.name}")
    if written:
        with _writing(out):
            _write_makefile(out, Path(args.file).name, written, C_FLAGS, args.backend)
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


def _write_makefile(out: Path, source: str, written: list[tuple[str, str]], c_flags: tuple[str, ...],
                    backend: str = "c") -> None:
    """A Makefile beside the C files: static and shared libraries and a demo program, built with
    the flags of convdsl's own builds (OpenMP, OpenCL and PIC are the Makefile's business)."""
    from .codegen.render import comment_safe, environment
    one = len(written) == 1
    networks = [{"name": name, "prefix": prefix, "demo_target": "demo" if one else f"{prefix}_demo"}
                for name, prefix in written]
    libraries = [f"lib{prefix}.{kind}" for _, prefix in written for kind in ("a", "so")]
    text = environment().get_template("c/Makefile.j2").render(
        networks=networks, libraries=libraries, source_name=comment_safe(source), backend=backend,
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
    p.add_argument("--emit", choices=("module", "lowered"), default="module",
                   help="module: C, header and Python module (the default); lowered: print the lowered program "
                        "(as `convdsl plan`) and write nothing")
    _backend_option(p)
    _algo_option(p)
    _lint_options(p)
    p.set_defaults(run=cmd_compile)
    p = sub.add_parser("plan", help="print the lowered program: per step its kernel variant, operands, "
                                    "epilogue, workspace and threads")
    p.add_argument("file")
    p.add_argument("--network", help="only this network of the file")
    _algo_option(p)
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
