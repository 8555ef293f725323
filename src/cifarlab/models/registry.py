"""The model registry: a recipe's `model` section -> an nn.Module and its preprocessing.

A builder is registered under the name recipes use (`model.name`):

    @register_model("fastnet", label="FastNet")
    def build(args, num_classes, input_size, pretrained):
        return FastNet(num_classes, **args), {}   # preprocessing keys to override, if any

`args` are the model section's other keys (lists as tuples). The returned preprocessing
updates the default (CIFAR-10 mean/std at `input_size`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cifarlab.core import checkpoint
from cifarlab.core.errors import UserError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NOT_MODELS = ("registry", "protocol", "pretrained")  # modules of models/ that register nothing


@dataclass(frozen=True)
class Entry:
    build: Callable[..., tuple[nn.Module, dict]]
    label: str | Callable[[dict], str]  # for tables: a name, or one from the model section


MODELS: dict[str, Entry] = {}


def register_model(name: str, label: str | Callable[[dict], str] | None = None):
    def add(build):
        MODELS[name] = Entry(build, label or name)
        return build

    return add


def _registry() -> dict[str, Entry]:
    """Every model file of this package, imported on first use (each registers itself)."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in NOT_MODELS and not module.ispkg:
            importlib.import_module(f"cifarlab.models.{module.name}")
    return MODELS


def build_model(
    spec: dict[str, Any], num_classes: int, image_size: int, pretrained: bool = True
) -> tuple[nn.Module, dict]:
    """Build the model a recipe names. Returns (model, preprocess) where preprocess holds the
    input_size the model expects and the normalisation mean/std. `pretrained=False` skips loading
    pretrained weights (a checkpoint rebuilding its own architecture)."""
    models = _registry()
    name = spec["name"]
    if name not in models:
        raise UserError(f"unknown model {name!r} in recipe; use {', '.join(sorted(models))}")
    args = {k: v for k, v in spec.items() if k not in ("name", "input_size", "mean", "std")}
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    input_size = spec.get("input_size") or image_size
    model, own = models[name].build(args, num_classes, input_size, pretrained)
    preprocess = {"input_size": input_size, "mean": CIFAR_MEAN, "std": CIFAR_STD, **own}
    for key in ("mean", "std"):
        if spec.get(key) not in (None, "auto"):
            preprocess[key] = tuple(spec[key])
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess.items()}
    return model, preprocess


def model_label(spec: dict) -> str:
    """How tables and reports name the model of a recipe's `model` section."""
    entry = _registry().get(spec["name"])
    if entry is None:
        return str(spec["name"])
    return entry.label(spec) if callable(entry.label) else entry.label


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint (or run directory). Returns (model in eval mode, info)."""
    ckpt = checkpoint.read(checkpoint.resolve_path(path))
    if ckpt.get("format") != checkpoint.FORMAT:
        raise UserError(
            f"{path} is not a cifarlab model checkpoint; pass best.pt from a run directory"
        )
    model, _ = build_model(
        ckpt["model"], len(ckpt["classes"]), ckpt["preprocess"]["input_size"], pretrained=False
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, info
