"""`--budget`: after each epoch, the plan is corrected by the epochs as they were really timed
(`budget.Plan.replan`), so that the run still ends on time."""

from __future__ import annotations

import time

from cifarlab.core.log import log
from cifarlab.training.budget import Plan
from cifarlab.training.events import Callback


class Replan(Callback):
    name = "replan"

    def __init__(self, plan: Plan, started: float):
        self.plan, self.started = plan, started  # started: perf_counter() at the run's start

    def on_validation_end(self, t) -> None:
        if t.stop_phase:  # a phase that stops early needs no new length
            return
        recipe, horizon = self.plan.replan(
            t.recipe,
            t.phase_index,
            t.epoch + 1,
            t.steps_per_epoch,
            t.state["history"] + [t.row],
            time.perf_counter() - self.started,
            log,
            one_off_first=t.first_epoch_one_off,
        )
        t.replan(recipe, horizon)
