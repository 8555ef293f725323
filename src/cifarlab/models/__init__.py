"""Models: a registry from a recipe's `model.name` to a builder (`registry.py`), the optional
hooks a model may offer the loop (`protocol.py`), and one file per model family. Adding a model
is one file with a `@register_model` builder (see docs/architecture.md)."""

from __future__ import annotations

from cifarlab.models.registry import (
    CIFAR_MEAN,
    CIFAR_STD,
    build_model,
    count_parameters,
    load_model,
    model_label,
    register_model,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "build_model",
    "count_parameters",
    "load_model",
    "model_label",
    "register_model",
]
