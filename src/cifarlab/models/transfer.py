"""Transfer learning: a timm backbone (pretrained weights from `models.pretrained`) plus a dense
head, with the freeze policies and per-stage learning rates that multi-phase recipes ask for.

Freeze policies (recipe key `train.freeze`; they name what trains):

- `none` (or `all`): every parameter trains.
- `head`: only the head trains; the whole backbone is frozen and in eval mode, so its output
  is a fixed function of the input (what the feature cache relies on).
- `conv-only`: the head and the backbone's convolution weights train; BatchNorm (and every other
  non-conv layer of the backbone) stays frozen and BatchNorm runs in eval mode (the seed's phase 2).
- `last-N`: the head and the last N stages of the backbone train (stages as timm groups them:
  stem, then each stage of blocks); `last-0` is `head`.

Rule for modes: after `model.train()`, `set_trainable` puts every module whose parameters are all
frozen back in eval mode, so frozen BatchNorm layers keep their ImageNet statistics.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from cifarlab.core.errors import UserError
from cifarlab.core.log import log
from cifarlab.models.registry import register_model

MODEL_ARGS = {
    "arch": "timm architecture name (timm.list_models())",
    "head": "widths of the dense layers before the classifier, e.g. [256, 128, 64]; [] = linear",
    "dropout": "dropout after each dense layer (and before a linear classifier)",
    "drop_path": "stochastic depth rate of the backbone",
    "pretrained_source": "auto | hub | file | lite-pypi | none",
    "weights": "local weights file for pretrained_source file/auto",
    "url": "download URL for pretrained_source hub",
    "interpolation": "resize mode (default: the weights' own, e.g. bicubic)",
    "resize_steps": "intermediate sizes before input_size, e.g. [64] for the seed's 32->64->224",
}
WEIGHT_DECAY_SCOPES = ("all", "weights", "head")
_LAST_N = re.compile(r"^last-(\d+)$")


def dense_head(
    in_features: int, widths: list[int], dropout: float, num_classes: int
) -> nn.Sequential:
    """Dense(w) -> BatchNorm -> ReLU -> Dropout for each width, then the classifier."""
    layers: list[nn.Module] = []
    c = in_features
    for w in widths:
        layers += [
            nn.Linear(c, w, bias=False),
            nn.BatchNorm1d(w),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        ]
        c = w
    if not widths and dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c, num_classes))
    return nn.Sequential(*layers)


class TransferNet(nn.Module):
    """`backbone` (a headless timm model returning pooled features) followed by `head`."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.stage_of = backbone_stages(backbone)  # backbone parameter name -> stage index
        self.num_stages = max(self.stage_of.values(), default=-1) + 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, backbone.num_features): the head's input."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def cam_layer(self) -> nn.Module:
        """The module timm names as the backbone's last feature stage (`feature_info`)."""
        return self.backbone.get_submodule(self.backbone.feature_info[-1]["module"])

    def set_trainable(self, policy: str) -> None:
        """Apply a freeze policy: requires_grad per parameter, and eval mode for frozen modules."""
        trainable = self._trainable(policy)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(trainable(name))
        for p in self.head.parameters():
            p.requires_grad_(True)
        if self.training:
            for m in self.backbone.modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()

    def _trainable(self, policy: str):
        if policy in ("none", "all"):
            return lambda name: True
        if policy == "head":
            return lambda name: False
        if policy == "conv-only":
            conv = {
                f"{m_name}.{p_name}"
                for m_name, m in self.backbone.named_modules()
                if isinstance(m, nn.Conv2d)
                for p_name, _ in m.named_parameters(recurse=False)
            }
            return lambda name: name in conv
        match = _LAST_N.match(str(policy))
        if match:
            first = self.num_stages - int(match.group(1))
            return lambda name: self.stage_of.get(name, self.num_stages - 1) >= first
        raise UserError(
            f"unknown freeze policy {policy!r}; use none, all, head, conv-only or last-N "
            f"(N = backbone stages left trainable, this backbone has {self.num_stages})"
        )

    def param_groups(self, phase) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters: the phase's lr scaled by
        `layer_decay` per stage below the head, weight decay where `weight_decay_scope` says."""
        lr, wd = phase.lr, phase.weight_decay
        decay, scope = phase.layer_decay, phase.weight_decay_scope
        if scope not in WEIGHT_DECAY_SCOPES:
            raise UserError(
                f"unknown weight_decay_scope {scope!r}; use {', '.join(WEIGHT_DECAY_SCOPES)}"
            )
        if decay is not None and not 0 < float(decay) <= 1:
            raise UserError(f"layer_decay must be in (0, 1] or null, got {decay!r}")
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            in_head = name.startswith("head.")
            depth = (
                self.num_stages
                if in_head
                else self.stage_of.get(name.removeprefix("backbone."), self.num_stages - 1)
            )
            scale = float(decay) ** (self.num_stages - depth) if decay else 1.0
            decays = scope == "all" or (p.ndim >= 2 and (scope == "weights" or in_head))
            groups.setdefault((scale, wd if decays else 0.0), []).append(p)
        return [
            {"params": params, "lr": lr * scale, "weight_decay": g_wd}
            for (scale, g_wd), params in groups.items()
        ]


def backbone_stages(backbone: nn.Module) -> dict[str, int]:
    """Parameter name -> stage index (0 = stem), by timm's coarse grouping of the model."""
    names = [n for n, _ in backbone.named_parameters()]
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        return dict.fromkeys(names, 0)
    from timm.models import group_parameters

    return group_parameters(backbone, matcher(coarse=True), reverse=True)


