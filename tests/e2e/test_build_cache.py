"""The compile cache: concurrent builds publish atomically, and a hit never runs the compiler."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl.runtime import build

NET = """
network CacheProbe {{
    input x: [2, 9, 9]
    y = x -> conv({c}, kernel=3, pad=same) -> relu -> globalavgpool
    output y
}}
"""


@pytest.mark.slow
def test_four_processes_compiling_one_network_all_succeed(tmp_path):
    """Each process builds in its own temporary folder and os.replace()s the result into place:
    none may see a half-written module, whatever order they finish in."""
    script = (
        "import sys, numpy as np, convdsl\n"
        f"mod = convdsl.load_source({NET.format(c=5)!r})\n"
        "y = mod.Model(seed=1).forward(np.ones((1, 2, 9, 9), dtype=np.float32))\n"
        "print(y.shape, float(y.sum()))\n"
    )
    env = dict(os.environ, CONVDSL_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert len({out for out, _ in results}) == 1, "all four processes must compute the same thing"
    published = list((tmp_path / "cache").rglob("*.so"))
    assert len(published) == 1
    leftovers = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("build-")]
    assert leftovers == []


def test_a_cache_hit_does_not_run_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    first = convdsl.load_source(NET.format(c=3))
    calls = []
    real_run = subprocess.run

    def spy(cmd, *args, **kwargs):
        calls.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(build.subprocess, "run", spy)
    again = convdsl.load_source(NET.format(c=3))
    assert again.extension_path == first.extension_path
    assert [c for c in calls if "-shared" in c or "-o" in c] == []
    x = np.ones((1, 2, 9, 9), dtype=np.float32)
    np.testing.assert_array_equal(first.Model(seed=2).forward(x), again.Model(seed=2).forward(x))


@pytest.mark.slow
def test_the_key_covers_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    a = convdsl.load_source(NET.format(c=3))
    b = convdsl.load_source(NET.format(c=4))
    assert a.extension_path != b.extension_path
    assert Path(a.extension_path).parent.parent.parent == tmp_path
