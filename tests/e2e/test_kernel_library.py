"""The kernel library (templates/c/kernels.c.j2: the GEMM's out-of-line half):
one source per element type, compiled once per flags into a cached object that every network
calling it links; a damaged cached object is rebuilt; and networks of both element types link
into one C program, each with its own copy (their functions carry the dtype in their names)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import convdsl
from convdsl.compiler import compile_graph, graph_from_source
from convdsl.runtime import build
from convdsl.runtime.build import build_library, file_digest, manifest_path

REPO = Path(__file__).resolve().parents[2]

CONV = """network {name} {{
    dtype {dtype}
    input x: [2, 6, 6]
    y = x -> conv({channels}, kernel=3, pad=1) -> relu -> flatten -> dense(3)
    output y
}}
"""


def source(name: str, dtype: str = "f32", channels: int = 4) -> str:
    return CONV.format(name=name, dtype=dtype, channels=channels)


def test_networks_of_one_dtype_share_one_kernel_object(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path / "cache"))
    first = compile_graph(graph_from_source(source("First"))).source
    second = compile_graph(graph_from_source(source("Second", channels=5))).source
    other = compile_graph(graph_from_source(source("Other", dtype="f64"))).source
    assert first.kernels == second.kernels and first.kernels.name == "cdsl_kernels_f32"
    assert other.kernels.name == "cdsl_kernels_f64" and other.kernels.tag != first.kernels.tag
    assert first.kernels.tag in first.c and "cdsl_gemm_pack_a" not in first.c     # called, not compiled in
    for code in (first, second, other):
        build_library(code.prefix, code.c, code.h, code.cdef, kernels=code.kernels)
    objects = sorted(p.name for p in (tmp_path / "cache" / "kernels").glob("*.o"))
    assert [name.rsplit("_", 1)[0] for name in objects] == ["cdsl_kernels_f32", "cdsl_kernels_f64"]


def test_a_network_without_products_links_no_kernel_library():
    code = compile_graph(graph_from_source("network P {\n input x: [3, 4, 4]\n y = x -> maxpool(2) -> relu\n"
                                           " output y\n}\n")).source
    assert code.kernels is None


def test_a_damaged_kernel_object_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path / "cache"))
    code = compile_graph(graph_from_source(source("Before"))).source
    build_library(code.prefix, code.c, code.h, code.cdef, kernels=code.kernels)
    (obj,) = (tmp_path / "cache" / "kernels").glob("*.o")
    obj.write_bytes(obj.read_bytes()[:100])               # a build cut short
    monkeypatch.setattr(build, "_KERNEL_OBJECTS", set())  # as a new process would find it
    later = compile_graph(graph_from_source(source("After", channels=6))).source
    path = build_library(later.prefix, later.c, later.h, later.cdef, kernels=later.kernels)
    size, _ = file_digest(obj)
    assert size > 100 and f'"size": {size}' in manifest_path(obj).read_text()
    assert path.exists()


C_PROGRAM = r"""
#include <stdio.h>
#include "narrow.h"
#include "wide.h"

int main(void)
{
    narrow_model *s = narrow_create(0);
    wide_model *d = wide_create(0);
    if (!s || !d || narrow_prepare(s, 1, NULL) || wide_prepare(d, 1, NULL)) return 1;
    float xs[72], ys[3];
    double xd[72], yd[3];
    for (int i = 0; i < 72; i++) { xs[i] = (float)(i % 7) / 7.0f - 0.4f; xd[i] = (double)(i % 5) / 5.0 - 0.3; }
    const float *in_s[] = {xs};
    float *out_s[] = {ys};
    const double *in_d[] = {xd};
    double *out_d[] = {yd};
    if (narrow_forward(s, in_s, out_s) || wide_forward(d, in_d, out_d)) return 1;
    for (int i = 0; i < 3; i++) printf("%.9g %.17g\n", (double)ys[i], yd[i]);
    narrow_destroy(s);
    wide_destroy(d);
    return 0;
}
"""


def test_an_f32_and_an_f64_network_link_into_one_program(tmp_path):
    """Each static library holds a kernel library: the f32 one and the f64 one define
    functions of the same source names, which would collide (or, worse, one would serve both)
    if their linked names did not carry the element type."""
    text = source("Narrow") + source("Wide", dtype="f64")
    (tmp_path / "two.cnn").write_text(text)
    out = tmp_path / "build"
    proc = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(tmp_path / "two.cnn"), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"cdsl_kernels_f32.c", "cdsl_kernels_f64.c"} <= {p.name for p in out.iterdir()}
    proc = subprocess.run(["make", "-C", str(out), "OPTFLAGS=-O0", "libnarrow.a", "libwide.a"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "both.c").write_text(C_PROGRAM)
    exe = tmp_path / "both"
    proc = subprocess.run(["cc", "-std=c11", f"-I{out}", str(tmp_path / "both.c"), str(out / "libnarrow.a"),
                           str(out / "libwide.a"), "-fopenmp", "-lm", "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = np.array([[float(v) for v in line.split()] for line in proc.stdout.splitlines()])

    i = np.arange(72)
    narrow = convdsl.load_source(source("Narrow")).Model(seed=0)
    wide = convdsl.load_source(source("Wide", dtype="f64")).Model(seed=0)
    want_s = narrow.forward(((i % 7).astype(np.float32) / np.float32(7) - np.float32(0.4)).reshape(1, 2, 6, 6))
    want_d = wide.forward(((i % 5) / 5.0 - 0.3).reshape(1, 2, 6, 6))
    np.testing.assert_allclose(got[:, 0], want_s[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 1], want_d[0], rtol=1e-12, atol=1e-14)


def test_broadcast_stages_no_more_than_the_plan_gives_it():
    # The plan sizes broadcast's workspace (ops/conv.py) from the kernel library's own limits on
    # what cdsl_gemm_broadcast stages at once (lib/gemm): the two must be the same numbers, or a
    # product would stage past its workspace.
    import re
    from convdsl.ops import conv
    from convdsl.resources import templates_dir
    lib = Path(templates_dir()) / "c" / "lib"
    stage = re.search(r"#define CDSL_BROADCAST_STAGE (\d+)", (lib / "gemm.c.j2").read_text())
    columns = re.search(r"#define CDSL_BROADCAST_COLUMNS (\d+)", (lib / "gemm.h.j2").read_text())
    assert stage and int(stage.group(1)) == conv.BROADCAST_STAGE
    assert columns and int(columns.group(1)) == conv.BROADCAST_COLUMNS
    # narrow stages all the rows of up to CDSL_NARROW_COLUMNS positions at a time
    narrow = re.search(r"#define CDSL_NARROW_COLUMNS (\d+)", (lib / "gemm.h.j2").read_text())
    assert narrow and int(narrow.group(1)) == conv.NARROW_COLUMNS
