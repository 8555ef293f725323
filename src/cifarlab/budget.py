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

from cifarlab import config
from cifarlab.errors import UserError
from cifarlab.metrics import tta_views

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


def with_size(recipe: dict, size: dict) -> dict:
    """A copy of the recipe with one of its `budget.sizes` (dotted keys, as --set) applied."""
    sized = copy.deepcopy(recipe)
    for key, value in size.items():
        if key.split(".")[0] not in ("model", "augment", "train"):
            raise UserError(
                f"budget.sizes sets {key!r}; a size may change model, augment and train keys only"
            )
        config.set_key(sized, key, value)
    return sized


class Plan:
    """What `plan` decided, kept to correct it with the epochs as they are really timed."""

    def __init__(self, budget_s: float, epoch_seconds: list[float], final_s: float, resized: bool):
        self.budget_s, self.epoch_seconds, self.final_s = budget_s, epoch_seconds, final_s
        self.resized = resized  # a larger size of the recipe was chosen
        self.walls: dict[tuple[int, int], float] = {}  # (phase, epoch): seconds between re-plans
        self._last: tuple[int, int, float] | None = None

    def replan(
        self,
        recipe: dict,
        phase: int,
        epochs_done: int,
        steps_per_epoch: int,
        history: list[dict],
        elapsed_s: float,
        log,
        one_off_first: bool = False,
    ) -> int:
        """After an epoch of phase `phase`: rescale what is left of every phase by the ratio of
        the measured to the planned epoch time, so that the run still ends on time. Returns the
        phase's new length in steps (never less than what is done, and a finished phase stays
        finished, so the LR schedule never jumps back up). A warm-up still under way keeps its
        share of the phase. `one_off_first`: the phase's first epoch held one-time costs
        (torch.compile, a feature cache), so its time counts as spent but not as a rate.
        An epoch's time is the wall time since the last re-plan (checkpoints and logs included:
        on a GPU they are a large part of a short epoch), else its `seconds` in `history`."""
        if self._last is not None and self._last[:2] == (phase, epochs_done - 1):
            self.walls[phase, epochs_done] = elapsed_s - self._last[2]
        self._last = (phase, epochs_done, elapsed_s)
        phases = config.phases(recipe)
        name = phases[phase]["name"]
        done_steps = epochs_done * steps_per_epoch
        horizon = max(1, round(float(phases[phase]["epochs"]) * steps_per_epoch))
        if done_steps >= horizon:
            return horizon
        rows = [r["seconds"] for r in history if r["phase"] == name][-epochs_done:]
        first = epochs_done - len(rows) + 1  # the epoch number of rows[0]
        times = [self.walls.get((phase, first + i), s) for i, s in enumerate(rows)]
        recent = sorted((times[1:] if one_off_first else times)[-3:])
        # the median of the last 3 (one stalled epoch is noise); none yet: the planned rate
        measured = recent[len(recent) // 2] if recent else self.epoch_seconds[phase]
        ratio = measured / self.epoch_seconds[phase]
        left = [float(phases[phase]["epochs"]) - epochs_done] + [
            float(p["epochs"]) for p in phases[phase + 1 :]
        ]
        need = sum(n * s * ratio for n, s in zip(left, self.epoch_seconds[phase:], strict=True))
        room = self.budget_s * (1 - MARGIN) - elapsed_s - self.final_s
        factor = max(0.0, room) / need if need > 0 else 1.0
        new_epochs = epochs_done + left[0] * factor
        steps = max(done_steps + 1, round(new_epochs * steps_per_epoch))
        _set(recipe, phase, "epochs", round(steps / steps_per_epoch, 3))
        warmup = float(phases[phase].get("warmup_epochs", 0))
        if epochs_done < warmup:  # the LR's peak moves with the phase's end
            stretch = steps / horizon
            _set(recipe, phase, "warmup_epochs", round(max(epochs_done, warmup * stretch), 3))
        for i in range(phase + 1, len(phases)):
            _set(recipe, i, "epochs", round(float(phases[i]["epochs"]) * factor, 3))
        if abs(steps - horizon) > 0.01 * horizon:
            log(
                f"budget: epochs take {measured:.1f}s, not {self.epoch_seconds[phase]:.1f}s; "
                f"{name} now ends after {steps / steps_per_epoch:.2f} epochs"
            )
        return steps


def _set(recipe: dict, phase: int, key: str, value: float) -> None:
    """Set a phase's schedule key (`epochs`, `warmup_epochs`) in the recipe."""
    if recipe["phases"]:
        recipe["phases"][phase][key] = value
    else:
        recipe["train"][key] = value


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
    build=None,
) -> Plan:
    """Rewrite the recipe's epochs (train.epochs and each phase's) to fill the budget, and, when
    the recipe lists `budget.sizes` (settings from small to large, the first being the recipe as
    written), apply the largest that still trains `budget.min_epochs` epochs. `loader_for(phase)` gives a phase's training loader, `build(cfg)`
    a model (on the device, in the run's memory format) from a model config, `elapsed_s()` the
    seconds spent so far."""
    t_eval = time_eval(model, val_loader, bf16)
    final = 5.0  # plots, checkpoints, report

    def cost(candidate) -> tuple[list[float], float]:
        tta = int(recipe["train"]["eval_tta"])
        seconds = []
        for phase in phases:
            loader = loader_for(phase)
            evals = len(val_loader)  # per-epoch validation is plain; TTA only in the final scoring
            seconds.append(
                time_steps(candidate, loader, phase, bf16) * len(loader) + t_eval * evals
            )
        return seconds, final + t_eval * len(val_loader) * _views(tta)

    def factor_of(seconds, fixed) -> float:
        return scale_epochs(phases, seconds, fixed, budget_s * (1 - MARGIN) - elapsed_s())

    epoch_seconds, fixed = cost(model)
    factor, chosen = factor_of(epoch_seconds, fixed), 0
    sizes, least = recipe["budget"]["sizes"], float(recipe["budget"]["min_epochs"])
    for size in sizes:
        with_size(recipe, size)  # a bad key fails before any timing
    for i, size in enumerate(sizes[1:], 1):  # sizes[0] is the recipe as written
        if sum(float(p["epochs"]) * factor for p in phases) < least:
            break  # a larger model would get even fewer epochs
        seconds, extra = cost(build(with_size(recipe, size)["model"]))
        f = factor_of(seconds, extra)
        if sum(float(p["epochs"]) * f for p in phases) < least:
            break
        epoch_seconds, fixed, factor, chosen = seconds, extra, f, i
    if chosen:
        recipe.update(with_size(recipe, sizes[chosen]))
    factor = factor_of(epoch_seconds, fixed)  # the time spent timing the sizes counts too
    recipe["train"]["epochs"] = round(float(recipe["train"]["epochs"]) * factor, 3)
    recipe["train"]["warmup_epochs"] = round(float(recipe["train"]["warmup_epochs"]) * factor, 3)
    for p in recipe["phases"]:
        for key in ("epochs", "warmup_epochs"):
            if key in p:
                p[key] = round(float(p[key]) * factor, 3)
    planned = [round(p["epochs"] * factor, 2) for p in phases]
    size_note = f"; model size {chosen + 1} of {len(sizes)}: {sizes[chosen]}" if sizes else ""
    log(
        f"budget {budget_s:.0f}s: measured {', '.join(f'{s:.1f}s' for s in epoch_seconds)} per epoch; "
        f"training {' + '.join(map(str, planned))} epochs{size_note}"
    )
    return Plan(budget_s, epoch_seconds, fixed, chosen > 0)


def _views(tta: int) -> int:
    """Forward passes per image for a test-time augmentation level."""
    return len(tta_views(torch.zeros(1, 1, 3, 3), tta))
