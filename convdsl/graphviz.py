"""`convdsl graph`: the network as a Graphviz picture — a box per layer with its op and output
shape, edges for the data flow, block instances as clusters."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .errors import ConvDSLError
from .ir.graph import Graph, Node
from .ops.base import lookup


def quote(text: str) -> str:
    """A DOT string literal: backslashes and quotes escaped, newlines as DOT line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def instance_path(node: Node) -> list[str]:
    """The block instances a node sits in, outermost first: `inception1`, `outer1.inner2`.

    node.scope names the blocks; the label's leading parts name their instances (a block's `conv3`
    in its first instance is `inception1.conv3`). A shared `layer` declared outside the block keeps
    its own label and is drawn outside the instance."""
    parts = node.label.split(".")
    path = []
    for depth, block in enumerate(node.scope):
        if depth < len(parts) - 1 and re.fullmatch(re.escape(block) + r"\d+", parts[depth]):
            path.append(".".join(parts[:depth + 1]))
        else:
            break
    return path


def to_dot(graph: Graph) -> str:
    lines = [f"digraph {quote(graph.name)} {{", "    rankdir=TB;", '    graph [fontname="Helvetica"];',
             '    node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", fontname="Helvetica"];']
    outputs = {o.value: o.name for o in graph.outputs}
    for i in graph.inputs:
        shape = graph.values[i.value].type.text(graph.layout)
        lines.append(f"    {quote('in:' + i.name)} [shape=ellipse, fillcolor=\"#dde8f7\", "
                     f"label={quote(f'input {i.name}' + chr(10) + shape)}];")

    # Nest the nodes of block instances in clusters, one per instance path.
    tree: dict = {}
    for node in graph.nodes:
        level = tree
        for instance in instance_path(node):
            level = level.setdefault(instance, {})
        level.setdefault("__nodes__", []).append(node)
    blocks = {path: block for node in graph.nodes for path, block in zip(instance_path(node), node.scope)}

    def emit(level: dict, indent: str) -> None:
        for node in level.get("__nodes__", []):
            op = lookup(node.op)
            label = f"{node.label}\n{op.describe(node.attrs)}\n{graph.values[node.output].type.text(graph.layout)}"
            extra = ', penwidth=2, fillcolor="#fbe7c6"' if node.output in outputs else ""
            lines.append(f"{indent}n{node.id} [label={quote(label)}{extra}];")
        for name, sub in level.items():
            if name == "__nodes__":
                continue
            lines.append(f"{indent}subgraph {quote('cluster_' + name)} {{")
            lines.append(f"{indent}    label={quote(f'{name} (block {blocks[name]})')}; style=dashed;")
            emit(sub, indent + "    ")
            lines.append(f"{indent}}}")

    emit(tree, "    ")
    for node in graph.nodes:
        for vid in node.inputs:
            v = graph.values[vid]
            src = f"n{v.producer}" if v.producer is not None else quote("in:" + next(
                i.name for i in graph.inputs if i.value == vid))
            lines.append(f"    {src} -> n{node.id};")
    for o in graph.outputs:
        v = graph.values[o.value]
        src = f"n{v.producer}" if v.producer is not None else quote("in:" + next(
            i.name for i in graph.inputs if i.value == o.value))
        lines.append(f"    {quote('out:' + o.name)} [shape=ellipse, fillcolor=\"#e3f2dc\", "
                     f"label={quote('output ' + o.name)}];")
        lines.append(f"    {src} -> {quote('out:' + o.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(graphs: list[Graph], target: Path) -> list[Path]:
    """Write DOT (always) and SVG/PNG/PDF when the target asks for it and Graphviz's dot exists."""
    written = []
    fmt = target.suffix.lstrip(".").lower() or "dot"
    for graph in graphs:
        base = target if len(graphs) == 1 else target.with_name(f"{target.stem}-{graph.name}{target.suffix}")
        dot_path = base if fmt == "dot" else base.with_suffix(".dot")
        dot_path.write_text(to_dot(graph))
        written.append(dot_path)
        if fmt != "dot":
            exe = shutil.which("dot")
            if exe is None:
                raise ConvDSLError(None, f"wrote {dot_path}; to draw {base.name}, install Graphviz "
                                         f"(`apt-get install graphviz`) and run this again")
            proc = subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(base)], capture_output=True,
                                  text=True, timeout=120)
            if proc.returncode != 0:
                raise ConvDSLError(None, f"Graphviz could not draw {base.name}: {proc.stderr.strip()[:300]}")
            written.append(base)
    return written
