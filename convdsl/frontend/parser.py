"""Text → AST: the Lark LALR parser, a post-lexer for the newline rules, and friendly syntax errors."""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from pathlib import Path

from lark import Lark, Token, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.visitors import Transformer_NonRecursive

from .. import limits, resources
from ..errors import ConvDSLError, Source, Span
from ..limits import power_text
from . import ast

KEYWORDS = frozenset({"network", "block", "use", "input", "layer", "const", "repeat", "output",
                      "loss", "layout", "dtype", "return", "true", "false"})

# What a user would call each terminal, for "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "a new line",
    "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "LBRACE": "`{`", "RBRACE": "`}`",
    "COMMA": "`,`", "COLON": "`:`", "EQUAL": "`=`", "ARROW": "`->`", "PLUS": "`+`", "MINUS": "`-`",
    "STAR": "`*`", "SLASH": "`/`", "DSLASH": "`//`", "$END": "end of file",
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


class _ToAst(Transformer_NonRecursive):
    """Builds ast nodes from the Lark tree; desugars `a -> f(b)` into f(a, b). Non-recursive: a
    chain of thousands of `->` is a tree thousands deep."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    # -- helpers
    def _span_tok(self, tok: Token) -> Span:
        return Span(self.source, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)

    def _name(self, tok: Token) -> str:
        if str(tok) in KEYWORDS:  # cannot happen through the lexer, kept as a guard
            raise ConvDSLError(self._span_tok(tok), f"`{tok}` is a keyword and cannot be a name")
        if len(tok) > limits.MAX_NAME_LENGTH:
            # Names end up in file, module and C names; an overlong one would fail far from here.
            raise ConvDSLError(self._span_tok(tok), f"this name is {len(tok):,} characters long; a name has at "
                                                    f"most {limits.MAX_NAME_LENGTH}")
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
    @staticmethod
    def _end(meta) -> tuple[int, int]:
        return (meta.end_line, meta.end_column)

    @v_args(meta=True)
    def input_stmt(self, meta, items):
        name, dims = items
        return ast.Input(self._name(name), dims.items, self._span_tok(name), self._end(meta))

    @v_args(meta=True)
    def assign(self, meta, items):
        name, value = items
        return ast.Assign(self._name(name), value, self._span_tok(name), self._end(meta))

    @v_args(meta=True)
    def layer_stmt(self, meta, items):
        name, value = items
        return ast.LayerDecl(self._name(name), value, self._span_tok(name), self._end(meta))

    @v_args(meta=True)
    def const_stmt(self, meta, items):
        name, value = items
        return ast.ConstDecl(self._name(name), value, self._span_tok(name), self._end(meta))

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
        return ast.Loss(call, call.span, self._end(meta))

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
        return ast.Return(value, Span(self.source, meta.line, meta.column, meta.line, meta.column + 6),
                          self._end(meta))

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
        span = self._span_tok(tok)
        return ast.Num(_number_value(str(tok), span), span)

    def number_list(self, items):
        """A NUMBER_LIST token, `[1, -2, 0.5]`: the same ListLit of Nums the `list` rule would make
        (a negative number's span starts at its `-`, as `neg` makes it), read with one regular
        expression instead of a parser step per number."""
        (tok,) = items
        text = str(tok)
        line, col = tok.line, tok.column
        numbers: list[ast.Num] = []
        minus_at = None
        for m in _LIST_PIECE.finditer(text):
            kind, piece = m.lastgroup, m.group()
            if kind == "num":
                if len(numbers) == limits.MAX_CONST_ELEMENTS:
                    raise ConvDSLError(Span(self.source, tok.line, tok.column, tok.line, tok.column + 1),
                                       f"this list holds more than {power_text(limits.MAX_CONST_ELEMENTS)} "
                                       "numbers, the most a const may hold")
                span = Span(self.source, line, col, line, col + len(piece))
                value = _number_value(piece, span)
                if minus_at is not None:
                    value, span = -value, Span(self.source, *minus_at, minus_at[0], minus_at[1] + 1)
                numbers.append(ast.Num(value, span))
                minus_at = None
            elif kind == "minus":
                minus_at = (line, col)
            if kind == "newline":
                line, col = line + 1, 1
            else:
                col += len(piece)
        return ast.ListLit(tuple(numbers), Span(self.source, tok.line, tok.column, tok.line, tok.column + 1))

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


def _number_value(text: str, span: Span) -> int | float:
    """A NUMBER token's value; integers beyond limits.MAX_INT and floats beyond double range are refused."""
    try:
        value = int(text) if text.isdigit() else float(text)
    except ValueError:      # Python refuses to convert integers of more than 4300 digits
        raise ConvDSLError(span, f"number too long ({len(text)} digits)") from None
    if isinstance(value, int) and value > limits.MAX_INT:
        raise ConvDSLError(span, f"integer `{text}` is too large: integers are at most {power_text(limits.MAX_INT)}")
    if not math.isfinite(value):
        raise ConvDSLError(span, f"number `{text}` is too large for a float")
    return value


# The pieces of a NUMBER_LIST token, as the lexer would cut them (NUMBER as in the grammar).
_LIST_PIECE = re.compile(r"(?P<num>([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?)|(?P<minus>-)|(?P<newline>\n)"
                         r"|(?P<comment>#[^\n]*)|(?P<other>[^-0-9.#\n]+)")


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    text = " ".join(str(tok).split())     # a number list can span lines: the message keeps to one
    return f"`{text if len(text) <= 40 else text[:37] + '…'}`"


# When a parser state accepts many tokens, naming them all helps nobody: these are the ones
# worth saying, in this order, and at most four of them.
_WORTH_SAYING = ("NAME", "NUMBER", "EQUAL", "COLON", "RPAR", "RSQB", "RBRACE", "LBRACE", "COMMA", "ARROW", "_NL",
                 "NETWORK", "BLOCK", "USE", "$END")
_STATEMENT_KEYWORDS = frozenset({"input", "layer", "const", "repeat", "output", "loss", "layout", "dtype", "return"})


def _expected_text(expected) -> str:
    if len(expected) == 1:          # only one way on: say it, whatever it is
        (only,) = expected
        return _TERMINAL_NAMES.get(only) or f"`{only.lower()}`"
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


def _never_closed(opened) -> str:
    char, line, col = opened
    closer = ")" if char == "(" else "]"
    return f"the `{char}` opened at line {line}, column {col} is never closed (missing `{closer}`)"


def _show_char(ch: str) -> str:
    """A character as a message can show it: visible ASCII as itself, anything else with its code point."""
    if ch.isascii() and ch.isprintable() and ch != " ":
        return f"`{ch}`"
    code = f"U+{ord(ch):04X}"
    name = unicodedata.name(ch, "")
    if name:
        code += f" {name}"
    return f"`{ch}` ({code})" if ch.isprintable() and not ch.isspace() else code


def _char_hint(ch: str) -> str:
    """Why a character the lexer refused is probably there, and what to write instead."""
    category = unicodedata.category(ch)
    if ch == ";":
        return "; statements end at the end of the line, no `;` needed"
    if ch == '"':
        return '; a string is only used in `use "file.cnn"` and must close on its line'
    if ch in "'\u2018\u2019\u201c\u201d":
        return '; a file name is written in plain double quotes: `use "file.cnn"`'
    if ch == "\\":
        return "; a chain continues on a line that starts with `->`, and any line continues inside ( ) and [ ]"
    if category == "Nd":
        return "; write numbers with the digits 0-9"
    if category.startswith("L"):
        return "; names use the letters A-Z and a-z, digits and `_`"
    if category in ("Zs", "Cf") or ch == "\x00":
        return "; it is invisible (often pasted in with the text): delete it"
    return ""


def _word_at(text: str, pos: int) -> tuple[int, str]:
    """The run of name and number characters around pos (3.4.5, 3x3, conv1.weight), as (start, word)."""
    def inside(i):
        c = text[i]
        if c.isascii() and (c.isalnum() or c in "_."):
            return True
        return c in "+-" and i >= 2 and text[i - 1] in "eE" and (text[i - 2].isdigit() or text[i - 2] == ".")
    start, end = pos, pos
    while start > 0 and inside(start - 1):
        start -= 1
    while end < len(text) and text[end] != "\n" and inside(end):
        end += 1
    return start, text[start:end]


def _line_text(source: Source, line: int) -> str:
    """Line `line` as Lark counts lines: only \\n ends one."""
    return source.line(line)


def _text_before(text: str, pos: int | None) -> tuple[str, int]:
    """The end of the text before `pos`, less the comments and blanks it ends with, as (tail,
    offset of the tail in text). The messages look only at how it ends; keeping the last few
    hundred characters means no pattern scans a long file, or a long line, from its start."""
    if pos is None:
        return "", 0
    end = pos
    while True:
        while end > 0 and text[end - 1].isspace():
            end -= 1
        line_start = text.rfind("\n", 0, end) + 1
        line = text[line_start:end]
        comment = line.find("#", line.rfind('"') + 1)      # a `#` inside a string starts no comment
        if comment < 0:
            break
        end = line_start + comment
    start = max(0, end - 400)
    return text[start:end], start


def file_end(module: ast.Module) -> Span | None:
    """Where an error about a whole parsed file points: just after its last token."""
    return end_of_file(module.source) if module.source is not None else None


def end_of_file(source: Source) -> Span:
    """Just after the last token, where a user looks for what is missing: not after the blank
    lines, spaces or comments that follow it, where a caret would point at nothing."""
    last = None
    try:
        for tok in _parser().lex(source.text):
            if tok.type != "_NL":
                last = tok
    except UnexpectedInput:
        pass
    if last is None:
        return Span(source, 1, 1, 1, 2)
    line, col = last.end_line or last.line, last.end_column or last.column + len(last)
    return Span(source, line, col, line, col + 1)


def _malformed_number(word: str) -> str:
    if word.count(".") > 1:
        return f"malformed number `{word}`: a number has at most one decimal point"
    size = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", word)
    if size:
        h, w = size.groups()
        return f"malformed number `{word}`; a size is written `({h}, {w})`" + (f" or just `{h}`" if h == w else "")
    return f"malformed number `{word}`; numbers are decimal, like 16, 0.5 or 1e-3"


def _syntax_error(source: Source, err: UnexpectedInput) -> ConvDSLError:
    line, col = max(err.line, 1), max(err.column, 1)
    if isinstance(err, UnexpectedCharacters):
        ch = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        msg = f"unexpected character {_show_char(ch)}{_char_hint(ch)}"
        start, width = col, 1
        if ch == ".":
            at, word = _word_at(source.text, err.pos_in_stream)
            if word[0].isdigit() or (word[0] == "." and len(word) > 1):      # 3.4. or 1e3.
                start, width = col - (err.pos_in_stream - at), len(word)
                msg = _malformed_number(word)
            elif word != ".":
                msg += "; a name cannot contain `.`"
        return ConvDSLError(Span(source, line, start, line, start + width), msg)
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END":
            span = end_of_file(source)
            msg = "unexpected end of file"
            opened = _unclosed_bracket(source, span.line + 1, 1)
            if opened is not None:
                msg += ": " + _never_closed(opened)
            elif "RBRACE" in err.expected:
                msg += ": a `{` is never closed (missing `}`)"
            else:
                expected = _expected_text(err.expected)
                if expected:
                    msg += f"; expected {expected}"
            return ConvDSLError(span, msg)
        width = len(str(tok)) if tok.type != "_NL" else 1
        column = tok.column
        if tok.type == "_NL":
            # The end of the line as the error shows it: a lone \r before it (white space to the
            # lexer) is not shown, so the caret goes just after the line's last shown character.
            lines = source.text.split("\n")
            shown = lines[tok.line - 1].rstrip("\r") if tok.line <= len(lines) else ""
            column = min(column, len(shown) + 1)
        span = Span(source, tok.line, column, tok.line, column + max(1, width))
        text = str(tok)
        before, before_at = _text_before(source.text, tok.start_pos)
        prefix = source.text[max(0, tok.start_pos - 1):tok.start_pos] if tok.start_pos else ""   # the character before
        if text in KEYWORDS and "NAME" in err.expected:
            return ConvDSLError(span, f"`{tok}` is a keyword and cannot be used as a name")
        if text in _STATEMENT_KEYWORDS and "NETWORK" in err.expected:
            return ConvDSLError(span, f"`{tok}` is a statement: it belongs inside `network NAME {{ … }}` or a block")
        glued = (tok.type == "NUMBER" and text.startswith(".") and re.search(r"[A-Za-z0-9_.]$", prefix)) or \
            (tok.type == "NAME" and re.search(r"[0-9.]$", prefix))
        if glued:                          # 3.4.5, 3x3, 0x10, 1_000, 2e, x.5: one word the lexer split in two
            at, word = _word_at(source.text, tok.start_pos)
            start = tok.column - (tok.start_pos - at)
            word_span = Span(source, tok.line, start, tok.line, start + len(word))
            if not word[0].isdigit() and word[0] != ".":
                return ConvDSLError(word_span, f"`{word}`: a name cannot contain `.`")
            return ConvDSLError(word_span, _malformed_number(word))
        if "NETWORK" in err.expected:
            if tok.type == "RBRACE":
                return ConvDSLError(span, "unexpected `}`: no `{` is open here")
            return ConvDSLError(span, f"unexpected {_describe_token(tok)}; a file holds `network`, `block` and "
                                      "`use` items")
        if before.endswith("->") and "NAME" in err.expected:
            return ConvDSLError(span, "`->` needs an op after it, on the same line")
        if set(err.expected) == {"STRING"}:
            return ConvDSLError(span, '`use` takes a file name in quotes, as in `use "blocks.cnn"`')
        if tok.type == "_NL" and "LBRACE" in err.expected:
            header = re.sub(r"#.*", "", _line_text(source, tok.line)).strip()
            return ConvDSLError(span, f"expected `{{` at the end of this line, as in `{header} {{`")
        loss = re.search(r"\bloss\s+([A-Za-z_][A-Za-z0-9_]*)$", before)
        if loss and "LPAR" in err.expected:
            name = loss.group(1)
            at = before_at + loss.start(1)
            name_col = at - source.text.rfind("\n", 0, at)
            return ConvDSLError(Span(source, tok.line, name_col, tok.line, name_col + len(name)),
                                f"`loss` takes a loss function of an output, as in "
                                f"`loss softmax_cross_entropy({name})`")
        previous = re.search(r"([A-Za-z_][A-Za-z0-9_]*)$", before)
        if previous and previous.group(1) in KEYWORDS and text == "=":
            at = before_at + previous.start(1)
            kw_line = source.text.count("\n", 0, at) + 1
            kw_col = at - source.text.rfind("\n", 0, at)
            kw_span = Span(source, kw_line, kw_col, kw_line, kw_col + len(previous.group(1)))
            return ConvDSLError(kw_span, f"`{previous.group(1)}` is a keyword and cannot be used as a name")
        opened = _unclosed_bracket(source, tok.line, tok.column)
        if opened is not None and opened[1] < tok.line:
            return ConvDSLError(span, f"unexpected {_describe_token(tok)}: {_never_closed(opened)}")
        msg = f"unexpected {_describe_token(tok)}"
        # After a whole expression the LALR tables accept a jumble of tokens that belong to other
        # contexts; what can really come next depends on the innermost open bracket.
        closer = {"(": "RPAR", "[": "RSQB"}.get(opened[0]) if opened else None
        if closer in err.expected:
            options = [_TERMINAL_NAMES["COMMA"]] if "COMMA" in err.expected else []
            return ConvDSLError(span, msg + f"; expected {' or '.join(options + [_TERMINAL_NAMES[closer]])}")
        if opened is None and {"ARROW", "_NL"} <= set(err.expected):
            if re.match(r"\s*repeat\b", _line_text(source, tok.line)):
                return ConvDSLError(span, msg + "; expected `{`")
            return ConvDSLError(span, msg + "; expected `->` or a new line")
        expected = _expected_text(err.expected)
        if expected:
            msg += f"; expected {expected}"
        return ConvDSLError(span, msg)
    if isinstance(err, UnexpectedEOF):
        return ConvDSLError(end_of_file(source), "unexpected end of file")
    return ConvDSLError(Span(source, line, col), "syntax error")


def _check_nesting(source: Source, tree: Tree) -> None:
    """Refuses a statement nested deeper than limits.MAX_NESTING, walking the tree without recursion.

    Nested expressions are walked recursively by the later stages, so their depth is limited. A
    chain is not nesting: `x -> f -> g` is a tree as deep as the chain is long, but every stage
    walks a chain link by link, so the left side of a `->` counts as the level of the `->`."""
    stack = [(tree, 0, tree)]
    while stack:
        node, depth, statement = stack.pop()
        if depth > limits.MAX_NESTING:
            line, col = getattr(statement.meta, "line", 1), getattr(statement.meta, "column", 1)
            raise ConvDSLError(Span(source, line, col, line, col + 1),
                               f"this statement nests more than {limits.MAX_NESTING} levels deep; "
                               "split it into several statements")
        for i, child in enumerate(node.children):
            if isinstance(child, Tree):
                inner = depth if node.data == "pipe" and i == 0 else depth + 1
                stack.append((child, inner, child if node.data == "body" else statement))


def parse(text: str, path: str = "<string>") -> ast.Module:
    """Parse one .cnn file into an ast.Module; every failure is a ConvDSLError with a span."""
    if text.startswith("\ufeff"):     # a byte-order mark, as some Windows editors write: not text
        text = text[1:]
    text = _universal_newlines(text)
    source = Source(str(path), text)
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as err:
        raise _syntax_error(source, err) from None
    _check_nesting(source, tree)
    try:
        items = _ToAst(source).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, ConvDSLError):
            raise err.orig_exc from None
        raise err.orig_exc from err      # a bug in this file: show it, not Lark's wrapper
    return ast.Module(items, str(path), source)


