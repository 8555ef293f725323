"""Class activation maps: where in an image a model found the evidence for a class.

Grad-CAM (Selvaraju et al., 2017): the feature maps A of the model's `cam_layer` (its last
spatial feature map, chosen per model family in models/, see protocol.py), weighted by the
spatial mean of d(class logit)/dA, summed over channels, ReLU, upsampled to the image and
scaled to [0, 1] per image. Grad-CAM++ (Chattopadhay et al., 2018) weights each location's
positive gradient by alpha = g^2 / (2 g^2 + sum(A) g^3), which separates several instances of
a class better. Both are a forward and a backward pass of the batch: as cheap as a training
step without the update.

Why not the `grad-cam` package (pytorch-grad-cam): it depends on opencv-python, scikit-learn and
ttach (~100 MB) for what is here 40 lines of torch; tests/test_explain.py checks this
implementation against a hand-computed case and against an object detector's task.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.core.errors import UserError
from cifarlab.models.protocol import HasCamLayer

METHODS = ("gradcam", "gradcam++")


def cam_layer(model: nn.Module) -> nn.Module:
    """The layer a model family explains with (see models/protocol.py: `cam_layer`)."""
    if not isinstance(model, HasCamLayer):
        raise UserError(
            f"{type(model).__name__} names no layer to explain (models/protocol.py: cam_layer); "
            "explain a seed_cnn, fastnet or timm model"
        )
    return model.cam_layer()


def gradcam(
    net: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    classes: torch.Tensor | None = None,
    method: str = "gradcam",
) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, H, W) in [0, 1] at the input's size, probabilities (N, classes)) of `net` on
    batch `x` for `classes` (default: each image's predicted class). `layer` is a module
    inside `net` whose output is (N, C, h, w)."""
    if method not in METHODS:
        raise UserError(f"unknown explanation method {method!r}; use {' or '.join(METHODS)}")
    seen: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen["a"] = output

    handle = layer.register_forward_hook(keep)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            logits = net(x).float()
            if classes is None:
                classes = logits.argmax(1)
            net.zero_grad(set_to_none=True)
            logits.gather(1, classes.view(-1, 1).to(logits.device)).sum().backward()
    finally:
        handle.remove()
        net.train(was_training)
    a, g = seen["a"].detach().float(), seen["a"].grad.float()
    if method == "gradcam":
        weights = g.mean((2, 3), keepdim=True)
    else:  # Grad-CAM++ with the exponential-of-score closed form (g^2, g^3 of the logit)
        g2, g3 = g.pow(2), g.pow(3)
        denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
        alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
        weights = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    top = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    probs = F.softmax(logits.detach(), 1)
    return (cam / top).cpu().numpy(), probs.cpu().numpy()


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An (H, W, 3) uint8 image with the (h, w) map in [0, 1] drawn over it in the 'jet'
    colours (the map is resized to the image)."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h))) / 255
    colours = colormaps["jet"](heat)[..., :3] * 255
    return (image * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    im = Image.fromarray(image)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
