"""No generated C draws a compiler warning. Every real build compiles with -Wall -Wextra and shows
whatever the compiler prints as a CompilerWarning, which tests/conftest.py turns into an error:
so each module any test builds (every example, every op test network in each dtype and layout it
is built in) is checked as it is built. Here: that a warning does come out, and — slow — the
stricter `-std=c11 -Wall -Wextra -Werror` (tests/ccheck.py), as the generated Makefile builds the
C library: compiled at -O3 for every op test file's cases (f32, NCHW), where the optimiser's own
warnings show; parsed only (-fsyntax-only) for the same cases in f64/NHWC and for every example,
whose -O3 builds with -Wall -Wextra test_examples.py makes (a warning there fails it)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ccheck import assert_generated_c_compiles_cleanly
from op_networks import load, op_files
from convdsl.compiler import compile_graph, graph_from_file, graph_from_source, networks_in_file
from convdsl.runtime.build import CompilerWarning, build_library

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [(path, name) for path in sorted((REPO / "examples").glob("*.cnn")) for name in networks_in_file(path)]
OP_FILES = op_files()


def test_a_build_that_draws_a_warning_says_so():
    """gcc's "integer constant is too large" (the literal is 2^64) was once printed and dropped."""
    code = compile_graph(graph_from_source("network Warns {\n input x: [1, 2, 2]\n y = x -> relu\n output y\n}\n")).source
    c_text = code.c + "\nstatic const long long cdsl_probe_literal = 18446744073709551616;\n"
    with pytest.warns(CompilerWarning, match="integer constant is too large"):
        build_library(code.prefix, c_text, code.h, code.cdef)


@pytest.mark.parametrize("optimised", [False, True])
def test_the_strict_check_fails_on_a_warning(optimised, tmp_path):
    """Parsed only or compiled, the strict check refuses C that draws a warning."""
    code = compile_graph(graph_from_source("network Strict {\n input x: [2]\n y = x -> relu\n output y\n}\n")).source
    probe = "\nint cdsl_probe(void);\nint cdsl_probe(void) { int unused; return 0; }\n"
    with pytest.raises(AssertionError, match="unused variable"):
        assert_generated_c_compiles_cleanly(dataclasses.replace(code, c=code.c + probe), tmp_path, optimised)


@pytest.mark.slow
@pytest.mark.parametrize("path,network", EXAMPLES, ids=[f"{p.stem}:{n}" for p, n in EXAMPLES])
def test_every_example_compiles_without_a_warning(path, network, tmp_path):
    assert_generated_c_compiles_cleanly(compile_graph(graph_from_file(path, network)).source, tmp_path,
                                        optimised=False)


def op_cases(path: Path):
    """The CASES of one op test file (and MAP_CASES where it has them), imported from its file."""
    module = load(path)
    return tuple(module.CASES) + tuple(getattr(module, "MAP_CASES", ()))


@pytest.mark.slow
@pytest.mark.parametrize("path", OP_FILES, ids=[p.stem for p in OP_FILES])
def test_every_op_test_network_compiles_without_a_warning(path, tmp_path):
    cases = op_cases(path)
    from opcases import source           # importable once op_cases put tests/ops on the path
    assert cases
    for dtype, layout, optimised in (("f32", "NCHW", True), ("f64", "NHWC", False)):
        src = source(cases, dtype, layout)
        out = tmp_path / f"{dtype}-{layout}"
        out.mkdir()
        assert_generated_c_compiles_cleanly(compile_graph(graph_from_source(src)).source, out, optimised)
