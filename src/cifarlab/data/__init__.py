"""cifarlab's data layer: one call, `load_images`, turns a data source into an ImageSet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cifarlab.core.errors import UserError
from cifarlab.data.cache import cached
from cifarlab.data.cifar10 import download_cifar10, is_cifar10, read_cifar10
from cifarlab.data.dataset import ImageSet, stratified_limit, stratified_split
from cifarlab.data.folder import read_image_folder

__all__ = [
    "ImageSet",
    "describe",
    "download_cifar10",
    "load_images",
    "stratified_limit",
    "stratified_split",
]

CIFAR10_WORDS = ("cifar10", "cifar-10")
MAX_IMAGE_SIZE = 1024


def load_images(
    source: str | Path,
    image_size: int = 32,
    split: str = "train",
    skip_bad: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> ImageSet:
    """Load a data source as (N, image_size, image_size, 3) uint8 images with int64 labels.

    `source` is the word "cifar10" (the official binary archive, downloaded once into
    cifarlab_home()/datasets), a path to an official CIFAR-10 archive or extracted folder (binary
    or python version), or an image folder ROOT/<class>/*.jpg or a .tar/.tar.gz/.tgz/.zip of one.
    `split` picks CIFAR-10's 'train' or 'test' (or an image folder's train/, val/, test/ folder).
    Decoded results are cached on disk by source content and options unless cache=False.
    """
    if not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(
            f"image size must be a whole number from 1 to {MAX_IMAGE_SIZE}, got {image_size!r}"
        )
    if str(source).strip().lower() in CIFAR10_WORDS:
        path = download_cifar10(progress=progress)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(
                f"data source {str(source)!r} does not exist; pass 'cifar10', a CIFAR-10 archive "
                "or folder, or an image folder ROOT/<class>/*.jpg (or a .tar.gz/.zip of one)"
            )
    if is_cifar10(path):
        params = {"reader": "cifar10", "split": split, "image_size": image_size}

        def build() -> ImageSet:
            return resize_images(read_cifar10(path, split), image_size)  # type: ignore[arg-type]

    else:
        params = {
            "reader": "folder",
            "split": split,
            "image_size": image_size,
            "skip_bad": skip_bad,
        }

        def build() -> ImageSet:
            return read_image_folder(path, image_size, skip_bad, progress=progress, split=split)

    return cached(path, params, build) if cache else build()


def resize_images(data: ImageSet, size: int) -> ImageSet:
    """The same ImageSet at size x size (bilinear, per image); unchanged when already that size."""
    if data.images.shape[1:3] == (size, size):
        return data
    out = np.empty((len(data), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(data.images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return ImageSet(out, data.labels, data.classes)


def describe(data: ImageSet) -> dict:
    """Summary for `cifarlab data info`: size, classes, per-class counts, image size."""
    counts = data.class_counts()
    return {
        "n": len(data),
        "classes": list(data.classes),
        "per_class": {c: int(n) for c, n in zip(data.classes, counts, strict=True)},
        "image_size": data.image_size,
    }
