"""A recipe's data: the train / held-out validation / optional test split, fixed by its split seed."""

from __future__ import annotations

import numpy as np

from cifarlab.core.errors import UserError
from cifarlab.data import load_images
from cifarlab.data.dataset import ImageSet, stratified_limit, stratified_split


def split_seed(recipe: dict) -> int:
    """The seed of the held-out split and of `data.limit`'s subset: `data.split_seed`, else the
    run's seed. Fixing it varies a run's seed (initialisation, augmentation) on the same images."""
    chosen = recipe["data"].get("split_seed")
    return int(recipe["seed"] if chosen is None else chosen)


def split_data(recipe: dict) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, val, test) exactly as the recipe and its split seed define them: the stratified
    validation split is taken before `data.limit` subsets the training images."""
    d, seed = recipe["data"], split_seed(recipe)
    full = load_images(d["source"], image_size=d["image_size"], skip_bad=d["skip_bad"])
    full.check_trainable()
    train_idx, val_idx = stratified_split(full.labels, d["val_fraction"], seed)
    train = full.subset(train_idx)
    if d["limit"]:
        train = train.subset(stratified_limit(train.labels, int(d["limit"]), seed))
    test = None
    if d["test"]:
        test = align_classes(
            load_images(d["test"], image_size=d["image_size"], split="test"), full.classes
        )
    return train, full.subset(val_idx), test


def align_classes(data: ImageSet, classes: list[str]) -> ImageSet:
    """Relabel `data` to the class order of a model; refuse a different set of classes."""
    if data.classes == list(classes):
        return data
    if set(data.classes) != set(classes):
        missing, extra = (
            sorted(set(classes) - set(data.classes)),
            sorted(set(data.classes) - set(classes)),
        )
        raise UserError(
            f"class mismatch: the model knows {len(classes)} classes, the data has {len(data.classes)} "
            f"(missing: {missing or '-'}, unknown: {extra or '-'}); use data with the model's classes"
        )
    remap = np.array([classes.index(c) for c in data.classes])
    return ImageSet(data.images, remap[data.labels], list(classes))
