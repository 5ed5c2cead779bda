"""Test settings shared by every test: one compile cache per test run, and the repo paths."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Compiled modules are cached by content hash; one cache per run keeps runs independent while
# every test of the run that compiles the same network reuses the first build.
_OWN_CACHE = None
if "CONVDSL_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="convdsl-test-cache-")
    os.environ["CONVDSL_CACHE_DIR"] = _OWN_CACHE


# Modules build at -O0 in the suite: compiling is most of the suite's time, and gcc compiles an op
# test file's network at -O0 in a third of its -O1 time (test_conv's cases: 2.0 s of CPU against
# 6.2 s) and a tenth of -O3's. The tests that must see the optimiser's code ask for it: -O3 with
# the `optimised` fixture (every example, the digits training), -O1 in the random networks (whose
# f32 results need the FMAs gcc forms when it optimises), and the -Werror checks compile at -O3
# (tests/ccheck.py). CONVDSL_OPT set by the caller wins.
if "CONVDSL_OPT" not in os.environ:
    os.environ["CONVDSL_OPT"] = "-O0"


# Under pytest-xdist (`-n auto`) the workers share the machine's cores, and each compiled module
# and torch run OpenMP teams of one thread per core: a thread that spins while it waits for work
# burns a core the other worker needs. Waiting threads sleep instead (no thread count changes, so
# every threaded path still runs threaded), and torch, the oracle, computes on one thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    import torch
    torch.set_num_threads(1)


# OpenCL programs in the suite: PoCL's compiler at -O0 (as the C builds are -O1, for the compile
# time), and the device binaries and PoCL's own kernel cache kept per user between runs, beside
# (not in) the per-run module cache: PoCL compiles each kernel through LLVM when it first runs,
# ~0.3 s a kernel, which a second run of the suite does not pay again. Both caches are keyed by
# the program source, the options and the device, so no run can read another's stale kernels.
if "CONVDSL_OPENCL_OPTIONS" not in os.environ:
    os.environ["CONVDSL_OPENCL_OPTIONS"] = "-cl-opt-disable"
# PoCL compiles every kernel of a program when the program is built (a work-group function for
# any local size) and, by default, once more at the kernel's first launch, specialised for that
# launch's sizes: lenet5's 30 kernels cost 3.4 s to build and 1.7 s more at their first launches
# (batch 1, then 3). The suite runs the generic functions PoCL already built; the kernels' source
# is the same, only PoCL's code for it is less specialised. The OpenCL benchmark keeps PoCL's default.
os.environ.setdefault("POCL_WORK_GROUP_SPECIALIZATION", "0")
_OPENCL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convdsl-tests" / "opencl"
os.environ.setdefault("CONVDSL_OPENCL_CACHE_DIR", str(_OPENCL_CACHE))
# PoCL's own cache, one per pytest-xdist worker: several processes sharing one PoCL cache have
# crashed in PoCL's history (worker names repeat from run to run, so each stays warm).
# (The workers inherit the controller's environment: a folder this file chose is chosen again.)
if "POCL_CACHE_DIR" not in os.environ or os.environ.get("CONVDSL_TESTS_POCL_CACHE") == os.environ["POCL_CACHE_DIR"]:
    os.environ["POCL_CACHE_DIR"] = str(_OPENCL_CACHE / f"pocl-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    os.environ["CONVDSL_TESTS_POCL_CACHE"] = os.environ["POCL_CACHE_DIR"]


# (After the settings above: asking the ICD loader for platforms starts PoCL, which reads them.)
from backends import BACKENDS, requires_opencl  # noqa: E402,F401  (the backend fixture below)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    """The backend a test builds its models for: each test that asks runs on C and on OpenCL."""
    return request.param


@pytest.fixture
def optimised(monkeypatch):
    """Modules this test builds (in the process and in its subprocesses) are -O3, as users get them."""
    monkeypatch.setenv("CONVDSL_OPT", "-O3")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# Under pytest-xdist (`--dist loadgroup`, pyproject.toml) a file's tests stay on one worker, so
# that the modules they share are compiled once — except in these files, whose tests each build
# networks of their own: they spread over every worker (the random networks alone would
# otherwise keep one worker busy for most of the run). The marks must be on the items before
# pytest-xdist's own collection hook reads them into the tests' ids (`@group`, which is what its
# scheduler groups by), hence tryfirst: without it the hook ran after xdist's, no test had a
# group, and every file's tests were dealt to both workers, each compiling the file's modules.
SPREAD_FILES = frozenset({
    "tests/campaigns/test_random_networks.py", "tests/e2e/test_compiler_warnings.py",
    "tests/e2e/test_memory_plan.py", "tests/e2e/test_examples.py", "tests/e2e/test_sanitizers.py",
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        where = Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
        if where not in SPREAD_FILES:
            item.add_marker(pytest.mark.xdist_group(where))


def pytest_configure(config):
    # The compiler warning about generated code is a convdsl bug: the test that built it fails.
    config.addinivalue_line("filterwarnings", "error::convdsl.runtime.build.CompilerWarning")
