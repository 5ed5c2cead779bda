"""Text → AST: the Lark LALR parser, a post-lexer for the newline rules, and friendly syntax errors."""
from __future__ import annotations

import functools
import re
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from .. import resources
from ..errors import ConvDSLError, Source, Span
from . import ast

KEYWORDS = frozenset({"network", "block", "use", "input", "layer", "const", "repeat", "output",
                      "loss", "layout", "dtype", "return", "true", "false"})

# What a user would call each terminal, for "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "a new line",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "ARROW": "'->'", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "SLASH": "'/'", "DSLASH": "'//'", "$END": "end of file",
    "NETWORK": "`network`", "BLOCK": "`block`", "USE": "`use`",
}


class _NewlinePostLexer:
    """Implements the newline rules of §2: newlines are ignored inside ( ) and [ ],
    a newline followed by `->` continues the chain, and blank-line runs collapse."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        pending_nl = None
        for tok in stream:
            if tok.type == "_NL":
                if depth == 0 and pending_nl is None:
                    pending_nl = tok
                continue
            if pending_nl is not None:
                if tok.type != "ARROW":
                    yield pending_nl
                pending_nl = None
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            yield tok
        if pending_nl is not None:
            yield pending_nl


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(resources.grammar_path().read_text(), parser="lalr", lexer="basic", postlex=_NewlinePostLexer(),
                propagate_positions=True, maybe_placeholders=True)


class _ToAst(Transformer):
    """Builds ast nodes from the Lark tree; desugars `a -> f(b)` into f(a, b)."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    # -- helpers
    def _span_tok(self, tok: Token) -> Span:
        return Span(self.source, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)

    def _name(self, tok: Token) -> str:
        if str(tok) in KEYWORDS:  # cannot happen through the lexer, kept as a guard
            raise ConvDSLError(self._span_tok(tok), f"`{tok}` is a keyword and cannot be a name")
        return str(tok)

    @staticmethod
    def _span_of(node) -> Span:
        return node.span

    # -- top level
    def start(self, items):
        return tuple(i for i in items if i is not None)

    def use(self, items):
        (s,) = items
        return ast.Use(str(s)[1:-1], self._span_tok(s))

    def network(self, items):
        name, body = items
        return ast.Network(self._name(name), body, self._span_tok(name))

    def block(self, items):
        name, *rest = items
        body = rest[-1]
        params = tuple(p for p in rest[:-1] if p is not None)
        return ast.Block(self._name(name), params, body, self._span_tok(name))

    def param(self, items):
        name, default = items
        return ast.Param(self._name(name), default, self._span_tok(name))

    def body(self, items):
        return tuple(s for s in items if s is not None)

    # -- statements
    def input_stmt(self, items):
        name, dims = items
        return ast.Input(self._name(name), dims.items, self._span_tok(name))

    def assign(self, items):
        name, value = items
        return ast.Assign(self._name(name), value, self._span_tok(name))

    def layer_stmt(self, items):
        name, value = items
        return ast.LayerDecl(self._name(name), value, self._span_tok(name))

    def const_stmt(self, items):
        name, value = items
        return ast.ConstDecl(self._name(name), value, self._span_tok(name))

    @v_args(meta=True)
    def repeat_stmt(self, meta, items):
        count, body = items
        return ast.Repeat(count, body, Span(self.source, meta.line, meta.column, meta.line, meta.column + 6))

    @v_args(meta=True)
    def output_stmt(self, meta, items):
        names = tuple(ast.Name(self._name(t), self._span_tok(t)) for t in items)
        return ast.Output(names, Span(self.source, meta.line, meta.column, meta.line, meta.column + 6))

    @v_args(meta=True)
    def loss_stmt(self, meta, items):
        (call,) = items
        return ast.Loss(call, call.span)

    def layout_stmt(self, items):
        (tok,) = items
        if str(tok) not in ("NCHW", "NHWC"):
            raise ConvDSLError(self._span_tok(tok), f"unknown layout `{tok}`: expected NCHW or NHWC")
        return ast.Layout(str(tok), self._span_tok(tok))

    def dtype_stmt(self, items):
        (tok,) = items
        if str(tok) not in ("f32", "f64"):
            raise ConvDSLError(self._span_tok(tok), f"unknown dtype `{tok}`: expected f32 or f64")
        return ast.DType(str(tok), self._span_tok(tok))

    @v_args(meta=True)
    def return_stmt(self, meta, items):
        (value,) = items
        return ast.Return(value, Span(self.source, meta.line, meta.column, meta.line, meta.column + 6))

    # -- expressions
    def pipe(self, items):
        lhs, _arrow, callee = items
        return ast.Call(callee.func, (lhs, *callee.args), callee.kwargs, callee.span, piped=True)

    def bare_callee(self, items):
        (tok,) = items
        return ast.Call(self._name(tok), (), (), self._span_tok(tok))

    def call(self, items):
        name, *args = items
        positional, keywords = [], []
        for a in args:
            if a is None:
                continue
            if isinstance(a, ast.Kwarg):
                if any(k.name == a.name for k in keywords):
                    raise ConvDSLError(a.span, f"argument `{a.name}` is given twice")
                keywords.append(a)
            else:
                if keywords:
                    raise ConvDSLError(a.span, "a positional argument cannot follow a keyword argument")
                positional.append(a)
        return ast.Call(self._name(name), tuple(positional), tuple(keywords), self._span_tok(name))

    def kwarg(self, items):
        name, value = items
        return ast.Kwarg(self._name(name), value, self._span_tok(name))

    def binop(self, items):
        left, op, right = items
        return ast.BinOp(str(op), left, right, self._span_tok(op))

    def neg(self, items):
        op, operand = items
        if isinstance(operand, ast.Num):
            return ast.Num(-operand.value, self._span_tok(op))
        return ast.Neg(operand, self._span_tok(op))

    def number(self, items):
        (tok,) = items
        text = str(tok)
        value = int(text) if text.isdigit() else float(text)
        return ast.Num(value, self._span_tok(tok))

    @v_args(meta=True)
    def true(self, meta, items):
        return ast.Bool(True, Span(self.source, meta.line, meta.column, meta.line, meta.column + 4))

    @v_args(meta=True)
    def false(self, meta, items):
        return ast.Bool(False, Span(self.source, meta.line, meta.column, meta.line, meta.column + 5))

    def string(self, items):
        (tok,) = items
        return ast.Str(str(tok)[1:-1], self._span_tok(tok))

    def name(self, items):
        (tok,) = items
        return ast.Name(self._name(tok), self._span_tok(tok))

    @v_args(meta=True)
    def tuple(self, meta, items):
        return ast.TupleLit(tuple(i for i in items if i is not None),
                            Span(self.source, meta.line, meta.column, meta.line, meta.column + 1))

    @v_args(meta=True)
    def list(self, meta, items):
        return ast.ListLit(tuple(i for i in items if i is not None),
                           Span(self.source, meta.line, meta.column, meta.line, meta.column + 1))


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return f"`{tok}`"


