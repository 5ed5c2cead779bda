"""The design warnings (§5): each fires at the right line and column with the chapter's numbers,
stays silent on a correct counterpart, and can be allowed per line or per run."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from convdsl.compiler import graph_from_file, graph_from_source, networks_in_file
from convdsl.passes.lints import CODES, RULES, lint

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
FIRING = sorted(p for p in GOLDEN.glob("lint_*.cnn") if not p.stem.endswith("_ok"))
SILENT = sorted(GOLDEN.glob("lint_*_ok.cnn"))


def warnings_of(path: Path) -> str:
    rel = path.relative_to(REPO)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return "".join(d.render() + "\n" for d in lint(graph_from_file(str(rel))))
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("path", FIRING, ids=lambda p: p.stem)
def test_warning_text(path: Path):
    got = warnings_of(path)
    expected = path.with_suffix(".txt")
    if os.environ.get("CONVDSL_REGEN_GOLDEN"):
        expected.write_text(got)
    assert got == expected.read_text()


@pytest.mark.parametrize("path", SILENT, ids=lambda p: p.stem)
def test_silent_on_the_correct_counterpart(path: Path):
    assert warnings_of(path) == ""


def test_every_code_has_a_golden_that_shows_it_and_a_silent_counterpart():
    shown = {line.rsplit("[", 1)[1].rstrip("]") for p in FIRING for line in p.with_suffix(".txt").read_text().splitlines()
             if ": warning: " in line}
    assert shown == set(CODES)
    assert [p.stem for p in FIRING if not (GOLDEN / f"{p.stem}_ok.cnn").exists()] == ["lint_allowed_on_line"]


def test_every_code_is_documented_in_section_5():
    doc = (REPO / "docs" / "language.md").read_text()
    section = doc[doc.index("## 5."):doc.index("## 6.")]
    assert set(re.findall(r"^\| (W\d{3}) \|", section, flags=re.M)) == set(CODES)
    assert [r.code for r in RULES] == sorted(CODES)


# ---- what each rule must not flag (and the edge of what it must) ----------------------------

def codes(body: str) -> list[str]:
    graph = graph_from_source("network N {\n" + body + "\n}\n")
    return [d.code for d in lint(graph)]


def messages(body: str) -> list[str]:
    return [d.message for d in lint(graph_from_source("network N {\n" + body + "\n}\n"))]


def test_gridding_is_found_per_axis_and_through_1x1_convs():
    (msg,) = messages("""
    input x: [4, 32, 32]
    y = x -> conv(8, kernel=3, pad=same, dilation=(2, 1)) -> relu -> conv(8, kernel=1)
          -> conv(8, kernel=3, pad=same, dilation=(4, 1))
    output y""")
    assert msg.startswith("dilation rates 2, 4 share the factor 2: only every 2nd input position along the "
                          "height reaches an output, so 1 in 2 inputs are never seen")


def test_an_undilated_conv_after_the_stack_refills_the_grid_but_the_rates_still_grid():
    # §3.11 calls the rates themselves bad: the conv after them re-mixes the phases, but each unit of
    # the dilated layers sees a grid. The warning points at the last dilated conv, not the stack's end.
    (diag,) = lint(graph_from_source("""network N {
    input x: [4, 32, 32]
    y = x -> conv(8, kernel=3, pad=same, dilation=2) -> relu -> conv(8, kernel=3, pad=same, dilation=4) -> relu
          -> conv(8, kernel=3, pad=same)
    output y
}
"""))
    assert (diag.code, diag.span.line, diag.span.col) == ("W101", 3, 65)
    assert "re-mixes the phases, but the dilated layers themselves only see a grid" in diag.message


def test_one_dilated_conv_before_an_undilated_one_is_not_a_gridded_stack():
    assert codes("""
    input x: [4, 32, 32]
    y = x -> conv(8, kernel=3, pad=same, dilation=2) -> relu -> conv(8, kernel=3, pad=same)
    output y""") == []


def test_the_order_rule_stays_quiet_when_the_rates_grid():
    assert codes("""
    input x: [4, 32, 32]
    y = x -> conv(8, kernel=3, pad=same, dilation=6) -> conv(8, kernel=3, pad=same, dilation=2)
          -> conv(8, kernel=3, pad=same)
    output y""") == ["W101"]


def test_a_pool_or_a_stride_ends_a_dilated_stack():
    assert codes("""
    input x: [4, 32, 32]
    y = x -> conv(8, kernel=3, pad=same, dilation=2) -> maxpool(2) -> conv(8, kernel=3, pad=same, dilation=2)
    output y""") == []


def test_depthwise_dilated_convs_grid_too():
    assert codes("""
    input x: [4, 32, 32]
    y = x -> depthwise(3, pad=same, dilation=2) -> depthwise(3, pad=same, dilation=2)
    output y""") == ["W101"]


def test_large_kernel_needs_fewer_parameters_for_its_own_channels():
    # A stem (3 → 64 channels): three 3×3 convs 3→64, 64→64, 64→64 need 8× the weights of the 7×7.
    assert codes("""
    input x: [3, 64, 64]
    y = x -> conv(64, kernel=7, stride=2, pad=same)
    output y""") == []
    # Fewer channels out than in: the stack saves more than the chapter's 72%.
    (msg,) = messages("""
    input x: [64, 32, 32]
    y = x -> conv(32, kernel=5, pad=same)
    output y""")
    assert "2 stacked 3×3 convs (64→32, then 32→32 channels) see the same 5×5 field with 54% of the parameters " \
           "(§3.4's 72% holds when channels in = out)" in msg


def test_even_grouped_and_dilated_kernels_are_not_large_kernels():
    assert codes("""
    input x: [16, 32, 32]
    a = x -> conv(16, kernel=5, pad=same, groups=16)
    b = x -> conv(16, kernel=5, pad=same, dilation=2)
    c = x -> conv(16, kernel=(5, 3), pad=same)
    output a, b, c""") == []


def test_asymmetric_split_only_on_maps_of_12_to_20():
    body = """
    input x: [16, {n}, {n}]
    y = x -> conv(16, kernel=5, pad=same)   # convdsl: allow W103
    output y"""
    assert codes(body.format(n=12)) == ["W104"] and codes(body.format(n=20)) == ["W104"]
    assert codes(body.format(n=11)) == [] and codes(body.format(n=21)) == []
    assert codes("""
    input x: [16, 16, 16]
    y = x -> conv(16, kernel=3, pad=same)
    output y""") == []


def test_subsampling_a_conv_that_is_read_elsewhere_is_not_waste():
    assert codes("""
    input x: [3, 32, 32]
    f = x -> conv(8, kernel=3, pad=same) -> relu
    y = f -> maxpool(1, stride=2)
    output f, y""") == []
    assert codes("""
    input x: [3, 32, 32]
    y = x -> conv(8, kernel=3, pad=same) -> relu -> maxpool(3, stride=2)
    output y""") == []


def test_one_conv_that_covers_its_map_is_a_dense_layer_not_a_valid_stack():
    # §2.5: LeNet's first dense layer written as a conv whose kernel is the whole 5×5 map.
    assert codes("""
    input x: [1, 28, 28]
    f = x -> conv(6, kernel=5, pad=same) -> relu -> maxpool(2)
          -> conv(16, kernel=5) -> relu -> maxpool(2)          # convdsl: allow W104
    y = f -> conv(120, kernel=5) -> relu -> conv(10, kernel=1)
    output y""") == []
    # Pooling down to 1×1 is global pooling, not a valid stack.
    assert codes("""
    input x: [8, 4, 4]
    y = x -> maxpool(2) -> maxpool(2)
    output y""") == []
    # Two valid convs that eat the map are.
    assert codes("""
    input x: [8, 5, 5]
    y = x -> conv(8, kernel=3) -> relu -> conv(8, kernel=3)
    output y""") == ["W106"]


def test_even_kernel_with_same_padding_that_comes_out_symmetric():
    # Stride 2 on an even map: 7·2 + 4 − 16 = 2 zeros, one on each side.
    assert codes("""
    input x: [3, 16, 16]
    y = x -> conv(8, kernel=4, stride=2, pad=same)
    output y""") == []


def test_a_depthwise_conv_between_group_convs_keeps_the_groups_apart():
    assert codes("""
    input x: [16, 8, 8]
    y = x -> conv(16, kernel=1, groups=4) -> depthwise(3, pad=same) -> batchnorm -> conv(16, kernel=1, groups=4)
    output y""") == ["W108"]
    # A depthwise conv written as conv(groups=in) is not a group conv that needs a shuffle after it.
    assert codes("""
    input x: [16, 8, 8]
    y = x -> conv(16, kernel=1, groups=4) -> shuffle(4) -> conv(16, kernel=3, pad=same, groups=16)
          -> conv(16, kernel=1, groups=4)
    output y""") == []


def test_group_counts_that_already_mix():
    (msg,) = messages("""
    input x: [16, 8, 8]
    y = x -> conv(16, kernel=1, groups=4) -> conv(16, kernel=1, groups=2)
    output y""")
    assert "each group of conv2 sees the channels of only 2 of conv1's 4 groups" in msg


def test_dense_after_dense_or_on_a_one_by_one_map_is_not_flagged():
    # Global pooling cannot help: the dense layer reads a vector, or a 1×1 map.
    assert codes("""
    input x: [256]
    y = x -> dense(512) -> relu -> dense(10)
    output y""") == []
    assert codes("""
    input x: [64, 4, 4]
    y = x -> conv(64, kernel=4) -> relu -> flatten -> dense(100)
    output y""") == []


def test_a_warning_in_a_block_is_reported_once_per_line():
    graph = graph_from_source("""
