"""PNG plots of a run: learning curves, confusion matrix, per-class accuracy, reliability diagram,
mistakes grid; and several runs overlaid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cifarlab.core.files import atomic_path  # noqa: E402
from cifarlab.eval import explain  # noqa: E402


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
    with atomic_path(path, suffix=".png") as tmp:  # savefig goes by the extension
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def class_accuracy(runs: dict[str, dict[str, float]], path: Path) -> None:
    """Per-class accuracy bars; one colour per run when several are compared."""
    classes = list(next(iter(runs.values())))
    x = np.arange(len(classes))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(classes) + 2), 4))
    for i, (name, accuracy) in enumerate(runs.items()):
        values = [accuracy.get(c, 0.0) for c in classes]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=name)
        if len(runs) == 1:
            ax.bar_label(bars, [f"{v:.0%}" for v in values], fontsize=8)
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 6 else 0, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title("per-class accuracy")
    ax.grid(axis="y", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def reliability(
    confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray, ece: float, path: Path
) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and how many
    predictions fall in each bin."""
    bins = len(counts)
    centers = (np.arange(bins) + 0.5) / bins
    filled = counts > 0
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    ax.bar(centers[filled], accuracy[filled], 1 / bins, edgecolor="black", label="accuracy")
    ax.bar(
        centers[filled],
        confidence[filled] - accuracy[filled],
        1 / bins,
        bottom=accuracy[filled],
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centers, counts, 1 / bins, edgecolor="black", color="tab:gray")
    hist.set_xlabel("confidence (top probability)")
    hist.set_ylabel("predictions")
    fig.tight_layout()
    _save(fig, path)


def mistakes(
    images: np.ndarray,
    true: list[str],
    predicted: list[str],
    confidence: np.ndarray,
    path: Path,
    columns: int = 8,
    heat: np.ndarray | None = None,
) -> None:
    """A grid of images titled with their true and (wrongly) predicted labels; with `heat`
    (one map per image in [0, 1]), each image is drawn as a pair: the image, and where the
    model saw its (wrong) prediction."""
    per = 1 if heat is None else 2
    columns = columns if heat is None else max(2, columns // 2 * 2)
    cells = len(images) * per
    rows = max(1, -(-cells // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.95 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(len(images)):
        ax = axes.flat[i * per]
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"true: {true[i]}\npred: {predicted[i]} {confidence[i]:.0%}", fontsize=8)
        if heat is not None:
            axes.flat[i * per + 1].imshow(explain.overlay(images[i], heat[i]))
            axes.flat[i * per + 1].set_title(f"where: {predicted[i]}", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def examples(images: np.ndarray, heat: np.ndarray, titles: list[str], path: Path) -> None:
    """Pairs (image above, its class activation map below), one column per image."""
    n = max(1, len(images))
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(len(images)):
        axes[0, i].imshow(images[i], interpolation="nearest")
        axes[0, i].set_title(titles[i], fontsize=8)
        axes[1, i].imshow(explain.overlay(images[i], heat[i]))
    fig.tight_layout()
    _save(fig, path)


def explanation(
    image: np.ndarray, heat: np.ndarray, probs: np.ndarray, classes: list[str], title: str,
    path: Path, k: int = 5,
) -> None:  # fmt: skip
    """One image explained: the image, the map for the class explained drawn over it, and the
    top-k probabilities."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(9.6, 3.2), width_ratios=[1, 1, 1.3])
    a.imshow(image, interpolation="nearest")
    a.set_title("image", fontsize=9)
    b.imshow(explain.overlay(image, heat))
    b.set_title(title, fontsize=9)
    for ax in (a, b):
        ax.axis("off")
    top = np.argsort(-probs)[:k][::-1]
    c.barh([classes[i] for i in top], probs[top], color="#4878a8")
    c.set_xlim(0, 1)
    c.set_title(f"top {len(top)}", fontsize=9)
    c.tick_params(labelsize=8)
    fig.tight_layout()
    _save(fig, path)


def overlay(histories: dict[str, list[dict]], path: Path) -> None:
    """Validation accuracy and loss per epoch of several runs on shared axes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("val_accuracy", "val_loss"), strict=True):
        for name, history in histories.items():
            ax.plot(np.arange(1, len(history) + 1), [r[key] for r in history], label=name)
        ax.set_xlabel("epoch (all phases)")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
