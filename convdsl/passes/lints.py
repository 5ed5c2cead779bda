"""Design warnings from the textbook's advice: a pass over the checked IR that returns Diagnostics.

Each rule is one function registered with @rule (code, name); `lint` runs every registered rule
in turn. No rule edits the graph. A warning is silenced for one op by a comment
`# convdsl: allow W101` at the end of the op's line or alone on the line just above it, and for a
run by `convdsl check --allow W101`. docs/language.md §5 lists the codes and states each rule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

from ..errors import Diagnostic, Note, block_note
from ..ir import dims as D
from ..ir.graph import Graph, Node
from ..ops.base import OpDef, lookup
from ..ops.losses import LOSSES


# What the rules ask of an op, from the traits its OpDef declares (ops/base.py), never its name.

def op_of(node: Node) -> OpDef:
    return lookup(node.op)


def elementwise(node: Node) -> bool:
    """A one-input op that changes each value on its own (or per channel): it keeps positions and
    channel groups (relu, dropout, batchnorm …)."""
    op = op_of(node)
    return op.max_inputs == 1 and op.locality in ("value", "channel")


def positionwise(node: Node) -> bool:
    """A one-input op that keeps every position where it is; besides the element-wise ones, these
    also mix or reorder the channels of a position (softmax, shuffle, maxout)."""
    op = op_of(node)
    return op.max_inputs == 1 and op.locality is not None


def window_pool(node: Node) -> bool:
    return op_of(node).window_pool


def convolution(node: Node) -> bool:
    """conv or depthwise: one kernel per group sliding over the map, dilation and all."""
    return op_of(node).convolution


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    check: Callable[[Graph], Iterator[Diagnostic]]


RULES: list[Rule] = []


def rule(code: str, name: str):
    def register(fn):
        if any(r.code == code for r in RULES):
            raise ValueError(f"lint code {code} registered twice")
        RULES.append(Rule(code, name, fn))
        return fn
    return register


# ---- helpers --------------------------------------------------------------------------------

def warning(node: Node, code: str, message: str, notes: tuple = ()) -> Diagnostic:
    """A warning at the op `node` was made from, with a note for each block instance it sits in
    (innermost first, as for errors): the line alone does not say which use of a block it is."""
    calls = tuple(block_note(block, call) for block, call in zip(reversed(node.scope), reversed(node.block_calls)))
    return Diagnostic(node.span, code, message, (*notes, *calls))


def producer(g: Graph, vid: int) -> Node | None:
    p = g.values[vid].producer
    return None if p is None else g.nodes[p]


def only_feeds(g: Graph, node: Node, reader: Node) -> bool:
    """`node`'s output is read by `reader` alone and is not a network output."""
    return (all(o.value != node.output for o in g.outputs)
            and [n.id for n in g.consumers(node.output)] == [reader.id])


def x(values: Iterable) -> str:
    return "×".join(map(str, values))


def ints(values: Iterable) -> str:
    return ", ".join(map(str, values))


def percent(ratio: float) -> str:
    return f"{round(100 * ratio)}%"


def is_depthwise(node: Node) -> bool:
    """A convolution with one input channel per group: `depthwise`, or `conv` with groups = in."""
    return op_of(node).depthwise or (convolution(node) and node.attrs["groups"] > 1
                                     and node.attrs["groups"] == node.attrs["in"])


def channel_mixing_conv(node: Node) -> bool:
    """A convolution whose op mixes the channels of a group (conv), not depthwise."""
    return convolution(node) and not op_of(node).depthwise


def is_pointwise_conv(node: Node) -> bool:
    return channel_mixing_conv(node) and all(k == 1 for k in node.attrs["kernel"]) and \
        all(s == 1 for s in node.attrs["stride"])


def pads_zero(node: Node) -> bool:
    return all(p == (0, 0) for p in node.attrs.get("pads", ()))


# ---- §3.11 dilated stacks: W101, W102 -------------------------------------------------------

def is_stack_member(node: Node) -> bool:
    return convolution(node) and all(s == 1 for s in node.attrs["stride"]) and \
        any(k > 1 for k in node.attrs["kernel"])


