"""A non-editable install works from another folder: grammar and templates ship in the wheel."""
from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_non_editable_install_compiles_an_example(tmp_path):
    env_dir = tmp_path / "venv"
    # System site-packages supply the dependencies (numpy, cffi, lark, jinja2) offline;
    # the package itself is installed from a copy of the source, not in editable mode.
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                              ".pytest_cache"))
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet",
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(src)          # nothing may be read from the source tree after installing
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "examples" / "lenet5.cnn", work / "lenet5.cnn")
    env = dict(os.environ, CONVDSL_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH="")
    script = (
        "import convdsl, convdsl.resources as r, numpy as np\n"
        "print(r.grammar_path()); print(r.templates_dir())\n"
        "mod = convdsl.load('lenet5.cnn')\n"
        "print(mod.Model(seed=0).forward(np.zeros((1, 1, 28, 28), dtype=np.float32)).shape)\n"
    )
    proc = subprocess.run([str(python), "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    grammar, templates, shape = proc.stdout.splitlines()
    assert "site-packages" in grammar and "site-packages" in templates
    assert shape == "(1, 10)"
