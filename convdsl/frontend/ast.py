"""The abstract syntax tree: frozen dataclasses, each carrying the span it was parsed from.

Chains are already desugared here: `a -> f(b, k=3)` is Call("f", (a, b), k=3),
so later stages see one form only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..errors import Source, Span


# ---- expressions -------------------------------------------------------------------------

@dataclass(frozen=True)
class Num:
    value: int | float
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class Str:
    value: str
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: "Expr"
    span: Span          # span of the keyword itself


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]
    span: Span          # span of the function name
    piped: bool = False  # the first argument came in through `->`


@dataclass(frozen=True)
class TupleLit:
    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class ListLit:
    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str              # + - * // /
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


Expr = Union[Num, Bool, Str, Name, Call, TupleLit, ListLit, BinOp, Neg]


# ---- statements --------------------------------------------------------------------------

# A statement's `end`: (line, column) just past its last token, from the parser, so that a tool
# that rewrites the source (rewrite/fc_to_conv.py) knows its extent without lexing it again. Not
# part of what it means (a statement built by a tool has none).
END_UNKNOWN = (0, 0)

@dataclass(frozen=True)
class Input:
    name: str
    dims: tuple[Expr, ...]   # Num or Name
    span: Span
    end: tuple[int, int] = field(default=END_UNKNOWN, compare=False)


@dataclass(frozen=True)
class Assign:
    name: str
    value: Expr
    span: Span
    end: tuple[int, int] = field(default=END_UNKNOWN, compare=False)


@dataclass(frozen=True)
class LayerDecl:
    name: str
    value: Expr              # a Call
    span: Span
    end: tuple[int, int] = field(default=END_UNKNOWN, compare=False)


@dataclass(frozen=True)
class ConstDecl:
    name: str
    value: Expr              # a ListLit (nested)
    span: Span
    end: tuple[int, int] = field(default=END_UNKNOWN, compare=False)


@dataclass(frozen=True)
class Repeat:
    count: Expr
    body: tuple["Stmt", ...]
    span: Span


@dataclass(frozen=True)
class Output:
    names: tuple[Name, ...]
    span: Span


@dataclass(frozen=True)
class Loss:
    call: Call
    span: Span
    end: tuple[int, int] = field(default=END_UNKNOWN, compare=False)


@dataclass(frozen=True)
class Layout:
    value: str               # NCHW | NHWC (validated by the parser)
    span: Span


@dataclass(frozen=True)
class DType:
    value: str               # f32 | f64
    span: Span


@dataclass(frozen=True)
class Return:
    value: Expr
    span: Span
    end: tuple[int, int] = field(default=END_UNKNOWN, compare=False)


Stmt = Union[Input, Assign, LayerDecl, ConstDecl, Repeat, Output, Loss, Layout, DType, Return]


# ---- top level ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    span: Span


@dataclass(frozen=True)
class Network:
    name: str
    body: tuple[Stmt, ...]
    span: Span               # span of the name


@dataclass(frozen=True)
class Block:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class Use:
    path: str
    span: Span


@dataclass(frozen=True)
class Module:
    items: tuple[Network | Block | Use, ...]
    path: str
    # The text it was parsed from, for errors about the whole file; not part of what it means.
    source: Source | None = field(default=None, compare=False, repr=False)
