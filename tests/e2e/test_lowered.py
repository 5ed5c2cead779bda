"""The lowered program: what `convdsl plan` / `compile --emit lowered` print (golden for LeNet-5),
kernel variants chosen by cost and overridden per layer (`algo=`) and per run (`algo=` of load,
`--algo`, CONVDSL_ALGO), and the backend reading the program alone."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl import ConvDSLError
from convdsl.compiler import compile_graph, graph_from_file, graph_from_source
from convdsl.lower import lower
from convdsl.lower.show import program_text
from reference import assert_close

REPO = Path(__file__).resolve().parents[2]
LENET = REPO / "examples" / "lenet5.cnn"
GOLDEN = REPO / "tests" / "golden" / "lowered_lenet5.txt"


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "convdsl", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)


def test_plan_of_lenet5_is_the_golden_text():
    """Regenerate with `python -m convdsl plan examples/lenet5.cnn > tests/golden/lowered_lenet5.txt`
    after a deliberate change, and read the difference."""
    proc = cli("plan", "examples/lenet5.cnn")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == GOLDEN.read_text()


def test_compile_emit_lowered_prints_the_same_and_writes_nothing(tmp_path):
    proc = cli("compile", "examples/lenet5.cnn", "--emit", "lowered", "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == GOLDEN.read_text()
    assert not (tmp_path / "out").exists()


def test_every_step_line_names_variant_operands_epilogue_workspace_threads():
    program = lower(graph_from_file(LENET))
    lines = [l for l in program_text(program).splitlines() if l[:4].strip().isdigit()]
    # forward: 12 layers less the 4 relus fused into conv1, conv2, dense1, dense2; backward: all 12
    assert len(lines) == len(program.steps) == 8 + 12 + 1
    conv1 = lines[0]
    assert "conv1 (line 7)" in conv1 and "conv/blocked" in conv1
    # conv1 + bias + relu1 as one kernel writing relu1's output (value 2) once
    # (training block offsets: the input is kept apart from everything; relu1's output, which
    # maxpool1's and relu1's backwards read, is placed first)
    assert "x0=act[16888:+784]" in conv1 and "y=act[0:+4704]" in conv1 and "weight=params[0:+150]" in conv1
    assert "| epilogue bias+relu (relu1 fused) |" in conv1
    # the shared columns, and per thread (a backward giving threads whole samples) columns + dW + db
    assert "| workspace 19600 + 19756 per thread |" in conv1 and "| threads " in conv1
    assert [s.label for s in program.forward] == ["conv1", "maxpool1", "conv2", "maxpool2", "flatten1", "dense1",
                                                  "dense2", "dense3"]


SRC = """network V {
    input x: [4, H, W]
    a = x -> conv(4, kernel=1)
    b = x -> depthwise(3, pad=same)
    c = x -> conv(6, kernel=3, pad=same)
    output a, b, c
}
"""


def variants(program):
    return [s.variant for s in program.forward]


def test_the_plan_picks_by_cost_and_the_file_overrides_one_layer():
    assert variants(lower(graph_from_source(SRC))) == ["pointwise", "direct", "blocked"]
    forced = SRC.replace("conv(4, kernel=1)", "conv(4, kernel=1, algo=im2col)")
    assert variants(lower(graph_from_source(forced))) == ["im2col", "direct", "blocked"]
    forced = forced.replace("conv(6, kernel=3, pad=same)", "conv(6, kernel=3, pad=same, algo=im2col)")
    assert variants(lower(graph_from_source(forced))) == ["im2col", "direct", "im2col"]


def test_algo_that_does_not_apply_is_an_error_at_the_argument():
    bad = SRC.replace("conv(6, kernel=3, pad=same)", "conv(6, kernel=3, pad=same, algo=pointwise)")
    with pytest.raises(ConvDSLError) as e:
        graph_from_source(bad)
    text = str(e.value)
    assert "algo=pointwise does not apply to this conv" in text and "no padding before or after" in text
    assert "^" in text and ":5:" in text


def test_run_override_applies_where_the_variant_applies(monkeypatch):
    g = graph_from_source(SRC)
    assert variants(lower(g, {"conv": "im2col", "depthwise": "im2col"})) == ["im2col", "im2col", "im2col"]
    # direct does not apply to a conv with 4 input channels per group: the plan's choice stays
    assert variants(lower(g, "conv=direct")) == ["pointwise", "direct", "blocked"]
    # blocked applies to every conv: forced, it replaces the 1×1's pointwise GEMM too
    assert variants(lower(g, "conv=blocked")) == ["blocked", "direct", "blocked"]
    monkeypatch.setenv("CONVDSL_ALGO", "depthwise:im2col")
    assert variants(lower(g)) == ["pointwise", "im2col", "blocked"]
    assert variants(lower(g, {"depthwise": "direct"})) == ["pointwise", "direct", "blocked"]   # explicit wins


@pytest.mark.parametrize("algo, message", [
    ({"conv": "winograd"}, "conv has no variant `winograd`; it has im2col, pointwise, broadcast, narrow, direct"),
    ({"convolution": "im2col"}, "there is no op `convolution`"),
    ("conv", "`conv` is not OP=VARIANT"),
])
def test_bad_overrides_are_errors(algo, message):
    with pytest.raises(ConvDSLError, match=message):
        lower(graph_from_source(SRC), algo)


def test_cli_algo_and_environment(tmp_path):
    (tmp_path / "v.cnn").write_text(SRC)
    plain = cli("plan", str(tmp_path / "v.cnn"))
    forced = cli("plan", str(tmp_path / "v.cnn"), "--algo", "depthwise=im2col", "--algo", "conv=im2col")
    assert plain.returncode == forced.returncode == 0, plain.stderr + forced.stderr
    assert "depthwise/direct" in plain.stdout and "depthwise/im2col" in forced.stdout
    assert "conv/pointwise" in plain.stdout and "conv/pointwise" not in forced.stdout
    import os
    env = dict(os.environ, CONVDSL_ALGO="depthwise=im2col")
    assert "depthwise/im2col" in cli("plan", str(tmp_path / "v.cnn"), env=env).stdout
    bad = cli("plan", str(tmp_path / "v.cnn"), "--algo", "conv=strassen")
    assert bad.returncode == 1 and "conv has no variant `strassen`" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_and_emit_lowered_are_the_backends_program():
    """`--backend opencl` prints what the OpenCL build runs (it printed the C program before):
    its own `tiled` conv on the large layer with each product's work-group tile, where the C
    program runs Winograd."""
    layers = "benchmarks/nets/layers.cnn"
    tile = "tiles 32×64 by 16 (8×8 work-items, 4×8 each)"
    for args in (("plan", layers), ("compile", layers, "--emit", "lowered", "-o", "unused")):
        on_cl = cli(*args, "--network", "VGG3x3", "--backend", "opencl")
        on_c = cli(*args, "--network", "VGG3x3")
        assert on_cl.returncode == on_c.returncode == 0, on_cl.stderr + on_c.stderr
        assert "conv/tiled" in on_cl.stdout and f"forward in {tile}; dx in {tile}; dw in {tile}" in on_cl.stdout
        assert "conv/winograd4" in on_c.stdout and "tiled" not in on_c.stdout
    # Forced on C, which has no kernels for it: the C backend's own choice instead.
    forced = cli("plan", layers, "--network", "VGG3x3", "--algo", "conv=tiled")
    assert forced.returncode == 0 and "conv/winograd4" in forced.stdout, forced.stderr


def test_load_with_algo_builds_that_variant_and_computes_the_same():
    rng = np.random.default_rng(5)
    auto = convdsl.load_source(SRC).Model(seed=3)
    im2col = convdsl.load_source(SRC, algo={"conv": "im2col", "depthwise": "im2col"}).Model(seed=3)
    x = rng.standard_normal((2, 4, 7, 5)).astype(np.float32)
    for a, b in zip(auto.forward(x), im2col.forward(x)):
        assert_close(a, b, what="forward")


def test_the_c_backend_reads_the_lowered_program_only():
    """The renderer imports nothing of the graph, the plan or the passes: the program is its input.
    (Target.check_supported answers `check` from the graph, before anything is lowered.)"""
    for path in (REPO / "convdsl" / "codegen" / "render.py",):
        tree = ast.parse(path.read_text())
        imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not any(m.endswith(("passes.schedule", "passes.memory")) for m in imported), path
        assert not {"Graph", "Plan", "make_plan"} & names, path
    program = lower(graph_from_file(LENET))
    assert compile_graph(graph_from_file(LENET)).source.c == \
        __import__("convdsl.codegen.render", fromlist=["render_c"]).render_c(program).c


def test_no_kernel_allocates_memory():
    """Workspaces, per-thread ones too, are planned by the placement: no kernel template calls the
    allocator (a conv backward that split the batch across threads once calloc'ed its own)."""
    import re
    for path in sorted((REPO / "templates" / "c" / "ops").glob("*.j2")):
        assert not re.search(r"\b(malloc|calloc|realloc|free)\s*\(", path.read_text()), path.name
