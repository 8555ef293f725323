"""The one training loop, for every model and recipe: phases of epochs, each epoch trained,
validated and recorded; everything optional plugs in as a callback (see `events`).

Read `fit` top to bottom: it is the whole loop. Per-phase set-up is `_start_phase`; one
epoch's steps are `_train_epoch`; `_validate` and `_advance` close the epoch.

Under torchrun each process runs this same loop on its rows of every global batch, the network
wrapped in DistributedDataParallel (gradients averaged across processes); the epoch's training
loss and accuracy are summed over processes, validation is split between them and gathered, and
rank 0's decisions (early stopping, re-planning, pruning) reach the others in `_agree`. What
only rank 0 does (files, console, MLflow) is decided by which callbacks each process gets.
"""

from __future__ import annotations

import functools
import time

import torch

from cifarlab import config
from cifarlab.core import distributed
from cifarlab.core.errors import UserError
from cifarlab.core.progress import bar as progress_bar
from cifarlab.core.runtime import Choice
from cifarlab.data.augment import AugmentConfig
from cifarlab.data.dataset import ImageSet
from cifarlab.eval.metrics import metrics
from cifarlab.eval.predict import predict_probs
from cifarlab.models.protocol import Freezable, HasParamGroups
from cifarlab.rundir import RunDir
from cifarlab.training.events import Callback
from cifarlab.training.interrupt import CTRL_C
from cifarlab.training.optim import lr_factor, make_optimizer
from cifarlab.training.step import cross_entropy, train_step


def epoch_seed(seed: int, phase: int, epoch: int) -> int:
    """Each epoch draws from its own seed, so a resumed run replays the same stream."""
    return seed * 1_000_003 + phase * 10_007 + epoch


