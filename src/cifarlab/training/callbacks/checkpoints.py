"""The run's checkpoints: `best.pt` whenever the validation accuracy improves, `phaseN.pt` at
the end of each phase of a multi-phase recipe (e.g. for `compare`), and `last.pt` (the whole
training state, for an exact resume) after every epoch. All written atomically."""

from __future__ import annotations

from cifarlab.core import checkpoint
from cifarlab.training.events import Callback


class Checkpoints(Callback):
    name = "checkpoints"

    def on_epoch_end(self, t) -> None:
        metrics = {"val_accuracy": t.val["accuracy"], "phase": t.phase.name, "epoch": t.epoch + 1}
        spec = (t.recipe["model"], t.classes, t.preprocess, metrics, t.trained_in)
        if t.improved:
            checkpoint.save_model(t.run.best, t.scored, *spec)
        if t.phase_done and len(t.phases) > 1:
            checkpoint.save_model(t.run.phase_checkpoint(t.phase_index), t.scored, *spec)
        t.run.save_state(t.training_state())
