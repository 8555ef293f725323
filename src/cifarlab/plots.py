"""PNG plots of a run: learning curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs val, with a line at each phase boundary."""
    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(x, [r[f"train_{key}"] for r in history], label="train")
        ax.plot(x, [r[f"val_{key}"] for r in history], label="val")
        for i in range(1, len(history)):
            if history[i]["phase"] != history[i - 1]["phase"]:
                ax.axvline(i + 0.5, color="gray", linestyle="--", linewidth=1)
                ax.text(i + 0.6, ax.get_ylim()[1], history[i]["phase"], va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrix with counts."""
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(5, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title(f"confusion matrix (accuracy {np.trace(matrix) / max(matrix.sum(), 1):.2%})")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