def previous_member(g: Graph, node: Node) -> Node | None:
    """The stride-1 spatial conv that feeds `node` through position-wise ops and 1×1 convs."""
    current = producer(g, node.inputs[0])
    while current is not None and (positionwise(current) or is_pointwise_conv(current)):
        current = producer(g, current.inputs[0])
    return current if current is not None and is_stack_member(current) else None


def dilated_stacks(g: Graph) -> list[list[Node]]:
    """Chains of stride-1 convs with a kernel > 1 (position-wise ops and 1×1 convs between them),
    at least two long and with one conv dilated: the stacks the hybrid-dilation rules speak of.
    Each chain is as long as it goes; a conv that feeds several chains starts each of them."""
    members = [n for n in g.nodes if is_stack_member(n)]
    before = {n.id: previous_member(g, n) for n in members}
    has_next = {p.id for p in before.values() if p is not None}
    stacks = []
    for end in members:
        if end.id in has_next:
            continue
        chain = [end]
        while before[chain[-1].id] is not None:
            chain.append(before[chain[-1].id])
        chain.reverse()
        if len(chain) >= 2 and any(r > 1 for n in chain for r in n.attrs["dilation"]):
            stacks.append(chain)
    return stacks


def axis_rates(stack: list[Node], axis: int) -> list[int]:
    """The dilation rates of the convs that have a kernel > 1 along `axis`."""
    return [n.attrs["dilation"][axis] for n in stack if n.attrs["kernel"][axis] > 1]


# Fields wider than this (on one axis) are not enumerated position by position: kernels and rates
# go up to 2**24, and a field of 2**48 positions has no list of holes worth printing.
MAX_LISTED_FIELD = 1 << 16


def field_taps(stack: list[Node], axis: int) -> list[tuple[int, int]]:
    """(rate, kernel) of every conv with a kernel > 1 along `axis`."""
    return [(n.attrs["dilation"][axis], n.attrs["kernel"][axis]) for n in stack if n.attrs["kernel"][axis] > 1]


def field_width(stack: list[Node], axis: int) -> int:
    return sum(r * (k - 1) for r, k in field_taps(stack, axis)) + 1


def first_hole(stack: list[Node], axis: int) -> int | None:
    """The first input position (from 0 at the start of the field) that no output of the stack
    reaches, or None: closed form, whatever the sizes.

    The reached positions are the sums of one tap offset r·m (m = 0 … k−1) per conv, and a sum does
    not depend on the order of the convs. Taken by increasing rate, the sums so far fill [0, W]
    (W = Σ r·(k−1) of the convs taken): a conv of rate r ≤ W + 1 keeps them contiguous, up to
    W + r·(k−1); one of rate r > W + 1 leaves W + 1 unreached, since a sum that uses any tap of it
    or of a later conv (all of rate ≥ r) is at least r, and the others are at most W."""
    reach = 0
    for r, k in sorted(field_taps(stack, axis)):
        if r > reach + 1:
            return reach + 1
        reach += r * (k - 1)
    return None


def field_offsets(stack: list[Node], axis: int) -> set[int]:
    """The input positions along `axis` that reach one output of the stack, counted from the first
    position of its field: every sum of one tap offset r·m (m = 0 … k−1) per conv. Computed on a
    bit set, with O(log k) shifts per conv; callers keep the field within MAX_LISTED_FIELD."""
    reach = 1
    for r, k in field_taps(stack, axis):
        taps = 1                         # reach covers shifts 0 … taps−1 of r so far
        while taps < k:
            more = min(taps, k - taps)
            reach |= reach << (more * r)
            taps += more
    return {i for i in range(reach.bit_length()) if reach >> i & 1}


def same_on_every_axis(values: list) -> bool:
    return all(v == values[0] for v in values)


def axis_phrase(axes: list[int], rank: int) -> str:
    if rank == 1 or len(axes) == rank:
        return "on each axis" if rank > 1 else ""
    names = ("depth", "height", "width")[3 - rank:]
    return "along the " + " and ".join(names[a] for a in axes)