def _universal_newlines(text: str) -> str:
    # \r\n ends a line as \n does; a lone \r is white space, as the lexer reads it, so that a
    # file and the same text given as a string (load_source) mean the same thing.
    return text.replace("\r\n", "\n")


def decode_source(data: bytes) -> str:
    """A file's bytes as the text the parser reads. Raises UnicodeDecodeError if not UTF-8."""
    return _universal_newlines(data.decode("utf-8"))


def bad_byte_position(data: bytes, offset: int) -> tuple[int, int]:
    """(line, column) of the first byte that is not UTF-8, as the parser would count them."""
    before = _universal_newlines(data[:offset].decode("utf-8", errors="replace"))
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1


def parse_file(path: str | Path) -> ast.Module:
    p = Path(path)
    if p.is_dir():
        raise ConvDSLError(None, f"{p} is a folder, not a .cnn file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConvDSLError(None, f"cannot read {p}: {e.strerror}") from None
    try:
        text = decode_source(data)
    except UnicodeDecodeError as e:
        line, col = bad_byte_position(data, e.start)
        shown = Source(str(p), _universal_newlines(data.decode("utf-8", errors="replace")))
        raise ConvDSLError(Span(shown, line, col, line, col + 1),
                           f"this file is not UTF-8 text: byte {e.start} (0x{data[e.start]:02X}) is not valid "
                           "UTF-8; save it as UTF-8") from None
    return parse(text, str(p))