block gg(x) {
    return x -> conv(16, kernel=1, groups=4) -> conv(16, kernel=1, groups=4)
}
network N {
    input x: [16, 8, 8]
    y = x -> gg -> gg -> gg
    output y
}
""")
    # Inside each instance conv2 reads conv1; across instances, the next conv1 reads conv2.
    first, second = lint(graph)
    assert (first.code, first.span.line, first.span.col, second.span.col) == ("W108", 3, 17, 49)
    assert first.message.startswith("gg2.conv1 (groups=4) reads gg1.conv2")
    # The block note names the use the shown warning comes from; the count covers the others.
    assert [str(n) for n in first.notes] == [
        "note: in block `gg` called at <string>:7:20",
        "note: 2 layers made from this line (block instances or repeat rounds) warn alike; shown once, for the first"]
    assert (first.notes[0].span.line, first.notes[0].span.col) == (7, 20)
    assert second.message.startswith("gg1.conv2 (groups=4) reads gg1.conv1")
    assert str(second.notes[0]) == "note: in block `gg` called at <string>:7:14"
    assert second.notes[1].startswith("note: 3 layers made from this line")


def test_allowed_per_run():
    graph = graph_from_file(GOLDEN / "lint_subsampled.cnn")
    assert [d.code for d in lint(graph)] == ["W105", "W105"]
    assert lint(graph, frozenset({"W105"})) == ()


def test_an_allow_comment_on_another_op_line_above_does_not_count():
    assert codes("""
    input x: [3, 16, 16]
    y = x -> conv(8, kernel=4, pad=same)   # convdsl: allow W107
    z = x -> conv(8, kernel=4, pad=same)
    output y, z""") == ["W107"]


# ---- the examples -----------------------------------------------------------------------------

# The examples are quiet unless they are about what a warning says.
EXPECTED_IN_EXAMPLES = {
    "digits_fc.cnn": {"W109"},          # its dense head is what convert --fc-to-conv is for
    "local_faces.cnn": {"W110"},        # the locally connected head is the point of the example
}


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.cnn")), ids=lambda p: p.name)
def test_examples_are_quiet_unless_about_it(path: Path):
    found = {d.code for n in networks_in_file(path) for d in lint(graph_from_file(path, n))}
    assert found == EXPECTED_IN_EXAMPLES.get(path.name, set())


# ---- the command line ---------------------------------------------------------------------------

def run_check(*args):
    return subprocess.run([sys.executable, "-m", "convdsl", "check", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_allow_and_werror_on_the_command_line():
    path = "tests/golden/lint_even_same.cnn"
    plain = run_check(path)
    assert plain.returncode == 0 and plain.stderr == (GOLDEN / "lint_even_same.txt").read_text()
    assert plain.stdout.startswith("network A")
    strict = run_check(path, "--werror")
    assert strict.returncode == 1 and ": error: an even 4×4 kernel" in strict.stderr
    allowed = run_check(path, "--werror", "--allow", "W107")
    assert allowed.returncode == 0 and allowed.stderr == ""
    two = run_check("tests/golden/lint_subsampled.cnn", "--allow", "W107", "--allow", "w105")
    assert two.returncode == 0 and two.stderr == ""
    unknown = run_check(path, "--allow", "W999")
    assert unknown.returncode == 1 and "unknown warning code(s) W999" in unknown.stderr


# ---- hole analysis: exact on small fields, closed form on huge ones --------------------------------

def brute_force_reach(taps):
    """Every sum of one tap offset r·m (m < k) per conv: the definition, enumerated."""
    reach = {0}
    for r, k in taps:
        reach = {p + r * m for p in reach for m in range(k)}
    return reach


def test_the_hole_analysis_matches_the_definition():
    from types import SimpleNamespace
    from convdsl.passes.lints import field_offsets, first_hole
    rng = random.Random(3)
    for _ in range(2000):
        taps = [(rng.randint(1, 12), rng.randint(2, 6)) for _ in range(rng.randint(1, 4))]
        stack = [SimpleNamespace(attrs={"kernel": (k,), "dilation": (r,)}) for r, k in taps]
        reach = brute_force_reach(taps)
        missing = sorted(set(range(max(reach) + 1)) - reach)
        assert field_offsets(stack, 0) == reach
        assert first_hole(stack, 0) == (missing[0] if missing else None)


def test_huge_rates_and_kernels_are_analysed_without_enumerating_the_field(monkeypatch):
    import convdsl.passes.lints as lints

    def enumerate_field(stack, axis):
        raise AssertionError("a field of millions of positions was enumerated")
    monkeypatch.setattr(lints, "field_offsets", enumerate_field)
    (msg,) = messages("""
    input x: [4, 8]
    y = x -> conv(4, kernel=3, pad=same) -> conv(4, kernel=3, pad=same, dilation=16777216)
    output y""")
    assert msg.startswith("dilation rates 1, 16777216 leave holes: an output spans 33554435 input positions, and "
                          "the inputs 16777214 positions away from its centre on either side, and others, are "
                          "never seen")
