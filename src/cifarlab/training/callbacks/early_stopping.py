"""Recipe key `early_stopping: N`: end a phase after N epochs without a better validation
accuracy (than any epoch of the run so far); 0 = never."""

from __future__ import annotations

from cifarlab.training.events import Callback


class EarlyStopping(Callback):
    name = "early_stopping"

    def __init__(self):
        self.stale = 0

    def on_phase_start(self, t) -> None:
        self.stale = 0

    def on_validation_end(self, t) -> None:
        self.stale = 0 if t.improved else self.stale + 1
        if t.phase.early_stopping and self.stale >= t.phase.early_stopping:
            t.stop_phase = True

    def state_dict(self) -> dict:
        return {"stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.stale = int(state.get("stale", 0))
