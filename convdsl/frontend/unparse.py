"""AST → .cnn text in a canonical form: what the parser reads back into the same AST (spans aside).

Chains are written with arrows (`x -> conv(8, kernel=3) -> relu`) wherever the call came in
through `->`; a statement longer than the line width breaks its chain before an arrow, on
continuation lines that start with `->`. Comments are not in the AST and so are not written.
"""
from __future__ import annotations

from . import ast

WIDTH = 100
INDENT = "    "

# Binding strength: a pipe binds loosest, then + -, then * // /, then unary minus.
_PIPE, _SUM, _PRODUCT, _UNARY, _ATOM = range(5)
_BINOP_LEVEL = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "//": _PRODUCT, "/": _PRODUCT}


def _level(e) -> int:
    if isinstance(e, ast.Call) and e.piped:
        return _PIPE
    if isinstance(e, ast.BinOp):
        return _BINOP_LEVEL[e.op]
    if isinstance(e, ast.Neg) or isinstance(e, ast.Num) and e.value < 0:
        return _UNARY
    return _ATOM


def _wrap(e, at_least: int) -> str:
    text = expr(e)
    return f"({text})" if _level(e) < at_least else text


def number(value) -> str:
    if isinstance(value, bool):
        raise TypeError("a bool is not a number")
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    if text in ("inf", "-inf", "nan"):
        raise ValueError(f"{value} cannot be written in a .cnn file")
    return text


def _arguments(args, kwargs) -> str:
    return ", ".join([expr(a) for a in args] + [f"{k.name}={expr(k.value)}" for k in kwargs])


def callee(call: ast.Call, first_is_input: bool) -> str:
    """The call as written after an arrow (without its first argument when it was piped)."""
    args = call.args[1:] if first_is_input else call.args
    if not args and not call.kwargs:
        return call.func
    return f"{call.func}({_arguments(args, call.kwargs)})"


def chain(e) -> list[str]:
    """A piped chain as its pieces: [base, callee, callee, …]; any other expression is one piece."""
    pieces = []
    while isinstance(e, ast.Call) and e.piped:
        pieces.append(callee(e, True))
        e = e.args[0]
    pieces.append(expr(e))
    return pieces[::-1]


def expr(e) -> str:
    if isinstance(e, ast.Num):
        return number(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Str):
        return f'"{e.value}"'
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Call):
        if e.piped:
            return " -> ".join(chain(e))
        return f"{e.func}({_arguments(e.args, e.kwargs)})"
    if isinstance(e, ast.TupleLit):
        items = [expr(i) for i in e.items]
        return "(" + (items[0] + "," if len(items) == 1 else ", ".join(items)) + ")"
    if isinstance(e, ast.ListLit):
        return "[" + ", ".join(expr(i) for i in e.items) + "]"
    if isinstance(e, ast.BinOp):
        level = _BINOP_LEVEL[e.op]
        return f"{_wrap(e.left, level)} {e.op} {_wrap(e.right, level + 1)}"
    if isinstance(e, ast.Neg):
        return "-" + _wrap(e.operand, _UNARY)
    raise TypeError(f"cannot write {type(e).__name__}")


def _broken(head: str, value, indent: str, width: int) -> list[str]:
    """`head` + the value's chain, broken before arrows when the line would be too long."""
    pieces = chain(value)
    lines = [head + pieces[0]]
    for piece in pieces[1:]:
        if len(indent) + len(lines[-1]) + 4 + len(piece) > width and lines[-1].strip():
            lines.append(INDENT + "-> " + piece)
        else:
            lines[-1] += " -> " + piece
    return lines


def statement(s, indent: str = "", width: int = WIDTH) -> list[str]:
    """One statement as lines (without the leading indent; continuation lines carry INDENT)."""
    if isinstance(s, ast.Input):
        return [f"input {s.name}: [{', '.join(expr(d) for d in s.dims)}]"]
    if isinstance(s, ast.Assign):
        return _broken(f"{s.name} = ", s.value, indent, width)
    if isinstance(s, ast.LayerDecl):
        v = s.value
        return [f"layer {s.name} = {v.func}({_arguments(v.args, v.kwargs)})" if isinstance(v, ast.Call)
                else f"layer {s.name} = {expr(v)}"]
    if isinstance(s, ast.ConstDecl):
        return [f"const {s.name} = {expr(s.value)}"]
    if isinstance(s, ast.Output):
        return ["output " + ", ".join(n.id for n in s.names)]
    if isinstance(s, ast.Loss):
        return [f"loss {expr(s.call)}"]
    if isinstance(s, ast.Layout):
        return [f"layout {s.value}"]
    if isinstance(s, ast.DType):
        return [f"dtype {s.value}"]
    if isinstance(s, ast.Return):
        return _broken("return ", s.value, indent, width)
    if isinstance(s, ast.Repeat):
        lines = [f"repeat {expr(s.count)} {{"]
        for inner in s.body:
            lines += [INDENT + line for line in statement(inner, indent + INDENT, width)]
        return lines + ["}"]
    raise TypeError(f"cannot write {type(s).__name__}")


def body(stmts, indent: str) -> list[str]:
    lines = []
    for s in stmts:
        lines += [indent + line for line in statement(s, indent)]
    return lines


def module(m: ast.Module) -> str:
    """A whole file, canonical."""
    out: list[str] = []
    for item in m.items:
        if isinstance(item, ast.Use):
            out.append(f'use "{item.path}"')
            continue
        if out:
            out.append("")
        if isinstance(item, ast.Network):
            out.append(f"network {item.name} {{")
        else:
            params = ", ".join(p.name + (f"={expr(p.default)}" if p.default is not None else "") for p in item.params)
            out.append(f"block {item.name}({params}) {{")
        out += body(item.body, INDENT)
        out.append("}")
    return "\n".join(out) + "\n"
