"""Predicted probabilities of a model over a loader, with optional test-time augmentation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.core.progress import bar
from cifarlab.data.loader import BatchLoader

TTA_NAMES = {0: "none", 1: "mirror", 2: "mirror + 1-pixel shifts"}  # the levels of `tta_views`


def tta_views(x: torch.Tensor, level: int) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of a normalised batch for test-time augmentation: level 0 the batch
    itself, 1 adds its mirror image, 2 also the mirrored pair shifted one pixel up-left and one
    down-right (reflected borders). Weights sum to 1: half on the unshifted pair."""
    views = [(1.0, x)] if level <= 0 else [(0.5, x), (0.5, x.flip(3))]
    if level >= 2:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        views = [(wt / 2, v) for wt, v in views]
        views += [(0.125, v) for s in shifted for v in (s, s.flip(3))]
    return views


def image_views(images: np.ndarray, level: int) -> list[tuple[float, np.ndarray]]:
    """`tta_views` of uint8 images (N, H, W, 3): the same views with the same weights (a flip and a
    reflected 1-pixel shift commute with normalisation, so scoring them matches training's)."""
    if level <= 0:
        return [(1.0, images)]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return [
        (w, np.ascontiguousarray(v.permute(0, 2, 3, 1).to(torch.uint8).numpy()))
        for w, v in tta_views(x, level)
    ]


@torch.no_grad()
def predict_probs(
    model, loader: BatchLoader, tta: int = 0, bf16: bool = False, desc: str = "scoring"
) -> np.ndarray:
    """Softmax probabilities for every image the loader serves, in order; `tta` (a level, see
    `tta_views`; True = 1) averages the predictions of each image's views. `desc` names the
    progress bar (shown on a terminal)."""
    model.eval()
    out = []
    for x, _ in bar(loader.epoch(), total=len(loader), desc=desc, unit="batch"):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            p = sum(wt * F.softmax(model(v).float(), dim=1) for wt, v in tta_views(x, int(tta)))
        out.append(p.float().cpu())
    return torch.cat(out).numpy()
