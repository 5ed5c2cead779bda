"""Train a LeNet-style network on scikit-learn's 8×8 digits with the generated train_step.

    python examples/train_digits.py [--epochs 40] [--batch 32] [--lr 0.05]

The digits set ships inside scikit-learn, so this runs offline. It compiles
examples/digits_lenet.cnn (or reuses the cached build), trains with plain SGD on 80% of the
images and reports accuracy on the held-out 20%.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import convdsl

HERE = Path(__file__).resolve().parent


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]     # [N, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def progress(epoch: int, epochs: int, step: int, steps: int, loss: float, width: int = 30) -> None:
    done = int(width * step / steps)
    bar = "#" * done + "-" * (width - done)
    sys.stdout.write(f"\repoch {epoch + 1:2d}/{epochs} [{bar}] loss {loss:.4f}")
    sys.stdout.flush()


def accuracy(net, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = net.forward(x[i:i + batch])
        correct += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    net.train()
    return correct / len(x)


def train(epochs: int = 40, batch: int = 32, lr: float = 0.05, seed: int = 0, quiet: bool = False) -> float:
    x_train, x_test, y_train, y_test = load_digits_split(seed)
    module = convdsl.load(HERE / "digits_lenet.cnn")
    net = module.Model(seed=seed)
    rng = np.random.default_rng(seed)
    steps = (len(x_train) + batch - 1) // batch
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        running = 0.0
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            loss = net.train_step(x_train[idx], y_train[idx], lr=lr)
            running = loss if step == 0 else 0.9 * running + 0.1 * loss
            if not quiet:
                progress(epoch, epochs, step + 1, steps, running)
        if not quiet:
            sys.stdout.write(f"  test accuracy {accuracy(net, x_test, y_test):.3f}\n")
    acc = accuracy(net, x_test, y_test)
    if not quiet:
        print(f"held-out accuracy: {acc:.3%} on {len(x_test)} images "
              f"({time.perf_counter() - start:.1f} s of training)")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.epochs, args.batch, args.lr, args.seed)


if __name__ == "__main__":
    main()
