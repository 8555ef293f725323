"""The optional hooks a model may offer the training loop. A model is any `nn.Module`
mapping a normalised batch (N, 3, H, W) to logits (N, classes); these add to that:

- `init_from_data(images)`: data-dependent initialisation, called once on up to 5,000
  un-augmented training images before the first step (FastNet: its whitening filters).
- `set_trainable(policy)`: the phase's `freeze` policy (none, head, conv-only, last-N); also
  called at every epoch's start, so frozen BatchNorm layers stay in eval mode.
- `param_groups(phase)`: optimizer parameter groups for a `config.Phase` (per-stage LR,
  scoped weight decay); without it, one group of the trainable parameters.
- `features(x)` and `head`: backbone features and the module that classifies them, so that a
  frozen-backbone phase can train the head on cached features.
- `cam_layer()`: the module whose output (N, C, h, w) explanations weigh (Grad-CAM): the
  last spatial feature map before the model pools it away.

The loop asks `isinstance(model, Freezable)` and so on: a model offers a hook by defining it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class DataInit(Protocol):
    def init_from_data(self, images: torch.Tensor) -> None: ...


@runtime_checkable
class Freezable(Protocol):
    def set_trainable(self, policy: str) -> None: ...


@runtime_checkable
class HasParamGroups(Protocol):
    def param_groups(self, phase) -> list[dict]: ...


@runtime_checkable
class Backbone(Protocol):
    head: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class HasCamLayer(Protocol):
    def cam_layer(self) -> nn.Module: ...
