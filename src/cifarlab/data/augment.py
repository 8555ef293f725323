"""Batch augmentation on tensors, on the device where training runs.

Every op takes a float batch (N, C, H, W) in [0, 1] and a torch.Generator, so a fixed seed gives
the same augmentation stream. Nothing here loops over images in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifarlab.core.errors import UserError


@dataclass
class AugmentConfig:
    flip: bool | str = False  # horizontal flip: true = at random; "alternate" = each image every
    # other epoch, starting from a random half (more distinct views in few epochs; airbench)
    rotate: float = 0.0  # max degrees either way (Keras RandomRotation(0.1) = 36 degrees)
    zoom: float = 0.0  # max relative zoom either way (Keras RandomZoom(0.1) = 0.1)
    translate: int = 0  # max pixels of shift: reflect-pad then random crop
    brightness: float = 0.0  # max additive change, in [0, 1] units
    contrast: float = 0.0  # max relative change of contrast
    cutout: int = 0  # side in pixels of one square erased per image
    mixup: float = 0.0  # Beta(alpha, alpha) for MixUp; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed (when mixup or cutmix is on)

    def __post_init__(self):
        if self.flip not in (True, False, "alternate"):
            raise UserError(f"augment.flip is {self.flip!r}; use true, false or alternate")


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def flip(x: torch.Tensor, g: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror the images where `mask` is set (default: a random half)."""
    if mask is None:
        mask = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def rotate_zoom(x: torch.Tensor, degrees: float, zoom: float, g: torch.Generator) -> torch.Tensor:
    """Random rotation and zoom with reflected borders (as Keras' fill_mode='reflect')."""
    n = x.shape[0]
    angle = _uniform(n, -degrees, degrees, g, x.device) * (math.pi / 180)
    scale = 1 + _uniform(n, -zoom, zoom, g, x.device)  # >1 zooms out, <1 zooms in
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def translate(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `pad` and take a random crop of the original size from each image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float, g: torch.Generator):
    n = x.shape[0]
    if contrast:
        factor = 1 + _uniform(n, -contrast, contrast, g, x.device)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor + mean
    if brightness:
        x = x + _uniform(n, -brightness, brightness, g, x.device)[:, None, None, None]
    return x.clamp(0, 1)


def _boxes(n: int, h: int, w: int, side_h, side_w, g, device) -> torch.Tensor:
    """Boolean (N, 1, H, W) masks of boxes of the given sides centred at random points."""
    cy = torch.randint(0, h, (n,), generator=g, device=device)[:, None, None]
    cx = torch.randint(0, w, (n,), generator=g, device=device)[:, None, None]
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, None, :]
    inside = ((ys - cy).abs() * 2 < side_h) & ((xs - cx).abs() * 2 < side_w)
    return inside[:, None]


def cutout(x: torch.Tensor, side: int, g: torch.Generator) -> torch.Tensor:
    mask = _boxes(x.shape[0], x.shape[2], x.shape[3], side, side, g, x.device)
    return x.masked_fill(mask, 0.5)


def mix(x, y_soft, cfg: AugmentConfig, g: torch.Generator):
    """MixUp or CutMix (chosen at random when both are on) with a shuffled copy of the batch."""
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or _coin(g) < 0.5)
    lam = _beta(cfg.cutmix if use_cutmix else cfg.mixup, g)
    perm = torch.randperm(x.shape[0], generator=g, device=x.device)
    if use_cutmix:
        h, w = x.shape[2], x.shape[3]
        cut = math.sqrt(1 - lam)
        mask = _boxes(1, h, w, cut * h, cut * w, g, x.device)
        x = torch.where(mask, x[perm], x)
        lam = 1 - mask.float().mean().item()
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * y_soft + (1 - lam) * y_soft[perm]


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) sample drawn from the generator (torch.distributions ignores generators)."""
    a = torch._standard_gamma(torch.full((2,), float(alpha), device=g.device), generator=g)
    return float(a[0] / a.sum())


def _coin(g: torch.Generator) -> float:
    return torch.rand(1, generator=g, device=g.device).item()


def augment(
    x: torch.Tensor,
    y_soft: torch.Tensor,
    cfg: AugmentConfig,
    g: torch.Generator,
    flip_mask: torch.Tensor | None = None,
):
    """Apply the configured ops to a float batch in [0, 1] with soft (one-hot) targets;
    `flip_mask` says which images to mirror when flipping is not random."""
    if cfg.flip:
        x = flip(x, g, flip_mask)
    if cfg.translate:
        x = translate(x, cfg.translate, g)
    if cfg.rotate or cfg.zoom:
        x = rotate_zoom(x, cfg.rotate, cfg.zoom, g)
    if cfg.brightness or cfg.contrast:
        x = brightness_contrast(x, cfg.brightness, cfg.contrast, g)
    if cfg.cutout:
        x = cutout(x, cfg.cutout, g)
    if (cfg.mixup or cfg.cutmix) and _coin(g) < cfg.mix_prob:
        x, y_soft = mix(x, y_soft, cfg, g)
    return x, y_soft