def dilated_part(stack: list[Node]) -> list[Node]:
    """The stack up to its last dilated conv: undilated convs after it only fill the grid's gaps."""
    dilated = list(stack)
    while dilated and all(r == 1 for r in dilated[-1].attrs["dilation"]):
        dilated.pop()
    return dilated


def common_factors(stack: list[Node], rank: int, at_least: int = 1) -> list[int]:
    """Per axis, the common factor of the rates of the convs with a kernel > 1 there (1 when fewer
    than `at_least` of them)."""
    return [math.gcd(*axis_rates(stack, a)) if len(axis_rates(stack, a)) >= max(at_least, 1) else 1
            for a in range(rank)]


def gridded_dilated_part(stack: list[Node]) -> list[Node] | None:
    """The dilated part of a stack that an undilated conv follows, when two or more of its rates
    along an axis share a factor > 1 (rates 2, 4, 6 then a 3×3 conv): the following conv reaches
    every input again, but each unit of the dilated layers sees only a grid (§3.11)."""
    rank = len(stack[0].attrs["kernel"])
    dilated = dilated_part(stack)
    if len(dilated) == len(stack) or any(f > 1 for f in common_factors(stack, rank)):
        return None
    return dilated if any(f > 1 for f in common_factors(dilated, rank, at_least=2)) else None


@rule("W101", "dilation-gridding")
def dilation_gridding(g: Graph):
    for stack in dilated_stacks(g):
        rank = len(stack[0].attrs["kernel"])
        factors = common_factors(stack, rank)
        gridded = stack
        if not any(f > 1 for f in factors):
            gridded = gridded_dilated_part(stack)
            if gridded is None:
                continue
            factors = common_factors(gridded, rank, at_least=2)
        axes = [a for a in range(rank) if factors[a] > 1]
        a = axes[0]
        rates = axis_rates(gridded, a)
        f = factors[a]
        seen = math.prod(factors)
        where = axis_phrase(axes, rank)
        rates_text = ints(rates) if same_on_every_axis([axis_rates(gridded, b) for b in axes]) else \
            "; ".join(ints(axis_rates(gridded, b)) for b in axes)
        if gridded is stack:
            yield warning(stack[-1], "W101",
                          f"dilation rates {rates_text} share the factor {f}: only every {ordinal(f)} input "
                          f"position{' ' + where if where else ''} reaches an output, so {seen - 1} in {seen} "
                          f"inputs are never seen (gridding, §3.11); use rates without a common factor, such "
                          f"as 1, 2, 5")
            continue
        last, follower = gridded[-1], stack[len(gridded)]
        yield warning(last, "W101",
                      f"dilation rates {rates_text} share the factor {f}: each unit of {last.label} sees only "
                      f"every {ordinal(f)} position of the stack's input{' ' + where if where else ''}, a grid "
                      f"that misses {seen - 1} in {seen} of them (gridding, §3.11); the undilated "
                      f"{follower.label} after it re-mixes the phases, but the dilated layers themselves only "
                      f"see a grid; use rates without a common factor, such as 1, 2, 5")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@rule("W102", "dilation-order")
