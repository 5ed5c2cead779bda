"""ConvDSLError and the gcc-style renderer that points a caret at the user's source."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Source:
    """A source file's name and text, shared by every span that points into it."""
    path: str
    text: str = field(repr=False)

    @cached_property
    def _lines(self) -> list[str]:
        # Split once: quoting a line (for every warning of a big file) must not rescan the text.
        # Lines as the lexer counts them: only \n ends one (str.splitlines would also split on
        # \f, \v, \x85, U+2028 … and quote a different line than the one reported).
        return self.text.split("\n")

    def line(self, lineno: int) -> str:
        lines = self._lines
        if 1 <= lineno <= len(lines):
            return lines[lineno - 1].rstrip("\r")
        return ""


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns count from 1."""
    source: Source = field(repr=False, compare=False, hash=False)
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    @property
    def path(self) -> str:
        return self.source.path

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


def render_diagnostic(span: Span | None, severity: str, message: str, notes: tuple[str, ...] = ()) -> str:
    """gcc/rustc form: `FILE:LINE:COL: error: MESSAGE`, then the line and a caret under the span."""
    if span is None:
        head = f"convdsl: {severity}: {message}"
        return "\n".join((head, *notes))
    text = span.source.line(span.line)
    out = [f"{span.path}:{span.line}:{span.col}: {severity}: {message}"]
    if text:
        expanded = text.expandtabs(1)
        width = 1
        if span.end_line == span.line and span.end_col > span.col:
            width = span.end_col - span.col
        width = max(1, min(width, len(expanded) - span.col + 1))
        out.append(f"    {expanded}")
        out.append("    " + " " * (span.col - 1) + "^" + "~" * (width - 1))
    out.extend(notes)
    return "\n".join(out)


class ConvDSLError(Exception):
    """Every error the compiler reports. str() is the full rendered diagnostic."""

    def __init__(self, span: Span | None, message: str, *, notes: tuple[str, ...] = (), code: str | None = None):
        self.span = span
        self.message = message
        self.notes = tuple(notes)
        self.code = code
        super().__init__(render_diagnostic(span, "error", message, self.notes))


@dataclass(frozen=True)
class Diagnostic:
    """A warning from a lint: it does not stop compilation unless --werror."""
    span: Span | None
    code: str
    message: str
    notes: tuple[str, ...] = ()

    def render(self, severity: str = "warning") -> str:
        return render_diagnostic(self.span, severity, f"{self.message} [{self.code}]", self.notes)


def did_you_mean(word: str, candidates) -> str | None:
    """The closest candidate within a small edit distance, for "did you mean" hints."""
    import difflib
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return found[0] if found else None
