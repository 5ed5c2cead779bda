"""`convdsl graph`: the network as a Graphviz picture — a box per layer with its op and output
shape, edges for the data flow, block instances as clusters; optionally position-wise ops folded
into the box before them, block instances drawn as one box, and another direction."""
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


RANKDIRS = ("TB", "LR", "BT", "RL")      # Graphviz's directions: top to bottom, left to right, …


def _value_uses(graph: Graph) -> dict[int, int]:
    """How many times each value is read: by a node's input, or as a network output."""
    uses: dict[int, int] = {}
    for node in graph.nodes:
        for vid in node.inputs:
            uses[vid] = uses.get(vid, 0) + 1
    for o in graph.outputs:
        uses[o.value] = uses.get(o.value, 0) + 1
    return uses


def fold_positionwise(graph: Graph) -> dict[int, int]:
    """node id → the id of the node whose box draws it.

    A position-wise op (its OpDef's `positionwise` trait: relu, batchnorm, dropout …) goes into
    the box of the layer that makes its input when nothing else reads that input and both sit in
    the same block instance; a chain conv → batchnorm → relu is one box. Anything else is its
    own box."""
    uses = _value_uses(graph)
    box: dict[int, int] = {}
    nodes = {node.id: node for node in graph.nodes}
    for node in graph.nodes:
        box[node.id] = node.id
        if not lookup(node.op).positionwise or len(node.inputs) != 1:
            continue
        producer = graph.values[node.inputs[0]].producer
        if producer is not None and uses[node.inputs[0]] == 1 \
                and instance_path(nodes[producer]) == instance_path(node):
            box[node.id] = box[producer]
    return box


def to_dot(graph: Graph, *, rankdir: str = "TB", fold: bool = False, collapse: bool = False) -> str:
    """The network as DOT. By default every layer is a box; `fold` draws position-wise ops in the
    box of the layer before them, `collapse` draws each outermost block instance as one box with
    the shapes that go in and come out. `convdsl graph` folds unless told --no-fold."""
    if rankdir not in RANKDIRS:
        raise ConvDSLError(None, f"--rankdir must be one of {', '.join(RANKDIRS)}, got {rankdir!r}")
    lines = [f"digraph {quote(graph.name)} {{", f"    rankdir={rankdir};", '    graph [fontname="Helvetica"];',
             '    node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", fontname="Helvetica"];']
    outputs = {o.value: o.name for o in graph.outputs}
    input_names = {i.value: i.name for i in graph.inputs}
    for i in graph.inputs:
        shape = graph.values[i.value].type.text(graph.layout)
        lines.append(f"    {quote('in:' + i.name)} [shape=ellipse, fillcolor=\"#dde8f7\", "
                     f"label={quote(f'input {i.name}' + chr(10) + shape)}];")

    box = fold_positionwise(graph) if fold else {node.id: node.id for node in graph.nodes}
    folded: dict[int, list[Node]] = {}
    for node in graph.nodes:
        folded.setdefault(box[node.id], []).append(node)
    blocks = {path: block for node in graph.nodes for path, block in zip(instance_path(node), node.scope)}
    collapsed = {node.id: instance_path(node)[0] for node in graph.nodes if collapse and instance_path(node)}

    def drawn(node_id: int) -> str:
        """The DOT id of what a node is drawn in: its box, its folded box, or its block's box."""
        if node_id in collapsed:
            return quote("block:" + collapsed[node_id])
        return f"n{box[node_id]}"

    def source(vid: int) -> str:
        producer = graph.values[vid].producer
        return drawn(producer) if producer is not None else quote("in:" + input_names[vid])

    def shape(vid: int) -> str:
        return graph.values[vid].type.text(graph.layout)

    def layer_box(head: Node, indent: str) -> None:
        chain = folded[head.id]
        last = chain[-1]
        ops = " + ".join(lookup(n.op).describe(n.attrs) for n in chain)
        label = f"{head.label}\n{ops}\n{shape(last.output)}"
        extra = ', penwidth=2, fillcolor="#fbe7c6"' if last.output in outputs else ""
        lines.append(f"{indent}n{head.id} [label={quote(label)}{extra}];")

    # Block instances drawn whole: one box, the shapes going in and coming out.
    readers: dict[int, list[int]] = {}
    for node in graph.nodes:
        for vid in node.inputs:
            readers.setdefault(vid, []).append(node.id)
    for instance in dict.fromkeys(collapsed.values()):
        members = [n for n in graph.nodes if collapsed.get(n.id) == instance]
        inside = {n.output for n in members}
        ins = [vid for vid in dict.fromkeys(v for n in members for v in n.inputs) if vid not in inside]
        outs = [n.output for n in members if n.output in outputs
                or any(collapsed.get(r) != instance for r in readers.get(n.output, ()))]
        io = f"{', '.join(shape(v) for v in ins)} → {', '.join(shape(v) for v in outs)}"
        extra = ', penwidth=2, fillcolor="#fbe7c6"' if any(v in outputs for v in outs) else ""
        lines.append(f"    {quote('block:' + instance)} [peripheries=2, "
                     f"label={quote(f'{instance}{chr(10)}block {blocks[instance]}{chr(10)}{io}')}{extra}];")

    # The other nodes, nested in clusters, one per block instance path.
    tree: dict = {}
    for node in graph.nodes:
        if node.id in collapsed or box[node.id] != node.id:
            continue
        level = tree
        for instance in instance_path(node):
            level = level.setdefault(instance, {})
        level.setdefault("__nodes__", []).append(node)

    def emit(level: dict, indent: str) -> None:
        for node in level.get("__nodes__", []):
            layer_box(node, indent)
        for name, sub in level.items():
            if name == "__nodes__":
                continue
            lines.append(f"{indent}subgraph {quote('cluster_' + name)} {{")
            lines.append(f"{indent}    label={quote(f'{name} (block {blocks[name]})')}; style=dashed;")
            emit(sub, indent + "    ")
            lines.append(f"{indent}}}")

    emit(tree, "    ")
    # An edge per input of every node, but none inside a box, and one per value into a block's box.
    seen = set()
    for node in graph.nodes:
        for position, vid in enumerate(node.inputs):
            src, dst = source(vid), drawn(node.id)
            key = (src, dst, vid) if node.id in collapsed else (src, dst, vid, node.id, position)
            if src != dst and key not in seen:
                seen.add(key)
                lines.append(f"    {src} -> {dst};")
    for o in graph.outputs:
        lines.append(f"    {quote('out:' + o.name)} [shape=ellipse, fillcolor=\"#e3f2dc\", "
                     f"label={quote('output ' + o.name)}];")
        lines.append(f"    {source(o.value)} -> {quote('out:' + o.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(graphs: list[Graph], target: Path, **style) -> list[Path]:
    """Write DOT (always) and SVG/PNG/PDF when the target asks for it and Graphviz's dot exists;
    `style` goes to to_dot (rankdir, fold, collapse)."""
    written = []
    fmt = target.suffix.lstrip(".").lower() or "dot"
    for graph in graphs:
        base = target if len(graphs) == 1 else target.with_name(f"{target.stem}-{graph.name}{target.suffix}")
        dot_path = base if fmt == "dot" else base.with_suffix(".dot")
        dot_path.write_text(to_dot(graph, **style))
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