# When a parser state accepts many tokens, naming them all helps nobody: these are the ones
# worth saying, in this order, and at most four of them.
_WORTH_SAYING = ("NAME", "NUMBER", "EQUAL", "COLON", "RPAR", "RSQB", "RBRACE", "LBRACE", "COMMA", "ARROW", "_NL",
                 "NETWORK", "BLOCK", "USE", "$END")
_STATEMENT_KEYWORDS = frozenset({"input", "layer", "const", "repeat", "output", "loss", "layout", "dtype", "return"})


def _expected_text(expected) -> str:
    names = []
    for e in _WORTH_SAYING:
        if e in expected:
            n = _TERMINAL_NAMES.get(e) or f"`{e.lower()}`"
            if n not in names:
                names.append(n)
    if not names or len(names) > 4:
        return ""
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _unclosed_bracket(source: Source, upto_line: int, upto_col: int):
    """The innermost ( or [ still open before a position, as (char, line, col), or None."""
    stack = []
    try:
        for tok in _parser().lex(source.text):
            if (tok.line, tok.column) >= (upto_line, upto_col):
                break
            if tok.type in ("LPAR", "LSQB"):
                stack.append((str(tok), tok.line, tok.column))
            elif tok.type in ("RPAR", "RSQB") and stack:
                stack.pop()
    except UnexpectedInput:
        pass
    return stack[-1] if stack else None


