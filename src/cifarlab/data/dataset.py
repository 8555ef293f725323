"""The one in-memory form of a dataset: uint8 images, int labels, class names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cifarlab.core.errors import UserError


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, (N, H, W, 3)
    labels: np.ndarray  # int64, (N,)
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def check_trainable(self) -> None:
        """Refuse data a classifier cannot learn from: fewer than two classes or an empty class."""
        if len(self.classes) < 2:
            raise UserError(
                f"found {len(self.classes)} class ({', '.join(self.classes) or 'none'}); "
                "a classifier needs at least two class folders"
            )
        empty = [c for c, n in zip(self.classes, self.class_counts(), strict=True) if n == 0]
        if empty:
            raise UserError(
                f"class(es) with no images: {', '.join(empty)}; add images or remove the folder"
            )


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val), the same fraction of every class in val; fixed by seed."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_limit(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a subset of about n items with the class proportions of `labels`; fixed by seed."""
    if n <= 0:
        raise UserError(f"--limit must be positive, got {n}")
    if n >= len(labels):
        return np.arange(len(labels))
    _, keep = stratified_split(labels, n / len(labels), seed)
    return keep
