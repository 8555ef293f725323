"""`fit`: one run from a recipe to a scored run directory.

set up     device, threads, the data split, the model, the precision decision (measured)
plan       with a budget: the size and epochs that fit (training/budget.py)
train      the Trainer's loop with the run's callbacks (training/trainer.py)
finish     the best checkpoint scored on val (and test), metrics.json, plots, report.html

Under torchrun every process runs `fit`; rank 0 alone measures the precision check's decision,
plans the budget and writes (run directory, console, MLflow): see core/distributed.py.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarlab import config
from cifarlab.core import distributed
from cifarlab.core.errors import Interrupted, RunFailed, UserError
from cifarlab.core.heap import reuse_freed_memory
from cifarlab.core.log import log
from cifarlab.core.progress import bar as progress_bar
from cifarlab.core.progress import enabled as progress_enabled
from cifarlab.core.runtime import (
    Choice,
    memory_format,
    resolve_device,
    set_threads,
    use_compile,
)
from cifarlab.data.augment import AugmentConfig
from cifarlab.data.dataset import ImageSet
from cifarlab.data.loader import BatchLoader
from cifarlab.data.split import split_data
from cifarlab.eval.metrics import expected_calibration_error, metrics, phase_summaries
from cifarlab.eval.predict import predict_probs
from cifarlab.models import build_model, count_parameters, load_model
from cifarlab.models.protocol import DataInit
from cifarlab.report import html as report
from cifarlab.report import plots
from cifarlab.rundir import RunDir
from cifarlab.track.tracker import NullTracker
from cifarlab.training import budget
from cifarlab.training.callbacks.checkpoints import Checkpoints
from cifarlab.training.callbacks.console import Console, estimate_epoch_seconds
from cifarlab.training.callbacks.distill import Distill, Teacher
from cifarlab.training.callbacks.early_stopping import EarlyStopping
from cifarlab.training.callbacks.ema import EMA
from cifarlab.training.callbacks.feature_cache import CachedFeatures
from cifarlab.training.callbacks.history import History
from cifarlab.training.callbacks.lookahead import LookaheadAveraging
from cifarlab.training.callbacks.replan import Replan
from cifarlab.training.callbacks.tracking import Tracking
from cifarlab.training.events import Callback
from cifarlab.training.interrupt import CTRL_C
from cifarlab.training.step import decide_precision
from cifarlab.training.trainer import Trainer


def fit(
    recipe: dict,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    tracker=None,
    budget_s: float | None = None,
    callbacks: list[Callback] | None = None,
) -> dict:
    """Train the recipe into run directory `out` and return its metrics. With `budget_s`, the
    epochs are sized so that the whole call takes about that many seconds. `callbacks` are
    added after the run's own (see `run_callbacks`). Ctrl-C stops within the current step:
    `Interrupted` says whether `last.pt` holds finished epochs to resume from; a run
    interrupted before its first epoch leaves no run directory behind."""
    run = RunDir(out)
    existed = run.path.exists()
    world = distributed.init(resolve_device(recipe["device"]))
    progress_enabled(progress and world.main)
    tracker = tracker if world.main else None  # one MLflow run: rank 0's
    try:
        with CTRL_C.installed():
            return _fit(recipe, run, resume, tracker, budget_s, callbacks or [])
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(run, existed)) from None
    except UserError:  # e.g. a budget too small: found before the first step
        if world.main:
            run.discard_unstarted(existed)
        raise
    except RuntimeError as e:
        if not distributed.lost_peer(e):
            raise
        if CTRL_C.asked:  # Ctrl-C held in a step whose peer stopped first on the same Ctrl-C
            CTRL_C.asked = False
            raise Interrupted(interrupted_message(run, existed)) from None
        raise RunFailed(
            f"rank {world.rank}: another process of this run stopped; "
            + interrupted_message(run, existed).removeprefix("interrupted; ")
        ) from None


def interrupted_message(run: RunDir, existed: bool) -> str:
    """What an interrupted run left: resumable epochs in last.pt, or nothing (then the files of
    this run are removed, and the directory too if this run created it)."""
    if run.last.is_file():
        return (
            f"interrupted; {run.last} holds {run.finished_epochs()} finished epoch(s): "
            f"continue with `cifarlab train --resume {run}`"
        )
    if distributed.world().main:
        run.discard_unstarted(existed)
    return f"interrupted before the first epoch finished: nothing resumable was written ({run} removed)"


@dataclass
class Setup:
    """What the run trains, decided before the first step."""

    recipe: dict
    model: torch.nn.Module
    preprocess: dict
    choice: Choice
    train_set: ImageSet
    val_set: ImageSet
    test_set: ImageSet | None
    plan: budget.Plan | None
    saved: dict | None  # last.pt when resuming
    teacher: Teacher | None  # distillation


def run_callbacks(setup: Setup, tracker, started: float) -> list[Callback]:
    """The run's callbacks, in the order they see each event: deciders first (early stopping
    before re-planning: a stopped phase is not re-planned), then what records the epoch.
    Under torchrun the recorders (files, MLflow, console) run on rank 0 only."""
    plan = setup.plan
    callbacks: list[Callback] = [CachedFeatures(), EMA(), LookaheadAveraging(), EarlyStopping()]
    distill = setup.recipe["distill"]
    if setup.teacher is not None:  # after the feature cache: it distils image batches only
        callbacks.append(Distill(setup.teacher, distill["temperature"], distill["weight"]))
    if plan is not None:  # rank 0's: the others follow its plan (Trainer._agree)
        callbacks.append(Replan(plan, started))
    if not distributed.world().main:
        return callbacks
    seconds = (
        plan.epoch_seconds
        if plan
        else estimate_epoch_seconds(
            setup.choice, config.phases(setup.recipe), setup.train_set, setup.val_set
        )
    )
    callbacks += [Checkpoints(), History(), Tracking(tracker), Console(seconds, plan is None)]
    return callbacks


@reuse_freed_memory()
def _fit(recipe, run: RunDir, resume, tracker, budget_s, extra: list[Callback]) -> dict:
    started = time.perf_counter()
    setup, loader_for, val_loader = prepare(recipe, run, resume, budget_s, started)
    trainer = Trainer(
        setup.model, setup.recipe, setup.train_set, setup.val_set, run, setup.choice,
        setup.preprocess, loader_for, val_loader,
        run_callbacks(setup, tracker or NullTracker(), started) + extra,
        compiled=use_compile(setup.recipe["compile"], resolve_device(setup.recipe["device"])),
        resume=setup.saved,
    )  # fmt: skip
    trainer.fit()
    return finish(trainer, setup.test_set, setup.teacher)


def check_device(recipe: dict, several: bool) -> torch.device:
    """The run's device, with the settings it cannot run refused before any data is read (the
    launcher asks before it starts the processes: `several` is then whether there will be more
    than one)."""
    device = resolve_device(recipe["device"])
    use_compile(recipe["compile"], device)
    if recipe["sync_bn"] and several and device.type != "cuda":
        raise UserError(
            "--sync-bn (sync_bn: true) needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; "
            "on the CPU each process normalises over its own rows of the batch"
        )
    return device


def prepare(recipe: dict, run: RunDir, resume: bool, budget_s, started: float):
    """Set up the run: (Setup, loader_for(phase), val_loader). Writes config.yaml once, with
    every decision in it (precision, size, epochs): resume reads them back."""
    world = distributed.world()
    device = distributed.local_device(check_device(recipe, world.active))
    threads = set_threads(recipe["threads"])
    teacher = Teacher(recipe["distill"]["teacher"]) if recipe["distill"]["teacher"] else None
    torch.manual_seed(recipe["seed"])
    train_set, val_set, test_set = split_data(recipe)  # bad data fails before anything is written
    loaded = time.perf_counter()
    classes = train_set.classes
    model, preprocess = build_model(recipe["model"], len(classes), recipe["data"]["image_size"])
    model.to(device)
    # measured here, once; resume reads the decision from config.yaml
    choice = decide_precision(recipe, model, int(preprocess["input_size"]), device, threads)
    choice = Choice(**distributed.broadcast(dataclasses.asdict(choice)))  # rank 0's, for all
    recipe = {**recipe, "precision": choice.precision, "memory_format": choice.memory_format}
    preprocess["image_size"] = recipe["data"]["image_size"]
    model.to(device, memory_format=memory_format(choice.channels_last))
    log(choice.line())
    log(
        f"data: {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes; "
        f"model: {recipe['model']['name']} {count_parameters(model) / 1e6:.2f}M params"
    )
    saved = resume_state(run, model, recipe) if resume else None

    def loaders(pre: dict, aug: AugmentConfig):
        return data_loaders(train_set, val_set, pre, aug, recipe["seed"], device, choice)

    aug = AugmentConfig(**recipe["augment"])  # as written; the chosen size's once planned

    def build(model_cfg: dict, aug: AugmentConfig = aug):
        """(model, preprocess, loader_for, val_loader) of another size's model config."""
        built, pre = build_model(model_cfg, len(classes), recipe["data"]["image_size"])
        pre["image_size"] = recipe["data"]["image_size"]
        built.to(device, memory_format=memory_format(choice.channels_last))
        return built, pre, *loaders(pre, aug)

    loader_for, val_loader = loaders(preprocess, aug)

    # the teacher's one-off logits are spent from the budget, not from the planner's start-up
    # allowance: 141 s of them left a 15-minute budget no time to time more than one size
    cached_s = 0.0
    if teacher is not None:  # its classes checked before anything is written
        teacher.place(classes, device, preprocess, choice)
        if recipe["distill"]["cache"]:  # before the plan: its one-off cost is spent by then
            teacher.cache_views(train_set, device)
            cached_s = teacher.cache["seconds"]
    plan = None
    if budget_s is not None and not resume:
        if world.main:  # the others wait for its plan (timed on rank 0's share of a batch)
            extra = teacher.seconds_per_image(next(val_loader.epoch())[0][:64]) if teacher else 0.0
            plan = budget.plan(
                recipe, model, loader_for, val_loader, choice.bf16, budget_s,
                lambda: time.perf_counter() - started, log,
                build=build, overhead_s=time.perf_counter() - loaded - cached_s, per_image_s=extra,
            )  # fmt: skip
        planned = distributed.broadcast(
            {"recipe": plan.recipe, "resized": plan.resized} if plan else None
        )
        recipe = plan.recipe if plan else planned["recipe"]
        if planned["resized"]:  # the budget chose another size of the recipe
            aug = AugmentConfig(**recipe["augment"])
            model, preprocess, loader_for, val_loader = build(recipe["model"], aug)
            if teacher is not None:  # the student's normalisation may have changed
                teacher.place(classes, device, preprocess, choice)
            log(f"model: {recipe['model']} {count_parameters(model) / 1e6:.2f}M params")
        log(
            f"budget: first training step {time.perf_counter() - loaded:.1f}s after the data loaded"
        )
    if world.main:
        run.write_recipe(recipe)
    if isinstance(model, DataInit) and not resume:  # once, on the model the budget chose
        model.init_from_data(sample_batch(train_set, preprocess, device))
    if recipe["sync_bn"] and world.active:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same parameters
    setup = Setup(
        recipe, model, preprocess, choice, train_set, val_set, test_set, plan, saved, teacher
    )
    return setup, loader_for, val_loader


