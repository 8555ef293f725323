"""The one training loop, for every model and recipe: phases of epochs, validation each epoch,
best checkpoint kept, early stopping, exact resume from the last finished epoch."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cifarlab import config
from cifarlab.core import checkpoint
from cifarlab.core.errors import Interrupted, UserError
from cifarlab.core.files import atomic_write_text
from cifarlab.core.heap import reuse_freed_memory
from cifarlab.core.progress import bar as progress_bar
from cifarlab.core.progress import enabled as progress_enabled
from cifarlab.core.runtime import (
    Choice,
    decide_for_recipe,
    memory_format,
    resolve_device,
    set_threads,
    use_compile,
)
from cifarlab.data import ImageSet, load_images, stratified_limit, stratified_split
from cifarlab.data.augment import AugmentConfig
from cifarlab.data.loader import BatchLoader
from cifarlab.eval.metrics import metrics, predict_probs
from cifarlab.models import build_model, count_parameters
from cifarlab.track.tracker import NullTracker
from cifarlab.training import budget
from cifarlab.training.callbacks import feature_cache
from cifarlab.training.callbacks.lookahead import Lookahead
from cifarlab.training.step import train_step


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_data(recipe: dict) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, val, test) exactly as the recipe and its seed define them."""
    d = recipe["data"]
    full = load_images(d["source"], image_size=d["image_size"], skip_bad=d["skip_bad"])
    full.check_trainable()
    train_idx, val_idx = stratified_split(full.labels, d["val_fraction"], recipe["seed"])
    train = full.subset(train_idx)
    if d["limit"]:
        train = train.subset(stratified_limit(train.labels, int(d["limit"]), recipe["seed"]))
    test = None
    if d["test"]:
        test = align_classes(
            load_images(d["test"], image_size=d["image_size"], split="test"), full.classes
        )
    return train, full.subset(val_idx), test


def align_classes(data: ImageSet, classes: list[str]) -> ImageSet:
    """Relabel `data` to the class order of a model; refuse a different set of classes."""
    if data.classes == list(classes):
        return data
    if set(data.classes) != set(classes):
        missing, extra = (
            sorted(set(classes) - set(data.classes)),
            sorted(set(data.classes) - set(classes)),
        )
        raise UserError(
            f"class mismatch: the model knows {len(classes)} classes, the data has {len(data.classes)} "
            f"(missing: {missing or '-'}, unknown: {extra or '-'}); use data with the model's classes"
        )
    remap = np.array([classes.index(c) for c in data.classes])
    return ImageSet(data.images, remap[data.labels], list(classes))


def make_optimizer(params, phase: dict) -> torch.optim.Optimizer:
    name, lr, wd = phase["optimizer"], float(phase["lr"]), float(phase["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=phase["momentum"], nesterov=phase["nesterov"], weight_decay=wd
        )
    raise UserError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


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


def sample_batch(data: ImageSet, preprocess: dict, device: torch.device, n: int = 5000):
    """Up to n training images, un-augmented and normalised, for data-dependent initialisation."""
    loader = BatchLoader(data.subset(np.arange(min(n, len(data)))), n, device, preprocess)
    return next(loader.epoch())[0]


def epoch_seed(seed: int, phase: int, epoch: int) -> int:
    """Each epoch draws from its own seed, so a resumed run replays the same stream."""
    return seed * 1_000_003 + phase * 10_007 + epoch


def fit(
    recipe: dict,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    tracker=None,
    budget_s: float | None = None,
) -> dict:
    """Train the recipe into run directory `out` and return its metrics. With `budget_s`, the
    epochs are sized so that the whole call takes about that many seconds. Ctrl-C stops within
    the current step: `Interrupted` says whether `last.pt` holds finished epochs to resume
    from; a run interrupted before its first epoch leaves no run directory behind."""
    existed = out.exists()
    progress_enabled(progress)
    try:
        with CTRL_C.installed():
            return _fit(recipe, out, resume, tracker, budget_s)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(out, existed)) from None
    except UserError:  # e.g. a budget too small: found before the first step
        discard_unstarted(out, existed)
        raise


