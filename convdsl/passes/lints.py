"""Design warnings from the textbook's advice: a pass over the checked IR that returns Diagnostics.

Each rule is one function registered with @rule; none edits the graph. A warning is silenced
for one op by a comment `# convdsl: allow W101` on the op's line, or for a run by
`convdsl check --allow W101`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import Diagnostic
from ..ir import dims as D
from ..ir.graph import Graph, Node
from ..ops.base import Symbol

# Ops that keep every position where it is (and the channel count): looking through them finds
# the conv that feeds a later one.
POSITIONWISE = frozenset({"relu", "sigmoid", "tanh", "leaky_relu", "batchnorm", "dropout", "softmax"})


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    check: Callable[[Graph], Iterator[Diagnostic]]


RULES: list[Rule] = []


def rule(code: str, name: str):
    def register(fn):
        RULES.append(Rule(code, name, fn))
        return fn
    return register


# ---- helpers --------------------------------------------------------------------------------

def producer(g: Graph, vid: int) -> Node | None:
    p = g.values[vid].producer
    return None if p is None else g.nodes[p]


def consumers(g: Graph, vid: int) -> list[Node]:
    return [n for n in g.nodes if vid in n.inputs]


def feeding_conv(g: Graph, node: Node, through: frozenset = POSITIONWISE) -> tuple[Node | None, list[Node]]:
    """The conv whose output reaches `node`'s first input through `through` ops only, and those ops."""
    passed = []
    current = producer(g, node.inputs[0]) if node.inputs else None
    while current is not None and current.op in through:
        passed.append(current)
        current = producer(g, current.inputs[0])
    if current is not None and current.op in ("conv", "depthwise"):
        return current, passed
    return None, passed


def kernel_text(k) -> str:
    return "×".join(map(str, k))


def is_same(node: Node) -> bool:
    spec = node.attrs.get("pad_spec")
    return isinstance(spec, Symbol) and spec.name == "same"


def is_valid(node: Node) -> bool:
    return all(p == (0, 0) for p in node.attrs.get("pads", ()))


def stride_arg(stride) -> str:
    return f"stride={stride[0]}" if len(set(stride)) == 1 else f"stride=({', '.join(map(str, stride))})"