def _syntax_error(source: Source, err: UnexpectedInput) -> ConvDSLError:
    line, col = max(err.line, 1), max(err.column, 1)
    if isinstance(err, UnexpectedCharacters):
        ch = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        msg = f"unexpected character `{ch}`"
        if ch == ";":
            msg += "; statements end at the end of the line, no `;` needed"
        elif ch == '"':
            msg += '; a string is only used in `use "file.cnn"` and must close on its line'
        elif ch == ".":
            msg = "malformed number: a number has at most one decimal point"
        return ConvDSLError(Span(source, line, col, line, col + 1), msg)
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END":
            lines = source.text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
            span = Span(source, line, col, line, col + 1)
            msg = "unexpected end of file"
            if "RBRACE" in err.expected:
                msg += ": a `{` is never closed (missing `}`)"
            else:
                expected = _expected_text(err.expected)
                if expected:
                    msg += f"; expected {expected}"
            return ConvDSLError(span, msg)
        width = len(str(tok)) if tok.type != "_NL" else 1
        span = Span(source, tok.line, tok.column, tok.line, tok.column + max(1, width))
        text = str(tok)
        if text in KEYWORDS and "NAME" in err.expected:
            return ConvDSLError(span, f"`{tok}` is a keyword and cannot be used as a name")
        if text in _STATEMENT_KEYWORDS and "NETWORK" in err.expected:
            return ConvDSLError(span, f"`{tok}` is a statement: it belongs inside `network NAME {{ … }}` or a block")
        if tok.type == "NUMBER" and text.startswith(".") and tok.start_pos and \
                source.text[tok.start_pos - 1].isdigit():
            return ConvDSLError(span, "malformed number: a number has at most one decimal point")
        before = source.text[:tok.start_pos].rstrip() if tok.start_pos is not None else ""
        if before.endswith("->") and "NAME" in err.expected:
            return ConvDSLError(span, "`->` needs an op after it, on the same line")
        previous = re.search(r"([A-Za-z_][A-Za-z0-9_]*)$", before)
        if previous and previous.group(1) in KEYWORDS and text == "=":
            at = previous.start(1)
            kw_line = source.text.count("\n", 0, at) + 1
            kw_col = at - source.text.rfind("\n", 0, at)
            kw_span = Span(source, kw_line, kw_col, kw_line, kw_col + len(previous.group(1)))
            return ConvDSLError(kw_span, f"`{previous.group(1)}` is a keyword and cannot be used as a name")
        opened = _unclosed_bracket(source, tok.line, tok.column)
        if opened is not None and opened[1] < tok.line:
            char, oline, ocol = opened
            closer = ")" if char == "(" else "]"
            return ConvDSLError(span, f"unexpected {_describe_token(tok)}: the `{char}` opened at line {oline}, "
                                      f"column {ocol} is never closed (missing `{closer}`)")
        msg = f"unexpected {_describe_token(tok)}"
        expected = _expected_text(err.expected)
        if expected:
            msg += f"; expected {expected}"
        return ConvDSLError(span, msg)
    if isinstance(err, UnexpectedEOF):
        lines = source.text.splitlines() or [""]
        return ConvDSLError(Span(source, len(lines), len(lines[-1]) + 1), "unexpected end of file")
    return ConvDSLError(Span(source, line, col), "syntax error")


def parse(text: str, path: str = "<string>") -> ast.Module:
    """Parse one .cnn file into an ast.Module; every failure is a ConvDSLError with a span."""
    source = Source(str(path), text)
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as err:
        raise _syntax_error(source, err) from None
    try:
        items = _ToAst(source).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, ConvDSLError):
            raise err.orig_exc from None
        raise
    return ast.Module(items, str(path))


def parse_file(path: str | Path) -> ast.Module:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConvDSLError(None, f"cannot read {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConvDSLError(None, f"{p}: not a UTF-8 text file") from None
    return parse(text, str(p))
