"""Activation memory planned from liveness: where every value lives when the network runs
forward only (eval mode), so that values whose lifetimes do not overlap share memory.

A value is live from the node that makes it to the last node that reads it (network inputs
from the start, outputs to the end); while a node runs, its inputs and its output are live.
The plan places values in one region, in elements per sample (a batch of N scales every offset
by N, which keeps placements apart). With static sizes several placements are tried (first fit
in production order, first fit largest first, both ends of the region for chains, then first
fit in seeded random orders until one reaches the lower bound) and the smallest kept. Run-time sizes that are all multiples of one expression (19·H·W, 35·H·W) are
placed as those multiples, so that the placement holds at every size; other run-time sizes are
placed apart, without sharing.

First fit asks, for each value in turn, the lowest offset that no value placed before it and
live at the same time occupies. An index built once per set of lifetimes answers that without
scanning every value placed so far: a segment tree over the times (O(log² T) a value), or each
value's list of the values it overlaps when those lists are short. The peak is a sweep over the
times. So a network of n layers is placed in about n log² n per order tried, not n², and the
random orders (each dropped once it cannot beat the best) are tried only up to SEARCH_MAX_VALUES.

Training mode places activations, gradients and saved masks together, by their lifetimes over
a timeline of the forward steps, then the backward steps (`training_placement`):
- an activation lives from the step that writes it to its last forward reader, or to the end
  when some backward reads it (the op's `backward_reads`: a conv its input, a relu its output).
  To the end, not to that backward step: a backward may run again on the same forward (the
  Model contract), so a backward never overwrites what a backward reads. Inputs and outputs
  live throughout (the caller's data, read after the forward and by the loss);
- a gradient lives from the first backward step that touches it (its consumers' backwards add
  into it; an output's is seeded as the backward starts) to its producer's backward, which
  reads it (an input's is copied out at the end). The module zeroes each gradient just before
  that first step, since the memory held another tensor before;
- what a forward saves for its backward (dropout's mask) lives from that forward to the end.
Values nobody's backward reads so die at their last forward reader, and their memory serves
other values and, in the backward, the gradients.
"""
from __future__ import annotations

import functools
import random
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import cached_property

from ..errors import ConvDSLError
from ..ir import dims as D
from ..ir.dims import Dim
from ..ir.graph import Graph
from ..ops.base import INPUTS, OUTPUT, lookup


SEARCH_ORDERS = 400        # first-fit orders tried beyond the fixed ones
SEARCH_MAX_VALUES = 300    # graphs with more values keep the fixed orders' best


@dataclass(frozen=True)
class Lifetimes:
    first: tuple[int, ...]           # per value: the node index it becomes live at
    last: tuple[int, ...]            # per value: the last node index it is live at
    size: tuple[Dim, ...]            # per value: elements per sample


def lifetimes(g: Graph, fusions: dict[int, tuple[int, ...]] | None = None) -> Lifetimes:
    """`fusions`: producer node → the chain of nodes run in the producer's epilogue. The producer
    then writes the chain's last value (live from the producer on) and, in eval mode, none of the
    values before it (size 0)."""
    fusions = fusions or {}
    n = len(g.nodes)
    last_use = [-1] * len(g.values)
    for node in g.nodes:
        for vid in node.inputs:
            last_use[vid] = max(last_use[vid], node.id)
    for out in g.outputs:
        last_use[out.value] = max(n - 1, 0)
    written_at = {v.id: v.producer for v in g.values}
    unwritten = set()
    for producer, chain in fusions.items():
        written_at[g.nodes[chain[-1]].output] = producer
        unwritten.update(g.nodes[nid].output for nid in (producer, *chain[:-1]))
    first, last = [], []
    for v in g.values:
        at = written_at[v.id]
        start = 0 if at is None else at
        end = last_use[v.id] if at is None else max(last_use[v.id], at)
        first.append(start)
        last.append(max(end, start))
    return Lifetimes(tuple(first), tuple(last),
                     tuple(0 if v.id in unwritten else D.product(v.type.shape) for v in g.values))


