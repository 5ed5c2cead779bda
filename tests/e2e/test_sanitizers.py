"""The generated C under AddressSanitizer and UndefinedBehaviorSanitizer, through tests/sanitize.sh
(CONVDSL_SANITIZE builds, libasan preloaded): a small network of every kernel family in the
quick run; every example, and every op test file's networks, in the slow one; every run must
end with no report. A deliberate overflow shows that the harness does see reports."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from convdsl import ConvDSLError
from convdsl.runtime.build import c_flags, cache_key, link_flags

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "sanitize.sh"
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


# A -fsanitize= list as CONVDSL_SANITIZE may name one instead of 1 (all of ASan and UBSan): ASan
# and the core of UBSan, for a quicker run by hand (docs/testing.md).
CHECK_LIST = "address,signed-integer-overflow,shift,bounds,integer-divide-by-zero,vla-bound"

# The op networks' sweep builds with ASan and UBSan less its `null`, `alignment` and
# `pointer-overflow` checks, which instrument every dereference and every pointer sum: they took
# 47% of a sanitized compile (test_conv's network of 66 cases: 22.8 s to build and run against
# 43.6 s with all of UBSan, 4.0 s to compile without sanitizers). A null or stray pointer that is
# used is an ASan report anyway (its SEGV handler, or a poisoned byte). The kernels read and write
# vectors with memcpy, but for their own panels (the GEMM's packed blocks, Winograd's tiles),
# aligned by construction. The network of every kernel family and the examples keep all of UBSan.
SWEEP_CHECKS = ("address,shift,integer-divide-by-zero,unreachable,vla-bound,signed-integer-overflow,"
                "bounds,object-size,nonnull-attribute,returns-nonnull-attribute,bool,enum,builtin")


@pytest.fixture(scope="session")
def sanitize_cache(tmp_path_factory) -> Path:
    """One sanitizer build cache for this worker's runs: what they share (the kernel library,
    the same small networks) compiles once; entries are keyed by content and flags."""
    return tmp_path_factory.mktemp("sanitize-cache")


def sanitized(args, cache: Path, timeout: int, checks: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CONVDSL_SANITIZE_CACHE_DIR": str(cache),
           "CONVDSL_SANITIZE": checks, "OMP_NUM_THREADS": "2"}
    env.pop("CONVDSL_CACHE_DIR", None)
    env.pop("PYTEST_ADDOPTS", None)     # the caller's plugins and options are not the nested run's
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def test_sanitized_builds_have_flags_and_a_cache_key_of_their_own(monkeypatch):
    monkeypatch.delenv("CONVDSL_SANITIZE", raising=False)
    monkeypatch.delenv("CONVDSL_OPT", raising=False)
    plain_key, plain_flags = cache_key("source"), c_flags()
    monkeypatch.setenv("CONVDSL_SANITIZE", "1")
    assert cache_key("source") != plain_key
    assert "-fsanitize=address,undefined" in c_flags() and "-O3" not in c_flags() and "-O3" in plain_flags
    assert "-fsanitize=address,undefined" in link_flags()
    monkeypatch.setenv("CONVDSL_SANITIZE", CHECK_LIST)
    assert f"-fsanitize={CHECK_LIST}" in c_flags() and f"-fsanitize={CHECK_LIST}" in link_flags()
    for wrong in ("undefined", "address;rm -rf /", "address,"):
        monkeypatch.setenv("CONVDSL_SANITIZE", wrong)
        with pytest.raises(ConvDSLError, match="CONVDSL_SANITIZE"):
            c_flags()


def test_the_optimisation_level_follows_convdsl_opt_and_is_part_of_the_cache_key(monkeypatch):
    monkeypatch.delenv("CONVDSL_SANITIZE", raising=False)
    monkeypatch.delenv("CONVDSL_OPT", raising=False)
    default_key, default_flags = cache_key("source"), c_flags()
    assert default_flags[0] == "-O3" and sum(f.startswith("-O") for f in default_flags) == 1
    monkeypatch.setenv("CONVDSL_OPT", "-O1")
    assert c_flags()[0] == "-O1" and "-O3" not in c_flags() and cache_key("source") != default_key
    monkeypatch.setenv("CONVDSL_OPT", "-O9; rm -rf /")
    with pytest.raises(ConvDSLError, match="is not an optimisation level"):
        c_flags()


def assert_clean(proc: subprocess.CompletedProcess) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"rc {proc.returncode}\n{output[-6000:]}"
    for report in REPORTS:
        assert report not in output, output[-6000:]


# Every kernel family once: im2col + GEMM (3×3, strided), the 1×1 GEMM on the input, depthwise's
# direct loop, deconv, pools, batchnorm, dropout, upsample, concat, dense and a loss; epilogues
# with a residual add and a scale, keeping values for backward, in conv, depthwise and deconv
# kernels; padding modes, group, instance and layer norms, prelu, sub, mul, reshape; run-time sizes.
SMALL = """
import numpy as np, convdsl
src = '''network San {
    input x: [3, H, W]
    a = x -> conv(8, kernel=3, pad=same) -> batchnorm -> relu
    s = a -> globalavgpool
    r = a -> conv(8, kernel=1) -> relu -> add(a)
    e = r -> conv(8, kernel=3, pad=same, bias=false) -> scale(s)
    b = e -> depthwise(3, stride=2, pad=same) -> relu -> conv(8, kernel=1) -> dropout(0.3)
    c = b -> conv(4, kernel=1, pad=((0, 1), (0, 1))) -> avgpool(2, stride=1) -> maxpool(3, stride=1, pad=same)
    v = c -> pad(1, mode=replicate) -> groupnorm(2) -> conv(4, kernel=3) -> gelu -> hardswish
    w = v -> conv(4, kernel=3, pad=1, pad_mode=replicate) -> instancenorm -> layernorm -> prelu -> elu
    u = b -> deconv(8, kernel=3, pad=1) -> relu -> add(b)
    d = concat(u, sub(w, mul(c, c))) -> upsample(2, mode=bilinear) -> globalavgpool -> flatten -> reshape([3, 4])
        -> reshape([-1]) -> dense(5)
    output d
    loss softmax_cross_entropy(d)
}
'''
net = convdsl.load_source(src).Model(seed=0)
rng = np.random.default_rng(0)
for h, w in ((9, 10), (6, 7)):
    x = rng.standard_normal((3, 3, h, w)).astype(np.float32)
    y = net.forward(x)
    net.backward(np.ones_like(y))
    loss = net.train_step(x, rng.integers(0, 5, size=3), lr=0.01)
    assert np.isfinite(loss)
