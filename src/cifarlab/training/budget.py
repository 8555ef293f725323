"""Budget-aware training: measure this machine's speed on the recipe, then size the schedule.

`--budget 15m` times a few real training and validation steps (on a copy of the model, so the
run itself is untouched), then scales every phase's epochs by one factor so that the whole run
(start-up, training, per-epoch validation, final scoring) ends within the budget; a head phase on
cached features costs one backbone pass and keeps its epochs (`Cost`). Epochs may be fractional;
the LR schedule is sized to the new length, so it completes instead of being cut off.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import time

import torch

from cifarlab import config
from cifarlab.config import Phase, schema
from cifarlab.core import distributed
from cifarlab.core.errors import UserError
from cifarlab.core.runtime import probe_batch
from cifarlab.eval.predict import tta_views
from cifarlab.models.protocol import Freezable
from cifarlab.training.callbacks import feature_cache
from cifarlab.training.step import train_step

MARGIN = 0.03  # fraction of the budget kept in reserve for noise
UNMEASURED_DROP = 0.03  # accuracy a size is assumed to lose per halving below its shortest run
OVERHEAD = 0.03  # fraction of the budget that start-up (precision check, planning) may take


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


def time_steps(model, loader, phase: Phase, bf16: bool, steps: int = 2, warmup: int = 1) -> float:
    """Seconds per training step of `phase` on `loader` (the run's own data path and training
    step), on a copy of the model. The loader may serve smaller batches than training does:
    the caller scales the time to the real batch."""
    model = copy.deepcopy(model).train()
    if isinstance(model, Freezable):
        model.set_trainable(phase.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # a step's cost barely depends on the optimizer
    rng = torch.get_rng_state()
    batches = itertools.chain.from_iterable(loader.epoch(seed=12345 + e) for e in itertools.count())
    for i in range(warmup + steps):
        if i == warmup:
            _sync(next(model.parameters()).device)
            start = time.perf_counter()
        x, y = next(batches)
        train_step(model, opt, x, y, bf16)
    _sync(x.device)
    torch.set_rng_state(rng)
    return (time.perf_counter() - start) / steps


def time_head_step(model, x: torch.Tensor, rows: int, bf16: bool, steps: int = 3) -> float:
    """Seconds per training step of the head alone on `rows` rows of backbone features (those
    of batch `x`, repeated): a step of a phase on cached features, on a copy of the model."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        feats = model.features(x).float()
    feats = feats.repeat(math.ceil(rows / len(x)), 1)[:rows]
    head = model.head.train().requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=0.0)
    y = torch.zeros(rows, dtype=torch.long, device=x.device)
    train_step(head, opt, feats, y, bf16)
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(head, opt, feats, y, bf16)
    _sync(x.device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def time_eval(model, x: torch.Tensor, bf16: bool, batches: int = 1) -> float:
    """Seconds per forward pass of batch `x` in eval mode, on a copy of the model."""
    model = copy.deepcopy(model).eval()
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
    phases: list[Phase], epoch_seconds: list[float], fixed_seconds: float, available_seconds: float
) -> float:
    """The factor by which to multiply every phase's epochs to fill `available_seconds`."""
    planned = sum(p.epochs * s for p, s in zip(phases, epoch_seconds, strict=True))
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
    return schema.validate(sized)


@dataclasses.dataclass
class Cost:
    """What a size of the recipe costs on this machine: seconds per epoch of each phase, the
    final scoring, and the one-off backbone passes of phases on cached features (`cached`).
    The budget stretches the phases that run the backbone; a phase on cached features keeps
    its epochs (each costs next to nothing, and more of them add little), unless it is all there is."""

    seconds: list[float]
    final_s: float
    one_off: list[float]  # per phase: its feature cache's backbone pass (0 for the others)
    cached: list[bool]

    @property
    def one_off_s(self) -> float:
        return sum(self.one_off)

    def kept(self) -> list[bool]:
        """Which phases keep their epochs: the cached ones, unless every phase is."""
        return [c and not all(self.cached) for c in self.cached]

    def each(self, factor: float) -> list[float]:
        """The factor for each phase's epochs."""
        return [1.0 if k else factor for k in self.kept()]

    def factor(self, phases: list[Phase], available_s: float, strict: bool = True) -> float:
        """The factor by which to multiply the stretched phases' epochs to fill `available_s`
        (`strict`: a budget too small for anything is an error, else a factor of 0)."""
        kept = self.kept()
        fixed = self.final_s + self.one_off_s
        fixed += sum(p.epochs * s for p, s, k in zip(phases, self.seconds, kept, strict=True) if k)
        stretched = [(p, s) for p, s, k in zip(phases, self.seconds, kept, strict=True) if not k]
        if not strict:
            planned = sum(p.epochs * s for p, s in stretched)
            return max(0.0, available_s - fixed) / planned if planned > 0 else 0.0
        return scale_epochs(
            [p for p, _ in stretched], [s for _, s in stretched], fixed, available_s
        )

    def describe(self) -> str:
        """Per-epoch seconds (and the one-off cache) for the plan's line."""
        once = f" (+ {self.one_off_s:.0f}s once for cached features)" if any(self.cached) else ""
        return f"{', '.join(f'{s:.1f}s' for s in self.seconds)} per epoch{once}"

    def apply(self, recipe: dict, factor: float) -> dict:
        """A copy of the recipe with each phase's epochs (and warm-up, keeping its share)
        multiplied by its factor."""
        for n, (p, f) in enumerate(zip(config.phases(recipe), self.each(factor), strict=True)):
            keys = {"epochs": round(p.epochs * f, 3)}
            if p.warmup_epochs:
                keys["warmup_epochs"] = round(p.warmup_epochs * f, 3)
            recipe = config.with_phase_keys(recipe, n, **keys)
        return recipe

    def epochs(self, phases: list[Phase], factor: float) -> float:
        """The stretched phases' epochs that `factor` gives: what `budget.accuracy` is indexed
        by (a two-phase transfer recipe: its fine-tuning epochs)."""
        kept = self.kept()
        return sum(p.epochs * factor for p, k in zip(phases, kept, strict=True) if not k)


