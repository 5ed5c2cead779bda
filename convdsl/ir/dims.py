"""Tensor dimensions that may depend on run-time sizes: ints, or small symbolic expressions.

A named input dim (`input x: [3, H, W]`) becomes a Sym; output-size formulas applied to it
stay symbolic (`(H - 3)//2 + 1`). Constant subexpressions fold away, so a network without
named dims only ever sees ints. A Sym renders to C (for the generated `prepare`) and to text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

Dim = Union[int, "Sym"]


@dataclass(frozen=True)
class Atom:
    """A non-linear piece: a variable, floor(a / k), max(a, b), or a * b."""
    kind: str                 # var | floordiv | max | mul
    name: str = ""
    args: tuple = ()


@dataclass(frozen=True)
class Sym:
    """const + Σ coeff·atom, in a canonical (sorted) order so equal expressions compare equal."""
    terms: tuple[tuple[Atom, int], ...]
    const: int = 0

    # -- construction
    @staticmethod
    def var(name: str) -> "Sym":
        return Sym(((Atom("var", name), 1),), 0)

    def __add__(self, other: Dim) -> Dim:
        return add(self, other)

    __radd__ = __add__

    def __sub__(self, other: Dim) -> Dim:
        return add(self, mul(other, -1))

    def __rsub__(self, other: Dim) -> Dim:
        return add(other, mul(self, -1))

    def __mul__(self, other: Dim) -> Dim:
        return mul(self, other)

    __rmul__ = __mul__

    def __floordiv__(self, other: int) -> Dim:
        return floordiv(self, other)

    def __str__(self) -> str:
        return to_text(self)


def _make(terms: dict, const: int) -> Dim:
    items = tuple(sorted(((a, c) for a, c in terms.items() if c != 0), key=lambda ac: repr(ac[0])))
    if not items:
        return const
    return Sym(items, const)


def _as_parts(d: Dim) -> tuple[dict, int]:
    if isinstance(d, int):
        return {}, d
    return dict(d.terms), d.const


def add(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    ta, ca = _as_parts(a)
    tb, cb = _as_parts(b)
    for atom, c in tb.items():
        ta[atom] = ta.get(atom, 0) + c
    return _make(ta, ca + cb)


def sub(a: Dim, b: Dim) -> Dim:
    return add(a, mul(b, -1))


def mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if isinstance(b, int):
        a, b = b, a
    if isinstance(a, int):
        if a == 0:
            return 0
        tb, cb = _as_parts(b)
        return _make({k: v * a for k, v in tb.items()}, cb * a)
    # Both symbolic: distribute, so that 4·(3·H)·W reads 12·H·W.
    ta, ca = _as_parts(a)
    tb, cb = _as_parts(b)
    terms: dict = {}
    for x, cx in ta.items():
        for y, cy in tb.items():
            m = _monomial(x, y)
            terms[m] = terms.get(m, 0) + cx * cy
    for x, cx in ta.items():
        terms[x] = terms.get(x, 0) + cx * cb
    for y, cy in tb.items():
        terms[y] = terms.get(y, 0) + cy * ca
    return _make(terms, ca * cb)


def _factors(atom: Atom) -> tuple:
    return atom.args if atom.kind == "mul" else (atom,)


def _monomial(x: Atom, y: Atom) -> Atom:
    return Atom("mul", args=tuple(sorted(_factors(x) + _factors(y), key=repr)))


def floordiv(a: Dim, k: int) -> Dim:
    if not isinstance(k, int) or k <= 0:
        raise ValueError("floordiv by a positive int only")
    if isinstance(a, int):
        return a // k
    if k == 1:
        return a
    terms, const = _as_parts(a)
    if const // k:
        # (x + c·k + r) // k == (x + r) // k + c: keep the constant outside, as a person writes it.
        return add(floordiv(_make(terms, const % k), k), const // k)
    if all(c % k == 0 for c in terms.values()):
        # (k·t + c) // k == t + c // k for integer t
        return _make({t: c // k for t, c in terms.items()}, const // k)
    if len(terms) == 1 and const == 0:
        (atom, c), = terms.items()
        if c == 1 and atom.kind == "floordiv":       # (x // a) // b == x // (a·b)
            return floordiv(atom.args[0], atom.args[1] * k)
    return _make({Atom("floordiv", args=(a, k)): 1}, 0)


def ceildiv(a: Dim, k: int) -> Dim:
    return floordiv(add(a, k - 1), k)


def maximum(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    if a == b:
        return a
    x, y = sorted((a, b), key=repr)
    return _make({Atom("max", args=(x, y)): 1}, 0)


def maximum_of(dims) -> Dim:
    """The largest of `dims` (0 for none), as a balanced tree of `maximum` over the distinct ones:
    folding them one by one nested the expression once per item, and a network of a hundred
    layers with run-time sizes nested its workspace's maximum deeper than Python's recursion
    limit (a fuzzed input, tests/campaigns/fuzz_regressions/
    recursion-workspace-max-of-110-runtime-size-convs.cnn)."""
    static = [d for d in dims if isinstance(d, int)]
    items = sorted({d for d in dims if not isinstance(d, int)}, key=repr)
    if static:
        items.append(max(static))
    while len(items) > 1:
        items = [maximum(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0] if items else 0


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def variables(d: Dim) -> set[str]:
    if isinstance(d, int):
        return set()
    out: set[str] = set()
    for atom, _ in d.terms:
        if atom.kind == "var":
            out.add(atom.name)
        else:
            for arg in atom.args:
                if isinstance(arg, Atom):
                    out |= variables(Sym(((arg, 1),), 0))
                elif not isinstance(arg, int):
                    out |= variables(arg)
    return out


def evaluate(d: Dim, env: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    total = d.const
    for atom, c in d.terms:
        if atom.kind == "var":
            v = env[atom.name]
        elif atom.kind == "floordiv":
            v = evaluate(atom.args[0], env) // atom.args[1]
        elif atom.kind == "max":
            v = max(evaluate(atom.args[0], env), evaluate(atom.args[1], env))
        else:
            v = 1
            for factor in atom.args:
                v *= evaluate(Sym(((factor, 1),), 0), env)
        total += c * v
    return total


def _render(d: Dim, var: Callable[[str], str], fdiv: Callable[[str, int], str],
            fmax: Callable[[str, str], str]) -> str:
    if isinstance(d, int):
        return str(d)
    parts: list[str] = []
    for atom, c in d.terms:
        if atom.kind == "var":
            s = var(atom.name)
        elif atom.kind == "floordiv":
            s = fdiv(_render(atom.args[0], var, fdiv, fmax), atom.args[1])
        elif atom.kind == "max":
            s = fmax(_render(atom.args[0], var, fdiv, fmax), _render(atom.args[1], var, fdiv, fmax))
        else:
            s = "*".join(_grouped(f, _render(Sym(((f, 1),), 0), var, fdiv, fmax)) for f in atom.args)
        if c not in (1, -1):
            s = _grouped(atom, s)
        if c == 1:
            term = s
        elif c == -1:
            term = f"-{s}"
        else:
            term = f"{c}*{s}"
        parts.append(term)
    if d.const:
        parts.append(str(d.const))
    text = parts[0]
    for p in parts[1:]:
        text += f" - {p[1:]}" if p.startswith("-") else f" + {p}"
    return text


def _grouped(atom: Atom, text: str) -> str:
    """Parenthesise a floor division inside a product: 3*(H//2), never 3*H//2."""
    return f"({text})" if atom.kind == "floordiv" else text


def to_text(d: Dim) -> str:
    """Human form for reports: `H`, `(H + 1)//2`."""
    def fdiv(inner: str, k: int) -> str:
        return f"{inner}//{k}" if inner.isidentifier() else f"({inner})//{k}"
    return _render(d, lambda n: n, fdiv, lambda a, b: f"max({a}, {b})")


def magnitude_bound(d: Dim, size: int, _memo: dict | None = None) -> int:
    """An upper bound on |d|, and on every partial result of computing d the way a target writes
    it (terms and factors left to right), for every value in [1, size] of every variable.

    By structure: a variable is at most `size`; |a // k| ≤ |a| and computing it (a / k, a % k)
    makes nothing larger than a; |max(a, b)| ≤ max(|a|, |b|); each partial product of a monomial
    is at most the product of its factors' bounds; and each partial sum of const + Σ c·atom is at
    most |const| + Σ |c|·bound(atom). Shared subexpressions are bounded once (memo by identity).
    """
    if isinstance(d, int):
        return abs(d)
    memo = {} if _memo is None else _memo
    key = id(d)
    if key in memo:
        return memo[key][1]
    total = abs(d.const)
    for atom, c in d.terms:
        total += abs(c) * _atom_bound(atom, size, memo)
    memo[key] = (d, total)          # keeps d alive, so its id is not reused while memo lives
    return total


def _atom_bound(atom: Atom, size: int, memo: dict) -> int:
    key = id(atom)
    if key in memo:
        return memo[key][1]
    if atom.kind == "var":
        bound = size
    elif atom.kind == "floordiv":
        bound = magnitude_bound(atom.args[0], size, memo)
    elif atom.kind == "max":
        bound = max(magnitude_bound(atom.args[0], size, memo), magnitude_bound(atom.args[1], size, memo))
    else:
        bound = 1
        for factor in atom.args:
            bound *= _atom_bound(factor, size, memo)
    memo[key] = (atom, bound)
    return bound


def expression_shape(d: Dim, _memo: dict | None = None) -> tuple[int, int]:
    """(pieces, depth) of an expression written out as a tree: pieces counts its terms and atoms
    (a subexpression used twice counts twice, as in the text a target writes), depth how deeply its
    floor divisions, maxima and products nest. Linear in the shared structure (memo by identity)."""
    if isinstance(d, int):
        return 1, 0
    memo = {} if _memo is None else _memo
    key = id(d)
    if key in memo:
        return memo[key][1]
    pieces, depth = 1, 0
    for atom, _ in d.terms:
        p, dp = _atom_shape(atom, memo)
        pieces += p
        depth = max(depth, dp)
    memo[key] = (d, (pieces, depth))
    return pieces, depth


def _atom_shape(atom: Atom, memo: dict) -> tuple[int, int]:
    key = id(atom)
    if key in memo:
        return memo[key][1]
    if atom.kind == "var":
        shape = (1, 0)
    elif atom.kind == "mul":
        parts = [_atom_shape(f, memo) for f in atom.args]
        shape = (1 + sum(p for p, _ in parts), 1 + max(dp for _, dp in parts))
    else:
        parts = [expression_shape(a, memo) for a in atom.args if not isinstance(a, int)]
        shape = (1 + sum(p for p, _ in parts), 1 + max((dp for _, dp in parts), default=0))
    memo[key] = (atom, shape)
    return shape


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out
