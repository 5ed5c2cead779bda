"""Every example parses, says what it is on its first line, and the ones the language reference
prints (§2 LeNet-5, §3 se/inception/Refine/Tiny) are the reference's text, statement for statement."""
from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from convdsl.frontend import ast
from convdsl.frontend.parser import parse, parse_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.cnn"))


def strip(node):
    """The AST without spans, for structural comparison."""
    if isinstance(node, tuple):
        return tuple(strip(n) for n in node)
    if dataclasses.is_dataclass(node):
        fields = {f.name: strip(getattr(node, f.name)) for f in dataclasses.fields(node)
                  if f.name not in ("span", "end", "piped", "path", "source")}
        return (type(node).__name__, tuple(sorted(fields.items())))
    return node


def reference_items() -> dict[str, ast.Network | ast.Block]:
    """The networks and blocks printed in §2 and §3 of docs/language.md, by name."""
    doc = (REPO / "docs" / "language.md").read_text()
    part = doc[doc.index("## 2. A whole file"):doc.index("## 4. Operations")]
    chunks, current = [], []
    for line in part.splitlines():
        if line.startswith("    ") or (not line.strip() and current):
            current.append(line)
        elif current:
            chunks.append(current)
            current = []
    items = {}
    for chunk in chunks + [current]:
        text = textwrap.dedent("\n".join(chunk)).strip()
        if re.match(r"(#[^\n]*\n)*\s*(network|block)\b", text):
            for item in parse(text + "\n", "docs/language.md").items:
                items[item.name] = item
    return items


def example_items(name: str) -> dict[str, ast.Network | ast.Block]:
    return {i.name: i for i in parse_file(REPO / "examples" / name).items if not isinstance(i, ast.Use)}


def test_there_are_the_examples_the_chapter_needs():
    names = {p.stem for p in EXAMPLES}
    assert {"lenet5", "inception_se", "refine", "sobel", "resnet_block", "digits_lenet", "shufflenet_unit",
            "hdc_segmentation", "local_faces", "bottleneck", "random_features", "segmentation_upsample"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_says_what_it_is(path: Path):
    module = parse_file(path)
    assert any(isinstance(i, ast.Network) for i in module.items)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# examples/{path.name} — ") and len(first) > len(path.name) + 20, first


def test_the_reference_is_where_the_examples_come_from():
    ref = reference_items()
    assert {"LeNet5", "se", "inception", "Refine", "Tiny"} <= set(ref)
    assert strip(example_items("lenet5.cnn")["LeNet5"]) == strip(ref["LeNet5"])
    assert strip(example_items("refine.cnn")["Refine"]) == strip(ref["Refine"])
    inception_se = example_items("inception_se.cnn")
    assert strip(inception_se["se"]) == strip(ref["se"])
    assert strip(inception_se["inception"]) == strip(ref["inception"])
    # Tiny gains a classifier head and a loss so that it can be trained; what the reference
    # writes is its beginning.
    tiny = inception_se["Tiny"].body
    assert strip(tiny[:len(ref["Tiny"].body) - 1]) == strip(ref["Tiny"].body[:-1])


def test_sobel_kernels_are_out_in_kh_kw():
    (net,) = [i for i in parse_file(REPO / "examples" / "sobel.cnn").items if isinstance(i, ast.Network)]
    (const,) = [s for s in net.body if isinstance(s, ast.ConstDecl)]

    def shape(node):
        return (len(node.items), *shape(node.items[0])) if isinstance(node, ast.ListLit) else ()

    assert shape(const.value) == (2, 1, 3, 3)
    conv = next(s.value for s in net.body if isinstance(s, ast.Assign) and s.name == "edges")
    kwargs = {k.name: k.value for k in conv.kwargs}
    assert kwargs["weight"].id == const.name
    assert kwargs["flip"].value is True and kwargs["frozen"].value is True and kwargs["bias"].value is False


def test_refine_shares_its_layers_and_has_run_time_sizes():
    net = example_items("refine.cnn")["Refine"]
    (inp,) = [s for s in net.body if isinstance(s, ast.Input)]
    assert [type(d).__name__ for d in inp.dims] == ["Num", "Name", "Name"]
    assert [s.name for s in net.body if isinstance(s, ast.LayerDecl)] == ["U", "W", "V"]
    (rep,) = [s for s in net.body if isinstance(s, ast.Repeat)]
    assert rep.count.value == 3
