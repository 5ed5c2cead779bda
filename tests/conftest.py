"""Test settings shared by every test: one compile cache per test run, and the repo paths."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Compiled modules are cached by content hash; one cache per run keeps runs independent while
# every test of the run that compiles the same network reuses the first build.
if "CONVDSL_CACHE_DIR" not in os.environ:
    os.environ["CONVDSL_CACHE_DIR"] = tempfile.mkdtemp(prefix="convdsl-test-cache-")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
