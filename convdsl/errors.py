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


@dataclass(frozen=True)
class Note:
    """A line after a diagnostic that says more; `span` when it points elsewhere in the source (the
    call of the block an error sits in), so that `check --json` can give its place."""
    message: str
    span: Span | None = None

    def __str__(self) -> str:
        return f"note: {self.message}"


def note_text(note) -> str:
    """A note without its `note: ` prefix (notes are Note objects or plain `note: …` strings)."""
    text = note.message if isinstance(note, Note) else str(note)
    return text[len("note: "):] if text.startswith("note: ") else text


def block_note(block: str, call: Span) -> Note:
    """Where the block instance holding a diagnostic was called: one note per level of nesting,
    innermost first (gcc's "required from here" chain)."""
    return Note(f"in block `{block}` called at {call}", call)


def render_diagnostic(span: Span | None, severity: str, message: str, notes: tuple = ()) -> str:
    """gcc/rustc form: `FILE:LINE:COL: error: MESSAGE`, then the line and a caret under the span."""
    notes = tuple(str(n) for n in notes)
    if span is None:
        head = f"convdsl: {severity}: {message}"
        return "\n".join((head, *notes))
    text = span.source.line(span.line)
    out = [f"{span.path}:{span.line}:{span.col}: {severity}: {message}"]
    if text or span.source.text.count("\n") + 1 >= span.line:     # an empty line is shown too: the caret says where
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

    def __init__(self, span: Span | None, message: str, *, notes: tuple = (), code: str | None = None):
        self.span = span
        self.message = message
        self.notes = tuple(notes)
        self.code = code
        super().__init__(render_diagnostic(span, "error", message, self.notes))

    @property
    def errors(self) -> tuple["ConvDSLError", ...]:
        """Each error this one reports, in source order: itself, or several for ConvDSLErrors."""
        return (self,)

    def with_notes(self, *notes) -> "ConvDSLError":
        """The same error (same class) with more notes after the ones it has."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.notes = (*self.notes, *notes)
        Exception.__init__(new, render_diagnostic(new.span, "error", new.message, new.notes))
        return new


class ConvDSLErrors(ConvDSLError):
    """Several independent errors found in one pass, rendered one after another in source order.

    It is a ConvDSLError (callers catch that one type); its span, message and notes are the first
    error's, and `errors` lists them all."""

    def __init__(self, errors, *, stopped_after: int | None = None):
        errors = tuple(errors)
        if len(errors) < 2:
            raise ValueError("ConvDSLErrors holds two errors or more")
        first = errors[0]
        self.span, self.message, self.notes, self.code = first.span, first.message, first.notes, first.code
        self._errors = errors
        self.stopped_after = stopped_after
        text = "\n".join(str(e) for e in errors)
        if stopped_after is not None:
            text += f"\nconvdsl: note: stopped after {stopped_after} errors"
        Exception.__init__(self, text)

    @property
    def errors(self) -> tuple[ConvDSLError, ...]:
        return self._errors

    def with_notes(self, *notes) -> "ConvDSLError":
        raise TypeError("add notes to one of the errors, not to the group")


def raise_errors(errors, stopped_after: int | None = None) -> None:
    """Raise what a pass collected: nothing, one ConvDSLError, or a ConvDSLErrors of several."""
    errors = list(errors)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConvDSLErrors(errors, stopped_after=stopped_after)


@dataclass(frozen=True)
class Diagnostic:
    """A warning from a lint: it does not stop compilation unless --werror."""
    span: Span | None
    code: str
    message: str
    notes: tuple = ()                # Note objects or `note: …` strings

    def render(self, severity: str = "warning") -> str:
        return render_diagnostic(self.span, severity, f"{self.message} [{self.code}]", self.notes)


def edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of two neighbours (optimal string alignment):
    the slips of a typing hand."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[len(b)]


def is_misspelling(word: str, candidate: str) -> bool:
    """Close enough to be the same word mistyped: at most one slip per four letters (at least one).
    Two different words that share a part (binary_cross_entropy, softmax_cross_entropy) are not."""
    return edit_distance(word.lower(), candidate.lower()) <= max(1, len(word) // 4)


def did_you_mean(word: str, candidates) -> str | None:
    """The closest candidate that `word` could be a misspelling of, for "did you mean" hints;
    None when nothing is close (a far-fetched hint misleads more than none)."""
    close = sorted((edit_distance(word.lower(), c.lower()), c) for c in set(candidates)
                   if c != word and is_misspelling(word, c))
    return close[0][1] if close else None
