"""`convdsl compile` end to end: the C library compiles cleanly on its own, a plain C program
uses it, and the written Python module imports and agrees with it — for the C backend and for
OpenCL (`--backend opencl`: the same C API over OpenCL kernels, linked with -lOpenCL)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LENET = REPO / "examples" / "lenet5.cnn"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, backend):
    out = tmp_path_factory.mktemp("build")
    proc = run([sys.executable, "-m", "convdsl", "compile", str(LENET), "-o", str(out), "--backend", backend])
    assert proc.returncode == 0, proc.stderr
    return out


def test_compile_writes_c_header_and_module(compiled):
    names = {p.name for p in compiled.iterdir()}
    assert {"lenet5.c", "lenet5.h", "lenet5.py"} <= names
    assert any(n.startswith("liblenet5_") and n.endswith(".so") for n in names)
    header = (compiled / "lenet5.h").read_text()
    assert "Python" not in (compiled / "lenet5.c").read_text()
    assert "lenet5_model *lenet5_create(uint64_t seed);" in header


def c_files(compiled) -> list[str]:
    """The network's C and the kernel library it calls (written beside it on the C backend)."""
    return [str(compiled / "lenet5.c"), *sorted(str(p) for p in compiled.glob("cdsl_kernels_*.c"))]


def test_c_library_compiles_without_warnings(compiled, tmp_path, backend):
    assert len(c_files(compiled)) == (2 if backend == "c" else 1)
    for c_file in c_files(compiled):
        proc = run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-fopenmp", "-c",
                    c_file, "-o", str(tmp_path / "part.o")])
        assert proc.returncode == 0, proc.stderr


def test_c_program_uses_the_library(compiled, tmp_path, backend):
    exe = tmp_path / "demo"
    libraries = ["-lOpenCL", "-lm"] if backend == "opencl" else ["-lm"]
    proc = run(["gcc", "-std=c11", "-Wall", "-Werror", "-O2", "-fopenmp", f"-I{compiled}",
                str(REPO / "examples" / "c_api_demo.c"), *c_files(compiled), *libraries, "-o", str(exe)])
    assert proc.returncode == 0, proc.stderr
    proc = run([str(exe)])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    logits = np.array([float(v) for v in lines[0].split(":")[1].split()], dtype=np.float32)
    assert logits.shape == (20,)
    assert lines[2] == "parameters: 10, first is conv1.weight"
    loss = float(lines[3].split(":")[1])

    # The same network through the generated Python module gives the same numbers.
    script = f"""
import sys, numpy as np
sys.path.insert(0, {str(compiled)!r})
import lenet5
net = lenet5.Model(seed=0)
x = np.sin(0.01 * np.arange(2 * 28 * 28)).astype(np.float32).reshape(2, 1, 28, 28)
y = net.forward(x)
print(" ".join(repr(float(v)) for v in y.ravel()))
dx = net.backward(np.ones_like(y))
print(repr(float(dx.sum(dtype=np.float64))))
print(repr(net.train_step(x, np.array([3, 7]), lr=0.01)))
"""
    py = run([sys.executable, "-c", script], cwd=str(tmp_path))
    assert py.returncode == 0, py.stderr
    py_lines = py.stdout.splitlines()
    np.testing.assert_allclose(logits, np.array(py_lines[0].split(), dtype=np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(lines[1].split(":")[1]), float(py_lines[1]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, float(py_lines[2]), rtol=1e-5)


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.cnn"
    bad.write_text("network A {\n    input x: [1, 8, 8]\n    y = x -> maxpol(2)\n    output y\n}\n")
    proc = run([sys.executable, "-m", "convdsl", "compile", str(bad), "-o", str(tmp_path / "out")])
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{bad}:3:14: error: unknown op `maxpol`; did you mean `maxpool`?")
    assert "Traceback" not in proc.stderr


def test_check_prints_lenet_parameter_count():
    proc = run([sys.executable, "-m", "convdsl", "check", str(LENET)])
    assert proc.returncode == 0, proc.stderr
    assert "parameters:  61,706" in proc.stdout


def test_the_written_module_refuses_a_damaged_library(compiled, tmp_path):
    """The .py carries the size and sha256 of its .so: a truncated copy is an ImportError
    that says what to do, not a SIGBUS."""
    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    (so,) = copy.glob("liblenet5_*.so")
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    proc = run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(copy)!r}); import lenet5"],
               cwd=str(tmp_path))
    assert proc.returncode == 1, f"exit status {proc.returncode}"
    assert f"ImportError: {so} is damaged" in proc.stderr
    assert "run `convdsl compile` again" in proc.stderr


def test_an_output_path_that_is_a_file_is_a_clear_error(tmp_path):
    taken = tmp_path / "build"
    taken.write_text("not a folder")
    proc = run([sys.executable, "-m", "convdsl", "compile", str(LENET), "-o", str(taken)])
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"convdsl: error: cannot write the compiled network to {taken}: "
                                  "it is a file, not a folder"), proc.stderr
    assert "Traceback" not in proc.stderr