class Trainer:
    """Trains `model` through the recipe's phases. `loader_for(phase)` gives a phase's training
    loader, `val_loader` the validation images; `resume` is a last.pt to continue from."""

    def __init__(
        self,
        model: torch.nn.Module,
        recipe: dict,
        train_set: ImageSet,
        val_set: ImageSet,
        run: RunDir,
        choice: Choice,
        preprocess: dict,
        loader_for,
        val_loader,
        callbacks: list[Callback],
        compiled: bool = False,
        resume: dict | None = None,
    ):
        self.model, self.recipe, self.phases = model, recipe, config.phases(recipe)
        self.train_set, self.val_set, self.classes = train_set, val_set, train_set.classes
        self.run, self.choice, self.bf16 = run, choice, choice.bf16
        self.preprocess, self.loader_for, self.val_loader = preprocess, loader_for, val_loader
        self.callbacks, self.compiled, self.saved = callbacks, compiled, resume
        self.device = next(model.parameters()).device
        self.world = distributed.world()
        self.aug = AugmentConfig(**recipe["augment"])  # the chosen size's
        self.trained_in = {"precision": choice.precision, "memory_format": choice.memory_format}
        self.state = (
            resume["state"]
            if resume
            else {"phase": 0, "epoch": 0, "best": -1.0, "history": [], "done": False}
        )

    def emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, f"on_{event}")(self, *args)

    def fit(self) -> dict:
        """Train what is left of the run; returns its state (history, best accuracy)."""
        self.emit("fit_start")
        self.stop_run = False  # a callback may end the whole run (a pruned trial)
        for p_i in range(len(self.phases)):
            if p_i < self.state["phase"] or self.state["done"] or self.stop_run:
                continue  # finished before a resume, or stopped
            self._start_phase(p_i)
            while self.epoch < self.epochs:
                # -- train one epoch, then validate the weights that are scored --
                self._train_epoch()
                self._validate()
                self.emit("validation_end")  # decisions: early stopping, re-planning
                self._agree()  # under DDP: rank 0's decisions on every process
                self._advance()
                self.emit("epoch_end")  # records: checkpoints, history, tracking, console
                if self.phase_done:
                    break
                self.epoch += 1
            self.emit("phase_end")
        self.state["done"] = True
        return self.state

    # -- a phase ------------------------------------------------------------------------------
    def _start_phase(self, p_i: int) -> None:
        self.phase_index, self.phase = p_i, self.phases[p_i]
        phase, model = self.phase, self.model
        self.train_loader = self.loader_for(phase)
        self.steps_per_epoch = len(self.train_loader)
        if isinstance(model, Freezable):
            model.set_trainable(phase.freeze)
        elif phase.freeze != "none":
            raise UserError(
                f"freeze={phase.freeze!r} needs a pretrained backbone (model.name: timm)"
            )
        if isinstance(model, HasParamGroups):  # per-stage LR, scoped weight decay
            params = model.param_groups(phase)
        elif phase.layer_decay or phase.weight_decay_scope != "all":
            raise UserError(
                "layer_decay and weight_decay_scope need a pretrained backbone (model.name: timm)"
            )
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(params, phase)
        # what trains and how it is validated; callbacks may replace these (feature cache)
        self.net, self.batches = model, self.train_loader
        self.val_probs = self._predict_val
        self.loss_fn = functools.partial(cross_entropy, label_smoothing=phase.label_smoothing)
        self.pending_seconds = 0.0  # one-off costs counted into the phase's first epoch
        self.first_epoch_one_off = self.compiled
        self.stop_phase = self.phase_done = False
        # the schedule's length in steps; a budgeted run may re-plan it after each epoch
        self.horizon = max(1, round(phase.epochs * self.steps_per_epoch))
        self.warmup = int(phase.warmup_epochs * self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: lr_factor(
                s, self.horizon, self.warmup, phase.schedule, phase.lr_start, phase.lr_end
            ),
        )
        self.emit("phase_start")
        if self.compiled:
            self.net = torch.compile(self.net)  # the same parameters: checkpoints see them
        if self.world.active:  # after compiling, as nanoGPT does; rank 0's weights to all
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.epoch = 0
        if self.saved is not None:  # resuming: inside this phase, or at its start
            if self.state["epoch"] > 0:
                self.opt.load_state_dict(self.saved["optimizer"])
                self.sched.load_state_dict(self.saved["scheduler"])
                for callback in self.callbacks:
                    callback.load_state_dict(self.saved["callbacks"].get(callback.name, {}))
                self.epoch = self.state["epoch"]
            self.saved = None

    @property
    def epochs(self) -> int:
        """The phase's epochs (the last may be cut short: the schedule ends at `horizon`)."""
        return -(-self.horizon // self.steps_per_epoch)

    # -- an epoch -----------------------------------------------------------------------------
    def _train_epoch(self) -> None:
        seed = epoch_seed(self.recipe["seed"], self.phase_index, self.epoch)
        torch.manual_seed(seed + (self.world.rank << 32))  # e.g. dropout: its own per process
        self.epoch_started = time.perf_counter()
        self.model.train()
        if isinstance(self.model, Freezable):
            self.model.set_trainable(self.phase.freeze)  # frozen BatchNorm layers back to eval
        loss_sum = correct = seen = 0.0
        steps = progress_bar(
            self.batches.epoch(seed, index=self.epoch),
            total=len(self.batches),
            desc=f"{self.phase.name} {self.epoch + 1}/{self.epochs}",
        )
        for i, (x, y) in enumerate(steps):
            self.step = self.epoch * self.steps_per_epoch + i  # steps done in this phase
            if self.step >= self.horizon:  # a fractional last epoch
                break
            scale = self.world.size * self.batches.share(i)  # exactly 1.0 in a world of one
            with CTRL_C.deferred():  # Ctrl-C lands between steps, never inside one
                loss, logits = train_step(
                    self.net, self.opt, x, y, self.bf16, self.loss_fn, scale, self.phase.accumulate
                )
            self.sched.step()
            self.step += 1
            self.emit("step_end")
            loss_sum += loss.detach() * len(x)  # summed on the device: no GPU sync per step
            correct += (logits.argmax(1) == y.argmax(1)).sum()
            seen += len(x)
            if i % 16 == 0:
                steps.set_postfix(
                    loss=f"{float(loss_sum) / seen:.3f}",
                    acc=f"{float(correct) / seen:.3f}",
                    refresh=False,
                )
        steps.close()
        self.train_seconds = time.perf_counter() - self.epoch_started
        loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen])  # all images
        self.train_loss, self.train_accuracy = loss_sum / seen, correct / seen
        self.seen = seen

    def _predict_val(self, model: torch.nn.Module):
        """Each process predicts its share of the validation images; all get all of them."""
        probs = predict_probs(model, self.val_loader, 0, self.bf16, desc="validating")
        return distributed.gather_rows(probs, len(self.val_set))

    def scored_model(self) -> torch.nn.Module:
        model = self.model
        for callback in self.callbacks:
            model = callback.scored_model(model)
        return model

    def _validate(self) -> None:
        """Plain validation of the scored weights (TTA is for the final scoring)."""
        self.scored = self.scored_model()
        distributed.sync_from_main(self.scored)  # rank 0's weights are the ones validated
        self.val = metrics(self.val_probs(self.scored), self.val_set.labels, self.classes)
        self.row = {
            "phase": self.phase.name,
            "epoch": self.epoch + 1,
            "step": len(self.state["history"]) + 1,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "val_loss": self.val["loss"],
            "val_accuracy": self.val["accuracy"],
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - self.epoch_started + self.pending_seconds,
            "train_images_per_s": self.seen / self.train_seconds,
        }
        self.pending_seconds = 0.0
        self.improved = self.val["accuracy"] > self.state["best"]
        if self.improved:
            self.state["best"] = self.val["accuracy"]

    def _agree(self) -> None:
        """Under DDP: rank 0's decisions of this epoch (stop the phase or the run, a new plan)
        on every process: they depend on its clock and its callbacks, and must not diverge."""
        if not self.world.active:
            return
        said = distributed.broadcast(
            {
                "stop": [self.stop_phase, self.stop_run],
                "horizon": self.horizon,
                "recipe": self.recipe,
            }
        )
        self.stop_phase, self.stop_run = said["stop"]
        if not self.world.main and (said["horizon"], said["recipe"]) != (self.horizon, self.recipe):
            self.replan(said["recipe"], said["horizon"])

    def _advance(self) -> None:
        """Record the epoch in the run's state (what last.pt saves) after the decisions."""
        self.row["planned_epochs"] = self.phase.epochs  # re-plans show in the history
        self.state["history"].append(self.row)
        self.phase_done = self.epoch + 1 >= self.epochs or self.stop_phase or self.stop_run
        self.state["epoch"] = 0 if self.phase_done else self.epoch + 1
        self.state["phase"] = self.phase_index + (1 if self.phase_done else 0)

    # -- for callbacks ------------------------------------------------------------------------
    def replan(self, recipe: dict, horizon: int) -> None:
        """Adopt a new plan (a budget re-plan): the recipe with new epochs, and the current
        phase's new length in steps; config.yaml is rewritten when the plan changed."""
        if recipe != self.recipe and self.world.main:
            self.run.write_recipe(recipe)
        self.recipe, self.phases = recipe, config.phases(recipe)
        self.phase = self.phases[self.phase_index]
        self.horizon = horizon
        self.warmup = int(self.phase.warmup_epochs * self.steps_per_epoch)

    def training_state(self) -> dict:
        """What last.pt holds: enough to resume exactly after the last finished epoch, and
        `scored`: the weights validated this epoch where a callback supplies other ones (EMA),
        so that an interrupted run is scored as it was validated."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "callbacks": {c.name: c.state_dict() for c in self.callbacks},
            "state": self.state,
            "rng": {"torch": torch.get_rng_state()},
        }
        if self.scored is not self.model:
            state["scored"] = self.scored.state_dict()
        return state