def dilation_order(g: Graph):
    for stack in dilated_stacks(g):
        rank = len(stack[0].attrs["kernel"])
        if any(f > 1 for f in common_factors(stack, rank)) or gridded_dilated_part(stack) is not None:
            continue                     # W101 says what is wrong
        # Undilated convs after the dilated ones only fill gaps: the rule is about the dilated part.
        dilated = dilated_part(stack)
        last = stack[-1]
        disordered = [a for a in range(rank)
                      if len(axis_rates(dilated, a)) >= 2 and axis_rates(dilated, a)[-1] != max(axis_rates(dilated, a))]
        if disordered:
            yield warning(last, "W102",
                          f"dilation rates {ints(axis_rates(stack, disordered[0]))}: the last dilated conv "
                          f"should have the largest rate (hybrid dilated convolution, §3.11), as in 1, 2, 5")
            continue
        holes = {a: holes_of(stack, a) for a in range(rank)}
        axes = [a for a in range(rank) if holes[a][1]]
        if not axes:
            continue
        a = axes[0]
        width, gaps, centred, complete = holes[a]
        if not complete:                 # a huge field: its first hole, found in closed form
            where = f"the inputs {gaps[0]} positions away from its centre on either side, and others, are never " \
                    f"seen" if centred else f"position {gaps[0]} of them, and others, are never seen"
        elif centred:
            where = f"the inputs {listing(gaps)} position{'' if gaps == [1] else 's'} away from its centre on " \
                    f"either side are never seen"
        else:
            where = f"positions {ints(gaps) if len(gaps) <= 8 else listing(gaps)} of them are never seen"
        same = all(holes[b] == holes[a] and axis_rates(stack, b) == axis_rates(stack, a) for b in axes)
        axis_text = axis_phrase(axes if same else [a], rank)
        yield warning(last, "W102",
                      f"dilation rates {ints(axis_rates(stack, a))} leave holes: an output spans {width} input "
                      f"positions{' ' + axis_text if axis_text else ''}, and {where} (hybrid dilated "
                      f"convolution, §3.11); make the earlier rates larger or the last one smaller, as in "
                      f"1, 2, 5 with 3×3 kernels")


def holes_of(stack: list[Node], axis: int) -> tuple[int, list[int], bool, bool]:
    """(field width, the positions inside it no output reaches, whether they are counted from the
    centre, whether the list is complete) along one axis. With odd kernels the field is symmetric
    and positions are distances from its centre; otherwise they count from 1 at the field's start.
    A field wider than MAX_LISTED_FIELD lists only its first hole (found in closed form)."""
    width = field_width(stack, axis)
    centred = all(n.attrs["kernel"][axis] % 2 == 1 for n in stack)
    centre = (width - 1) // 2
    first = first_hole(stack, axis)
    if first is None:
        return width, [], centred, True
    if width > MAX_LISTED_FIELD:
        return width, [centre - first if centred else first + 1], centred, False
    reach = field_offsets(stack, axis)
    missing = [h for h in range(width) if h not in reach]
    if centred:
        return width, sorted({abs(h - centre) for h in missing}), True, True
    return width, [h + 1 for h in missing], False, True


def listing(values: list[int]) -> str:
    """`4`, `4 and 5`, `1, 2 and 3`, or the first few of a long list."""
    if len(values) > 8:
        return f"{ints(values[:6])} and {len(values) - 6} others"
    return f"{ints(values[:-1])} and {values[-1]}" if len(values) > 1 else str(values[0])


# ---- §3.4, §3.5 kernel sizes: W103, W104 ----------------------------------------------------

def square_2d(node: Node) -> int | None:
    """n for an undilated n×n 2-D conv that is not depthwise."""
    k = node.attrs.get("kernel", ())
    if channel_mixing_conv(node) and not is_depthwise(node) and len(k) == 2 and k[0] == k[1] and \
            all(r == 1 for r in node.attrs["dilation"]):
        return k[0]
    return None


def channels_text(node: Node) -> str:
    return f"{node.attrs['in']}→{node.attrs['out']} channels"


@rule("W103", "large-kernel")
def large_kernel(g: Graph):
    for node in g.nodes:
        n = square_2d(node)
        if n is None or n < 5 or n % 2 == 0:
            continue
        m = (n - 1) // 2                                 # §3.4: k − 1 = m·(3 − 1)
        cin, cout = node.attrs["in"], node.attrs["out"]
        book = 9 * m / (n * n)
        # The replacement: the first 3×3 takes in→out channels, the others out→out.
        here = 9 * (cin + (m - 1) * cout) / (cin * n * n)
        if here >= 1:
            continue                                     # not fewer parameters for these channels
        article = "an" if n in (8, 11, 18) or 80 <= n < 90 else "a"
        gain = "add 1 more non-linearity" if m == 2 else f"add {m - 1} more non-linearities"
        if cin == cout:
            stack, amount = f"{m} stacked 3×3 convs", f"{percent(book)} of the parameters ({m}·3·3 / {n}·{n}, §3.4)"
        else:
            stack = f"{m} stacked 3×3 convs ({cin}→{cout}, then {cout}→{cout} channels)"
            amount = f"{percent(here)} of the parameters (§3.4's {percent(book)} holds when channels in = out)"
        yield warning(node, "W103",
                      f"{article} {n}×{n} kernel: {stack} see the same {n}×{n} field with {amount}, and "
                      f"{gain}")