class CtrlC:
    """SIGINT while a training step runs is held until the step is done, then raised as
    KeyboardInterrupt (a KeyboardInterrupt raised inside a C++ op's callback or a `__del__`
    can be swallowed); anywhere else, and at a second Ctrl-C, it is raised at once."""

    def __init__(self):
        self.holding = self.asked = False

    def handler(self, signum, frame):
        if self.holding and not self.asked:
            self.asked = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.asked:
            self.asked = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        previous = signal.signal(signal.SIGINT, self.handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


CTRL_C = CtrlC()


def interrupted_message(out: Path, existed: bool) -> str:
    """What an interrupted run left: resumable epochs in last.pt, or nothing (then the files of
    this run are removed, and the directory too if this run created it)."""
    if (out / "last.pt").is_file():
        state = checkpoint.read(out / "last.pt")["state"]
        return (
            f"interrupted; {out}/last.pt holds {len(state['history'])} finished epoch(s): "
            f"continue with `cifarlab train --resume {out}`"
        )
    discard_unstarted(out, existed)
    return f"interrupted before the first epoch finished: nothing resumable was written ({out} removed)"


def discard_unstarted(out: Path, existed: bool) -> None:
    """Remove what a run wrote before its first finished epoch (none if it has a last.pt)."""
    if (out / "last.pt").is_file():
        return
    for name in ("config.yaml", "best.pt", "history.csv"):
        (out / name).unlink(missing_ok=True)
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


@reuse_freed_memory()
def _fit(recipe, out, resume, tracker, budget_s) -> dict:
    started = time.perf_counter()
    tracker = tracker or NullTracker()
    device = resolve_device(recipe["device"])
    threads = set_threads(recipe["threads"])
    use_compile(recipe["compile"], device)  # a bad setting fails before the data is read
    torch.manual_seed(recipe["seed"])

    train_set, val_set, test_set = split_data(recipe)  # bad data fails before anything is written
    loaded = time.perf_counter()
    classes = train_set.classes
    model, preprocess = build_model(recipe["model"], len(classes), recipe["data"]["image_size"])
    model.to(device)
    # measured here, once; resume reads the decision from config.yaml
    choice = decide_for_recipe(recipe, model, int(preprocess["input_size"]), device, threads)
    recipe["precision"], recipe["memory_format"] = choice.precision, choice.memory_format
    bf16, channels_last = choice.bf16, choice.channels_last
    trained_in = {"precision": choice.precision, "memory_format": choice.memory_format}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config.dump(recipe))
    preprocess["image_size"] = recipe["data"]["image_size"]
    model.to(device, memory_format=memory_format(channels_last))
    log(choice.line())
    log(
        f"data: {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes; "
        f"model: {recipe['model']['name']} {count_parameters(model) / 1e6:.2f}M params"
    )

    phase_list = config.phases(recipe)
    state = {"phase": 0, "epoch": 0, "best": -1.0, "stale": 0, "history": [], "done": False}
    saved = None
    if resume:
        saved = checkpoint.read(out / "last.pt")
        model.load_state_dict(saved["model"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"]["torch"])
        where = (
            f"{phase_list[state['phase']]['name']} epoch {state['epoch'] + 1}"
            if state["phase"] < len(phase_list)
            else "the final scoring"
        )
        log(f"resuming {out} at {where}")

    aug = AugmentConfig(**recipe["augment"])
    eval_kw = dict(device=device, preprocess=preprocess, channels_last=channels_last)
    val_loader = BatchLoader(val_set, 500, **eval_kw)

    def train_loader_for(phase: dict, batch: int | None = None) -> BatchLoader:
        batch = batch or int(phase["batch_size"])
        return BatchLoader(
            train_set,
            batch,
            aug=aug,
            shuffle=True,
            drop_last=len(train_set) > batch,
            seed=recipe["seed"],
            **eval_kw,
        )

    def build(model_cfg: dict) -> torch.nn.Module:
        built = build_model(model_cfg, len(classes), recipe["data"]["image_size"])[0]
        return built.to(device, memory_format=memory_format(channels_last))

    planned = None
    if budget_s is not None and not resume:
        planned = budget.plan(
            recipe, model, train_loader_for, val_loader, bf16, budget_s,
            lambda: time.perf_counter() - started, log,
            build=build, overhead_s=time.perf_counter() - loaded,
        )  # fmt: skip
        if planned.resized:  # the budget chose another size of the recipe
            model = build(recipe["model"])
            aug = AugmentConfig(**recipe["augment"])
            log(f"model: {recipe['model']} {count_parameters(model) / 1e6:.2f}M params")
        log(
            f"budget: first training step {time.perf_counter() - loaded:.1f}s after the data loaded"
        )
        phase_list = config.phases(recipe)
        atomic_write_text(out / "config.yaml", config.dump(recipe))
    init = getattr(model, "init_from_data", None)  # data-dependent initialisation, e.g. whitening
    if init is not None and not resume:  # once, on the model the budget chose
        init(sample_batch(train_set, preprocess, device))
    tracker.start(recipe, out)  # after planning: the run records the epochs and size it trains
    step = sum(1 for _ in state["history"])
    eta = RunClock(
        phase_list,
        planned.epoch_seconds
        if planned
        else estimate_epoch_seconds(choice, phase_list, train_set, val_set),
        state["history"],
        estimated=planned is None,
    )
    log(eta.line())
    for p_i, phase in enumerate(phase_list):
        if p_i < state["phase"] or state["done"]:
            continue
        train_loader = train_loader_for(phase)
        set_trainable = getattr(model, "set_trainable", None)
        if set_trainable is not None:
            set_trainable(phase["freeze"])
        elif phase["freeze"] != "none":
            raise UserError(
                f"freeze={phase['freeze']!r} needs a pretrained backbone (model.name: timm)"
            )
        param_groups = getattr(model, "param_groups", None)  # per-stage LR, scoped weight decay
        if param_groups is not None:
            params = param_groups(phase)
        elif phase["layer_decay"] or phase["weight_decay_scope"] != "all":
            raise UserError(
                "layer_decay and weight_decay_scope need a pretrained backbone (model.name: timm)"
            )
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, phase)
        cache = (  # a frozen backbone: its features once, then the head trains on them
            feature_cache.FeatureCache(
                model, train_set, val_set, aug, phase, recipe["seed"], bf16, **eval_kw
            )
            if feature_cache.applies(model, phase)
            else None
        )
        batches, net = (cache, model.head) if cache else (train_loader, model)
        compiled = use_compile(recipe["compile"], device)
        if compiled:
            net = torch.compile(net)  # the same parameters: checkpoints and averaging see them
        pending_seconds = cache.seconds if cache else 0.0  # counted in the first epoch's time
        # the schedule's length in steps; a budgeted run may re-plan it after each epoch
        horizon = [max(1, round(float(phase["epochs"]) * len(train_loader)))]
        warmup = [int(float(phase["warmup_epochs"]) * len(train_loader))]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s, _h=horizon, _w=warmup, _p=phase: lr_factor(
                s, _h[0], _w[0], _p["schedule"], float(_p["lr_start"]), float(_p["lr_end"])
            ),
        )
        lookahead = Lookahead(model, float(phase["lookahead"])) if phase["lookahead"] else None
        ema = (
            AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(float(phase["ema"])), use_buffers=True
            )
            if phase["ema"]
            else None
        )
        if saved is not None and saved["state"]["phase"] == p_i and state["epoch"] > 0:
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            if ema is not None:
                ema.load_state_dict(saved["ema"])
            if lookahead is not None:
                lookahead.load_state_dict(saved["lookahead"])
        epoch = state["epoch"]
        while epoch < (epochs := math.ceil(horizon[0] / len(train_loader))):
            torch.manual_seed(epoch_seed(recipe["seed"], p_i, epoch))
            t0 = time.perf_counter()
            model.train()
            if set_trainable is not None:
                set_trainable(phase["freeze"])  # re-applies eval mode to frozen BatchNorm layers
            loss_sum = correct = seen = 0.0
            bar = progress_bar(
                batches.epoch(epoch_seed(recipe["seed"], p_i, epoch), index=epoch),
                total=len(batches),
                desc=f"{phase['name']} {epoch + 1}/{epochs}",
            )
            for i, (x, y) in enumerate(bar):
                if epoch * len(train_loader) + i >= horizon[0]:  # a fractional last epoch
                    break
                with CTRL_C.deferred():  # Ctrl-C lands between steps, never inside one
                    loss, logits = train_step(net, opt, x, y, bf16, float(phase["label_smoothing"]))
                sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                if lookahead is not None:
                    lookahead.step(epoch * len(train_loader) + i + 1, horizon[0])
                n = len(x)
                loss_sum += loss.detach() * n  # summed on the device: no GPU sync per step
                correct += (logits.argmax(1) == y.argmax(1)).sum()
                seen += n
                if i % 16 == 0:
                    bar.set_postfix(
                        loss=f"{float(loss_sum) / seen:.3f}",
                        acc=f"{float(correct) / seen:.3f}",
                        refresh=False,
                    )
            bar.close()
            loss_sum, correct = float(loss_sum), float(correct)
            train_time = time.perf_counter() - t0
            scored = ema.module if ema is not None else model
            val_probs = (
                cache.val_probs(scored, bf16)  # plain: TTA is for the final scoring
                if cache
                else predict_probs(scored, val_loader, 0, bf16, desc="validating")
            )
            val = metrics(val_probs, val_set.labels, classes)
            row = {
                "phase": phase["name"],
                "epoch": epoch + 1,
                "step": step + 1,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0 + pending_seconds,
                "train_images_per_s": seen / train_time,
            }
            state["history"].append(row)
            step += 1
            pending_seconds = 0.0
            improved = val["accuracy"] > state["best"]
            if improved:
                state["best"], state["stale"] = val["accuracy"], 0
                checkpoint.save_model(
                    out / "best.pt",
                    scored,
                    recipe["model"],
                    classes,
                    preprocess,
                    {"val_accuracy": val["accuracy"], "phase": phase["name"], "epoch": epoch + 1},
                    trained_in,
                )
            else:
                state["stale"] += 1
            stop = bool(phase["early_stopping"]) and state["stale"] >= int(phase["early_stopping"])
            if planned is not None and not stop:  # re-plan from this phase's measured epochs
                horizon[0] = planned.replan(
                    recipe, p_i, epoch + 1, len(train_loader), state["history"],
                    time.perf_counter() - started, log, one_off_first=compiled or cache is not None,
                )  # fmt: skip
                warmup[0] = int(
                    float(config.phases(recipe)[p_i]["warmup_epochs"]) * len(train_loader)
                )
                epochs = math.ceil(horizon[0] / len(train_loader))
                atomic_write_text(out / "config.yaml", config.dump(recipe))
            last = epoch + 1 >= epochs or stop
            state["epoch"] = 0 if last else epoch + 1
            state["phase"] = p_i + 1 if last else p_i
            if last and len(phase_list) > 1:  # each phase's final model, e.g. for `compare`
                checkpoint.save_model(
                    out / f"phase{p_i + 1}.pt",
                    scored,
                    recipe["model"],
                    classes,
                    preprocess,
                    {"val_accuracy": val["accuracy"], "phase": phase["name"], "epoch": epoch + 1},
                    trained_in,
                )
            checkpoint.atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {},
                    "lookahead": lookahead.state_dict() if lookahead is not None else {},
                    "state": state,
                    "rng": {"torch": torch.get_rng_state()},
                },
                out / "last.pt",
            )
            write_history(out / "history.csv", state["history"])
            tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float)}, step)
            log(
                f"{phase['name']} {epoch + 1:>3}/{epochs}  loss {row['train_loss']:.4f}  "
                f"acc {row['train_accuracy']:.4f}  val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.4f}  "
                f"{row['seconds']:.1f}s  {row['train_images_per_s']:.0f} img/s{'  *' if improved else ''}"
            )
            if not (last and p_i == len(phase_list) - 1):
                log(eta.line(config.phases(recipe)))
            if stop:
                log(f"early stopping: no better val accuracy for {phase['early_stopping']} epochs")
                break
            epoch += 1
        state["stale"] = 0
        saved = None
    state["done"] = True
    return finish(recipe, out, model, train_set, val_set, test_set, state, tracker, choice)


