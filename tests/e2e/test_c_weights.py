"""PREFIX_load_weights: the C library reads the .npz files Model.save writes, and refuses every
malformed one with an error in last_error — never a crash, never a half-loaded model.

Loading runs in a subprocess wherever a file is malformed, so that a crash fails the test
instead of killing the test run."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import convdsl

REPO = Path(__file__).resolve().parents[2]

# Parameters and a buffer (batchnorm's running statistics), of several ranks.
SMALL = """
network Small {{
    dtype {dtype}
    input x: [2, 6, 6]
    y = x -> conv(3, kernel=3) -> batchnorm -> relu -> flatten -> dense(4)
    output y
    loss softmax_cross_entropy(y)
}}
"""


def small(dtype: str = "f32", backend: str = "c"):
    return convdsl.load_source(SMALL.format(dtype=dtype), backend=backend)


def trained(module, seed: int = 1):
    """A model whose parameters and buffers are no longer what any seed gives."""
    net = module.Model(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        net.train_step(rng.standard_normal((5, 2, 6, 6)).astype(net.params["conv1.weight"].dtype),
                       rng.integers(0, 4, 5), lr=0.1)
    return net


def load_in_process(net, path) -> tuple[int, str]:
    """Call the C loader through the module's cffi library (for files known to be valid)."""
    lib, ffi, prefix = net._lib, net._ffi, net._meta["prefix"]
    rc = getattr(lib, f"{prefix}_load_weights")(net._m, str(path).encode())
    return rc, ffi.string(getattr(lib, f"{prefix}_last_error")(net._m)).decode()


def state(net) -> dict[str, np.ndarray]:
    return {name: value.copy() for name, value in {**net.params, **net.buffers}.items()}


def assert_state_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_weights_saved_in_python_load_in_c(tmp_path, backend):
    """On OpenCL too: what the C loader writes (parameters, batchnorm's buffers) reaches the device
    at the next call."""
    module = small(backend=backend)
    source = trained(module)
    path = tmp_path / "small.npz"
    source.save(path)
    target = module.Model(seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(state(target).values(), state(source).values()))
    assert load_in_process(target, path)[0] == 0
    assert_state_equal(state(target), state(source))
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(target.eval().forward(x), source.eval().forward(x))


def test_float32_and_float64_files_convert_to_the_model_dtype(tmp_path):
    source = trained(small("f64"))
    as_f32 = {name: value.astype(np.float32) for name, value in state(source).items()}
    np.savez(tmp_path / "f32.npz", **as_f32)
    target = small("f64").Model(seed=5)
    assert load_in_process(target, tmp_path / "f32.npz")[0] == 0
    assert_state_equal(state(target), {name: v.astype(np.float64) for name, v in as_f32.items()})

    np.savez(tmp_path / "f64.npz", **state(source))
    target32 = small("f32").Model(seed=5)
    assert load_in_process(target32, tmp_path / "f64.npz")[0] == 0
    assert_state_equal(state(target32), {name: v.astype(np.float32) for name, v in state(source).items()})


