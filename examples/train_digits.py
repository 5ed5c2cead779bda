"""Compile a LeNet-style network, train it on scikit-learn's 8×8 digits, save its weights.

    python examples/train_digits.py [--out build] [--epochs 40] [--batch 32] [--lr LR]
                                    [--optimizer sgd|momentum|nesterov|adam|adamw]
                                    [--schedule constant|cosine] [--max-grad-norm N]
    mpirun -n 2 python examples/train_digits.py --distributed     # data-parallel over MPI

It does what `convdsl compile examples/digits_lenet.cnn -o build/` does (the C library
digitslenet.c and .h, its Makefile and a Python module, all in build/), imports that
module, trains the network with its generated train_step (plain SGD by default; Adam, AdamW,
SGD with momentum or Nesterov momentum with --optimizer, each torch.optim's, run in the
generated C; --schedule cosine adds a warm-up and cosine decay of the lr) on 80% of the images,
reports the accuracy on the other 20%, and saves the weights to build/digitslenet.npz,
which `Model.load` in Python and `digitslenet_load_weights` in C both read. The digits ship
inside scikit-learn, so this runs offline.

With --distributed, under mpirun, every rank trains the same model on its shard of each batch
(convdsl.distributed, docs/distributed.md): rank 0 compiles, prints and saves.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from convdsl.cli import main as convdsl_main

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "digits_lenet.cnn"
PREFIX = "digitslenet"        # the generated files are named after the network, DigitsLeNet, lower-cased


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]     # [N, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def progress(epoch: int, epochs: int, step: int, steps: int, loss: float, width: int = 30) -> None:
    """A bar redrawn in place on a terminal; nothing in a log (the epoch's line says it all)."""
    if not sys.stdout.isatty():
        return
    done = int(width * step / steps)
    bar = "#" * done + "-" * (width - done)
    sys.stdout.write(f"\repoch {epoch + 1:2d}/{epochs} [{bar}] loss {loss:.4f}")
    sys.stdout.flush()


def end_of_epoch(epoch: int, epochs: int, loss: float, test_accuracy: float) -> None:
    line = f"epoch {epoch + 1:2d}/{epochs}  loss {loss:.4f}  test accuracy {test_accuracy:.3f}"
    sys.stdout.write(("\r" + line + " " * 20 + "\n") if sys.stdout.isatty() else line + "\n")
    sys.stdout.flush()


def compile_into(out: Path):
    """`convdsl compile` into OUT, then the Python module it wrote there."""
    print(f"$ convdsl compile {SOURCE.relative_to(HERE.parent)} -o {out}/")
    if convdsl_main(["compile", str(SOURCE), "-o", str(out)]) != 0:
        raise SystemExit(1)
    spec = importlib.util.spec_from_file_location(PREFIX, out / f"{PREFIX}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_distributed(out: Path):
    """Rank 0 compiles into OUT; the other ranks then load the same network from the build cache."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    module = compile_into(out) if comm.Get_rank() == 0 else None
    comm.Barrier()              # a failed compile ends rank 0, and mpirun ends the others
    if module is None:
        import convdsl
        module = convdsl.load(SOURCE)
    return module


def accuracy(net, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = net.forward(x[i:i + batch])
        correct += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    net.train()
    return correct / len(x)


# --optimizer: the keywords of train_step, and the lr each one trains well with here.
OPTIMIZERS = {
    "sgd": ({}, 0.05),
    "momentum": ({"momentum": 0.9}, 0.01),
    "nesterov": ({"momentum": 0.9, "nesterov": True}, 0.01),
    "adam": ({"optimizer": "adam"}, 2e-3),
    "adamw": ({"optimizer": "adamw", "weight_decay": 1e-2}, 2e-3),
}


def train(module, epochs: int = 40, batch: int = 32, lr: float | None = None, seed: int = 0, quiet: bool = False,
          optimizer: str = "sgd", schedule: str = "constant", max_grad_norm: float | None = None,
          distributed: bool = False):
    """Train a fresh model of `module` on the digits; returns (model, held-out accuracy)."""
    from convdsl import schedules
    options, default_lr = OPTIMIZERS[optimizer]
    lr = default_lr if lr is None else lr
    x_train, x_test, y_train, y_test = load_digits_split(seed)
    net = stepper = module.Model(seed=seed)
    if distributed:             # every rank draws the same batches and trains on its shard of each
        from convdsl.distributed import DistributedModel
        stepper = DistributedModel(net)
        quiet = quiet or not stepper.is_root
    rng = np.random.default_rng(seed)
    steps = (len(x_train) + batch - 1) // batch
    lr_at = (schedules.cosine(lr, total_steps=epochs * steps, warmup_steps=steps) if schedule == "cosine"
             else lambda step: lr)
    if not quiet:
        print(f"training on {len(x_train)} images, {len(x_test)} held out; {optimizer}, lr {lr:g}"
              + (" with warm-up and cosine decay" if schedule == "cosine" else ""))
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        running = 0.0
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            loss = stepper.train_step(x_train[idx], y_train[idx], lr=lr_at(epoch * steps + step),
                                      max_grad_norm=max_grad_norm, **options)
            running = loss if step == 0 else 0.9 * running + 0.1 * loss
            if not quiet:
                progress(epoch, epochs, step + 1, steps, running)
        if not quiet:
            end_of_epoch(epoch, epochs, running, accuracy(net, x_test, y_test))
    acc = accuracy(net, x_test, y_test)
    if not quiet:
        print(f"held-out accuracy: {acc:.3%} on {len(x_test)} images "
              f"({time.perf_counter() - start:.1f} s of training)")
    return net, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build", help="folder for the compiled network and the weights (default: build)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: " + ", ".join(f"{k} {v[1]:g}" for k, v in OPTIMIZERS.items()) + ")")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                        help="torch.optim's SGD (plain, momentum 0.9, Nesterov), Adam or AdamW, in the generated C")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="cosine: one epoch of linear warm-up, then cosine decay to 0 (convdsl.schedules)")
    parser.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradients' global norm to this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distributed", action="store_true", help="data-parallel over the ranks of mpirun")
    args = parser.parse_args()
    out = Path(args.out)
    module = compile_distributed(out) if args.distributed else compile_into(out)
    net, _ = train(module, args.epochs, args.batch, args.lr, args.seed, optimizer=args.optimizer,
                   schedule=args.schedule, max_grad_norm=args.max_grad_norm, distributed=args.distributed)
    if args.distributed and not is_rank0():
        return
    weights = out / f"{PREFIX}.npz"
    net.save(weights)
    print(f"saved the weights to {weights}: net.load({str(weights)!r}) in Python, "
          f"{PREFIX}_load_weights(net, \"{weights}\") in C")


def is_rank0() -> bool:
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank() == 0


if __name__ == "__main__":
    main()