def ordinal(n: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(n, f"{n}th")


# ---- §3.11 dilated stacks -------------------------------------------------------------------

def dilated_stacks(g: Graph) -> list[list[Node]]:
    """Chains of stride-1 convs with kernels > 1 (1×1 convs and position-wise ops in between),
    at least one of them dilated: the stacks the hybrid-dilation rules speak of."""
    through = POSITIONWISE
    previous: dict[int, Node] = {}
    for node in g.nodes:
        if node.op == "conv" and all(s == 1 for s in node.attrs["stride"]):
            current = producer(g, node.inputs[0])
            while current is not None and (current.op in through or (
                    current.op == "conv" and all(k == 1 for k in current.attrs["kernel"]))):
                current = producer(g, current.inputs[0])
            if current is not None and current.op == "conv" and all(s == 1 for s in current.attrs["stride"]):
                previous[node.id] = current
    spatial = [n for n in g.nodes if n.op == "conv" and any(k > 1 for k in n.attrs["kernel"])]
    has_next = {previous[n.id].id for n in spatial if n.id in previous}
    stacks = []
    for end in spatial:
        if end.id in has_next:
            continue
        chain = [end]
        while chain[-1].id in previous:
            before = previous[chain[-1].id]
            if not any(k > 1 for k in before.attrs["kernel"]):
                break
            chain.append(before)
        chain.reverse()
        if len(chain) >= 2 and any(r > 1 for n in chain for r in n.attrs["dilation"]):
            stacks.append(chain)
    return stacks


def hdc_max_distance(rates: list[int]) -> int:
    """The HDC condition's M_2: the largest gap between the input positions the stack samples,
    M_n = r_n, M_i = max(M_{i+1} − 2r_i, M_{i+1} − 2(M_{i+1} − r_i), r_i)."""
    m = rates[-1]
    for r in reversed(rates[1:-1]):
        m = max(m - 2 * r, m - 2 * (m - r), r)
    return m


@rule("W101", "dilation-gridding")
def dilation_gridding(g: Graph):
    for stack in dilated_stacks(g):
        rates = [n.attrs["dilation"][0] for n in stack]
        factor = 0
        for r in rates:
            factor = math.gcd(factor, r)
        if factor > 1:
            last = stack[-1]
            yield Diagnostic(last.span, "W101",
                             f"dilation rates {', '.join(map(str, rates))} share the factor {factor}: an output sees "
                             f"only every {ordinal(factor)} input position on each axis (gridding, §3.11); use rates "
                             f"without a common factor, such as 1, 2, 5")


@rule("W102", "dilation-order")
def dilation_order(g: Graph):
    for stack in dilated_stacks(g):
        rates = [n.attrs["dilation"][0] for n in stack]
        if math.gcd(*rates) > 1:
            continue                     # W101 says it
        last = stack[-1]
        k = last.attrs["kernel"][0]
        if rates[-1] != max(rates):
            yield Diagnostic(last.span, "W102",
                             f"dilation rates {', '.join(map(str, rates))}: the last rate should be the largest "
                             f"(hybrid dilated convolution, §3.11)")
            continue
        gap = hdc_max_distance(rates)
        if gap > k:
            yield Diagnostic(last.span, "W102",
                             f"dilation rates {', '.join(map(str, rates))} leave holes: the stack samples input "
                             f"positions up to {gap} apart, more than the kernel size {k} (hybrid dilated "
                             f"convolution, §3.11); make the earlier rates larger or the last one smaller")


# ---- §3.4, §3.5 kernel sizes ----------------------------------------------------------------

def square_2d(node: Node) -> int | None:
    k = node.attrs.get("kernel", ())
    if node.op == "conv" and len(k) == 2 and k[0] == k[1] and all(r == 1 for r in node.attrs["dilation"]):
        return k[0]
    return None


@rule("W103", "large-kernel")
def large_kernel(g: Graph):
    for node in g.nodes:
        n = square_2d(node)
        if n is not None and n >= 5 and n % 2 == 1:
            count = (n - 1) // 2
            ratio = round(100 * count * 9 / (n * n))
            article = "an" if str(n).startswith(("8", "11", "18")) else "a"
            yield Diagnostic(node.span, "W103",
                             f"{article} {n}×{n} kernel: {count} stacked 3×3 convs see the same {n}×{n} field with "
                             f"{ratio}% of the parameters, and add {count - 1} more non-linearit"
                             f"{'y' if count == 2 else 'ies'} (§3.4)")


@rule("W104", "asymmetric-kernel")
def asymmetric_kernel(g: Graph):
    for node in g.nodes:
        n = square_2d(node)
        if n is None or n < 5:
            continue
        size = g.values[node.inputs[0]].type.spatial
        if all(isinstance(s, int) and 12 <= s <= 20 for s in size):
            yield Diagnostic(node.span, "W104",
                             f"a {n}×{n} kernel on a {size[0]}×{size[1]} map: 1×{n} then {n}×1 see the same field "
                             f"with 2/{n} = {round(200 / n)}% of the parameters, and work well on 12–20 sized "
                             f"maps (§3.5)")


# ---- §1.2.4 wasted positions ----------------------------------------------------------------

@rule("W105", "subsampled-output")
def subsampled_output(g: Graph):
    for node in g.nodes:
        if node.op not in ("maxpool", "avgpool", "conv") or any(k != 1 for k in node.attrs["kernel"]):
            continue
        if all(s == 1 for s in node.attrs["stride"]):
            continue
        conv, _ = feeding_conv(g, node)
        if conv is None or any(s != 1 for s in conv.attrs["stride"]):
            continue
        kept = math.prod(node.attrs["stride"])
        yield Diagnostic(conv.span, "W105",
                         f"{conv.label} computes every position, but {node.label} (window 1, stride "
                         f"{kernel_text(node.attrs['stride'])}) keeps only 1 in {kept} (§1.2.4): give "
                         f"{conv.label} {stride_arg(node.attrs['stride'])} instead")


# ---- §1.2.2, §3.4.7 padding -----------------------------------------------------------------

@rule("W106", "valid-shrinks-to-one")
def valid_shrinks_to_one(g: Graph):
    for node in g.nodes:
        if node.op not in ("conv", "depthwise", "maxpool", "avgpool", "l2pool") or not is_valid(node):
            continue
        if all(k == 1 for k in node.attrs["kernel"]):
            continue
        before = g.values[node.inputs[0]].type.spatial
        after = g.values[node.output].type.spatial
        if any(a == 1 and isinstance(b, int) and b > 1 for a, b in zip(after, before)):
            yield Diagnostic(node.span, "W106",
                             f"valid padding shrinks the map to {'×'.join(map(str, after))} here (§1.2.2: each "
                             f"valid k×k window removes k−1 positions); use pad=same to keep the map and go deeper")


@rule("W107", "even-kernel-same")
def even_kernel_same(g: Graph):
    for node in g.nodes:
        k = node.attrs.get("kernel")
        if k and is_same(node) and any(x % 2 == 0 for x in k) and node.op in ("conv", "depthwise", "separable"):
            yield Diagnostic(node.span, "W107",
                             f"an even {kernel_text(k)} kernel with pad=same needs asymmetric padding (the extra "
                             f"zero goes at the end, §3.4.7); prefer an odd kernel")


# ---- §3.9 group convs -----------------------------------------------------------------------

@rule("W108", "groups-without-shuffle")
def groups_without_shuffle(g: Graph):
    for node in g.nodes:
        if node.op != "conv" or node.attrs["groups"] == 1:
            continue
        current = producer(g, node.inputs[0])
        while current is not None and (current.op in POSITIONWISE or current.op in ("depthwise", "maxpool",
                                                                                      "avgpool")):
            current = producer(g, current.inputs[0])
        if current is not None and current.op == "conv" and current.attrs["groups"] > 1:
            yield Diagnostic(node.span, "W108",
                             f"{current.label} and {node.label} are group convs with no shuffle between them: each "
                             f"output group only ever sees its own input group (§3.9); put `shuffle("
                             f"{node.attrs['groups']})` between them")


# ---- §2.4, §2.5, §3.1 parameter budgets -----------------------------------------------------

def total_params(g: Graph) -> int:
    return sum(D.product(p.shape) for layer in g.layers for p in layer.params)


@rule("W109", "dense-heavy")
def dense_heavy(g: Graph):
    total = total_params(g)
    seen = set()
    for node in g.nodes:
        if node.op != "dense" or node.layer in seen:
            continue
        seen.add(node.layer)
        own = sum(D.product(p.shape) for p in g.layer(node.layer).params)
        if total >= 1000 and own * 2 > total:
            yield Diagnostic(node.span, "W109",
                             f"{node.label} holds {100 * own // total}% of the network's {total:,} "
                             f"parameters (§2.4); global average pooling before it, or `convdsl convert "
                             f"--fc-to-conv` (§2.5), would take most of them away")


@rule("W110", "unshared-heavy")
def unshared_heavy(g: Graph):
    for node in g.nodes:
        if node.op not in ("local", "tiled"):
            continue
        weight = next(p for p in g.layer(node.layer).params if p.name == "weight")
        own = D.product(weight.shape)
        shared = node.attrs["out"] * node.attrs["in"] * math.prod(node.attrs["kernel"])
        if own >= 10 * shared:
            yield Diagnostic(node.span, "W110",
                             f"{node.label} has {own:,} weights, {own // shared}× the {shared:,} of the conv it "
                             f"replaces (§3.1, §3.2); `tiled` with a small tile, or a conv, needs far fewer")


# ---- running the rules ----------------------------------------------------------------------

_ALLOW = re.compile(r"#\s*convdsl:\s*allow\s+([A-Z0-9,\s]+)")


def allowed_on_line(diag: Diagnostic) -> bool:
    if diag.span is None:
        return False
    match = _ALLOW.search(diag.span.source.line(diag.span.line))
    return bool(match) and diag.code in re.split(r"[,\s]+", match.group(1).strip())


def lint(g: Graph, allow: frozenset[str] = frozenset()) -> tuple[Diagnostic, ...]:
    """Every warning of every rule, in source order, less those allowed per line or per run."""
    found = [d for r in RULES if r.code not in allow for d in r.check(g)]
    found = [d for d in found if not allowed_on_line(d)]
    unique = {(d.code, d.span.path if d.span else "", d.span.line if d.span else 0,
               d.span.col if d.span else 0, d.message): d for d in found}
    return tuple(sorted(unique.values(), key=lambda d: (d.span.path, d.span.line, d.span.col, d.code)
                        if d.span else ("", 0, 0, d.code)))


CODES = {r.code: r.name for r in RULES}
