"""Random convolutional features (§4.5.1): frozen random convs, only the output layer trained.

    python examples/random_features.py [--epochs 30]

On scikit-learn's 8×8 digits (offline), with the split of train_digits.py. It reports the
held-out accuracy and how many parameters were trained versus left as drawn at random.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import convdsl
from train_digits import accuracy, load_digits_split

HERE = Path(__file__).resolve().parent


def run(epochs: int = 30, batch: int = 32, lr: float = 0.05, seed: int = 0, quiet: bool = False):
    x_train, x_test, y_train, y_test = load_digits_split(seed)
    net = convdsl.load(HERE / "random_features.cnn").Model(seed=seed)
    frozen = {k: v.copy() for k, v in net.params.items() if k not in net.grads}
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            net.train_step(x_train[idx], y_train[idx], lr=lr)
    acc = accuracy(net, x_test, y_test)
    trained = sum(v.size for v in net.grads.values())
    fixed = sum(v.size for v in frozen.values())
    if not quiet:
        print(f"trained {trained:,} parameters, {fixed:,} stayed at their random start")
        print(f"held-out accuracy: {acc:.3%} ({time.perf_counter() - start:.1f} s of training)")
    return acc, frozen, net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.epochs, seed=args.seed)


if __name__ == "__main__":
    main()
