"""Learning-rate schedules: the lr to pass to `train_step` / `update` at each step.

A schedule is any function of the step; these are the two common ones, equal to PyTorch's
(torch.optim.lr_scheduler.StepLR, and LinearLR then CosineAnnealingLR in a SequentialLR):

    lr_at = convdsl.schedules.cosine(1e-3, total_steps=1000, warmup_steps=50)
    for step in range(1000):
        net.train_step(x, labels, lr=lr_at(step), optimizer="adam")

Steps count from 0, the first step's lr being `lr_at(0)`.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

__all__ = ["cosine", "step_decay"]


def _number(value, what: str, *, low: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < low or (strict and float(value) == low):
        relation = ">" if strict else ">="
        raise ValueError(f"{what} must be a finite number {relation} {low:g}, got {value!r}")
    return float(value)


def _count(value, what: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> Callable[[int], float]:
    """lr · gamma^(step // step_size): lr multiplied by gamma every step_size steps (StepLR)."""
    lr = _number(lr, "lr", low=0.0)
    step_size = _count(step_size, "step_size", low=1)
    gamma = _number(gamma, "gamma", low=0.0)

    def lr_at(step: int) -> float:
        return lr * gamma ** (_count(step, "step", low=0) // step_size)
    return lr_at


def cosine(lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
           warmup_start: float = 1e-3) -> Callable[[int], float]:
    """Linear warm-up then cosine decay.

    During the first `warmup_steps` steps the lr rises linearly from `warmup_start · lr` towards
    lr (LinearLR(start_factor=warmup_start, total_iters=warmup_steps)); from then on it follows
    a half cosine from lr down to `min_lr` over the remaining `total_steps - warmup_steps` steps
    (CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min=min_lr)), and stays at min_lr
    after `total_steps`."""
    lr = _number(lr, "lr", low=0.0)
    total_steps = _count(total_steps, "total_steps", low=1)
    warmup_steps = _count(warmup_steps, "warmup_steps", low=0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be fewer than total_steps ({total_steps})")
    min_lr = _number(min_lr, "min_lr", low=0.0)
    warmup_start = _number(warmup_start, "warmup_start", low=0.0, strict=True)
    if warmup_start > 1:
        raise ValueError(f"warmup_start must be in (0, 1], got {warmup_start!r}")
    decay_steps = total_steps - warmup_steps

    def lr_at(step: int) -> float:
        step = _count(step, "step", low=0)
        if step < warmup_steps:
            return lr * (warmup_start + (1.0 - warmup_start) * step / warmup_steps)
        t = min(step - warmup_steps, decay_steps)
        return min_lr + (lr - min_lr) * (1.0 + math.cos(math.pi * t / decay_steps)) / 2.0
    return lr_at
