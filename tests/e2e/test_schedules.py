"""convdsl.schedules equal PyTorch's schedulers step for step: StepLR, and a linear warm-up then
cosine decay (SequentialLR of LinearLR and CosineAnnealingLR)."""
from __future__ import annotations

import pytest
import torch

from convdsl import schedules


def torch_lrs(make_scheduler, lr: float, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("step_size, gamma", [(1, 0.5), (7, 0.1), (30, 0.9)])
def test_step_decay_is_steplr(step_size, gamma):
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma), 0.1, 100)
    lr_at = schedules.step_decay(0.1, step_size, gamma)
    assert [lr_at(s) for s in range(100)] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("total, warmup, min_lr, start", [(100, 10, 0.0, 1e-3), (50, 0, 1e-4, 1e-3),
                                                           (64, 16, 1e-5, 0.1), (10, 9, 0.0, 0.5)])
def test_cosine_with_warmup_is_linear_then_cosine_annealing(total, warmup, min_lr, start):
    def make(opt):
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
        if warmup == 0:
            return cosine
        linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start, end_factor=1.0, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])
    want = torch_lrs(make, 3e-3, total)
    lr_at = schedules.cosine(3e-3, total_steps=total, warmup_steps=warmup, min_lr=min_lr, warmup_start=start)
    got = [lr_at(s) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert lr_at(total) == lr_at(total + 100) == pytest.approx(min_lr)    # stays at the floor after the end


@pytest.mark.parametrize("call, message", [
    (lambda: schedules.step_decay(-0.1, 10), "lr must be"),
    (lambda: schedules.step_decay(0.1, 0), "step_size must be an integer >= 1"),
    (lambda: schedules.cosine(0.1, 10, warmup_steps=10), "warmup_steps .* fewer than total_steps"),
    (lambda: schedules.cosine(0.1, 10, warmup_start=0.0), "warmup_start must be"),
    (lambda: schedules.cosine(0.1, 10)(-1), "step must be an integer >= 0"),
])
def test_schedules_refuse_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
