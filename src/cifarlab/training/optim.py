"""The optimizer and the learning-rate schedule of a phase."""

from __future__ import annotations

import math

import torch

from cifarlab.config import Phase
from cifarlab.core.errors import UserError


def make_optimizer(params, phase: Phase) -> torch.optim.Optimizer:
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=phase.lr,
            momentum=phase.momentum,
            nesterov=phase.nesterov,
            weight_decay=phase.weight_decay,
        )
    raise UserError(f"unknown optimizer {phase.optimizer!r}; use adam, adamw or sgd")


def lr_factor(
    step: int, total: int, warmup: int, schedule: str, start: float = 0.0, end: float = 0.0
) -> float:
    """Multiplier of the base LR at `step`: linear warm-up from `start` (a fraction of the
    peak), then the schedule's shape down to `end`."""
    if step < warmup:
        return start + (1 - start) * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return end + (1 - end) * max(0.0, 1 - t)
    if schedule == "onecycle":  # warm-up is part of the cycle: 25% up unless warmup_epochs says
        return max(0.0, 1 - t) if warmup else min(1.0, 4 * t) if t < 0.25 else (1 - t) / 0.75
    raise UserError(f"unknown schedule {schedule!r}; use constant, cosine, linear or onecycle")
