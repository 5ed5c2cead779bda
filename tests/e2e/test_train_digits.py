"""The main job of the README: `python examples/train_digits.py` compiles digits_lenet.cnn into a
folder, trains it to 97% held-out accuracy, saves weights the C library loads, and writes a
log of one line per epoch when its output is not a terminal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_digits_reaches_97_percent(tmp_path, optimised):
    out = tmp_path / "build"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_digits.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "\r" not in proc.stdout                       # no progress bar in a log
    assert sum(line.startswith("epoch ") for line in lines) == 40
    assert len(lines) < 60
    [result] = [line for line in lines if line.startswith("held-out accuracy: ")]
    accuracy = float(result.split(":")[1].split("%")[0]) / 100
    assert accuracy >= 0.97, result
    for name in ("digitslenet.c", "digitslenet.h", "digitslenet.py", "Makefile", "digitslenet.npz"):
        assert (out / name).is_file(), name
    assert lines[-1].startswith(f"saved the weights to {out / 'digitslenet.npz'}")
    with np.load(out / "digitslenet.npz") as weights:
        assert weights["conv1.weight"].shape == (16, 1, 3, 3)


@pytest.mark.slow
def test_train_digits_with_adam_reaches_98_percent(optimised):
    """`python examples/train_digits.py --optimizer adam` (the README's claim): the generated
    Adam reaches 98% held out where plain SGD reaches 97%."""
    import convdsl
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train_digits
    finally:
        sys.path.remove(str(REPO / "examples"))
    net, accuracy = train_digits.train(convdsl.load(REPO / "examples" / "digits_lenet.cnn"), optimizer="adam",
                                       quiet=True)
    assert accuracy >= 0.98, accuracy
    assert float(net.optimizer_state["optim.step"]) == 40 * 45        # 40 epochs of 45 batches: Adam ran
