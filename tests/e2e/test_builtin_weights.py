"""`convdsl compile --weights W.npz`: the C library carries the weights (NAME_weights.c, short
lines of numbers), `NAME_create` starts from them, and the C demo then prints what the Python
module computes with those weights — with no weight file and no Python; on the C backend and
on OpenCL (the same block of module.c.j2 and module.cl.j2, templates/c/lib/builtin_weights.j2)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LENET = REPO / "examples" / "lenet5.cnn"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def trained_weights(tmp_path) -> Path:
    import convdsl
    net = convdsl.load(LENET).Model(seed=3)
    rng = np.random.default_rng(0)
    for arr in net.params.values():
        arr[...] = rng.standard_normal(arr.shape) * 0.2
    path = tmp_path / "trained.npz"
    net.save(path)
    return path


@pytest.mark.slow
def test_demo_reproduces_the_module_from_the_built_in_weights(tmp_path, backend):
    weights = trained_weights(tmp_path)
    out = tmp_path / "build"
    proc = run([sys.executable, "-m", "convdsl", "compile", str(LENET), "-o", str(out), "--weights", str(weights),
                "--backend", backend])
    assert proc.returncode == 0, proc.stderr
    data = (out / "lenet5_weights.c").read_text()
    assert max(len(line) for line in data.splitlines()) < 200
    assert "/* conv1.weight [6, 1, 5, 5]: 150 values from 0 */" in data
    proc = run(["make", "-C", str(out), "demo", f"DEMO={REPO / 'examples' / 'c_api_demo.c'}"])
    assert proc.returncode == 0, proc.stderr
    demo = run([str(out / "lenet5_demo")])
    assert demo.returncode == 0, demo.stderr
    logits = [float(v) for v in re.search(r"logits:(.*)", demo.stdout).group(1).split()]

    # The Python module written beside it, with the same weights loaded from the file.
    sys.path.insert(0, str(out))
    try:
        import lenet5
        net = lenet5.Model(seed=0)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("lenet5", None)
    net.load(weights)
    x = np.sin(0.01 * np.arange(2 * 28 * 28)).reshape(2, 1, 28, 28).astype(np.float32)
    np.testing.assert_allclose(logits, net.forward(x).reshape(-1), rtol=1e-5, atol=2e-6)
    # And the seed's weights are not what the demo used.
    assert not np.allclose(logits, type(net)(seed=0).forward(x).reshape(-1), atol=1e-3)


def test_weights_of_another_network_are_refused(tmp_path, capsys):
    from convdsl.cli import main
    np.savez(tmp_path / "w.npz", other=np.zeros(3))
    assert main(["compile", str(LENET), "-o", str(tmp_path / "b"), "--weights", str(tmp_path / "w.npz")]) == 1
    err = capsys.readouterr().err
    assert "--weights" in err and "missing ['conv1.bias'" in err and "unexpected ['other']" in err
    assert not (tmp_path / "b").exists()          # refused before anything is written