print("ran", y.shape)
"""


def test_a_network_of_every_kernel_family_runs_clean_under_the_sanitizers(sanitize_cache):
    proc = sanitized(["--", "python", "-c", SMALL], sanitize_cache, timeout=600)
    assert_clean(proc)
    assert "ran (3, 5)" in proc.stdout


OVERRUN = """
import numpy as np, convdsl
net = convdsl.load_source("network Probe {\\n input x: [1, 4, 4]\\n y = x -> conv(2, kernel=3)\\n output y\\n}\\n").Model()
data = net._ffi.cast("float *", net._call("param_data", net._m, 0))
data[64 * 1024] = 1.0      # far past the parameter block
print("not caught")
"""


def test_the_harness_sees_a_report(sanitize_cache):
    proc = sanitized(["--", "python", "-c", OVERRUN], sanitize_cache, timeout=600)
    assert proc.returncode != 0 and "ERROR: AddressSanitizer" in proc.stderr, proc.stderr[-3000:]
    assert "not caught" not in proc.stdout


# A kernel that runs one element past its output, inside the arena: the first relu's loop is made
# to write y[count] (the C edited after rendering, as a kernel bug would have it). A sanitizer
# build places every tensor apart behind a poisoned gap, so the write lands in poison whatever
# follows the tensor; without that gap it landed in the next tensor, unseen (issue 7, item 2).
INNER_OVERRUN = """
import dataclasses, sys, numpy as np
from convdsl.compiler import build_module, compile_graph, graph_from_source
SRC = "network Inner {\\n input x: [3, 5, 5]\\n y = x -> relu -> relu -> relu\\n output y\\n}\\n"
compiled = compile_graph(graph_from_source(SRC))
loop = "for (int64_t i = 0; i < count; i++)"
assert loop in compiled.source.c
bad = compiled.source.c.replace(loop, "for (int64_t i = 0; i <= count; i++)", 1)
module = build_module(dataclasses.replace(compiled, source=dataclasses.replace(compiled.source, c=bad)))
net = module.Model()
for mode in sys.argv[1:]:
    getattr(net, mode)()
    net.forward(np.ones((2, 3, 5, 5), np.float32))
