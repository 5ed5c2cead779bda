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


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def pytest_configure(config):
    # The compiler warning about generated code is a convdsl bug: the test that built it fails.
    config.addinivalue_line("filterwarnings", "error::convdsl.runtime.build.CompilerWarning")
