"""Iteration-based poly schedule with linear warmup, as mmcv's LrUpdaterHook applies it (docs/reference.md §R2.3).

For a parameter group with initial lr ``g`` at 0-based iteration ``t`` (set before each step):
``poly = (g - min_lr) * (1 - t / T) ** power + min_lr``; during warmup (``t < W``)
``lr = poly * (1 - (1 - t / W) * (1 - warmup_ratio))``.
"""

from __future__ import annotations

import torch

from models.config import ScheduleRecipe


def scheduled_lr(
    initial_lr: float, iteration: int, schedule: ScheduleRecipe, max_iters: int | None = None
) -> float:
    """The lr of a group with ``initial_lr`` at 0-based ``iteration``."""
    total = max_iters if max_iters is not None else schedule.max_iters
    progress = min(iteration, total) / total
    poly = (initial_lr - schedule.min_lr) * (1.0 - progress) ** schedule.power + schedule.min_lr
    if schedule.warmup_iters and iteration < schedule.warmup_iters:
        k = (1.0 - iteration / schedule.warmup_iters) * (1.0 - schedule.warmup_ratio)
        return poly * (1.0 - k)
    return poly


def apply_lr(
    optimizer: torch.optim.Optimizer, iteration: int, schedule: ScheduleRecipe, max_iters: int | None = None
) -> float:
    """Set every group's lr for ``iteration``; returns the lr of the first group (for logging)."""
    for group in optimizer.param_groups:
        group["lr"] = scheduled_lr(group["initial_lr"], iteration, schedule, max_iters)
    return optimizer.param_groups[0]["lr"]
