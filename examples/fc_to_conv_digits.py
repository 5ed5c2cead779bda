"""Train on 8×8 digits, convert the dense head to convolutions, and slide it over a wide canvas.

    python examples/fc_to_conv_digits.py [--epochs 15] [--canvases 200] [--out DIR]

§2.5 and §4.2 in one run: examples/digits_fc.cnn ends in flatten → dense → dense, so it only
takes 8×8 images. `convdsl convert --fc-to-conv` (called here as a Python function) rewrites
the head as a 2×2 convolution and a 1×1 convolution, makes the input size a run-time size, and
reshapes the trained weights. The converted network then reads an 8×32 canvas holding four
digits side by side, with no cropping: its output is a 1×7 map of class scores, one per window
of 8×8 pixels, the windows 4 pixels apart (the two 2×2 max-pools). Windows 0, 2, 4 and 6 sit
exactly on the four digits; the script prints the class map and reports whether the argmax
of those windows recovers the digits.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import convdsl
from convdsl.rewrite.fc_to_conv import convert_file

HERE = Path(__file__).resolve().parent
DIGITS_PER_CANVAS = 4
STRIDE = 4                   # pixels between neighbouring windows: two 2×2 max-pools
WINDOWS_ON_DIGITS = [k * 8 // STRIDE for k in range(DIGITS_PER_CANVAS)]


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]     # [N, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def train(net, x, y, epochs: int, batch: int, lr: float, seed: int, quiet: bool) -> None:
    rng = np.random.default_rng(seed)
    net.train()
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = [net.train_step(x[idx], y[idx], lr=lr)
                  for idx in (order[i:i + batch] for i in range(0, len(x) - batch + 1, batch))]
        if not quiet:
            print(f"epoch {epoch + 1:2d}/{epochs}: mean loss {np.mean(losses):.4f}")


def predict(net, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([net.forward(x[i:i + batch]) for i in range(0, len(x), batch)])


def make_canvases(x: np.ndarray, y: np.ndarray, count: int, seed: int):
    """`count` canvases [1, 8, 32], each four test digits side by side; which digits (indices into
    x) and their labels, both [count, 4]."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), size=(count, DIGITS_PER_CANVAS))
    canvases = np.concatenate([x[picks[:, k]] for k in range(DIGITS_PER_CANVAS)], axis=3)
    return np.ascontiguousarray(canvases), picks, y[picks]


def run(epochs: int = 15, batch: int = 32, lr: float = 0.05, canvases: int = 200, seed: int = 0,
        out: Path | None = None, quiet: bool = False) -> dict:
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_digits_split(seed)
    net = convdsl.load(HERE / "digits_fc.cnn").Model(seed=seed)
    train(net, x_train, y_train, epochs, batch, lr, seed, quiet)
    net.eval()
    accuracy = float((predict(net, x_test).argmax(axis=1) == y_test).mean())

    with contextlib.ExitStack() as stack:
        work = Path(out) if out is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        net.save(work / "digits_fc.npz")
        # The same as `convdsl convert --fc-to-conv digits_fc.cnn -o digits_fcn.cnn --weights digits_fc.npz`.
        conversion = convert_file(HERE / "digits_fc.cnn", work / "digits_fcn.cnn", weights=work / "digits_fc.npz")
        fcn = convdsl.load(work / "digits_fcn.cnn").Model(seed=seed)
        fcn.load(work / "digits_fcn.npz")
    fcn.eval()

    # At the training size the two networks agree: [N, 10] against [N, 10, 1, 1].
    same_size = predict(fcn, x_test)
    max_diff = float(np.abs(same_size.reshape(len(x_test), 10) - predict(net, x_test)).max())

    canvas, picks, labels = make_canvases(x_test, y_test, canvases, seed + 1)
    scores = predict(fcn, canvas)                                   # [count, 10, 1, 7]
    class_map = scores.argmax(axis=1)[:, 0, :]                      # [count, 7]: one class per window
    found = class_map[:, WINDOWS_ON_DIGITS]
    per_digit = float((found == labels).mean())
    whole = float(np.all(found == labels, axis=1).mean())
    # The same digits one at a time through the original network: what the windows should match.
    alone = float((predict(net, x_test).argmax(axis=1)[picks] == labels).mean())
    if not quiet:
        print(f"\nheld-out accuracy of {conversion.network} at 8×8: {accuracy:.3%}")
        print("converted: " + ", ".join(f"{d.label} → {conversion.new_label(d.label)} (kernel {d.kernel[0]}×{d.kernel[1]})"
                                        for d in conversion.dense) + f"; run-time sizes {', '.join(conversion.sizes)}")
        print(f"largest difference between the two networks on 8×8 inputs: {max_diff:.2e}")
        print(f"\nclass map of an 8×32 canvas (output {list(scores.shape[1:])}): windows 0–6, "
              f"{STRIDE} pixels apart; digits under windows {WINDOWS_ON_DIGITS}")
        for i in range(min(5, canvases)):
            print(f"  canvas {i}: digits {' '.join(map(str, labels[i]))}   class map "
                  f"[{' '.join(map(str, class_map[i]))}]   "
                  f"{'recovered' if np.array_equal(found[i], labels[i]) else 'not recovered'}")
        print(f"\nover {canvases} canvases: {per_digit:.1%} of the digits recovered by the argmax of their "
              f"window (the original network, given each digit alone, gets {alone:.1%}); all four digits on "
              f"{whole:.1%} of the canvases")
        print(f"{time.perf_counter() - start:.1f} s in all" + (f"; files in {out}" if out is not None else ""))
    return {"accuracy": accuracy, "max_diff": max_diff, "per_digit": per_digit, "alone": alone, "whole": whole,
            "class_map_shape": tuple(scores.shape)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--canvases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for the weights and the converted network "
                                                 "(default: a new temporary folder)")
    args = parser.parse_args(argv)
    run(args.epochs, args.batch, args.lr, args.canvases, args.seed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
