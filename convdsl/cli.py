"""The `convdsl` command: check, compile, graph, convert."""
from __future__ import annotations

import argparse
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
    from .codegen.backends import C
    from .passes.memory import plan_memory
    from .passes.stats import collect
    from .report import text_report
    status = 0
    for i, graph in enumerate(_graphs(args.file, args.network)):
        C.check_supported(graph)
        warnings = _warnings(graph, args)
        if i:
            print()
        print(text_report(graph, collect(graph), plan_memory(graph)))
        status = max(status, _report_warnings(warnings, args))
    return status


def _check_json(args) -> int:
    """The report as one JSON document on stdout, errors included; stderr as without --json."""
    import json
    from .codegen.backends import C
    from .passes.memory import plan_memory
    from .passes.stats import collect
    from .report import json_document, json_network
    documents, errors, status = [], [], 0
    try:
        for graph in _graphs(args.file, args.network):
            C.check_supported(graph)
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
    for path in write_graph(_graphs(args.file, args.network), Path(args.output)):
        print(f"wrote {path}")
    return 0


def cmd_compile(args) -> int:
    from .compiler import compile_graph, module_meta
    from .codegen.render import comment_safe, environment
    from .runtime.build import build_extension
    import shutil
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for graph in _graphs(args.file, args.network):
        status = max(status, _report_warnings(_warnings(graph, args), args))
        if status:
            continue
        compiled = compile_graph(graph)
        src = compiled.source
        (out / f"{src.prefix}.c").write_text(src.c)
        (out / f"{src.prefix}.h").write_text(src.h)
        ext_name, so_path = build_extension(src.prefix, src.c, src.h, src.cdef)
        shutil.copyfile(so_path, out / so_path.name)
        py = environment().get_template("python/module.py.j2").render(
            network=graph.name, source_name=comment_safe(Path(graph.source_path).name), prefix=src.prefix,
            meta_literal=repr(module_meta(graph)), ext_name_literal=repr(ext_name),
            so_name_literal=repr(so_path.name))
        (out / f"{src.prefix}.py").write_text(py)
        print(f"{graph.name}: wrote {out / (src.prefix + '.c')}, {src.prefix}.h, {src.prefix}.py and {so_path.name}")
    return status


def cmd_convert(args) -> int:
    from .passes.fc_to_conv import convert_file
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convdsl", description="Compile .cnn networks to C kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check a file and report shapes, parameters, MACs, receptive fields")
    p.add_argument("file")
    p.add_argument("--network", help="only this network of the file")
    p.add_argument("--json", action="store_true", help="the report as JSON (docs/check-report.schema.json)")
    _lint_options(p)
    p.set_defaults(run=cmd_check)
    p = sub.add_parser("compile", help="write C, header and an importable Python module")
    p.add_argument("file")
    p.add_argument("-o", "--output", default="build", help="output folder (default: build)")
    p.add_argument("--network", help="only this network of the file")
    _lint_options(p)
    p.set_defaults(run=cmd_compile)
    p = sub.add_parser("graph", help="draw the network: DOT always, SVG/PNG/PDF with Graphviz installed")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, help="net.dot, net.svg, net.png or net.pdf")
    p.add_argument("--network", help="only this network of the file")
    p.set_defaults(run=cmd_graph)
    p = sub.add_parser("convert", help="transform a network: --fc-to-conv turns its dense head into convolutions")
    p.add_argument("file")
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