def live_peak(life: Lifetimes, nodes: int, probe: dict) -> tuple[Dim, int | None]:
    """The largest sum of live sizes over the nodes (a lower bound of any placement), and where.
    A sweep over the times: a value's size joins the sum at its first time and leaves it after
    its last (sizes add exactly, so the sums are those of adding up the live values at each time)."""
    times = max(nodes, 1)
    born: list[list[int]] = [[] for _ in range(times)]
    dies: list[list[int]] = [[] for _ in range(times + 1)]
    for v, (lo, hi) in enumerate(zip(life.first, life.last)):
        if lo <= hi and lo < times and hi >= 0:
            born[max(lo, 0)].append(v)
            dies[min(hi, times - 1) + 1].append(v)
    best: Dim = 0
    where = None
    live: Dim = 0
    for t in range(times):
        for v in dies[t]:
            live = D.sub(live, life.size[v])
        for v in born[t]:
            live = D.add(live, life.size[v])
        if where is None or D.evaluate(live, probe) > D.evaluate(best, probe):
            best, where = live, t
    return best, (where if nodes else None)


class _Occupancy:
    """Where the items placed so far lie, for asking what an item's lifetime leaves free: a
    segment tree over the times whose nodes hold memory intervals, merged and sorted.

    Each tree node has two sets: `whole` (items live over all of its times) and `part` (items
    live over some of them). An item live over [first, last] and placed at [offset, offset + size)
    is written into `whole` of every node of the canonical cover of [first, last] (the O(log T)
    nodes whose time ranges tile it) and into `part` of those nodes' ancestors. The items whose
    lifetimes meet [first, last] are then exactly those in `whole` or `part` of its cover, or in
    `whole` of the cover's ancestors: O(log T) sets, each searched by bisection, where the first
    version scanned every item placed so far (quadratic in the number of layers).

    A set is one sorted list of boundaries, lo₀ hi₀ lo₁ hi₁ …, of disjoint intervals [lo, hi)
    (touching ones merged): an even position holds where an interval starts, an odd one where it
    ends. Only whether memory is taken matters, never by whom."""

    def __init__(self, life: Lifetimes):
        times = max((hi + 1 for hi in life.last), default=1)
        width = 1
        while width < times:
            width *= 2
        part = 2 * width
        self.slots = 2 * part           # the sets: node n's `whole` is slot n, its `part` slot part + n
        self.query: list[tuple[int, ...]] = []      # per item: the slots of the sets its lifetime meets
        self.write: list[tuple[int, ...]] = []      # per item: the slots of the sets it is written into
        for lo, hi in zip(life.first, life.last):
            cover, a, b = [], lo + width, hi + width + 1
            while a < b:
                if a & 1:
                    cover.append(a)
                    a += 1
                if b & 1:
                    b -= 1
                    cover.append(b)
                a //= 2
                b //= 2
            above: set[int] = set()                 # the cover's ancestors
            for node in cover:
                node //= 2
                while node and node not in above:
                    above.add(node)
                    node //= 2
            ancestors = sorted(above)
            self.query.append((*cover, *(part + n for n in cover), *ancestors))
            self.write.append((*cover, *(part + n for n in ancestors)))
        self.sets: list[list[int] | None] = []

    def empty(self) -> "_Occupancy":
        """The same lifetimes with nothing placed."""
        fresh = object.__new__(_Occupancy)
        fresh.slots, fresh.query, fresh.write = self.slots, self.query, self.write
        fresh.sets = [None] * self.slots
        return fresh

    def lowest_free(self, v: int, size: int) -> int:
        """The lowest offset at which `size` elements meet nothing placed over v's lifetime."""
        if size == 0:
            return 0
        sets = [s for s in map(self.sets.__getitem__, self.query[v]) if s]
        at, moved = 0, True
        while moved:
            moved = False
            for bounds in sets:
                i = bisect_right(bounds, at)
                if i & 1:                           # `at` lies in an interval: past its end
                    at, moved = bounds[i], True
                    i += 1
                while i < len(bounds) and bounds[i] < at + size:     # the next one starts too low
                    at, moved = bounds[i + 1], True
                    i += 2
        return at

    def meets(self, v: int, at: int, size: int) -> bool:
        """Whether [at, at + size), size > 0, meets something placed over v's lifetime."""
        for n in self.query[v]:
            bounds = self.sets[n]
            if bounds:
                i = bisect_right(bounds, at)
                if i & 1 or (i < len(bounds) and bounds[i] < at + size):
                    return True
        return False

    def add(self, v: int, at: int, size: int) -> None:
        if size == 0:
            return
        end = at + size
        sets = self.sets
        for n in self.write[v]:
            bounds = sets[n]
            if bounds is None:
                sets[n] = [at, end]
                continue
            i = bisect_left(bounds, at)             # odd: `at` lies in (or ends) an interval, which grows
            j = bisect_right(bounds, end)           # odd: `end` lies in (or starts) one, which grows
            bounds[i:j] = ([] if i & 1 else [at]) + ([] if j & 1 else [end])


