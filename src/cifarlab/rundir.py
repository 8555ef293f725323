"""A run directory: the one owner of its file names, and of how each file is read and written.

    config.yaml      the resolved recipe the run trains (rewritten when a budget re-plans)
    history.csv      one row per finished epoch
    last.pt          training state after the last finished epoch (resume)
    best.pt          the best epoch's model (self-describing, see `checkpoint`)
    phaseN.pt        each phase's final model, in multi-phase recipes
    metrics.json     final scores; `{val,test}_probs.npy` their probabilities
    curves.png, confusion.png, report.html

Every write is atomic (a temporary file renamed into place): a kill never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab import config
from cifarlab.core import checkpoint
from cifarlab.core.errors import UserError
from cifarlab.core.files import atomic_save, atomic_write_text

TEXT_COLUMNS = ("phase",)
INT_COLUMNS = ("epoch", "step")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.history = self.path / "history.csv"
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self.metrics = self.path / "metrics.json"
        self.report = self.path / "report.html"
        self.curves = self.path / "curves.png"
        self.confusion = self.path / "confusion.png"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # a RunDir is accepted wherever a path is
        return str(self.path)

    def phase_checkpoint(self, phase: int) -> Path:
        """The final model of phase `phase` (0-based) of a multi-phase run."""
        return self.path / f"phase{phase + 1}.pt"

    def artifacts(self) -> list[Path]:
        """The files a tracker records (the model is logged on its own): recipe, history,
        metrics, report and every plot."""
        files = [self.config, self.history, self.metrics, self.report]
        return [p for p in files if p.is_file()] + sorted(self.path.glob("*.png"))

    def probs_path(self, split: str) -> Path:
        return self.path / f"{split}_probs.npy"

    # -- state -------------------------------------------------------------------------------
    def resumable(self) -> bool:
        return self.last.is_file() and self.config.is_file()

    def finished(self) -> bool:
        return self.metrics.is_file()

    # -- the recipe --------------------------------------------------------------------------
    def write_recipe(self, recipe: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config.dump(recipe))

    def recipe(self, overrides: dict[str, Any] | None = None) -> dict:
        """The resolved recipe the run was trained with."""
        if not self.config.is_file():
            raise UserError(f"{self.path} has no config.yaml; pass a cifarlab run directory")
        return config.resolve(
            config.read_yaml(self.config.read_text(), str(self.config)), overrides
        )

    def recipe_text(self) -> str:
        return self.config.read_text() if self.config.is_file() else ""

    # -- history -----------------------------------------------------------------------------
    def write_history(self, rows: list[dict]) -> None:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.history, text.getvalue())

    def read_history(self) -> list[dict]:
        """history.csv as rows of numbers (`phase` a name, `epoch`/`step` integers)."""
        if not self.history.is_file():
            return []
        with open(self.history, newline="") as f:
            return [{k: _cell(k, v) for k, v in r.items()} for r in csv.DictReader(f)]

    # -- training state ----------------------------------------------------------------------
    def save_state(self, state: dict) -> None:
        atomic_save(state, self.last)

    def read_state(self) -> dict:
        return checkpoint.read(self.last)

    def finished_epochs(self) -> int:
        return len(self.read_state()["state"]["history"])

    # -- results -----------------------------------------------------------------------------
    def write_metrics(self, result: dict) -> None:
        atomic_write_text(self.metrics, json.dumps(result, indent=2))

    def read_metrics(self) -> dict:
        try:
            return json.loads(self.metrics.read_text())
        except json.JSONDecodeError as e:
            raise UserError(
                f"{self.metrics} is not valid JSON ({e}); retrain or restore the file"
            ) from None

    def write_probs(self, split: str, probs: np.ndarray) -> None:
        path = self.probs_path(split)
        tmp = path.with_name(f".{path.stem}.tmp.npy")
        np.save(tmp, probs)
        tmp.replace(path)

    def discard_unstarted(self, existed: bool) -> None:
        """Remove what a run wrote before its first finished epoch (nothing once it has a
        last.pt), and the directory too if this run created it and it is empty."""
        if self.last.is_file():
            return
        for path in (self.config, self.best, self.history):
            path.unlink(missing_ok=True)
        if not existed and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def _cell(key: str, value: str):
    if key in TEXT_COLUMNS:
        return value
    if key in INT_COLUMNS:
        return int(float(value))
    return float(value)
