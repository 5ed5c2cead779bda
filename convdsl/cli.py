"""The `convdsl` command: check, compile (and, as they arrive, graph, convert, bench)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConvDSLError


def _graphs(path: str, network: str | None):
    from .compiler import graph_from_file, networks_in_file
    names = [network] if network else list(networks_in_file(path))
    if not names:
        raise ConvDSLError(None, f"{path}: no `network` in this file")
    return [graph_from_file(path, n) for n in names]


def cmd_check(args) -> int:
    from .passes.stats import collect
    from .report import text_report
    from .codegen.backends import C
    for i, graph in enumerate(_graphs(args.file, args.network)):
        C.check_supported(graph)
        if i:
            print()
        print(text_report(graph, collect(graph)))
    return 0


def cmd_compile(args) -> int:
    from .compiler import compile_graph, module_meta
    from .codegen.render import comment_safe, environment
    from .runtime.build import build_extension
    import shutil
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for graph in _graphs(args.file, args.network):
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
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convdsl", description="Compile .cnn networks to C kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check a file and report shapes, parameters, MACs, receptive fields")
    p.add_argument("file")
    p.add_argument("--network", help="only this network of the file")
    p.set_defaults(run=cmd_check)
    p = sub.add_parser("compile", help="write C, header and an importable Python module")
    p.add_argument("file")
    p.add_argument("-o", "--output", default="build", help="output folder (default: build)")
    p.add_argument("--network", help="only this network of the file")
    p.set_defaults(run=cmd_compile)
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
