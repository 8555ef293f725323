"""Budget-aware training: measure this machine's speed on the recipe, then size the schedule.

`--budget 15m` times a few real training and validation steps (on a copy of the model, so the
run itself is untouched), then scales every phase's epochs by one factor so that the whole run
(start-up, training, per-epoch validation, final scoring) ends within the budget. Epochs may be
fractional; the LR schedule is sized to the new length, so it completes instead of being cut off.
"""

from __future__ import annotations

import copy
import itertools
import re
import time

import torch
import torch.nn.functional as F

from cifarlab.errors import UserError

MARGIN = 0.03  # fraction of the budget kept in reserve for noise


def parse_budget(text: str | float | int) -> float:
    """'15m', '90s', '1h', '1h30m' or a number of seconds -> seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        parts = re.fullmatch(
            r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text
        )
        if not parts or not any(parts.groups()):
            raise UserError(f"--budget {text!r} is not a duration; use e.g. 15m, 90s, 1h or 1h30m")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise UserError("--budget must be positive")
    return seconds


def time_steps(model, loader, phase: dict, bf16: bool, steps: int = 8, warmup: int = 3) -> float:
    """Seconds per training step of `phase` on `loader`, on a copy of the model."""
    model = copy.deepcopy(model).train()
    if hasattr(model, "set_trainable"):
        model.set_trainable(phase["freeze"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # a step's cost barely depends on the optimizer
    rng = torch.get_rng_state()
    batches = itertools.chain.from_iterable(loader.epoch(seed=12345 + e) for e in itertools.count())
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        x, y = next(batches)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(x.device)
    torch.set_rng_state(rng)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def time_eval(model, loader, bf16: bool, batches: int = 3) -> float:
    """Seconds per validation batch."""
    model = copy.deepcopy(model).eval()
    it = loader.epoch()
    x, _ = next(it)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        model(x)
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
    _sync(x.device)
    return (time.perf_counter() - start) / batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def scale_epochs(
    phases: list[dict], epoch_seconds: list[float], fixed_seconds: float, available_seconds: float
) -> float:
    """The factor by which to multiply every phase's epochs to fill `available_seconds`."""
    planned = sum(p["epochs"] * s for p, s in zip(phases, epoch_seconds, strict=True))
    room = available_seconds - fixed_seconds
    if room <= 0 or planned <= 0:
        raise UserError(
            f"a budget of {available_seconds:.0f}s leaves no time to train after "
            f"{fixed_seconds:.0f}s of start-up and scoring; give a larger --budget"
        )
    return room / planned


def plan(
    recipe: dict,
    phases: list[dict],
    model,
    loader_for,
    val_loader,
    bf16: bool,
    budget_s: float,
    elapsed_s,
    log,
) -> None:
    """Rewrite the recipe's epochs (train.epochs and each phase's) to fill the budget.
    `loader_for(phase)` gives the phase's training loader; `elapsed_s()` the seconds spent so far."""
    t_eval = time_eval(model, val_loader, bf16)
    epoch_seconds, fixed = [], 5.0  # plots, checkpoints, report
    for phase in phases:
        loader = loader_for(phase)
        evals = len(val_loader) * (2 if phase["eval_tta"] else 1)
        epoch_seconds.append(time_steps(model, loader, phase, bf16) * len(loader) + t_eval * evals)
    fixed += t_eval * len(val_loader) * (2 if recipe["train"]["eval_tta"] else 1)
    factor = scale_epochs(phases, epoch_seconds, fixed, budget_s * (1 - MARGIN) - elapsed_s())
    recipe["train"]["epochs"] = round(float(recipe["train"]["epochs"]) * factor, 3)
    for p in recipe["phases"]:
        if "epochs" in p:
            p["epochs"] = round(float(p["epochs"]) * factor, 3)
    planned = [round(p["epochs"] * factor, 2) for p in phases]
    log(
        f"budget {budget_s:.0f}s: measured {', '.join(f'{s:.1f}s' for s in epoch_seconds)} per epoch; "
        f"training {' + '.join(map(str, planned))} epochs"
    )
