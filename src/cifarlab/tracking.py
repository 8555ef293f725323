"""Experiment tracking. The training loop talks to a tracker through four calls; NullTracker
records nothing."""

from __future__ import annotations

from pathlib import Path


class NullTracker:
    def start(self, recipe: dict, out: Path) -> None:
        pass

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def finish(self, result: dict, out: Path) -> None:
        pass
