"""The backend targets (convdsl/targets/): kernels take plain arguments and never the model, the
renderer reads the lowered program only, and how a loop is split comes from the program."""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path

from convdsl.compiler import graph_from_file, graph_from_source, networks_in_file
from convdsl.lower import lower
from convdsl.targets import C

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [(path, name) for path in sorted((REPO / "examples").glob("*.cnn")) for name in networks_in_file(path)]
OPS = REPO / "tests" / "ops"

# Run-time sizes, dropout (mode and random stream), batchnorm (mode, buffers), a loss.
MIXED = """network Mixed {
    input x: [3, H, W]
    a = x -> conv(4, kernel=3, pad=same) -> batchnorm -> relu -> dropout(0.5)
    g = sub(a, mul(a, a))
    b = g -> maxpool(2) -> conv(4, kernel=1) -> sigmoid
    y = b -> globalavgpool -> flatten -> reshape([2, 2]) -> reshape([-1]) -> dense(5) -> softmax
    output y
    loss mse(y)
}
"""
# conv's separable split: a frozen const Sobel kernel (rank 1) on a map of run-time size.
SPLIT = """network Split {
    input x: [1, H, W]
    const sobel = [[[[1, 0, -1], [2, 0, -2], [1, 0, -1]]]]
    y = x -> conv(1, kernel=3, weight=sobel, frozen=true, pad=same, algo=separable) -> relu
    output y
}
"""
# conv by FFT (sizes known at check time, as it needs).
BY_FFT = """network ByFFT {
    input x: [2, 12, 10]
    y = x -> conv(3, kernel=5, pad=((2, 1), (0, 3)), dilation=(1, 2), algo=fft) -> relu
    output y
    loss mse(y)
}
"""


def layer_section(c_text: str) -> str:
    start, end = c_text.index("/* ---- layers"), c_text.index("/* ---- parameters")
    return c_text[start:end]