def finish(
    recipe, out: Path, model, train_set, val_set, test_set, state, tracker, choice: Choice
) -> dict:
    """Score the best checkpoint on val (and test) and write metrics.json, the plots and
    report.html."""
    from cifarlab.report import html as report
    from cifarlab.report import plots

    best, info = checkpoint.load_model(out / "best.pt")
    device = next(model.parameters()).device
    best.to(device)
    tta = int(recipe["train"]["eval_tta"])
    channels_last, bf16 = choice.channels_last, choice.bf16  # as the run trained
    kw = dict(device=device, preprocess=info["preprocess"], channels_last=channels_last)
    best.to(memory_format=memory_format(channels_last))
    result = {
        "recipe": recipe["name"],
        "classes": train_set.classes,
        "n_train": len(train_set),
        "parameters": count_parameters(best),
        "device": str(device),
        "runtime": choice.as_dict(),
        "train_seconds": sum(r["seconds"] for r in state["history"]),
        "best": info["metrics"],
        "phases": phase_summaries(state["history"]),
    }
    for name, data in (("val", val_set), ("test", test_set)):
        if data is not None and len(data):
            desc = f"scoring {name}" + (f" (TTA {tta})" if tta else "")
            probs = predict_probs(best, BatchLoader(data, 500, **kw), tta, bf16, desc=desc)
            result[name] = metrics(probs, data.labels, data.classes)
            result[name]["ece"] = report.expected_calibration_error(probs, data.labels)
            np.save(out / f"{name}_probs.npy", probs)
    stages = progress_bar(total=3, desc="writing the plots, report and tracking")
    write_json(out / "metrics.json", result)
    plots.curves(state["history"], out / "curves.png")
    scored = result.get("test") or result["val"]
    plots.confusion(np.array(scored["confusion"]), scored["classes"], out / "confusion.png")
    stages.update()
    report.run_report(out, val_set)
    stages.update()
    tracker.finish(result, out)
    stages.update()
    stages.close()
    return result


