"""Memory placement by lifetime (convdsl/lower/memory.py) places exactly as the first, quadratic
version did — every offset and every total, on every example in both modes, on the fuzz file of
430 convolutions and on random lifetimes — while the cost grows as about n log² n, not n².

The reference below is that first version, kept here word for word in what it computes: for
every value it scanned all values placed so far, and summed the live sizes at each time by
visiting every value."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from convdsl.compiler import graph_from_file, graph_from_source, networks_in_file
from convdsl.ir import dims as D
from convdsl.lower import memory
from convdsl.lower.memory import Lifetimes, lifetimes, live_peak, place_static, saved_elements, training_lifetimes
from convdsl.lower.plan import fusions_of

REPO = Path(__file__).resolve().parents[2]
CASES = [(path, name) for path in sorted((REPO / "examples").glob("*.cnn")) for name in networks_in_file(path)]
# The fuzz campaign's file of 430 convolutions (215 branches off the input, the last one the output).
CONVOLUTIONS_400 = ("network A {\n    input x: [16, 17, 17]\n"
                    + "    y = x -> conv(16, kernel=(1, 7), pad=same) -> conv(16, kernel=(7, 1), pad=same)\n" * 215
                    + "    output y\n}")


# ---- the reference: the first version, O(values²) per order ------------------------------------

def reference_live_peak(life, nodes, probe):
    best, where = 0, None
    for t in range(max(nodes, 1)):
        live = 0
        for v in range(len(life.size)):
            if life.first[v] <= t <= life.last[v]:
                live = D.add(live, life.size[v])
        if where is None or D.evaluate(live, probe) > D.evaluate(best, probe):
            best, where = live, t
    return best, (where if nodes else None)


def _overlap(life, a, b):
    return life.first[a] <= life.last[b] and life.first[b] <= life.last[a]


def reference_first_fit(life, order):
    offsets = [None] * len(life.size)
    for v in order:
        busy = sorted((offsets[u], offsets[u] + life.size[u]) for u in range(len(life.size))
                      if offsets[u] is not None and _overlap(life, u, v) and life.size[u])
        at = 0
        for lo, hi in busy:
            if at + life.size[v] <= lo:
                break
            at = max(at, hi)
        offsets[v] = at
    return offsets, max((o + s for o, s in zip(offsets, life.size)), default=0)


def reference_two_ended(life, order, total):
    offsets = [None] * len(life.size)
    bottom = True
    for v in order:
        size = life.size[v]
        busy = [(offsets[u], offsets[u] + life.size[u]) for u in range(len(life.size))
                if offsets[u] is not None and _overlap(life, u, v) and life.size[u]]
        at = 0 if bottom else total - size
        if any(lo < at + size and at < hi for lo, hi in busy):
            return None
        offsets[v] = at
        bottom = not bottom
    return offsets


def reference_place_static(life, nodes, search):
    values = range(len(life.size))
    by_birth = sorted(values, key=lambda v: (life.first[v], v))
    candidates = [reference_first_fit(life, by_birth),
                  reference_first_fit(life, sorted(values, key=lambda v: (-life.size[v], life.first[v], v)))]
    peak, _ = reference_live_peak(life, nodes, {})
    for total in sorted({peak, *(t for _, t in candidates)}):
        two = reference_two_ended(life, by_birth, total)
        if two is not None:
            candidates.append((two, max((o + s for o, s in zip(two, life.size)), default=0)))
            break
    offsets, total = min(candidates, key=lambda c: c[1])
    shuffled = list(values)
    rng = random.Random(0)
    for _ in range(search if len(shuffled) <= memory.SEARCH_MAX_VALUES else 0):
        if total <= peak:
            break
        rng.shuffle(shuffled)
        tried, t = reference_first_fit(life, shuffled)
        if t < total:
            offsets, total = tried, t
    return tuple(offsets), total


# ---- the same placements ----------------------------------------------------------------------

def static_parts(life: Lifetimes) -> list[Lifetimes]:
    """The all-int lifetimes place() hands place_static: the whole, or (run-time sizes with a
    common unit) the multiples of the unit and the static sizes apart."""
    if all(isinstance(s, int) for s in life.size):
        return [life]
    common = memory._common_unit(life.size)
    if common is None:
        return []
    _, ks = common
    dyn = [v for v, s in enumerate(life.size) if not isinstance(s, int)]
    fixed = [v for v, s in enumerate(life.size) if isinstance(s, int)]
    sub = lambda vs, sizes: Lifetimes(tuple(life.first[v] for v in vs), tuple(life.last[v] for v in vs), tuple(sizes))  # noqa: E731
    return [sub(dyn, ks)] + ([sub(fixed, [life.size[v] for v in fixed])] if fixed else [])


def both_modes(graph):
    fusions = fusions_of(graph)
    life, timeline, _ = training_lifetimes(graph, fusions, saved_elements(graph))
    # Eval mode places the values of its own schedule (batchnorms folded into their producers).
    return [(lifetimes(graph, fusions_of(graph, eval_mode=True)), len(graph.nodes), memory.SEARCH_ORDERS),
            (life, timeline.end + 1, memory.TRAINING_SEARCH_ORDERS)]


@pytest.mark.parametrize("path,network", CASES, ids=[f"{p.stem}:{n}" for p, n in CASES])
def test_every_example_is_placed_as_the_reference_places_it(path, network):
    graph = graph_from_file(path, network)
    probe = {name: 64 for name in graph.sym_dims}
    for life, times, search in both_modes(graph):
        assert live_peak(life, times, probe) == reference_live_peak(life, times, probe)
        parts = static_parts(life)
        assert parts, "every example's run-time sizes share a unit"
        for part in parts:
            assert place_static(part, times, search) == reference_place_static(part, times, search)


def test_the_file_of_400_convolutions_is_placed_as_the_reference_places_it():
    graph = graph_from_source(CONVOLUTIONS_400)
    for life, times, search in both_modes(graph):
        assert len(life.size) > memory.SEARCH_MAX_VALUES          # the fixed orders only: the reference stays quick
        assert live_peak(life, times, {}) == reference_live_peak(life, times, {})
        assert place_static(life, times, search) == reference_place_static(life, times, search)


def random_lifetimes(rng: random.Random, n: int, times: int) -> Lifetimes:
    first, last, size = [], [], []
    for _ in range(n):
        lo = rng.randrange(times)
        # Short lives and lives to the end (what a backward reads), some values empty (fused away).
        hi = times - 1 if rng.random() < 0.2 else min(times - 1, lo + rng.choice([0, 1, 2, 5, times]))
        first.append(lo)
        last.append(hi)
        size.append(0 if rng.random() < 0.1 else rng.choice([1, 2, 3, 8, 16, 17, 64, rng.randrange(1, 200)]))
    return Lifetimes(tuple(first), tuple(last), tuple(size))


@pytest.mark.parametrize("index", [memory._Neighbours, memory._Occupancy])
@pytest.mark.parametrize("seed", range(40))
def test_random_lifetimes_are_placed_as_the_reference_places_them(seed, index, monkeypatch):
    # Both ways of finding what overlaps (place_static picks one by the lifetimes), each alone.
    monkeypatch.setattr(memory, "_index", index)
    rng = random.Random(seed)
    n = rng.choice([1, 2, 5, 12, 30, 80])
    life = random_lifetimes(rng, n, rng.choice([1, 3, 10, 40]))
    times = max(life.last) + 1
    assert live_peak(life, times, {}) == reference_live_peak(life, times, {})
    assert place_static(life, times, 30) == reference_place_static(life, times, 30)


def test_the_index_follows_how_many_lifetimes_overlap():
    chain = Lifetimes(tuple(range(100)), tuple(range(1, 101)), (4,) * 100)           # eval mode: few live at once
    kept = Lifetimes(tuple(range(100)), (100,) * 100, (4,) * 100)                   # all kept to the end
    assert memory.overlapping_pairs(chain) == 100 + 2 * 99
    assert memory.overlapping_pairs(kept) == 100 * 100
    assert isinstance(memory._index(chain), memory._Neighbours)
    assert isinstance(memory._index(kept), memory._Occupancy)


def test_a_sweep_sums_run_time_sizes_to_the_same_expressions():
    # Sizes that cancel and come back (H·W − H·W = 0, then 3·H·W): the same Dim as summing afresh.
    h, w = D.Sym.var("H"), D.Sym.var("W")
    hw = D.mul(h, w)
    life = Lifetimes((0, 0, 1, 2, 2, 3), (0, 1, 2, 3, 2, 3), (hw, 5, D.mul(hw, 3), D.add(h, 1), 7, hw))
    for probe in ({"H": 64, "W": 64}, {"H": 1, "W": 1}):
        assert live_peak(life, 4, probe) == reference_live_peak(life, 4, probe)
    peak, where = live_peak(life, 4, {"H": 64, "W": 64})
    assert (peak, where) == (D.add(D.add(D.mul(hw, 3), D.add(h, 1)), 7), 2)
