"""The optimizer and the learning-rate schedule of a phase."""

from __future__ import annotations

import math

import torch

from cifarlab.config import Phase
from cifarlab.core.errors import UserError


def orthogonalise(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `g` (singular values pushed to about 1) by Jordan's
    quintic Newton-Schulz iteration: a few matmuls instead of an SVD. Three steps, as
    airbench94_muon uses on this network, take a Gaussian matrix's singular values to 0.7-1.2
    and shrink a 100:1 spread to under 15:1 (tests/test_muon.py): near enough."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """SGD (Nesterov) for every parameter group, except groups marked `orthogonal` (conv
    filters): their update is the orthogonalised Nesterov momentum (Muon, Jordan 2024), each
    step on a filter tensor rescaled to norm sqrt(out channels), so a filter's update is a fixed
    share of its size (no weight decay there: the rescaling bounds it). torch.optim.Muon takes
    only 2-D parameters; a conv filter is orthogonalised here as its (out, in x k x k) matrix."""

    def __init__(self, groups, lr: float, momentum: float, nesterov: bool, weight_decay: float):
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, orthogonal=False
        )
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if group["orthogonal"] or not wd else p.grad.add(p, alpha=wd)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(mu).add_(g)
                g = g.add(buf, alpha=mu) if group["nesterov"] else buf
                if group["orthogonal"]:
                    p.mul_(len(p) ** 0.5 / (p.norm() + 1e-12))
                    g = orthogonalise(g.reshape(len(g), -1)).view_as(p)
                p.add_(g, alpha=-lr)


def muon_groups(params, phase: Phase) -> list[dict]:
    """Each parameter group split into the rest (SGD at the group's own LR) and its conv
    filters (orthogonalised at `muon_lr`, times the group's share of `lr` where it has its own,
    as under layer_decay, with `muon_momentum`)."""
    groups = [{"params": params}] if params and not isinstance(params[0], dict) else params
    out = []
    for group in groups:
        share = group.get("lr", phase.lr) / phase.lr
        filters = [p for p in group["params"] if p.ndim == 4]
        rest = [p for p in group["params"] if p.ndim != 4]
        if rest:
            out.append({**group, "params": rest})
        if filters:
            out.append(
                {
                    "params": filters,
                    "orthogonal": True,
                    "lr": phase.muon_lr * share,
                    "momentum": phase.muon_momentum,
                    "weight_decay": 0.0,
                }
            )
    return out  # the first group is at `lr` (history.csv's lr column), as with sgd


def make_optimizer(params, phase: Phase) -> torch.optim.Optimizer:
    if phase.optimizer == "muon":
        return Muon(
            muon_groups(list(params), phase),
            lr=phase.lr,
            momentum=phase.momentum,
            nesterov=phase.nesterov,
            weight_decay=phase.weight_decay,
        )
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
    raise UserError(f"unknown optimizer {phase.optimizer!r}; use adam, adamw, sgd or muon")


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