def estimate_epoch_seconds(
    choice: Choice, phases: list[dict], train_set: ImageSet, val_set: ImageSet
) -> list[float]:
    """Seconds per epoch of each phase, from the precision check's measured training rate
    (inference taken as 3x faster); empty where nothing was measured (pinned settings)."""
    rate = max(choice.rates.values(), default=0.0)
    if not rate:
        return []
    return [len(train_set) / rate + len(val_set) / (3 * rate) for _ in phases]


class RunClock:
    """The whole-run line: epochs left, time left and the finish clock time, from the planned
    (or estimated) epoch times, corrected by the epochs measured so far."""

    def __init__(self, phases, epoch_seconds, history: list[dict], estimated: bool):
        self.phases, self.epoch_seconds = phases, list(epoch_seconds)
        self.history, self.estimated = history, estimated

    def line(self, phases: list[dict] | None = None) -> str:
        phases = phases or self.phases
        done = {p["name"]: 0 for p in phases}
        for row in self.history:
            done[row["phase"]] = row["epoch"]
        left = [max(0.0, float(p["epochs"]) - done.get(p["name"], 0)) for p in phases]
        total = sum(float(p["epochs"]) for p in phases)
        seconds = []
        for i, p in enumerate(phases):
            measured = [r["seconds"] for r in self.history if r["phase"] == p["name"]][1:]
            if measured:  # the median after the first (which holds one-off costs)
                seconds.append(sorted(measured)[len(measured) // 2])
            elif i < len(self.epoch_seconds):
                seconds.append(self.epoch_seconds[i])
            else:
                seconds.append(None)
        head = f"run: {total - sum(left):.4g}/{total:.4g} epochs done"
        if None in seconds or not seconds:
            return head + "; time per epoch not measured yet"
        remaining = sum(n * s for n, s in zip(left, seconds, strict=True))
        finish = time.strftime("%H:%M", time.localtime(time.time() + remaining))
        how = " (estimated from the precision check)" if self.estimated and not self.history else ""
        return f"{head}, about {_duration(remaining)} left{how}, finishing about {finish}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def phase_summaries(history: list[dict]) -> list[dict]:
    """The last epoch of each phase: the seed's 'after training' / 'after fine-tuning' rows."""
    ends: dict[str, dict] = {}
    for row in history:
        ends[row["phase"]] = row
    return [
        {
            "phase": k,
            "epochs": v["epoch"],
            "val_accuracy": v["val_accuracy"],
            "val_loss": v["val_loss"],
        }
        for k, v in ends.items()
    ]


def write_history(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))
