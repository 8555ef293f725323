"""Model registry: a recipe's `model` section -> an nn.Module and its preprocessing."""

from __future__ import annotations

from typing import Any

from torch import nn

from cifarlab.core.errors import UserError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def build_model(
    spec: dict[str, Any], num_classes: int, image_size: int, pretrained: bool = True
) -> tuple[nn.Module, dict]:
    """Build the model a recipe names. Returns (model, preprocess) where preprocess holds the
    input_size the model expects and the normalisation mean/std. `pretrained=False` skips loading
    pretrained weights (a checkpoint rebuilding its own architecture)."""
    args = {k: v for k, v in spec.items() if k not in ("name", "input_size", "mean", "std")}
    name = spec["name"]
    input_size = spec.get("input_size") or image_size
    preprocess = {"input_size": input_size, "mean": CIFAR_MEAN, "std": CIFAR_STD}
    if name == "seed_cnn":
        from cifarlab.models.seed_cnn import SeedCNN

        model = SeedCNN(num_classes, image_size=input_size, **_tuples(args))
    elif name == "fastnet":
        from cifarlab.models.fastnet import FastNet

        model = FastNet(num_classes, **_tuples(args))
    elif name == "timm":
        from cifarlab.models.transfer import build_transfer

        model, preprocess = build_transfer(args, num_classes, input_size, pretrained)
    else:
        raise UserError(f"unknown model {name!r} in recipe; use seed_cnn, fastnet or timm")
    for key in ("mean", "std"):
        if spec.get(key) not in (None, "auto"):
            preprocess[key] = tuple(spec[key])
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess.items()}
    return model, preprocess


def _tuples(args: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