@rule("W104", "asymmetric-kernel")
def asymmetric_kernel(g: Graph):
    for node in g.nodes:
        n = square_2d(node)
        if n is None or n < 5:
            continue
        size = g.values[node.inputs[0]].type.spatial
        if not all(isinstance(s, int) and 12 <= s <= 20 for s in size):
            continue
        cin, cout = node.attrs["in"], node.attrs["out"]
        here = (cin + cout) / (n * cin)                 # 1×n: in→out, then n×1: out→out
        if here >= 1:
            continue
        if cin == cout:
            split, amount = f"1×{n} then {n}×1", f"2/{n} = {percent(2 / n)} of the parameters"
        else:
            split = f"1×{n} ({cin}→{cout} channels) then {n}×1 ({cout}→{cout})"
            amount = f"{percent(here)} of the parameters (§3.5's 2/{n} = {percent(2 / n)} holds when channels in = out)"
        yield warning(node, "W104",
                      f"a {n}×{n} kernel on a {x(size)} map: {split} see the same field with {amount}, and the "
                      f"split works well on maps of 12 to 20 (§3.5)")


# ---- §1.2.4 computed, then thrown away: W105 ------------------------------------------------

@rule("W105", "subsampled-output")
def subsampled_output(g: Graph):
    for node in g.nodes:
        if not (window_pool(node) or channel_mixing_conv(node)) or any(k != 1 for k in node.attrs["kernel"]):
            continue
        stride = node.attrs["stride"]
        if all(s == 1 for s in stride) or not pads_zero(node):
            continue
        reader, current = node, producer(g, node.inputs[0])
        while current is not None and positionwise(current) and only_feeds(g, current, reader):
            reader, current = current, producer(g, current.inputs[0])
        if current is None or not convolution(current) or not only_feeds(g, current, reader):
            continue
        if any(s != 1 for s in current.attrs["stride"]):
            continue
        kept = math.prod(stride)
        stride_arg = f"stride={stride[0]}" if len(set(stride)) == 1 else f"stride=({ints(stride)})"
        if convolution(node):
            what, fix = f"{node.label} (1×1, stride {x(stride)}) reads", f"and {node.label} stride=1"
        else:
            what, fix = f"{node.label} (window 1, stride {x(stride)}) keeps", f"and drop {node.label}"
        yield warning(current, "W105",
                      f"{current.label} computes every position, but {what} only 1 in {kept} of them "
                      f"(§1.2.4: a full convolution then subsampling wastes the work); give {current.label} "
                      f"{stride_arg} {fix}")


# ---- §1.2.2, §3.4.7 padding: W106, W107 -----------------------------------------------------

def valid_window(node: Node) -> bool:
    return convolution(node) and pads_zero(node) and any(k > 1 for k in node.attrs["kernel"])


@rule("W106", "valid-shrinks-to-one")
def valid_shrinks_to_one(g: Graph):
    for node in g.nodes:
        if not valid_window(node):
            continue
        before = g.values[node.inputs[0]].type.spatial
        after = g.values[node.output].type.spatial
        if not any(a == 1 and isinstance(b, int) and b > 1 for a, b in zip(after, before)):
            continue
        stack = [node]
        current = producer(g, node.inputs[0])
        while current is not None and (positionwise(current) or valid_window(current)):
            if valid_window(current):
                stack.append(current)
            current = producer(g, current.inputs[0])
        if len(stack) < 2:
            continue                     # one layer that covers its map: a dense layer as a conv (§2.5)
        stack.reverse()
        sizes = [g.values[stack[0].inputs[0]].type.spatial] + [g.values[n.output].type.spatial for n in stack]
        if not all(isinstance(s, int) for size in sizes for s in size):
            continue
        path = " → ".join(x(s) for s in sizes)
        kernels = {k for n in stack for k in n.attrs["kernel"]}
        formula = ""
        if len(kernels) == 1 and all(s == 1 for n in stack for s in n.attrs["stride"]) and \
                all(r == 1 for n in stack for r in n.attrs["dilation"]) and len(set(sizes[0])) == 1:
            (k,) = kernels
            formula = f", m − (k−1)·d = {sizes[0][0]} − {k - 1}·{len(stack)} = 1"
        yield warning(node, "W106",
                      f"valid padding shrinks the map {path} over {len(stack)} convs (§1.2.2: each removes "
                      f"k−1 positions per axis{formula}), so nothing deeper can convolve it; pad=same keeps "
                      f"the size")


