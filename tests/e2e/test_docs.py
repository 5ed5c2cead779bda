"""The user docs stand alone: every § that the compiler, the examples and the docs cite has an
entry in docs/background.md, and nothing points outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BACKGROUND = REPO / "docs" / "background.md"
# A background section: two or more parts (§2.4, §3.4.7); one-part numbers in docs/language.md
# are that document's own sections.
SECTION = re.compile(r"§(\d+(?:\.\d+)+)")
CITING = [*sorted((REPO / "convdsl").rglob("*.py")), *sorted((REPO / "templates").rglob("*.j2")),
          *sorted((REPO / "examples").glob("*")), *sorted((REPO / "tests").rglob("*.py")),
          *sorted((REPO / "benchmarks").rglob("*.py")), REPO / "README.md", REPO / "docs" / "language.md",
          REPO / "docs" / "check-report.schema.json"]
USER_DOCS = [REPO / "README.md", REPO / "docs" / "language.md", REPO / "docs" / "distributed.md", BACKGROUND]


def background_entries() -> set[str]:
    return set(re.findall(r"^###? §(\d+(?:\.\d+)+)\b", BACKGROUND.read_text(), flags=re.M))


def test_every_cited_section_has_an_entry():
    entries = background_entries()
    cited = {}
    for path in CITING:
        if path.is_file():
            for number in SECTION.findall(path.read_text(errors="replace")):
                cited.setdefault(number, path.relative_to(REPO))
    assert cited, "no § found: the scan is broken"
    missing = {n: str(p) for n, p in cited.items() if n not in entries}
    assert not missing, f"cited but not in docs/background.md: {missing}"


def test_the_warnings_cite_sections_with_entries():
    from convdsl.passes import lints
    entries = background_entries()
    cited = set(SECTION.findall(Path(lints.__file__).read_text()))
    assert {"3.11", "3.4", "3.5", "1.2.4", "1.2.2", "3.4.7", "3.9", "2.4", "2.5", "3.1", "3.2"} <= cited
    assert cited <= entries


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_user_docs_point_only_inside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text and "shared/seed" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (doc.parent / target).exists(), f"{doc.name} links to a missing {target}"


def test_the_language_reference_speaks_to_users():
    opening = (REPO / "docs" / "language.md").read_text().split("## 1.")[0]
    assert "write the decision down" not in opening and "starts as a copy" not in opening
    assert "background.md" in opening