def _op_case_sources():
    if str(OPS) not in sys.path:
        sys.path.insert(0, str(OPS))
    from opcases import source
    for path in sorted(OPS.glob("test_*.py")):
        if "\nCASES = (" not in path.read_text():
            continue
        spec = importlib.util.spec_from_file_location(f"_targets_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cases = tuple(module.CASES) + tuple(getattr(module, "MAP_CASES", ()))
        yield path.stem, source(cases, "f32", "NCHW")


def _kernel_heads(section: str) -> list[str]:
    return re.findall(r"^static (?:inline )?(?:void|int|int64_t) (\w+)\(([^)]*)\)", section, flags=re.M)


def test_no_kernel_takes_or_touches_the_model():
    """Every op and loss kernel (and every helper beside it) takes pointers and sizes: none
    takes model_t, none reads `m->`; the forward and backward passes resolve the arguments."""
    programs = [lower(graph_from_file(path, name)) for path, name in EXAMPLES]
    programs += [lower(graph_from_source(src)) for _, src in _op_case_sources()]
    programs += [lower(graph_from_source(src)) for src in (MIXED, SPLIT, BY_FFT)]
    seen_ops, seen_templates = set(), set()
    for program in programs:
        section = layer_section(C.render(program).c)
        heads = _kernel_heads(section)
        assert heads, program.name
        for name, params in heads:
            assert "model_t" not in params and "_model" not in params, (program.name, name, params)
        assert "m->" not in section, (program.name, section[section.index("m->") - 300:section.index("m->") + 100])
        seen_ops |= {s.op for s in program.steps}
        seen_templates |= {s.variant_template for s in program.steps}
    # The networks above run every op kind with a template.
    templates = {p.name.split(".")[0] for p in (REPO / "templates" / "c" / "ops").glob("*.c.j2")
                 if not p.name.endswith("_epilogue.c.j2")}   # an activation's formula, not a kernel
    assert {"conv", "dense", "batchnorm", "dropout", "softmax", "add", "concat", "upsample"} <= seen_ops
    assert {"conv_separable", "conv_fft"} <= seen_templates
    assert templates - {"conv_direct", "conv_separable", "conv_fft"} <= seen_ops | {"conv_direct"}, templates - seen_ops


def test_the_passes_launch_each_kernel_with_its_operands_from_the_model():
    c_text = C.render(lower(graph_from_source(MIXED))).c
    forward = c_text[c_text.index("static void cdsl_forward_pass"):c_text.index("static void cdsl_backward_pass")]
    conv = re.search(r"cdsl_L0_conv1_forward\((.*)\);", forward).group(1).split(", ")
    # batch, run-time sizes, x0, y, weight, bias and the im2col workspace
    assert conv[:3] == ["m->batch", "m->dim", "m->value[0]"], conv
    assert conv[4].startswith("m->params + ") and conv[5].startswith("m->params + ") and conv[6] == "m->scratch"
    dropout = re.search(r"cdsl_L\d+_dropout1_forward\((.*)\);", forward).group(1).split(", ")
    assert dropout[-2:] == ["m->training", "&m->rng"] and dropout[-3].startswith("m->saved[")
    backward = c_text[c_text.index("static void cdsl_backward_pass"):]
    bn = re.search(r"cdsl_L\d+_batchnorm1_backward\((.*)\);", backward).group(1).split(", ")
    assert bn[-1] == "m->forward_training", bn


def test_the_thread_split_threshold_comes_from_the_lowered_program():
    """A loop's `if (work > threshold)` is the step's ParallelSplit, set by the plan: another
    threshold in the program is another pragma, with no template changed."""
    program = lower(graph_from_source(MIXED))
    relu = next(s for s in program.steps if s.op == "sigmoid" and s.phase == "backward")
    assert relu.parallel.threshold == 65536
    assert "#pragma omp parallel for schedule(static) if (count > 65536)" in C.render(program).c
    changed = replace(program, steps=tuple(replace(s, parallel=replace(s.parallel, threshold=4096))
                                           if s.op == "sigmoid" else s for s in program.steps))
    text = C.render(changed).c
    kernel = text[text.index("static void cdsl_L") + text[text.index("static void cdsl_L"):].index("sigmoid1_backward"):]
    kernel = kernel[:kernel.index("\n}\n")]
    assert "if (count > 4096)" in kernel and "65536" not in kernel
    always = replace(program, steps=tuple(replace(s, parallel=replace(s.parallel, threshold=0))
                                          if s.op == "sigmoid" else s for s in program.steps))
    text = C.render(always).c
    kernel = text[text.index("sigmoid1_backward("):]
    kernel = kernel[:kernel.index("\n}\n")]
    assert "#pragma omp parallel for schedule(static)\n" in kernel


# The conv forced to im2col: its kernels are the ones that call the GEMM and im2col helpers.
SHARED_HELPERS = """network Helpers {
    input x: [3, 6, 6]
    a = x -> conv(4, kernel=3, algo=im2col) -> relu
    b = a -> deconv(2, kernel=2, stride=2) -> flatten -> dense(5)
    output b
}
"""


def test_the_shared_helpers_split_at_the_thresholds_of_the_lowered_program():
    """The GEMM, im2col / col2im and a conv's batch loop split across threads at the thresholds
    the plan wrote in each step's ParallelSplit, passed to them by the kernels; the helpers in
    lib/ hold no threshold of their own."""
    for name in ("gemm.h.j2", "gemm.c.j2", "im2col.h.j2", "optimizer.c.j2"):
        lib = (REPO / "templates" / "c" / "lib" / name).read_text()
        for condition in re.findall(r"#pragma omp parallel[^\n]* if \((.*)\)", lib):
            assert not re.search(r"\d", condition), (name, condition)
        assert not re.search(r"PARALLEL_(MACS|BYTES)|65536|8e6", lib), name
    program = lower(graph_from_source(SHARED_HELPERS))
    by_op = {s.op: s for s in program.forward}
    assert [(by_op[op].parallel.threshold, by_op[op].parallel.gemm_threshold) for op in ("conv", "deconv", "dense")] \
        == [(65536, 65536)] * 3
    assert by_op["conv"].parallel.batch_threshold == 8_000_000

    def kernels(prog, op):
        text = C.render(prog).c
        start = text.index(f"/* {by_op[op].label}: ")
        return text[start:text.index("#undef", start)]

    assert "cdsl_batch_threads(N, (double)COG * P * CIG * KK * G, CONV_BATCH_SPLIT)" in kernels(program, "conv")
    changed = replace(program, steps=tuple(
        replace(s, parallel=replace(s.parallel, threshold=111, gemm_threshold=222, batch_threshold=333))
        for s in program.steps))
    for op, prefix in (("conv", "CONV"), ("deconv", "DECONV"), ("dense", "DENSE")):
        text = kernels(changed, op)
        assert f"#define {prefix}_GEMM_SPLIT 222\n" in text, op
        assert text.count(f"{prefix}_GEMM_SPLIT);") >= 2, op
    conv, deconv = kernels(changed, "conv"), kernels(changed, "deconv")
    assert "#define CONV_LOOP_SPLIT 111\n" in conv and "#define CONV_BATCH_SPLIT 333\n" in conv
    assert "CONV_WINDOW, CONV_LOOP_SPLIT);" in conv
    assert "#define DECONV_LOOP_SPLIT 111\n" in deconv
    assert "cdsl_col2im(col, PI, yn, DECONV_WINDOW, DECONV_LOOP_SPLIT);" in deconv
    assert "cdsl_im2col(dyn, col, DECONV_WINDOW, DECONV_LOOP_SPLIT);" in deconv

def test_the_optimizer_splits_each_parameter_block_at_the_update_steps_threshold():
    """The optimizer's passes (lib/optimizer.c.j2) split across threads from the threshold of
    the lowered program's update step, which the plan sets; nothing in the template."""
    from convdsl.lower.plan import OPTIMIZER_SPLIT
    program = lower(graph_from_source(SHARED_HELPERS))
    [update] = program.phase("update")
    assert update.parallel.threshold == OPTIMIZER_SPLIT
    text = C.render(program).c
    passes = text[text.index("static void cdsl_sgd_block"):text.index("static int cdsl_optimizer_check")]
    assert passes.count(f"#pragma omp parallel for schedule(static) if (n > {OPTIMIZER_SPLIT})") == 3
    changed = replace(program, steps=tuple(replace(s, parallel=replace(s.parallel, threshold=4321))
                                           if s.phase == "update" else s for s in program.steps))
    text = C.render(changed).c
    passes = text[text.index("static double cdsl_grad_global_norm"):text.index("static int cdsl_optimizer_check")]
    assert passes.count("if (n > 4321)") == 4 and str(OPTIMIZER_SPLIT) not in passes


def test_the_targets_read_the_lowered_program_only():
    """No module of convdsl/targets (nor codegen/render.py) imports the graph, the plan or the passes
    that make it (ops are read for their kernel context and traits)."""
    paths = sorted((REPO / "convdsl" / "targets").glob("*.py")) + [REPO / "convdsl" / "codegen" / "render.py"]
    for path in paths:
        tree = ast.parse(path.read_text())
        imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not any(m.endswith(("passes.schedule", "passes.memory", "lower.plan", "ir.graph", "ir.build"))
                       for m in imported), (path, imported)
        assert not {"Graph", "Plan", "make_plan", "lower"} & names, path
