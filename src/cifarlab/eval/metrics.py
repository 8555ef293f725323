"""Metrics of predicted probabilities on a labelled set: accuracy, loss, per-class scores,
confusion matrix, calibration; and the per-phase summary of a run's history."""

from __future__ import annotations

import numpy as np

BINS = 10  # reliability diagram / ECE bins


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


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """Confidence (top probability) against accuracy in `bins` equal-width bins (lo, hi].
    `ece` is the expected calibration error: sum over bins of share * |accuracy - confidence|."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    seen = np.maximum(counts, 1)
    confidence = np.bincount(idx, weights=conf, minlength=bins) / seen
    accuracy = np.bincount(idx, weights=correct, minlength=bins) / seen
    ece = float(np.sum(counts * np.abs(accuracy - confidence)) / max(len(labels), 1))
    return {"confidence": confidence, "accuracy": accuracy, "counts": counts, "ece": ece}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    return calibration(probs, labels, bins)["ece"]


def phase_summaries(history: list[dict]) -> list[dict]:
    """The last epoch of each phase: the seed's 'after training' / 'after fine-tuning' rows."""
    ends: dict[str, dict] = {}
    for row in history:
        ends[row["phase"]] = row
    return [
        {
            "phase": k,
            "epochs": v["epoch"],
            "val_accuracy": v["val_accuracy"],
            "val_loss": v["val_loss"],
        }
        for k, v in ends.items()
    ]
