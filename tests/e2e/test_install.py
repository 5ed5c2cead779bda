"""A non-editable install works from another folder: grammar and templates ship in the wheel.

The package is installed with pip, without its dependencies, into a folder of its own, and run
by this same interpreter with that folder first on the path and the source checkout left off
it. The dependencies (numpy, cffi, lark, jinja2) come from whatever environment runs the tests
(a virtual environment or the system), so the test needs no network and no system-wide
packages.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(path or ".").resolve().relative_to(folder)
        return True
    except ValueError:
        return False


@pytest.mark.slow
def test_non_editable_install_compiles_an_example(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                              ".pytest_cache"))
    target = tmp_path / "installed"
    # --no-build-isolation: build with the setuptools already here (a dependency of the
    # package) instead of fetching one from an index.
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(src)          # nothing may be read from the source tree after installing
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "examples" / "lenet5.cnn", work / "lenet5.cnn")
    # -S: no site-packages hooks, so an editable install of the checkout (a .pth file or an
    # import finder) cannot shadow the installed copy; the dependencies' folders are passed
    # explicitly instead, less anything inside the checkout — but for the virtual environment,
    # which the README creates there (.venv): its site-packages hold the dependencies.
    dependency_paths = [p for p in sys.path if p and Path(p).is_dir()
                        and (not _inside(p, REPO) or _inside(p, Path(sys.prefix).resolve()))]
    env = dict(os.environ, CONVDSL_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(target), *dependency_paths]))
    script = (
        "import convdsl, convdsl.resources as r, numpy as np\n"
        "print(convdsl.__file__); print(r.grammar_path()); print(r.templates_dir())\n"
        "mod = convdsl.load('lenet5.cnn')\n"
        "print(mod.Model(seed=0).forward(np.zeros((1, 1, 28, 28), dtype=np.float32)).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    package, grammar, templates, shape = proc.stdout.splitlines()
    for path in (package, grammar, templates):
        assert _inside(path, target.resolve()), path
    assert shape == "(1, 10)"
