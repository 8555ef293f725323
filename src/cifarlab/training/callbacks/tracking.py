"""MLflow (or any tracker with start / log_metrics / finish): the run's recipe once the plan is
known, each epoch's metrics, and at the end the final scores, files and model."""

from __future__ import annotations

from cifarlab.training.events import Callback

NOT_LOGGED = ("planned_epochs",)  # in history.csv; the recipe's epochs are logged as params


class Tracking(Callback):
    name = "tracking"

    def __init__(self, tracker):
        self.tracker = tracker

    def on_fit_start(self, t) -> None:
        self.tracker.start(t.recipe, t.run.path)

    def on_epoch_end(self, t) -> None:
        values = {k: v for k, v in t.row.items() if isinstance(v, float) and k not in NOT_LOGGED}
        self.tracker.log_metrics(values, len(t.state["history"]))

    def on_fit_end(self, t, result: dict) -> None:
        self.tracker.finish(result, t.run.path)