@rule("W107", "even-kernel-same")
def even_kernel_same(g: Graph):
    for node in g.nodes:
        if not convolution(node):
            continue
        k = node.attrs["kernel"]
        spec = node.attrs["pad_spec"]
        if getattr(spec, "name", None) != "same" or all(n % 2 for n in k):
            continue
        uneven = [(b, a) for b, a in node.attrs["pads"] if isinstance(b, int) and isinstance(a, int) and b != a]
        if not uneven:
            continue
        b, a = uneven[0]
        yield warning(node, "W107",
                      f"an even {x(k)} kernel with pad=same pads unevenly ({b} before, {a} after): each "
                      f"output's window is centred half a position off its own (§3.4.7); an odd kernel such as "
                      f"3×3 pads both sides alike")


# ---- §3.9 group convs: W108 -----------------------------------------------------------------

def group_conv(node: Node) -> bool:
    return channel_mixing_conv(node) and node.attrs["groups"] > 1 and not is_depthwise(node)


def groups_seen(g1: int, g2: int, channels: int) -> int:
    """How many of the first conv's g1 output groups one group of the second conv (g2 groups)
    reads, at most."""
    size1, size2 = channels // g1, channels // g2
    return max(len({c // size1 for c in range(j * size2, (j + 1) * size2)}) for j in range(g2))


@rule("W108", "groups-without-shuffle")
def groups_without_shuffle(g: Graph):
    for node in g.nodes:
        if not group_conv(node):
            continue
        current = producer(g, node.inputs[0])
        while current is not None and (elementwise(current) or window_pool(current) or is_depthwise(current)):
            current = producer(g, current.inputs[0])
        if current is None or not group_conv(current):
            continue
        g1, g2 = current.attrs["groups"], node.attrs["groups"]
        seen = groups_seen(g1, g2, node.attrs["in"])
        if seen >= g1:
            continue
        yield warning(node, "W108",
                      f"{node.label} (groups={g2}) reads {current.label} (groups={g1}) with no shuffle between "
                      f"them: each group of {node.label} sees the channels of only {seen} of {current.label}'s "
                      f"{g1} groups (§3.9); put shuffle({g1}) after {current.label}")


# ---- §2.4, §2.5, §3.1, §3.2 parameter budgets: W109, W110 -----------------------------------

def layer_params(g: Graph, name: str) -> int:
    return sum(D.product(p.shape) for p in g.layer(name).params)


def total_params(g: Graph) -> int:
    return sum(D.product(p.shape) for layer in g.layers for p in layer.params)


def flattened_map(g: Graph, node: Node):
    """The map a dense layer reads (flattened), or None when it reads a vector."""
    current = producer(g, node.inputs[0])
    while current is not None and elementwise(current):
        current = producer(g, current.inputs[0])
    if current is None or not op_of(current).flattens:
        return None
    t = g.values[current.inputs[0]].type
    return t if t.spatial and t.is_static() else None


@rule("W109", "dense-heavy")
def dense_heavy(g: Graph):
    total = total_params(g)
    if total < 1000:
        return
    seen = set()
    for node in g.nodes:
        if not op_of(node).fully_connected or node.layer in seen:
            continue
        seen.add(node.layer)
        own = layer_params(g, node.layer)
        source = flattened_map(g, node)
        if own * 2 <= total or source is None or D.product(source.spatial) < 2:
            continue
        positions = D.product(source.spatial)
        out = node.attrs["out"]
        yield warning(node, "W109",
                      f"{node.label} holds {100 * own // total}% of the network's {total:,} parameters (§2.4): "
                      f"it reads a {source.text(g.layout)} map, so global average pooling before it would need "
                      f"{positions}× fewer weights ({source.channels * out:,} instead of "
                      f"{source.channels * positions * out:,}); `convdsl convert --fc-to-conv` keeps them "
                      f"but lets the network slide over larger inputs (§2.5)")


@rule("W110", "unshared-heavy")
def unshared_heavy(g: Graph):
    for node in g.nodes:
        if not op_of(node).unshared:
            continue
        weight = next(p for p in g.layer(node.layer).params if p.name == "weight")
        own = D.product(weight.shape)
        shared = node.attrs["out"] * node.attrs["in"] * math.prod(node.attrs["kernel"])
        if own < 10 * shared:
            continue
        sets = x(node.attrs["tile"])
        if op_of(node).kernel_per_position:
            what, fix = f"one kernel set for each of its {sets} output positions", "`tiled` with a small tile (§3.2)"
        else:
            what, fix = f"{sets} kernel sets", "a smaller tile"
        yield warning(node, "W110",
                      f"{node.label} has {own:,} weights, {what}: {own // shared}× the {shared:,} of a conv "
                      f"with the same kernel (§3.1, §3.2); {fix}, or a conv, needs far fewer")


# ---- the loss: W111 ---------------------------------------------------------------------------

@rule("W111", "softmax-before-loss")
def softmax_before_loss(g: Graph):
    loss = g.loss
    applied = LOSSES[loss.kind].applies(loss.attrs) if loss is not None else None
    if applied is None:
        return
    node = producer(g, loss.value)
    if node is None or node.op != applied:
        return
    yield warning(node, "W111",
                  f"{loss.kind} applies {applied} itself: with {node.label} before it, the scores go "
                  f"through {applied} twice, so the loss sees probabilities squeezed between 0 and 1 and trains "
                  f"slowly; give the loss the scores (the input of this {applied}), and for probabilities at "
                  f"inference output `probs = scores -> {applied}` as well",
                  (Note(f"the loss is at {loss.span}", loss.span),))


# ---- running the rules ----------------------------------------------------------------------

CODES = {r.code: r.name for r in RULES}

_ALLOW = re.compile(r"#\s*convdsl:\s*allow\s+(W\d+(?:[\s,]+W\d+)*)")


def allowed_codes(text: str) -> set[str]:
    match = _ALLOW.search(text)
    return set(re.split(r"[\s,]+", match.group(1))) if match else set()


def allowed_on_line(diag: Diagnostic) -> bool:
    """`# convdsl: allow CODE` at the end of the op's line, or alone on the line just above it."""
    if diag.span is None:
        return False
    source = diag.span.source
    if diag.code in allowed_codes(source.line(diag.span.line)):
        return True
    above = source.line(diag.span.line - 1) if diag.span.line > 1 else ""
    return above.lstrip().startswith("#") and diag.code in allowed_codes(above)


def lint(g: Graph, allow: frozenset[str] = frozenset()) -> tuple[Diagnostic, ...]:
    """Every warning of every rule, in source order, less those allowed per line or per run.

    An op inside a block or a `repeat` body is one line of source but several layers; a rule that
    fires at several of them is reported once, at that line, with a note saying how often."""
    found = [d for r in RULES if r.code not in allow for d in r.check(g)]
    found = [d for d in found if not allowed_on_line(d)]
    groups: dict[tuple, list[Diagnostic]] = {}
    for d in found:
        key = (d.code, d.span.path, d.span.line, d.span.col) if d.span else (d.code, "", 0, 0, d.message)
        groups.setdefault(key, []).append(d)
    out = []
    for same in groups.values():
        first = same[0]
        if len(same) > 1:
            first = replace(first, notes=(*first.notes, f"note: {len(same)} layers made from this line (block "
                                                        f"instances or repeat rounds) warn alike; shown once, "
                                                        f"for the first"))
        out.append(first)
    return tuple(sorted(out, key=lambda d: (d.span.path, d.span.line, d.span.col, d.code)
                        if d.span else ("", 0, 0, d.code)))
