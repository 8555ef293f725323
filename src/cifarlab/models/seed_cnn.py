"""The seed notebook's custom CNN: Conv2D stacks with BatchNorm and max pooling, a dense head with Dropout."""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.models.registry import register_model


def conv_bn(c_in: int, c_out: int, batchnorm: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm),
        nn.BatchNorm2d(c_out) if batchnorm else nn.Identity(),
        nn.ReLU(inplace=True),
    )


class SeedCNN(nn.Module):
    """`widths` blocks of `convs_per_block` 3x3 conv+BN+ReLU, each block ending in 2x2 max pooling,
    then flatten -> Dense(dense) + BN + ReLU -> Dropout -> Dense(num_classes) (softmax in the loss).
    `batchnorm: false` drops the BatchNorm layers (an ablation; and a network whose result does
    not depend on how a batch is split between processes)."""

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        widths: tuple[int, ...] = (32, 64, 128),
        convs_per_block: int = 2,
        dense: int = 256,
        dropout: float = 0.5,
        block_dropout: float = 0.0,
        batchnorm: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            for _ in range(convs_per_block):
                layers.append(conv_bn(c, w, batchnorm))
                c = w
            layers.append(nn.MaxPool2d(2))
            if block_dropout:
                layers.append(nn.Dropout(block_dropout))
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * side * side, dense, bias=not batchnorm),
            nn.BatchNorm1d(dense) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def cam_layer(self) -> nn.Module:
        """The last conv + BN + ReLU: the finest map that has seen the whole image's context
        (before the last pooling; 8 x 8 at 32 px with three blocks)."""
        return [m for m in self.features if isinstance(m, nn.Sequential)][-1]


@register_model("seed_cnn", label="Custom CNN")
def build(args: dict, num_classes: int, input_size: int, pretrained: bool):
    return SeedCNN(num_classes, image_size=input_size, **args), {}
