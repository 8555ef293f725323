"""A from-scratch CIFAR network built for accuracy per FLOP, after the ideas of the fastest
published CIFAR-10 trainings (Page's Myrtle ResNet, hlb-CIFAR10, Jordan's airbench, 2404.00498):

- a frozen first layer that whitens 2x2 patches (its filters are the eigenvectors of the patch
  covariance of the training images, and their negatives), so the net starts from decorrelated input;
- three blocks of conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU (`depth` convolutions per
  block, 2 by default), widths growing fast;
- BatchNorm without a learned scale, with a high momentum suited to short training;
- global max pooling and a linear classifier with a small output scale;
- a much larger learning rate for the BN biases than for the filters (`bias_lr_scale`).

On a CPU it trains fastest in channels_last with bf16 autocast (oneDNN's NHWC convolutions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.models.registry import register_model


class BatchNorm(nn.BatchNorm2d):
    """BN with a learned shift only (a learned scale adds nothing before GELU + next BN)."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


def conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)


class Block(nn.Sequential):
    """conv -> max-pool -> BN -> GELU, then `depth - 1` times conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, depth: int = 2):
        layers = [conv(c_in, c_out), nn.MaxPool2d(2), BatchNorm(c_out), nn.GELU()]
        for _ in range(depth - 1):
            layers += [conv(c_out, c_out), BatchNorm(c_out), nn.GELU()]
        super().__init__(*layers)


class FastNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int] = (64, 256, 256),
        depth: int = 2,
        whiten_width: int = 24,
        whiten_kernel: int = 2,
        scale: float = 1 / 9,
        bias_lr_scale: float = 64.0,
    ):
        super().__init__()
        self.whiten = nn.Conv2d(3, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.blocks = nn.Sequential(
            *(Block(c, w, depth) for c, w in zip([whiten_width, *widths[:-1]], widths, strict=True))
        )
        self.classifier = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = scale
        self.bias_lr_scale = bias_lr_scale
        for m in self.blocks.modules():
            if isinstance(m, nn.Conv2d):  # the first in_channels filters start as identity maps
                with torch.no_grad():
                    nn.init.dirac_(m.weight[: m.in_channels])

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from training images (normalised float, N x 3 x H x W)."""
        k = self.whiten.kernel_size[0]
        patches = images.unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).view(-1, 3, k, k)
        half = self.whiten.out_channels // 2
        filters = filters.flip(0)[:half].float()  # the strongest directions first
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def param_groups(self, phase) -> list[dict]:
        """BN biases at bias_lr_scale times the phase's LR, with weight decay scaled down by the
        same factor (so every parameter decays at the same rate per step); the rest at the LR."""
        bn_biases = [m.bias for m in self.modules() if isinstance(m, BatchNorm)]
        chosen = {id(p) for p in bn_biases}
        scale = self.bias_lr_scale
        return [
            {"params": [p for p in self.parameters() if p.requires_grad and id(p) not in chosen]},
            {
                "params": bn_biases,
                "lr": phase.lr * scale,
                "weight_decay": phase.weight_decay / scale,
            },
        ]

    def cam_layer(self) -> nn.Module:
        """The last block, whose map the classifier max-pools: the evidence the prediction is
        made of. Its map is 3 x 3 at 32 px, so heatmaps are coarse; on CIFAR-10 they sit on
        the object (an earlier block's 7 x 7 map was finer but looked at the background)."""
        return self.blocks[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.blocks(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.classifier(x) * self.scale


@register_model("fastnet", label="FastNet")
def build(args: dict, num_classes: int, input_size: int, pretrained: bool):
    return FastNet(num_classes, **args), {}