def resume_state(run: RunDir, model: torch.nn.Module, recipe: dict) -> dict:
    """last.pt of an interrupted run, its weights and RNG state restored; says where it resumes."""
    saved = run.read_state()
    model.load_state_dict(saved["model"])
    torch.set_rng_state(saved["rng"]["torch"])
    state, names = saved["state"], [p.name for p in config.phases(recipe)]
    where = (
        f"{names[state['phase']]} epoch {state['epoch'] + 1}"
        if state["phase"] < len(names)
        else "the final scoring"
    )
    log(f"resuming {run} at {where}")
    return saved


def data_loaders(
    train_set: ImageSet, val_set: ImageSet, pre: dict, aug: AugmentConfig, seed: int, device, choice
):
    """(loader_for(phase, batch=None), val_loader) in a model's preprocessing (each size of a
    recipe may have its own input size and normalisation): training batches of a phase (the
    global batch; each process takes its rows) and the validation loader (each process its
    share, gathered)."""
    world = distributed.world()
    eval_kw = dict(device=device, preprocess=pre, channels_last=choice.channels_last)

    def loader_for(phase, batch: int | None = None) -> BatchLoader:
        batch = batch or phase.batch_size
        if min(batch, len(train_set)) < world.size:
            raise UserError(
                f"a batch of {min(batch, len(train_set))} images cannot be shared by "
                f"{world.size} processes: use a batch size of at least {world.size}"
            )
        return BatchLoader(
            train_set, batch, aug=aug, shuffle=True, drop_last=len(train_set) > batch,
            seed=seed, rank=world.rank, world_size=world.size, **eval_kw,
        )  # fmt: skip

    return loader_for, BatchLoader(distributed.share(val_set), 500, **eval_kw)