def _zip_of_npy(path, arrays: dict, version=(1, 0), compression=zipfile.ZIP_STORED, names=None):
    """An .npz written by hand: .npy files of a chosen format version in a ZIP."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(value), version=version)
            archive.writestr((names or {}).get(name, name + ".npy"), buffer.getvalue())


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_format_versions(tmp_path, version):
    module = small()
    source = trained(module)
    _zip_of_npy(tmp_path / "w.npz", state(source), version=version)
    target = module.Model(seed=3)
    assert load_in_process(target, tmp_path / "w.npz") == (0, "")
    assert_state_equal(state(target), state(source))


def _malformed_cases(tmp_path: Path, good: dict) -> list[tuple[str, Path, str]]:
    """(what, file, a fragment of the expected error) for each way a weights file can be wrong."""
    cases = []

    def case(what, fragment, writer):
        path = tmp_path / f"{len(cases)}.npz"
        writer(path)
        cases.append((what, path, fragment))

    first = next(iter(good))
    wrong_shape = dict(good, **{first: np.zeros((2, 2), np.float32)})
    missing = {k: v for k, v in good.items() if k != first}
    case("compressed", "np.savez_compressed", lambda p: np.savez_compressed(p, **good))
    case("wrong shape", f"`{first}` has shape (2, 2), Small expects", lambda p: np.savez(p, **wrong_shape))
    case("missing", f"`{first}` is missing", lambda p: np.savez(p, **missing))
    case("unexpected", "`extra` is not a parameter or buffer of Small",
         lambda p: np.savez(p, **good, extra=np.zeros(3, np.float32)))
    case("int64", "not float32 ('<f4') or float64 ('<f8')",
         lambda p: np.savez(p, **dict(good, **{first: good[first].astype(np.int64)})))
    case("big-endian", "not float32 ('<f4') or float64 ('<f8')",
         lambda p: np.savez(p, **dict(good, **{first: good[first].astype(">f4")})))
    case("Fortran order", "Fortran order",
         lambda p: np.savez(p, **dict(good, **{first: np.asfortranarray(good[first])})))
    case("not a zip", "not an .npz file", lambda p: p.write_text("conv1.weight = [1, 2, 3]\n"))
    case("empty", "empty or truncated", lambda p: p.write_bytes(b""))
    case("a directory", "cannot read", lambda p: p.mkdir())
    case("no such file", "cannot open", lambda p: None)
    case("not .npy", "is not an .npy array", lambda p: _zip_of_npy(p, good, names={first: "weights.txt"}))

    def corrupt_data(p):
        np.savez(p, **good)
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x40          # inside an array's numbers
        p.write_bytes(bytes(data))
    case("flipped bit", "CRC-32", corrupt_data)

    def duplicate(p):
        _zip_of_npy(p, good)
        with zipfile.ZipFile(p, "a") as archive, pytest.warns(UserWarning, match="Duplicate"):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, good[first])
            archive.writestr(first + ".npy", buffer.getvalue())
    case("duplicate", "appears twice", duplicate)

    def header_garbage(p):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, good[first])
        raw = buffer.getvalue().replace(b"'shape': (", b"'shape': [", 1)
        with zipfile.ZipFile(p, "w") as archive:
            for name, value in good.items():
                if name == first:
                    archive.writestr(name + ".npy", raw)
                else:
                    b = io.BytesIO()
                    np.lib.format.write_array(b, value)
                    archive.writestr(name + ".npy", b.getvalue())
    case("bad .npy header", "not a dict numpy writes", header_garbage)
    return cases


LOADER_SCRIPT = textwrap.dedent("""
    import json, sys
    import convdsl
    module = convdsl.load_source(sys.argv[1])
    net = module.Model(seed=0)
    lib, ffi, prefix = net._lib, net._ffi, net._meta["prefix"]
    load = getattr(lib, prefix + "_load_weights")
    last_error = getattr(lib, prefix + "_last_error")
    before = {k: v.copy() for k, v in {**net.params, **net.buffers}.items()}
    for line in sys.stdin:
        path = line.rstrip("\\n")
        print("trying", json.dumps(path), flush=True)   # names the file if the next call crashes
        rc = load(net._m, path.encode())
        changed = any((v != before[k]).any() for k, v in {**net.params, **net.buffers}.items())
        if rc == 0:
            before = {k: v.copy() for k, v in {**net.params, **net.buffers}.items()}
        print(json.dumps([rc, ffi.string(last_error(net._m)).decode(errors="replace"), changed]), flush=True)
""")


def load_in_subprocess(paths) -> list[tuple[int, str, bool]]:
    proc = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, SMALL.format(dtype="f32")],
                          input="".join(f"{p}\n" for p in paths), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the loader crashed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    return [tuple(json.loads(line)) for line in lines if not line.startswith("trying ")]


def test_malformed_files_are_refused_with_a_reason(tmp_path):
    good = state(trained(small()))
    cases = _malformed_cases(tmp_path, good)
    results = load_in_subprocess([path for _, path, _ in cases])
    assert len(results) == len(cases)
    for (what, path, fragment), (rc, error, changed) in zip(cases, results):
        assert rc == -1, what
        assert error.startswith(str(path)[:48]) and fragment in error, (what, error)
        assert not changed, f"{what}: the model changed although loading failed"


def test_every_truncation_and_byte_change_is_an_error_or_harmless(tmp_path):
    """Cut the file at every length, and overwrite each byte of the ZIP and .npy headers: the
    loader answers each, a cut file is always refused, and a refused file changes nothing."""
    good_net = trained(small())
    whole = tmp_path / "whole.npz"
    good_net.save(whole)
    data = whole.read_bytes()
    paths, kinds = [whole], ["whole"]
    for length in range(len(data)):
        p = tmp_path / f"cut{length}.npz"
        p.write_bytes(data[:length])
        paths.append(p)
        kinds.append("cut")
    # Bytes outside the arrays' numbers: every header (ZIP local, .npy, central directory).
    with zipfile.ZipFile(whole) as archive:
        numbers = []
        for info in archive.infolist():
            start = info.header_offset + 30 + len(info.filename) + len(info.extra)
            raw = archive.read(info)
            header = 10 + int.from_bytes(raw[8:10], "little")
            numbers.append(range(start + header, start + len(raw)))
    header_bytes = [i for i in range(len(data)) if not any(i in r for r in numbers)]
    for i in header_bytes:
        for value in {0x00, 0xFF, (data[i] + 1) & 0xFF}:
            changed = bytearray(data)
            changed[i] = value
            p = tmp_path / f"byte{i}_{value}.npz"
            p.write_bytes(bytes(changed))
            paths.append(p)
            kinds.append("changed")
    results = load_in_subprocess(paths)
    assert len(results) == len(paths)
    assert results[0][0] == 0, results[0]
    for kind, path, (rc, error, changed) in zip(kinds, paths, results):
        assert rc in (0, -1), (path, rc)
        if kind == "cut":
            assert rc == -1 and error, path
        if rc == -1:
            assert not changed and error, (path, error)


@pytest.mark.slow
def test_makefile_builds_the_libraries_and_the_demo_loads_weights(tmp_path):
    """`convdsl compile` writes a Makefile; `make` builds both libraries, `make demo` links
    examples/c_api_demo.c, and the demo given a weights file computes what Python does."""
    out = tmp_path / "build"
    proc = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(REPO / "examples" / "lenet5.cnn"),
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Makefile" in proc.stdout
    makefile = (out / "Makefile").read_text()
    assert "-O3 -march=native" in makefile and "-fopenmp" in makefile
    proc = subprocess.run(["make", "-C", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "liblenet5.a").is_file() and (out / "liblenet5.so").is_file()
    proc = subprocess.run(["make", "-C", str(out), "demo", f"DEMO={REPO / 'examples' / 'c_api_demo.c'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # The shared library exports the C API, the loader included.
    import ctypes
    shared = ctypes.CDLL(str(out / "liblenet5.so"))
    assert shared.lenet5_load_weights and shared.lenet5_create

    script = f"""
