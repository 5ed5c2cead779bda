"""What is the OpenCL backend's own: the device choice and its errors, the device-binary cache,
the same numbers as the C backend on a whole network, every op having its kernels there, and
an op a backend lacks being refused at check time at the op's line. (The op, model-contract,
compile and example tests run on OpenCL through the `backend` fixture.)"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import convdsl
from backends import requires_opencl
from convdsl import ConvDSLError
from convdsl.compiler import compile_graph, graph_from_source
from convdsl.ops.base import registry
from convdsl.ops.losses import LOSSES
from convdsl.targets import C, OPENCL, TARGETS, OpenCLTarget
from reference import assert_close

REPO = Path(__file__).resolve().parents[2]
LENET = REPO / "examples" / "lenet5.cnn"
TINY = "network Tiny {\n    input x: [3, 5]\n    y = x -> conv(2, kernel=3) -> relu\n    output y\n}\n"


@pytest.fixture(scope="module")
def tiny():
    return convdsl.load_source(TINY, backend="opencl")


@requires_opencl
def test_a_device_is_named_by_index_pair_flat_index_or_part_of_its_name(tiny, monkeypatch):
    first = tiny.Model(seed=0).device
    assert first.endswith("(0:0)"), first
    platform = first.split(" / ")[0]
    for spec in ("0:0", "0", 0, platform.upper()[:8]):
        assert tiny.Model(seed=0, device=spec).device == first, spec
    monkeypatch.setenv("CONVDSL_OPENCL_DEVICE", "0:0")
    assert tiny.Model(seed=0).device == first


@requires_opencl
def test_no_matching_device_is_an_error_that_lists_what_was_found(tiny, monkeypatch):
    with pytest.raises(RuntimeError, match=r'no OpenCL device matches "no-such-gpu".*found: 0:0 '):
        tiny.Model(device="no-such-gpu")
    monkeypatch.setenv("CONVDSL_OPENCL_DEVICE", "7:3")
    with pytest.raises(RuntimeError, match=r'no OpenCL device matches "7:3" \(the device argument or '
                                           r'CONVDSL_OPENCL_DEVICE'):
        tiny.Model()


def test_the_c_backend_takes_no_device():
    module = convdsl.load_source(TINY)
    assert module.Model(seed=0).device == "cpu (C backend)"
    with pytest.raises(ValueError, match="device='0:0' is for the OpenCL backend"):
        module.Model(device="0:0")


@requires_opencl
def test_device_binaries_are_cached_and_a_hit_compiles_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_OPENCL_CACHE_DIR", str(tmp_path / "binaries"))
    module = convdsl.load_source(TINY.replace("kernel=3", "kernel=2"), backend="opencl")
    first = module.Model(seed=0)
    assert not first.program_from_cache
    published = list((tmp_path / "binaries").iterdir())
    assert [p.suffix for p in published if p.is_file()] == [".bin"], published    # no staging file left
    second = module.Model(seed=1)
    assert second.program_from_cache
    x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    second.params["conv1.weight"][...] = first.params["conv1.weight"]
    second.params["conv1.bias"][...] = first.params["conv1.bias"]
    np.testing.assert_array_equal(first.forward(x), second.forward(x))
    # Other compiler options are another binary.
    monkeypatch.setenv("CONVDSL_OPENCL_OPTIONS", "-cl-mad-enable")
    assert not module.Model(seed=0).program_from_cache
    assert len([p for p in (tmp_path / "binaries").iterdir() if p.suffix == ".bin"]) == 2


@requires_opencl
def test_a_damaged_cached_binary_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_OPENCL_CACHE_DIR", str(tmp_path))
    module = convdsl.load_source(TINY, backend="opencl")
    module.Model(seed=0)
    (binary,) = tmp_path.glob("*.bin")
    binary.write_bytes(b"garbage" * 10)
    net = module.Model(seed=0)
    assert not net.program_from_cache
    assert net.forward(np.ones((1, 3, 5), np.float32)).shape == (1, 2, 3)


@requires_opencl
def test_lenet_trains_the_same_on_both_backends():
    on_c, on_cl = (convdsl.load(LENET, backend=b).Model(seed=0) for b in ("c", "opencl"))
    rng = np.random.default_rng(3)
    for name in on_c.params:
        np.testing.assert_array_equal(on_c.params[name], on_cl.params[name])
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, size=4)
    for step in range(3):
        assert_close(on_cl.train_step(x, labels, lr=0.05), on_c.train_step(x, labels, lr=0.05), what=f"loss {step}")
        for name in on_c.params:
            assert_close(on_cl.params[name], on_c.params[name], what=f"{name} after step {step}")
            assert_close(on_cl.grads[name], on_c.grads[name], what=f"gradient of {name}, step {step}")
    on_cl.eval()
    on_c.eval()
    assert_close(on_cl.forward(x), on_c.forward(x), what="eval forward after training")


def test_every_op_and_loss_has_opencl_kernels():
    """Every kernel variant the C backend has a template for (an op that expands at build time,
    such as separable, has none on either) has one on OpenCL, but for the variants that say they
    are the C backend's only (Variant.backends: conv's `dot` and `separable`, batchnorm's `fusing`)."""
    checked = 0
    for name, op in sorted(registry().items()):
        for variant in op.variants():
            if variant.backends and OPENCL.name not in variant.backends:
                continue
            if C.has_template(C.kernel_template(variant.template)):
                assert OPENCL.has_template(OPENCL.kernel_template(variant.template)), f"{name}: {variant.name}"
                checked += 1
    assert checked >= 25
    for name, loss in LOSSES.items():
        assert OPENCL.has_template(OPENCL.loss_template(loss)), name
    assert TARGETS["opencl"] is OPENCL


def test_an_op_without_kernels_on_a_backend_is_refused_at_its_line():
    class WithoutMaxout(OpenCLTarget):
        name = "partial"

        def has_template(self, name):
            return "maxout" not in name and super().has_template(name)

    graph = graph_from_source("network P {\n    input x: [4, 6]\n    y = x -> relu\n    z = y -> maxout(2)\n"
                              "    output z\n}\n")
    with pytest.raises(ConvDSLError) as info:
        WithoutMaxout().check_supported(graph)
    assert info.value.span.line == 4 and "`maxout` is not supported by the partial backend" in info.value.message


def test_opencl_kernels_allocate_nothing_and_call_no_host_function():
    for path in sorted((REPO / "templates" / "opencl" / "ops").glob("*.j2")):
        text = path.read_text()
        assert not re.search(r"\b(malloc|calloc|realloc|free|printf|memcpy|memset)\s*\(", text), path.name


def test_the_program_source_is_embedded_and_the_header_adds_the_device_choice():
    source = compile_graph(graph_from_source(TINY), backend="opencl").source
    assert "static const char cdsl_program_source[] =" in source.c
    assert '"__kernel void cdsl_L0_conv1_forward(long batch, __global const real *x0_buf, long x0_off, ' in source.c
    assert "tiny_model *tiny_create_on(uint64_t seed, const char *device);" in source.h
    assert "tiny_model *tiny_create(uint64_t seed);" in source.h