class _Neighbours:
    """The same questions as _Occupancy, answered from each item's list of the items whose
    lifetimes overlap its own: cheaper when those lists are short (eval mode, where few values
    are live at once), dearer when they are long (training keeps what backwards read to the end)."""

    def __init__(self, life: Lifetimes):
        self.size = life.size
        self.near: list[list[int]] = [[] for _ in life.size]
        active: list[int] = []
        # By birth: an item overlaps each earlier-born one still live at its birth.
        for v in sorted(range(len(life.size)), key=lambda v: life.first[v]):
            born = life.first[v]
            active = [u for u in active if life.last[u] >= born]
            if life.size[v]:
                for u in active:
                    self.near[u].append(v)
                    self.near[v].append(u)
                active.append(v)
        self.offsets: list[int | None] = []

    def empty(self) -> "_Neighbours":
        """The same lifetimes with nothing placed."""
        fresh = object.__new__(_Neighbours)
        fresh.size, fresh.near, fresh.offsets = self.size, self.near, [None] * len(self.size)
        return fresh

    def _busy(self, v: int):
        offsets, size = self.offsets, self.size
        return ((offsets[u], offsets[u] + size[u]) for u in self.near[v] if offsets[u] is not None)

    def lowest_free(self, v: int, size: int) -> int:
        # The first version's scan: up the placed intervals in order, until a gap holds `size`.
        at = 0
        for lo, hi in sorted(self._busy(v)):
            if at + size <= lo:
                break
            at = max(at, hi)
        return at

    def meets(self, v: int, at: int, size: int) -> bool:
        return any(lo < at + size and at < hi for lo, hi in self._busy(v))

    def add(self, v: int, at: int, size: int) -> None:
        self.offsets[v] = at


def overlapping_pairs(life: Lifetimes) -> int:
    """How many ordered pairs of items (an item with itself too) have overlapping lifetimes:
    each item meets those born by its death, less those dead before its birth."""
    firsts, lasts = sorted(life.first), sorted(life.last)
    return sum(bisect_right(firsts, hi) - bisect_left(lasts, lo) for lo, hi in zip(life.first, life.last))


def _index(life: Lifetimes) -> _Occupancy | _Neighbours:
    """Whichever answers the placement's questions faster for these lifetimes: the neighbour
    lists while an item meets a few dozen others on average, else the tree over the times."""
    n = len(life.size)
    times = max(life.last, default=0) + 1
    if overlapping_pairs(life) <= n * 4 * times.bit_length():
        return _Neighbours(life)
    return _Occupancy(life)


def _first_fit(life: Lifetimes, order, occupancy: _Occupancy | _Neighbours,
               above: int | None = None) -> tuple[list[int], int] | None:
    """Each value in `order` at the lowest offset where it meets no value placed before it
    whose lifetime overlaps its own; None as soon as the total would reach `above` (an order
    tried only to beat that total is given up once it cannot)."""
    placed = occupancy.empty()
    offsets: list[int] = [0] * len(life.size)
    total = 0
    for v in order:
        size = life.size[v]
        offsets[v] = at = placed.lowest_free(v, size)
        placed.add(v, at, size)
        if at + size > total:
            total = at + size
            if above is not None and total >= above:
                return None
    return offsets, total