import sys, numpy as np
sys.path.insert(0, {str(out)!r})
import lenet5
net = lenet5.Model(seed=7)
x = np.sin(0.01 * np.arange(2 * 28 * 28)).astype(np.float32).reshape(2, 1, 28, 28)
net.train_step(x, np.array([1, 2]), lr=0.05)
net.save({str(tmp_path / 'lenet5.npz')!r})
print(" ".join(repr(float(v)) for v in net.forward(x).ravel()))
"""
    py = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert py.returncode == 0, py.stderr
    expected = np.array(py.stdout.split(), dtype=np.float64)
    demo = subprocess.run([str(out / "lenet5_demo"), str(tmp_path / "lenet5.npz")], capture_output=True, text=True,
                          timeout=60)
    assert demo.returncode == 0, demo.stderr
    logits = np.array(demo.stdout.splitlines()[0].split(":")[1].split(), dtype=np.float64)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    seeded = subprocess.run([str(out / "lenet5_demo")], capture_output=True, text=True, timeout=60)
    assert seeded.stdout.splitlines()[0] != demo.stdout.splitlines()[0]     # the weights made the difference
    bad = subprocess.run([str(out / "lenet5_demo"), str(out / "lenet5.h")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "load_weights:" in bad.stderr and "not an .npz file" in bad.stderr


@pytest.mark.slow
def test_the_loader_reads_nothing_out_of_bounds(tmp_path):
    """The demo built with AddressSanitizer and UBSan, on cut and changed weights files."""
    out = tmp_path / "build"
    proc = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(REPO / "examples" / "lenet5.cnn"),
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    exe = tmp_path / "demo_asan"
    # At -O0 -g, as convdsl's own sanitizer builds (SANITIZE_FLAGS): the same checks, 2.5 times faster to build.
    proc = subprocess.run(["gcc", "-std=c11", "-O0", "-g", "-fopenmp", "-fsanitize=address,undefined",
                           "-fno-sanitize-recover=all", f"-I{out}", str(REPO / "examples" / "c_api_demo.c"),
                           str(out / "lenet5.c"), str(out / "cdsl_kernels_f32.c"), "-lm", "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    script = f"""
import sys, numpy as np
sys.path.insert(0, {str(out)!r})
import lenet5
lenet5.Model(seed=4).save({str(tmp_path / 'w.npz')!r})
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == 0
    data = (tmp_path / "w.npz").read_bytes()
    rng = np.random.default_rng(0)
    variants = [data[:n] for n in sorted(set(rng.integers(0, len(data), 60).tolist()) | {0, 3, 29, 30, 100})]
    with zipfile.ZipFile(tmp_path / "w.npz") as archive:
        starts = [i.header_offset for i in archive.infolist()]
    for start in starts:
        for offset in range(0, 140, 3):            # ZIP local header, name, ZIP64 field, .npy header
            changed = bytearray(data)
            changed[start + offset] ^= 0xFF
            variants.append(bytes(changed))
    env = {"ASAN_OPTIONS": "detect_leaks=1:exitcode=86", "UBSAN_OPTIONS": "halt_on_error=1:exitcode=87",
           "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    path = tmp_path / "variant.npz"
    for i, variant in enumerate([data, *variants]):
        path.write_bytes(variant)
        run = subprocess.run([str(exe), str(path)], capture_output=True, text=True, errors="replace", timeout=60,
                             env=env)
        assert run.returncode in (0, 1), (i, run.returncode, run.stderr[-3000:])
        assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-3000:]
        if i == 0:
            assert run.returncode == 0, run.stderr
        elif run.returncode == 1:
            assert "load_weights:" in run.stderr
