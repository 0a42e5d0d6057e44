"""Learning-rate schedules as pure functions of training progress.

A schedule's whole state is (epoch, batch), which the checkpoint already holds, so nothing
else needs saving or restoring. ``onecycle`` reproduces torch's ``OneCycleLR`` (cosine
annealing, ``three_phase=False``) stepped per batch, the paper's recipe.
"""

from __future__ import annotations

import math

from trainables.config import ScheduleConfig


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def milestone_epochs(s: ScheduleConfig, epochs: int) -> list[float]:
    """Milestones in epochs: values below 1 are fractions of the run."""
    return [m * epochs if m < 1 else m for m in s.milestones]


def lr_at(s: ScheduleConfig, *, lr: float, epochs: int, epoch: int, batch: int, batches: int) -> float:
    """Learning rate for batch `batch` (of `batches`) in epoch `epoch` (0-based) of `epochs`."""
    if s.name == "piecewise":
        return lr * s.gamma ** sum(epoch >= m for m in milestone_epochs(s, epochs))
    total = epochs * batches
    step = epoch * batches + batch
    if s.name == "cosine":
        return _cos(lr, 0.0, step / total)
    # onecycle, as torch.optim.lr_scheduler.OneCycleLR(max_lr=lr, total_steps=total)
    initial = lr / s.div_factor
    final = initial / s.final_div_factor
    warm_end = float(s.pct_start * total) - 1
    if step <= warm_end:
        return _cos(initial, lr, step / warm_end if warm_end > 0 else 1.0)
    return _cos(lr, final, (step - warm_end) / (total - 1 - warm_end))


def momentum_at(s: ScheduleConfig, *, epochs: int, epoch: int, batch: int, batches: int) -> float:
    """SGD momentum for a batch when `s.cycle_momentum` (onecycle only): inversely to the lr, from
    max_momentum down to base_momentum at the peak lr and back up, with the same cosine
    annealing and the same step count as :func:`lr_at`, as torch's OneCycleLR(cycle_momentum=True)."""
    total = epochs * batches
    step = epoch * batches + batch
    warm_end = float(s.pct_start * total) - 1
    if step <= warm_end:
        return _cos(s.max_momentum, s.base_momentum, step / warm_end if warm_end > 0 else 1.0)
    return _cos(s.base_momentum, s.max_momentum, (step - warm_end) / (total - 1 - warm_end))