def _two_ended(life: Lifetimes, order, total: int, occupancy: _Occupancy | _Neighbours) -> list[int] | None:
    """Values alternately at the bottom and at the top of a region of `total` elements: the
    optimum for a chain; None when some value does not fit."""
    placed = occupancy.empty()
    offsets: list[int | None] = [None] * len(life.size)
    bottom = True
    for v in order:
        size = life.size[v]
        at = 0 if bottom else total - size
        # An empty value meets nothing: it lies at 0 or at `total`, and all that is placed lies
        # within [0, total] (every total tried is at least the peak, so at least every size).
        if size and placed.meets(v, at, size):
            return None
        offsets[v] = at
        placed.add(v, at, size)
        bottom = not bottom
    return offsets


def place_static(life: Lifetimes, nodes: int, search: int = SEARCH_ORDERS) -> tuple[tuple[int, ...], int]:
    values = range(len(life.size))
    by_birth = sorted(values, key=lambda v: (life.first[v], v))
    occupancy = _index(life)                 # built once for every order tried
    candidates = [_first_fit(life, by_birth, occupancy),
                  _first_fit(life, sorted(values, key=lambda v: (-life.size[v], life.first[v], v)), occupancy)]
    peak, _ = live_peak(life, nodes, {})
    # Chains reach the peak with both ends; try the bound first, then each fitting total found.
    for total in sorted({peak, *(t for _, t in candidates)}):
        two = _two_ended(life, by_birth, total, occupancy)
        if two is not None:
            candidates.append((two, max((o + s for o, s in zip(two, life.size)), default=0)))
            break
    offsets, total = min(candidates, key=lambda c: c[1])
    # Branching graphs: first fit in other orders, drawn from a fixed seed (the same placement on
    # every run), until one reaches the bound; only for graphs small enough to try many.
    shuffled = list(values)
    rng = random.Random(0)
    for _ in range(search if len(shuffled) <= SEARCH_MAX_VALUES else 0):
        if total <= peak:
            break
        rng.shuffle(shuffled)
        tried = _first_fit(life, shuffled, occupancy, above=total)
        if tried is not None:
            offsets, total = tried
    return tuple(offsets), total


def place_apart(life: Lifetimes) -> tuple[tuple[Dim, ...], Dim]:
    """Every value after the one before: no sharing. For run-time sizes without a common unit,
    where no placement that shares could be proven apart for every size."""
    offsets, total, _ = place_guarded(life, 0)
    return offsets, total


def place_guarded(life: Lifetimes, guard: int) -> tuple[tuple[Dim, ...], Dim, tuple[tuple[Dim, Dim], ...]]:
    """Every item apart, each followed by `guard` elements that nothing uses: the layout of a
    sanitizer build, whose module poisons those gaps (the guards returned, as (offset, elements)),
    so that a kernel running past one tensor into the next is reported. Sharing memory by
    lifetime would put another tensor where a guard is. An empty item (a value a fused kernel
    never writes) gets no guard."""
    offsets, guards, total = [], [], 0
    for size in life.size:
        offsets.append(total)
        if size == 0:
            continue
        total = D.add(total, size)
        if guard:
            guards.append((total, guard))
            total = D.add(total, guard)
    return tuple(offsets), total, tuple(guards)