print("not caught")
"""


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_overrun_from_one_tensor_into_the_next_is_reported(sanitize_cache, mode):
    proc = sanitized(["--", "python", "-c", INNER_OVERRUN, mode], sanitize_cache, timeout=600)
    assert proc.returncode != 0 and "ERROR: AddressSanitizer" in proc.stderr, proc.stdout + proc.stderr[-3000:]
    assert "not caught" not in proc.stdout


@pytest.mark.slow
def test_every_example_runs_clean_under_the_sanitizers(sanitize_cache):
    """Every example (forward, backward, train_step: convolutions of each algorithm, pools,
    batchnorm, dropout, concat, dense, both losses), with ASan and all of UBSan."""
    # The C backend's runs: on OpenCL the kernels run inside PoCL, which the sanitizers do not
    # instrument, and its compiles under them doubled this test's time. Nor the examples'
    # -Werror compile, which runs nothing.
    proc = sanitized(["-x", "-p", "no:cacheprovider", "-k", "not opencl and not warnings",
                      "tests/e2e/test_examples.py"], sanitize_cache, timeout=1800)
    assert_clean(proc)
    assert re.search(r"\b\d+ passed\b", proc.stdout) and "failed" not in proc.stdout, proc.stdout[-2000:]


# The op networks' sweep in parts that pytest-xdist runs side by side (it was one test of six
# minutes, often the suite's last).
OP_NETWORK_PARTS = 4


def test_the_op_network_parts_run_every_build_once():
    import sys
    sys.path.insert(0, str(REPO / "tests"))
    import op_networks
    builds = op_networks.all_builds()
    dealt = op_networks.parts(builds, OP_NETWORK_PARTS)
    assert sorted((b[0], b[1]) for part in dealt for b in part) == sorted((b[0], b[1]) for b in builds)
    assert len(builds) >= 27 and all(dealt)                              # 34 on 2026-12-03
    assert {("test_conv", "winograd4"), ("test_upsample", "plan")} <= {(b[0], b[1]) for b in builds}


@pytest.mark.slow
@pytest.mark.parametrize("part", range(1, OP_NETWORK_PARTS + 1))
def test_every_op_test_network_runs_clean_under_the_sanitizers(sanitize_cache, part):
    """The networks of every op test file with CASES, as its tests build them (the plan's
    variants and each forced one), forward and backward at two batch sizes and in eval mode
    (tests/op_networks.py), under ASan and UBSan (SWEEP_CHECKS); one of OP_NETWORK_PARTS parts."""
    proc = sanitized(["--", "python", "tests/op_networks.py", f"--part={part}/{OP_NETWORK_PARTS}"],
                     sanitize_cache, timeout=1800, checks=SWEEP_CHECKS)
    assert_clean(proc)
    ran = re.search(r"op_networks: (\d+) networks ran", proc.stdout)
    assert ran and int(ran.group(1)) >= 1, proc.stdout[-2000:]
