"""The console: one line per epoch, and the whole run's line (epochs left, time left, the
finish clock time) before the first epoch and after each."""

from __future__ import annotations

import time

from cifarlab.core.log import log
from cifarlab.core.runtime import Choice
from cifarlab.data.dataset import ImageSet
from cifarlab.training.events import Callback


class Console(Callback):
    name = "console"

    def __init__(self, epoch_seconds: list[float], estimated: bool):
        self.epoch_seconds, self.estimated = epoch_seconds, estimated

    def on_fit_start(self, t) -> None:
        self.clock = RunClock(t.phases, self.epoch_seconds, t.state["history"], self.estimated)
        log(self.clock.line())

    def on_epoch_end(self, t) -> None:
        row, val = t.row, t.val
        log(
            f"{t.phase.name} {t.epoch + 1:>3}/{t.epochs}  loss {row['train_loss']:.4f}  "
            f"acc {row['train_accuracy']:.4f}  val_loss {val['loss']:.4f}  "
            f"val_acc {val['accuracy']:.4f}  {row['seconds']:.1f}s  "
            f"{row['train_images_per_s']:.0f} img/s{'  *' if t.improved else ''}"
        )
        if not (t.phase_done and t.phase_index == len(t.phases) - 1):
            log(self.clock.line(t.phases))
        if t.stop_phase:
            log(f"early stopping: no better val accuracy for {t.phase.early_stopping} epochs")


def estimate_epoch_seconds(
    choice: Choice, phases: list, train_set: ImageSet, val_set: ImageSet
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

    def line(self, phases: list | None = None) -> str:
        phases = phases or self.phases
        done = {p.name: 0 for p in phases}
        for row in self.history:
            done[row["phase"]] = row["epoch"]
        left = [max(0.0, p.epochs - done.get(p.name, 0)) for p in phases]
        total = sum(p.epochs for p in phases)
        seconds = []
        for i, p in enumerate(phases):
            rows = [r["seconds"] for r in self.history if r["phase"] == p.name]
            measured = rows[1:] or rows  # the median after the first (which holds one-off
            if measured:  # costs) once there are two; the first beats the plan's estimate
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
        return f"{head}, about {duration(remaining)} left{how}, finishing about {finish}"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