def _common_unit(sizes) -> tuple[Dim, list[int]] | None:
    """(U, k) with size_i == k_i·U for every run-time size, when one U serves them all
    (`19·H·W`, `35·H·W` → U = H·W): they can then be placed as the integers k_i."""
    import math
    symbolic = [s for s in sizes if not isinstance(s, int)]
    first = symbolic[0]
    if first.const:
        return None
    g = 0
    for _, c in first.terms:
        g = math.gcd(g, c)
    unit = D.floordiv(first, g) if g > 1 else first
    if isinstance(unit, int) or unit.const:
        return None
    lead_atom, lead_coeff = unit.terms[0]
    ks = []
    for s in symbolic:
        coeff = dict(s.terms).get(lead_atom)
        if coeff is None or coeff % lead_coeff or D.mul(unit, coeff // lead_coeff) != s:
            return None
        ks.append(coeff // lead_coeff)
    return unit, ks


def inference_placement(g: Graph, fusions: dict[int, tuple[int, ...]] | None = None) -> tuple[tuple[Dim, ...], Dim]:
    """Per-sample offsets of every value in the eval-mode region, and the region's size."""
    return place(lifetimes(g, fusions), len(g.nodes))


@functools.lru_cache(maxsize=16)
def place(life: Lifetimes, times: int, search: int = SEARCH_ORDERS) -> tuple[tuple[Dim, ...], Dim]:
    """Per-sample offsets of every item of `life` (live over times 0 … times − 1), and the
    total: items whose lifetimes overlap never overlap in memory. Kept for the last few
    lifetimes asked (the same answer every time): `check` and the compile that follows it
    (passes/memory.py, lower/plan.py) place the same network twice."""
    nodes = times
    if all(isinstance(s, int) for s in life.size):
        return place_static(life, nodes, search)
    common = _common_unit(life.size)
    if common is None:
        return place_apart(life)
    # Run-time-sized values placed as multiples of U, below the static ones placed on their own.
    unit, ks = common
    dyn = [v for v, s in enumerate(life.size) if not isinstance(s, int)]
    fixed = [v for v, s in enumerate(life.size) if isinstance(s, int)]

    def sub(values, sizes):
        return Lifetimes(tuple(life.first[v] for v in values), tuple(life.last[v] for v in values), tuple(sizes))

    dyn_off, dyn_total = place_static(sub(dyn, ks), nodes, search)
    fixed_off, fixed_total = place_static(sub(fixed, [life.size[v] for v in fixed]), nodes, search) if fixed else ((), 0)
    offsets: list[Dim] = [0] * len(life.size)
    base = D.mul(unit, dyn_total)
    for v, o in zip(dyn, dyn_off):
        offsets[v] = D.mul(unit, o)
    for v, o in zip(fixed, fixed_off):
        offsets[v] = D.add(base, o)
    return tuple(offsets), D.add(base, fixed_total)


# ---- training mode -------------------------------------------------------------------------

TRAINING_SEARCH_ORDERS = 60     # fewer random orders than eval: three times the items, each order dearer


@dataclass(frozen=True)
class TrainingTimeline:
    """When each step of a training forward and backward runs. Node n's forward is at time n
    (an activation fused into its producer: the producer's); the backward starts at `start`,
    where the outputs' gradients are zeroed and seeded; node n's backward is at start + N − n;
    `end` is after the last backward (the input gradients are copied out)."""
    forward: tuple[int, ...]
    backward: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class TrainingLayout:
    """Where training mode keeps everything, in one per-sample block: per value the offset of its
    activation and of its gradient, per saving node the offset of what it saves, and the total."""
    activation: tuple[Dim, ...]
    gradient: tuple[Dim, ...]
    saved: dict[int, tuple[Dim, Dim]]        # node → (offset, elements)
    total: Dim
    first_touch: tuple[int, ...]             # per value: the time its gradient is zeroed
    timeline: TrainingTimeline
    life: Lifetimes                          # activations, then gradients, then saved masks
    guards: tuple[tuple[Dim, Dim], ...] = ()  # a guarded placement's gaps (place_guarded)

    def zeroed_before(self, node: int) -> tuple[int, ...]:
        """The values whose gradients node's backward is the first to touch: zeroed just before it."""
        return self._zeroed_at.get(self.timeline.backward[node], ())

    def zeroed_at_start(self) -> tuple[int, ...]:
        """The values whose gradients are zeroed as the backward starts (outputs: then seeded)."""
        return self._zeroed_at.get(self.timeline.start, ())

    @cached_property
    def _zeroed_at(self) -> dict[int, tuple[int, ...]]:
        # time → the values first touched then, in value order; built once for every step's asking.
        at: dict[int, list[int]] = {}
        for v, t in enumerate(self.first_touch):
            at.setdefault(t, []).append(v)
        return {t: tuple(vs) for t, vs in at.items()}


def values_read_by_backward(g: Graph) -> frozenset[int]:
    """The values some layer's backward reads: its inputs or its output, as its op says
    (OpDef.backward_reads). The others are not needed once the forward is done."""
    read: set[int] = set()
    for node in g.nodes:
        reads = lookup(node.op).backward_reads(node.attrs)
        if INPUTS in reads:
            read.update(node.inputs)
        if OUTPUT in reads:
            read.add(node.output)
    return frozenset(read)


def training_lifetimes(g: Graph, fusions: dict[int, tuple[int, ...]] | None = None,
                       saved: dict[int, Dim] | None = None) -> tuple[Lifetimes, TrainingTimeline, tuple[int, ...]]:
    """Lifetimes of the activations (items 0 … V − 1), the gradients (V … 2V − 1) and the saved
    masks (then, in node order of `saved`: node → elements), and each gradient's first touch.
    `fusions`: producer → the chain of nodes run in its epilogue; every value of the chain is
    written at the producer's step, the ones before its last only when a backward reads them
    (the fused kernel keeps exactly those, lower/plan.py `_stages`)."""
    fusions = fusions or {}
    saved = saved or {}
    n = len(g.nodes)
    start, end = n, 2 * n + 1
    fused_into = {nid: producer for producer, chain in fusions.items() for nid in chain}
    forward = tuple(fused_into.get(node.id, node.id) for node in g.nodes)
    backward = tuple(start + n - node.id for node in g.nodes)
    in_between = {g.nodes[nid].output for producer, chain in fusions.items() for nid in (producer, *chain[:-1])}
    boundary = {i.value for i in g.inputs} | {o.value for o in g.outputs}
    inputs = {i.value for i in g.inputs}
    outputs = {o.value for o in g.outputs}

    written_at: dict[int, int] = {}
    last_forward = {v.id: -1 for v in g.values}
    read_by_backward = values_read_by_backward(g)
    grad_touch: dict[int, list[int]] = {v.id: [] for v in g.values}
    for node in g.nodes:
        written_at[node.output] = forward[node.id]
        for vid in node.inputs:
            last_forward[vid] = max(last_forward[vid], node.id)
            grad_touch[vid].append(backward[node.id])          # its backward adds into dx
        grad_touch[node.output].append(backward[node.id])      # … and reads dy
    unwritten = in_between - read_by_backward

    first, last, size = [], [], []
    for v in g.values:                                          # activations
        if v.id in boundary:
            lo, hi = 0, end
        else:
            lo = written_at[v.id]
            hi = end if v.id in read_by_backward else max(lo, last_forward[v.id])
        first.append(lo)
        last.append(hi)
        size.append(0 if v.id in unwritten else D.product(v.type.shape))
    touch = []
    for v in g.values:                                          # gradients
        times = list(grad_touch[v.id])
        if v.id in outputs:
            times.append(start)
        if v.id in inputs:
            times.append(end)
        lo = min(times)
        if lo == end:               # an input nobody reads: zeroed with the outputs' at the start
            lo = start
        touch.append(lo)
        first.append(lo)
        last.append(max(times))
        size.append(D.product(v.type.shape))
    for nid, elems in saved.items():                            # saved masks
        first.append(forward[nid])
        last.append(end)
        size.append(elems)
    return Lifetimes(tuple(first), tuple(last), tuple(size)), TrainingTimeline(forward, backward, start, end), tuple(touch)


def saved_elements(g: Graph) -> dict[int, Dim]:
    """node → per-sample elements its forward keeps for its backward (dropout's mask), in node order."""
    out = {}
    for node in g.nodes:
        in_types = tuple(g.values[v].type for v in node.inputs)
        keep = lookup(node.op).saved_elements(in_types, g.values[node.output].type, node.attrs)
        if keep != 0:
            out[node.id] = keep
    return out


def training_placement(g: Graph, fusions: dict[int, tuple[int, ...]] | None = None,
                       guard: int = 0) -> TrainingLayout:
    """Offsets of every activation, gradient and saved mask in the training block, and its size;
    with `guard`, each apart from the others behind a guard of that many elements (place_guarded)."""
    saved = saved_elements(g)
    life, timeline, touch = training_lifetimes(g, fusions, saved)
    guards = ()
    if guard:
        offsets, total, guards = place_guarded(life, guard)
    else:
        offsets, total = place(life, timeline.end + 1, TRAINING_SEARCH_ORDERS)
    nv = len(g.values)
    saved_at = {nid: (offsets[2 * nv + k], elems) for k, (nid, elems) in enumerate(saved.items())}
    return TrainingLayout(tuple(offsets[:nv]), tuple(offsets[nv:2 * nv]), saved_at, total, touch, timeline, life,
                          guards)
