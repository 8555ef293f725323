"""Metrics of a model on a labelled set: accuracy, loss, per-class scores, confusion matrix."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.loader import BatchLoader


@torch.no_grad()
def predict_probs(model, loader: BatchLoader, tta: bool = False, bf16: bool = False) -> np.ndarray:
    """Softmax probabilities for every image the loader serves, in order; `tta` averages the
    prediction of each image with that of its mirror image."""
    model.eval()
    out = []
    for x, _ in loader.epoch():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            p = F.softmax(model(x).float(), dim=1)
            if tta:
                p = (p + F.softmax(model(x.flip(3)).float(), dim=1)) / 2
        out.append(p.float().cpu())
    return torch.cat(out).numpy()


def metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """accuracy (0-1), loss (mean cross-entropy), per_class {precision, recall, accuracy, support},
    confusion (rows: true class, columns: predicted), n."""
    pred = probs.argmax(1)
    k = len(classes)
    confusion = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    true_pos = np.diag(confusion)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    per_class = {
        name: {
            "precision": float(true_pos[i] / predicted[i]) if predicted[i] else 0.0,
            "recall": float(true_pos[i] / support[i]) if support[i] else 0.0,
            "accuracy": float(true_pos[i] / support[i]) if support[i] else 0.0,
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    p_true = probs[np.arange(len(labels)), labels]
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "loss": float(-np.log(np.clip(p_true, 1e-12, None)).mean()) if len(labels) else 0.0,
        "n": int(len(labels)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": list(classes),
    }
