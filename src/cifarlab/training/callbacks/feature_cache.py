"""Frozen-backbone phases train the head on cached features.

While the backbone is frozen and in eval mode (freeze policy `head`), its output for an image
never changes, so running it every epoch repeats the same work. `FeatureCache` runs it once over
the training images (`feature_views` views: view 0 the image itself, the others augmented with
the recipe's per-image augmentations) and the validation images, then serves epochs of
(features, targets) batches the way `BatchLoader` serves images; the training loop calls
`model.head` on them. MixUp/CutMix mix images across a batch and are not applied to cached views.
The cache lives in memory; a resumed run recomputes it (the same features: the backbone is fixed).
Under torchrun each process extracts its share of the images and all processes gather the whole
cache; an epoch then gives each process its rows of every global batch, as `BatchLoader` does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.config import Phase
from cifarlab.core import distributed
from cifarlab.core.errors import UserError
from cifarlab.core.log import log
from cifarlab.core.progress import bar
from cifarlab.data import ImageSet
from cifarlab.data.augment import AugmentConfig
from cifarlab.data.loader import BatchLoader, batch_share
from cifarlab.models.protocol import Backbone
from cifarlab.training.events import Callback

EXTRACT_BATCH = 128  # images per backbone pass while filling the cache
VIEW_SEED = 7_919  # augmented view v of a run with seed s draws from seed s * VIEW_SEED + v


def applies(model: torch.nn.Module, phase: Phase) -> bool:
    """A phase trains on cached features when only the head trains and the cache is on."""
    return phase.freeze == "head" and phase.feature_cache and isinstance(model, Backbone)


class CachedFeatures(Callback):
    """Where `applies`: the phase trains `model.head` on the cache, validates on cached
    validation features, and counts the cache's time into its first epoch."""

    name = "feature_cache"

    def on_phase_start(self, t) -> None:
        if not applies(t.model, t.phase):
            return
        cache = FeatureCache(
            t.model, t.train_set, t.val_set, t.aug, t.phase, t.recipe["seed"], t.bf16,
            device=t.device, preprocess=t.preprocess, channels_last=t.choice.channels_last,
        )  # fmt: skip
        t.batches, t.net = cache, t.model.head
        t.val_probs = lambda model: cache.val_probs(model, t.bf16)
        t.pending_seconds, t.first_epoch_one_off = cache.seconds, True


class FeatureCache:
    """Backbone features of a phase's training views and validation images, computed once."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_set: ImageSet,
        val_set: ImageSet,
        aug: AugmentConfig,
        phase: Phase,
        seed: int,
        bf16: bool,
        device: torch.device,
        preprocess: dict,
        channels_last: bool = False,
    ):
        views = phase.feature_views
        if views < 1:
            raise UserError(f"feature_views must be 1 or more, got {views}")
        t0 = time.perf_counter()
        kw = dict(device=device, preprocess=preprocess, channels_last=channels_last)
        per_image = dataclasses.replace(aug, mixup=0.0, cutmix=0.0)
        model.eval()
        self.world = distributed.world()
        mine = distributed.share(train_set)
        self.train = torch.stack(
            [
                distributed.gather_rows(
                    _extract(
                        model,
                        BatchLoader(mine, EXTRACT_BATCH, aug=per_image if v else None, **kw),
                        seed * VIEW_SEED + v,
                        bf16,
                    ),
                    len(train_set),
                )
                for v in range(views)
            ]
        )  # (views, N, features)
        val_loader = BatchLoader(distributed.share(val_set), EXTRACT_BATCH, **kw)
        self.val = distributed.gather_rows(_extract(model, val_loader, 0, bf16), len(val_set))
        labels = torch.from_numpy(train_set.labels).long().to(device)
        self.targets = F.one_hot(labels, len(train_set.classes)).float()
        self.batch_size = phase.batch_size
        self.drop_last = len(train_set) > self.batch_size
        self.device = device
        self.seconds = time.perf_counter() - t0
        log(
            f"feature cache: {views} view(s) of {len(train_set)} train + {len(val_set)} val "
            f"images through the frozen backbone in {self.seconds:.1f}s"
        )

    def __len__(self) -> int:
        n = self.train.shape[1]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def share(self, i: int) -> float:
        n = self.train.shape[1]
        return batch_share(i, self.batch_size, n, self.world.rank, self.world.size)

    def epoch(self, seed: int = 0, index: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (features, soft targets) in a shuffled order; each image from a random view.
        (`index`, the epoch's number, is the image loader's; views here are drawn at random.)"""
        g = torch.Generator(device=self.device).manual_seed(seed)
        views, n, _ = self.train.shape
        order = torch.randperm(n, generator=g, device=self.device)
        view = torch.randint(0, views, (n,), generator=g, device=self.device)
        mine = slice(self.world.rank, None, self.world.size)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size][mine]
            yield self.train[view[idx], idx], self.targets[idx]

    @torch.no_grad()
    def val_probs(self, model: torch.nn.Module, bf16: bool = False):
        """Softmax probabilities of `model.head` on the validation features (as predict_probs,
        without test-time augmentation: that is for the final scoring, on images)."""
        head = model.head.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            p = F.softmax(head(self.val).float(), dim=1)
        return p.float().cpu().numpy().astype(np.float32)


@torch.no_grad()
def _extract(model: torch.nn.Module, loader: BatchLoader, seed: int, bf16: bool) -> torch.Tensor:
    out = []
    for x, _ in bar(loader.epoch(seed), total=len(loader), desc="extracting features"):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model.features(x).float())
    return torch.cat(out)