def build_transfer(
    args: dict[str, Any], num_classes: int, input_size: int | str, pretrained: bool = True
) -> tuple[TransferNet, dict]:
    """A TransferNet from a recipe's model arguments, and its preprocessing (the weights' own
    mean/std and interpolation; `input_size: auto` = the weights' native size)."""
    import timm  # 1.2 s to import: only when a recipe uses it

    from cifarlab.models.pretrained import load_pretrained, preprocess_config

    unknown = set(args) - set(MODEL_ARGS)
    if unknown:
        raise UserError(
            f"unknown model argument(s) {sorted(unknown)} for name: timm; use "
            + ", ".join(MODEL_ARGS)
        )
    arch = args.get("arch")
    if not arch or not timm.is_model(arch):
        raise UserError(
            f"model.arch {arch!r} is not a timm architecture; e.g. resnet50, efficientnet_b0, "
            "tf_efficientnet_lite0 (see timm.list_models())"
        )
    source = args.get("pretrained_source") or "auto"
    cfg = preprocess_config(arch, source)
    size = cfg["input_size"][-1] if input_size in (None, "auto") else int(input_size)
    drop_path = float(args.get("drop_path") or 0)
    try:  # dropout belongs to the head: none inside the backbone
        backbone = timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            drop_rate=0.0,
            **({"drop_path_rate": drop_path} if drop_path else {}),  # not every arch has it
        )
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise
        raise UserError(
            f"model.drop_path: {arch} has no stochastic depth (timm's drop_path_rate); "
            "set model.drop_path: 0"
        ) from None
    head = dense_head(
        backbone.num_features,
        list(args.get("head") or []),
        float(args.get("dropout") or 0),
        num_classes,
    )
    if pretrained:
        report = load_pretrained(backbone, arch, source, args.get("weights"), args.get("url"))
        log(report.summary())
    preprocess = {
        "input_size": size,
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": args.get("interpolation") or cfg["interpolation"],
        "resize_steps": [int(s) for s in args.get("resize_steps") or []],
    }
    if preprocess["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        raise UserError(
            f"interpolation {preprocess['interpolation']!r}: use bilinear, bicubic or nearest"
        )
    return TransferNet(backbone, head), preprocess


@register_model("timm", label=lambda spec: str(spec.get("arch") or "timm"))
def build(args: dict, num_classes: int, input_size, pretrained: bool):
    return build_transfer(args, num_classes, input_size, pretrained)
