"""The front and middle of the compiler say nothing in C: the ops, the passes and the IR hand
the backend targets (convdsl/targets/, templates/) structured values — Dims, operands, guards —
and a target writes them in its language. So a second target (OpenCL) needs no change there.
Here: no string literal in convdsl/ops, convdsl/passes or convdsl/ir holds C (a member access
`m->batch`, a helper `cdsl_…`, a C type, a pragma, a cast to real, a statement ending in `;`)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ops", "passes", "ir")

# What C looks like inside a string. The language's own pipeline arrow is written `x -> relu`,
# with spaces; C's member access has none.
C_SYNTAX = re.compile(r"\w->\w|\bcdsl_\w|\b(u?int(8|16|32|64)_t|size_t)\b|#\s*pragma|\(real\)|\breal\s*\*"
                      r"|\bINT64_C\(|&overflow|\bsizeof\b|\bstatic\s+(inline\s+)?(void|int)\b")
STATEMENT_END = re.compile(r"[\w)\]]\s*;$")   # `… = 1;` ends a C statement; prose has `; ` mid-message


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def c_in_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal piece that looks like C."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        text = node.value
        if C_SYNTAX.search(text) or (id(node) not in docstrings
                                     and any(STATEMENT_END.search(line) for line in text.splitlines())):
            hits.append((node.lineno, text.strip()[:80]))
    return hits


def test_the_detector_sees_c():
    """What the ops and dims once held (the batchnorm training guard, the floor division), found."""
    assert c_in_strings('guard = f"m->batch * {spatial} > 1"\n')
    assert c_in_strings('fdiv = lambda a, k: f"cdsl_floordiv({a}, {k})"\n')
    assert c_in_strings('line = "y[i] = x[i];"\n')
    assert c_in_strings('decl = "const int64_t n = 3"\n')
    assert c_in_strings('p = "#pragma omp parallel for"\n')
    assert not c_in_strings('msg = "write it as `x -> relu`; then conv"\n')
    assert not c_in_strings('msg = ("needs more than one value (batch x positions = 1); "\n       "use a larger batch")\n')
    assert not c_in_strings('def f():\n    """Takes (kernel, stride) per axis;\n    for the field."""\n')


def test_no_c_syntax_in_ops_passes_or_ir():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / "convdsl" / package).rglob("*.py")):
            found += [f"{path.relative_to(REPO)}:{line}: {text}" for line, text in c_in_strings(path.read_text())]
    assert not found, "C written outside the backend targets:\n" + "\n".join(found)
