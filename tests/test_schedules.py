"""Learning-rate schedules: onecycle matches torch's OneCycleLR; piecewise drops at milestones."""

from __future__ import annotations

import pytest
import torch

from trainables.config import ScheduleConfig
from trainables.schedules import lr_at, momentum_at


def test_onecycle_matches_torch_per_batch() -> None:
    epochs, batches, lr = 4, 7, 0.1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * batches, pct_start=0.25, anneal_strategy="cos")
    ours = ScheduleConfig(name="onecycle")
    for e in range(epochs):
        for b in range(batches):
            assert lr_at(ours, lr=lr, epochs=epochs, epoch=e, batch=b, batches=batches) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
            opt.step()
            sched.step()


def test_cycled_momentum_matches_torch_onecycle_per_batch() -> None:
    # the WEAT code's OneCycleLR keeps torch's cycle_momentum=True: momentum 0.95 -> 0.85 -> 0.95
    epochs, batches, lr = 4, 7, 0.1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * batches, pct_start=0.25, anneal_strategy="cos",
                                                cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)
    ours = ScheduleConfig(name="onecycle", cycle_momentum=True)
    seen = []
    for e in range(epochs):
        for b in range(batches):
            seen.append(momentum_at(ours, epochs=epochs, epoch=e, batch=b, batches=batches))
            assert seen[-1] == pytest.approx(opt.param_groups[0]["momentum"], rel=1e-9)
            opt.step()
            sched.step()
    assert seen[0] == pytest.approx(0.95) and min(seen) == pytest.approx(0.85)


def test_piecewise_drops_by_gamma_at_each_milestone() -> None:
    s = ScheduleConfig(name="piecewise", milestones=(0.5, 15), gamma=0.1)
    lrs = [lr_at(s, lr=0.1, epochs=20, epoch=e, batch=0, batches=3) for e in range(20)]
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01) and lrs[15] == pytest.approx(0.001)


def test_cosine_starts_at_lr_and_decays_to_near_zero() -> None:
    s = ScheduleConfig(name="cosine")
    assert lr_at(s, lr=0.2, epochs=10, epoch=0, batch=0, batches=5) == pytest.approx(0.2)
    assert lr_at(s, lr=0.2, epochs=10, epoch=9, batch=4, batches=5) < 0.001