class Plan:
    """What `plan` decided (`recipe`: the recipe with the chosen size and epochs), kept to
    correct it with the epochs as they are really timed."""

    def __init__(
        self,
        recipe: dict,
        budget_s: float,
        epoch_seconds: list[float],
        final_s: float,
        resized: bool,
        cost: Cost | None = None,
    ):
        self.recipe = recipe
        self.budget_s, self.epoch_seconds, self.final_s = budget_s, epoch_seconds, final_s
        self.resized = resized  # another size of the recipe was chosen
        n = len(epoch_seconds)  # without a Cost: no phase on cached features
        self.cost = cost or Cost(epoch_seconds, final_s, [0.0] * n, [False] * n)
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
    ) -> tuple[dict, int]:
        """After an epoch of phase `phase`: rescale what is left of every phase by the ratio of
        the measured to the planned epoch time, so that the run still ends on time. Returns a
        new recipe (the old one is not changed) and the phase's new length in steps (never less than what is done, and a finished phase stays
        finished, so the LR schedule never jumps back up). A warm-up still under way keeps its
        share of the phase. `one_off_first`: the phase's first epoch held one-time costs
        (torch.compile, a feature cache), so its time counts as spent but not as a rate.
        Phases on cached features keep their length (`Cost.kept`) and cost what was planned,
        one-off pass included; a cached phase's measured rate says nothing of the backbone
        phases' (those after it keep their planned rates), nor theirs of a cached phase's.
        An epoch's time is the wall time since the last re-plan (checkpoints and logs included:
        on a GPU they are a large part of a short epoch), else its `seconds` in `history`."""
        if self._last is not None and self._last[:2] == (phase, epochs_done - 1):
            self.walls[phase, epochs_done] = elapsed_s - self._last[2]
        self._last = (phase, epochs_done, elapsed_s)
        phases = config.phases(recipe)
        name = phases[phase].name
        done_steps = epochs_done * steps_per_epoch
        horizon = max(1, round(phases[phase].epochs * steps_per_epoch))
        if done_steps >= horizon:
            return recipe, horizon
        rows = [r["seconds"] for r in history if r["phase"] == name][-epochs_done:]
        first = epochs_done - len(rows) + 1  # the epoch number of rows[0]
        times = [self.walls.get((phase, first + i), s) for i, s in enumerate(rows)]
        recent = sorted((times[1:] if one_off_first else times)[-3:])
        # the median of the last 3 (one stalled epoch is noise); none yet: the planned rate
        measured = recent[len(recent) // 2] if recent else self.epoch_seconds[phase]
        ratio = measured / self.epoch_seconds[phase]
        left = [phases[phase].epochs - epochs_done] + [p.epochs for p in phases[phase + 1 :]]
        kept = self.cost.kept()
        own = left[0] * self.epoch_seconds[phase] * ratio
        later_rate = 1.0 if kept[phase] else ratio
        fixed, need = (own, 0.0) if kept[phase] else (0.0, own)
        for j in range(phase + 1, len(phases)):
            n, s = left[j - phase], self.epoch_seconds[j]
            fixed += self.cost.one_off[j] + (n * s if kept[j] else 0.0)
            need += 0.0 if kept[j] else n * s * later_rate
        room = self.budget_s * (1 - MARGIN) - elapsed_s - self.final_s - fixed
        factor = max(0.0, room) / need if need > 0 else 1.0
        new_epochs = epochs_done + left[0] * (1.0 if kept[phase] else factor)
        steps = max(done_steps + 1, round(new_epochs * steps_per_epoch))
        new = config.with_phase_keys(recipe, phase, epochs=round(steps / steps_per_epoch, 3))
        warmup = phases[phase].warmup_epochs
        if epochs_done < warmup:  # the LR's peak moves with the phase's end
            stretch = steps / horizon
            new = config.with_phase_keys(
                new, phase, warmup_epochs=round(max(epochs_done, warmup * stretch), 3)
            )
        for i in (i for i in range(phase + 1, len(phases)) if not kept[i]):
            keys = {"epochs": max(round(phases[i].epochs * factor, 3), 0.001)}  # a step at least
            if phases[i].warmup_epochs:  # keeps its share of the phase
                keys["warmup_epochs"] = round(phases[i].warmup_epochs * factor, 3)
            new = config.with_phase_keys(new, i, **keys)
        if abs(steps - horizon) > 0.01 * horizon:
            log(
                f"budget: epochs take {measured:.1f}s, not {self.epoch_seconds[phase]:.1f}s; "
                f"{name} now ends after {steps / steps_per_epoch:.2f} epochs"
            )
        return new, steps


def overhead_allowance(budget_s: float) -> float:
    """Seconds a budgeted run may spend before its first real training step (precision check,
    planning): 3% of the budget, at least 20 s."""
    return max(OVERHEAD * budget_s, 20.0)


def expected_accuracy(points: dict, epochs: float) -> float:
    """Held-out accuracy expected after `epochs`, from a size's measured {epochs: accuracy}:
    linear in log(epochs) between points; above the last, the last value (no gain is claimed
    that was not measured); below the first, falling by the first segment's loss per halving
    and at least `UNMEASURED_DROP` per halving (a size is not trusted where it was not run)."""
    xs = sorted((float(k), float(v)) for k, v in points.items())
    if epochs <= 0 or not xs:
        return 0.0
    if epochs >= xs[-1][0]:
        return xs[-1][1]
    x0, y0 = xs[0]
    if epochs < x0:
        per_halving = UNMEASURED_DROP
        if len(xs) > 1:
            per_halving = max(per_halving, (xs[1][1] - y0) / math.log2(xs[1][0] / x0))
        return max(0.0, y0 - per_halving * math.log2(x0 / epochs))
    for (a, ya), (b, yb) in itertools.pairwise(xs):
        if epochs <= b:
            return ya + (yb - ya) * math.log(epochs / a) / math.log(b / a)
    return xs[-1][1]


def measure(
    model, loader_for, val_loader, phases: list[Phase], bf16: bool, tta: int, per_image_s: float
) -> Cost:
    """A size's `Cost`: its phases' steps and its validation timed on a few small batches of
    its own data path (scaled to the real batch and to every batch of an epoch)."""
    final = 5.0  # plots, checkpoints, report
    val_batch = next(val_loader.epoch())[0]  # in this size's preprocessing
    probe = probe_batch(val_loader.input_size, len(val_batch))
    t_eval = time_eval(model, val_batch[:probe], bf16) * len(val_batch) / probe
    evals = len(val_loader)  # per-epoch validation is plain; TTA only in the final scoring
    world = distributed.world().size
    seconds, cached, one_off = [], [], []
    for phase in phases:
        batch, loader = phase.batch_size, loader_for(phase)
        small = probe_batch(val_loader.input_size, batch)
        cached.append(feature_cache.applies(model, phase))
        one_off.append(0.0)
        if cached[-1]:
            # the backbone once over every view and validation image, then head steps; the
            # validation loader holds this process's share already, the training set not
            images = len(loader.labels) * phase.feature_views / world + len(val_loader.labels)
            one_off[-1] = t_eval / len(val_batch) * images
            step = time_head_step(model, val_batch[:small], -(-batch // world), bf16)
            seconds.append(step * (len(loader) + evals))  # validation: the head on features
            continue
        step = time_steps(model, loader_for(phase, small), phase, bf16) * batch / small
        step += per_image_s * batch / world  # this process's rows
        seconds.append(step * len(loader) + t_eval * evals)
    return Cost(seconds, final + t_eval * len(val_loader) * _views(tta), one_off, cached)


def plan(
    recipe: dict,
    model,
    loader_for,
    val_loader,
    bf16: bool,
    budget_s: float,
    elapsed_s,
    log,
    build=None,
    overhead_s: float = 0.0,
    per_image_s: float = 0.0,
) -> Plan:
    """Plan the recipe's epochs (train.epochs and each phase's) to fill the budget, and, when
    the recipe lists `budget.sizes` (settings, as --set keys; `{}` is the recipe as written),
    apply the one expected to give the best held-out accuracy in the epochs it can afford, from
    the measured table `budget.accuracy` (one {epochs: accuracy} per size); without a table,
    the largest (last) size that still trains `budget.min_epochs`.

    Every size is timed with a few small batches of the run's own data path and step, scaled
    to the real batch; the re-planning after each epoch corrects the estimate. Timing stops once
    the run has spent its overhead allowance (`overhead_s` already went on other start-up).
    `loader_for(phase, batch=None)` gives a phase's training loader, `build(cfg)` another size's
    (model on the device in the run's memory format, preprocess, loader_for, val_loader) from a
    model config (its own input size and normalisation), `elapsed_s()` the seconds spent so
    far; `per_image_s` is what each training image costs on top of the step (a distillation
    teacher's forward pass; not in phases that train on cached features)."""
    started = time.perf_counter()
    deadline = started + overhead_allowance(budget_s) - overhead_s  # the first size is always timed
    tta = int(recipe["train"]["eval_tta"])

    sizes = recipe["budget"]["sizes"] or [{}]
    table = recipe["budget"]["accuracy"]
    for size in sizes:
        with_size(recipe, size)  # a bad key fails before any timing
    timed: dict[str, Cost] = {}
    options, skipped, last_cost = [], [], 0.0  # options: (size, Cost, epochs)
    for i, size in enumerate(sizes):
        sized = with_size(recipe, size)
        key = repr(sized["model"])
        if key not in timed:
            # a size is timed only if that (guessed from the last size's timing) still fits
            if options and time.perf_counter() + 1.5 * last_cost > deadline:
                skipped.append(i + 1)
                continue
            t0 = time.perf_counter()
            same = sized["model"] == recipe["model"]
            candidate = (model, None, loader_for, val_loader) if same else build(sized["model"])
            timed[key] = measure(
                candidate[0], *candidate[2:], config.phases(sized), bf16, tta, per_image_s
            )
            last_cost = time.perf_counter() - t0
        phases = config.phases(sized)
        factor = timed[key].factor(phases, budget_s * (1 - MARGIN) - elapsed_s(), strict=False)
        options.append((i, timed[key], timed[key].epochs(phases, factor)))
    if skipped:
        log(f"budget: sizes {skipped} not timed: the start-up allowance was spent")
    (i, chosen, _), score = choose(options, table, float(recipe["budget"]["min_epochs"]))
    sized = with_size(recipe, sizes[i]) if sizes[i] else copy.deepcopy(recipe)
    phases = config.phases(sized)
    factor = chosen.factor(phases, budget_s * (1 - MARGIN) - elapsed_s())
    sized = chosen.apply(sized, factor)
    steps = sum(  # of the phases the budget stretched
        p.epochs * len(loader_for(p))
        for p, k in zip(config.phases(sized), chosen.kept(), strict=True)
        if not k
    )
    if steps < 10:
        raise UserError(
            f"a budget of {budget_s:.0f}s affords {steps:.1f} training steps of "
            f"{recipe['name']} on this machine (one epoch: {sum(chosen.seconds):.0f}s); "
            "give a larger --budget"
        )
    if len(sizes) > 1:
        log("budget: sizes " + "; ".join(
            f"{n + 1}) {sum(c.seconds):.1f}s/epoch, {e:.1f} epochs"
            + (f", expect {score[n]:.1%}" if score else "")
            for n, c, e in options
        ))  # fmt: skip
    size_note = f"; size {i + 1} of {len(sizes)}: {sizes[i]}" if len(sizes) > 1 else ""
    log(
        f"budget {budget_s:.0f}s: planned in {time.perf_counter() - started:.1f}s, "
        f"{chosen.describe()}; training "
        f"{' + '.join(str(round(p.epochs, 2)) for p in config.phases(sized))} epochs{size_note}"
    )
    return Plan(sized, budget_s, chosen.seconds, chosen.final_s, bool(sizes[i]), chosen)


def choose(options: list, table: list, min_epochs: float) -> tuple[tuple, dict[int, float]]:
    """The planned size among `options` (size, cost, epochs) and each size's expected accuracy:
    the best expectation from the measured `table`; without one, the largest (sizes go from
    small to large) that still trains `min_epochs`."""
    if table:
        score = {i: expected_accuracy(table[i], e) for i, _, e in options}
        return max(options, key=lambda o: (score[o[0]], -o[0])), score
    fits = [o for o in options if o[2] >= min_epochs]
    return (fits[-1] if fits else options[0]), {}


def _views(tta: int) -> int:
    """Forward passes per image for a test-time augmentation level."""
    return len(tta_views(torch.zeros(1, 1, 3, 3), tta))
