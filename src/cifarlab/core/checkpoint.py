"""Checkpoints that describe themselves and load with `torch.load(weights_only=True)`.

- model checkpoint (`best.pt`): weights + the recipe's model section + class names + preprocessing;
  enough to rebuild and use the model with nothing else.
- training state (`last.pt`): model, optimizer, scheduler, EMA, RNG states, phase, epoch, history;
  enough to resume a killed run exactly where its last finished epoch left off.
Both are written to a temporary file and renamed into place, so a kill never leaves half a file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cifarlab.core.errors import UserError
from cifarlab.core.files import atomic_save
from cifarlab.core.version import __version__

FORMAT = "cifarlab-checkpoint"


def save_model(
    path: Path,
    model: nn.Module,
    model_spec: dict,
    classes: list[str],
    preprocess: dict,
    metrics: dict | None = None,
    trained_in: dict | None = None,
) -> None:
    """A self-describing model file; `trained_in` ({precision, memory_format}: what the run
    decided) is what inference follows by default, so predictions match the run's metrics."""
    atomic_save(
        {
            "format": FORMAT,
            "version": 1,
            "cifarlab_version": __version__,
            "model": model_spec,
            "classes": list(classes),
            "preprocess": preprocess,
            "metrics": metrics or {},
            "trained_in": trained_in or {},
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def read(path: Path) -> dict:
    """Load any cifarlab checkpoint file safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass a run directory or a .pt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(
            f"{path} is not a readable cifarlab checkpoint ({type(e).__name__}); "
            "pass best.pt from a run directory"
        ) from None


def resolve_path(path: str | Path) -> Path:
    """A run directory means its best.pt."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise UserError(f"{path} has no best.pt; is it a finished cifarlab run directory?")
        return path / "best.pt"
    return path