def sample_batch(data: ImageSet, preprocess: dict, device: torch.device, n: int = 5000):
    """Up to n training images, un-augmented and normalised, for data-dependent initialisation."""
    loader = BatchLoader(data.subset(np.arange(min(n, len(data)))), n, device, preprocess)
    return next(loader.epoch())[0]


def finish(t: Trainer, test_set: ImageSet | None, teacher: Teacher | None = None) -> dict:
    """Score the best checkpoint on val (and test) in the run's precision and layout, write
    metrics.json (with a distillation teacher's cached logits: computed or read, in how many
    seconds), the plots and report.html, then tell the callbacks (tracking). Under DDP every
    process scores its share of the images, and rank 0 writes."""
    run, choice, recipe = t.run, t.choice, t.recipe
    distributed.barrier()  # rank 0 has written best.pt
    best, info = load_model(run.best)
    best.to(t.device, memory_format=memory_format(choice.channels_last))
    tta = int(recipe["train"]["eval_tta"])
    kw = dict(device=t.device, preprocess=info["preprocess"], channels_last=choice.channels_last)
    history = t.state["history"]
    result = {
        "recipe": recipe["name"],
        "classes": t.classes,
        "n_train": len(t.train_set),
        "parameters": count_parameters(best),
        "device": str(t.device),
        "runtime": choice.as_dict(),
        "train_seconds": sum(r["seconds"] for r in history),
        "best": info["metrics"],
        "phases": phase_summaries(history),
    }
    if recipe["distill"]["teacher"]:
        result["teacher"] = recipe["distill"]["teacher"]
        if teacher is not None and teacher.cache is not None:  # its one-off cost, in the budget
            result["teacher_cache"] = teacher.cache
    for name, data in (("val", t.val_set), ("test", test_set)):
        if data is not None and len(data):
            desc = f"scoring {name}" + (f" (TTA {tta})" if tta else "")
            loader = BatchLoader(distributed.share(data), 500, **kw)
            probs = predict_probs(best, loader, tta, choice.bf16, desc=desc)
            probs = distributed.gather_rows(probs, len(data))
            result[name] = metrics(probs, data.labels, data.classes)
            result[name]["ece"] = expected_calibration_error(probs, data.labels)
            if t.world.main:
                run.write_probs(name, probs)
    if not t.world.main:
        return result
    stages = progress_bar(total=3, desc="writing the plots, report and tracking")
    run.write_metrics(result)
    plots.curves(history, run.curves)
    scored = result.get("test") or result["val"]
    plots.confusion(np.array(scored["confusion"]), scored["classes"], run.confusion)
    stages.update()
    report.run_report(run.path, t.val_set)
    stages.update()
    t.emit("fit_end", result)
    stages.update()
    stages.close()
    return result
