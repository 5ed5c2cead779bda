"""The compile cache: concurrent builds publish atomically, and a hit never runs the compiler."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl import limits
from convdsl.errors import ConvDSLError
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
    assert again.library_path == first.library_path
    assert [c for c in calls if "-shared" in c or "-o" in c] == []
    x = np.ones((1, 2, 9, 9), dtype=np.float32)
    np.testing.assert_array_equal(first.Model(seed=2).forward(x), again.Model(seed=2).forward(x))


@pytest.mark.slow
def test_the_key_covers_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    a = convdsl.load_source(NET.format(c=3))
    b = convdsl.load_source(NET.format(c=4))
    assert a.library_path != b.library_path
    assert Path(a.library_path).parent.parent.parent == tmp_path


# ---- a damaged cache is rebuilt, never trusted ----------------------------------------------
PROBE_SCRIPT = (
    "import numpy as np, convdsl\n"
    f"mod = convdsl.load_source({NET.format(c=6)!r})\n"
    "y = mod.Model(seed=1).forward(np.ones((1, 2, 9, 9), dtype=np.float32))\n"
    "print(repr(float(y.sum())), mod.library_path)\n"
)


def run_probe(cache: Path) -> subprocess.CompletedProcess:
    """Load the probe network in a fresh process: a crash there cannot take pytest with it."""
    return subprocess.run([sys.executable, "-c", PROBE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CONVDSL_CACHE_DIR=str(cache), OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pristine") / "cache"
    proc = run_probe(cache)
    assert proc.returncode == 0, proc.stderr
    (so,) = cache.rglob("*.so")
    return cache, so.relative_to(cache), proc.stdout


def garble(data: bytes) -> bytes:
    third = len(data) // 3
    return data[:third] + bytes(b ^ 0xFF for b in data[third:2 * third]) + data[2 * third:]


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],     # was SIGBUS on every later load
    "empty": lambda data: b"",                            # was an ImportError "file too short"
    "garbled": garble,                                    # same size, was SIGILL
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_cached_module_is_rebuilt(pristine_cache, tmp_path, damage):
    source, so_name, expected = pristine_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    so = cache / so_name
    good = so.read_bytes()
    so.write_bytes(DAMAGES[damage](good))
    proc = run_probe(cache)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.replace(str(cache), "CACHE") == expected.replace(str(source), "CACHE")
    assert so.read_bytes() == good, "the rebuilt module is published in place of the damaged one"


def test_a_module_without_its_manifest_is_rebuilt(pristine_cache, tmp_path):
    """A .so whose manifest is missing (an interrupted publish, an older cache) is not trusted."""
    source, so_name, expected = pristine_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    so = cache / so_name
    manifests = [p for p in so.parent.iterdir() if p.name.startswith(so.name) and p != so]
    assert len(manifests) == 1
    manifests[0].unlink()
    so.write_bytes(so.read_bytes()[:100])
    proc = run_probe(cache)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert manifests[0].exists()


def test_a_module_loaded_in_this_process_is_not_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    convdsl.load_source(NET.format(c=7))
    hashed = []
    real_digest = build.file_digest
    monkeypatch.setattr(build, "file_digest", lambda path: hashed.append(path) or real_digest(path))
    convdsl.load_source(NET.format(c=7))
    assert hashed == []


# ---- the cache folder and the names in it -------------------------------------------------
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unusable_cache_dir_is_a_clear_error(tmp_path, monkeypatch, where):
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    bad = afile if where == "a file" else afile / "cache"
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(bad))
    with pytest.raises(ConvDSLError) as info:
        convdsl.load_source(NET.format(c=2))
    assert info.value.message.startswith(f"CONVDSL_CACHE_DIR={bad}")
    assert "writable folder" in info.value.message


def test_the_cli_reports_an_unusable_cache_dir_without_traceback(tmp_path):
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    net = tmp_path / "probe.cnn"
    net.write_text(NET.format(c=2))
    proc = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(net), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CONVDSL_CACHE_DIR=str(afile / "cache")))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"convdsl: error: CONVDSL_CACHE_DIR={afile / 'cache'}"), proc.stderr
    assert "Traceback" not in proc.stderr


def long_named(length: int) -> str:
    return NET.format(c=2).replace("CacheProbe", "N" + "a" * (length - 1))


def test_the_cache_path_holds_a_bounded_part_of_a_long_network_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    mod = convdsl.load_source(long_named(limits.MAX_NAME_LENGTH))   # the longest name the language allows
    assert len(Path(mod.library_path).name) < 100
    y = mod.Model(seed=0).forward(np.ones((1, 2, 9, 9), dtype=np.float32))
    assert y.shape == (1, 2, 1, 1)


def test_a_network_name_too_long_for_a_file_name_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    # Refused where it is written (the file name it would make is over the system's limit).
    with pytest.raises(ConvDSLError, match="5,000 characters long; a name has at most"):
        convdsl.load_source(long_named(5000))
