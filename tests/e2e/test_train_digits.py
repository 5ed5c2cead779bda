"""The main job of the README: LeNet-style training on the digits set reaches 97% held-out accuracy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_digits_reaches_97_percent():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_digits.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("held-out accuracy: ")
    accuracy = float(last.split(":")[1].split("%")[0]) / 100
    assert accuracy >= 0.97, last
