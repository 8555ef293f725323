"""Batches straight from a uint8 tensor on the training device: index, scale, augment, resize,
normalise. No worker processes, no per-image Python: the data path stays far ahead of the model.

Under torchrun (`world_size` > 1) `batch_size` is the global batch: every process draws the same
order and the same augmentation for the whole global batch, then keeps its own rows of it
(`rank::world_size`), so the processes never overlap and the global stream of (image, view)
pairs is the same for any number of processes. Augmenting the whole batch on every process
repeats the cheap part (indexing, flips, crops at 32 px); resizing, normalising and the model
run on the process's rows only."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from cifarlab.data import ImageSet
from cifarlab.data.augment import AugmentConfig, augment


class BatchLoader:
    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        device: torch.device,
        preprocess: dict,
        aug: AugmentConfig | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        seed: int = 0,
    ):
        self.images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.from_numpy(data.labels).long().to(device)
        self.num_classes = len(data.classes)
        self.batch_size, self.device, self.aug = batch_size, device, aug
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size  # this process's rows of each batch
        self.channels_last = channels_last
        self.input_size = int(preprocess["input_size"])
        self.mean = torch.tensor(preprocess["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], device=device).view(1, 3, 1, 1)
        self.interpolation = preprocess.get("interpolation", "bilinear")
        self.resize_steps = tuple(preprocess.get("resize_steps") or ())
        self.flipped = None  # alternating flip: the images mirrored in even epochs
        self.views: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see epoch()
        if aug is not None and aug.flip == "alternate":
            g = torch.Generator().manual_seed(seed)
            self.flipped = (torch.rand(len(self.labels), generator=g) < 0.5).to(device)

    def __len__(self) -> int:
        """Global batches: the same on every process."""
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def share(self, i: int) -> float:
        return batch_share(i, self.batch_size, len(self.labels), self.rank, self.world_size)

    def epoch(self, seed: int = 0, index: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, targets): targets are soft (N, classes) when augmenting, else class ids.
        `index` (the epoch's number) decides which images an alternating flip mirrors. While a
        batch is out, `views` holds its rows' image indices and which of them are mirrored
        (None without flips), for what is looked up per image (a teacher's cached logits)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=g, device=self.device)
            if self.shuffle
            else torch.arange(n, device=self.device)
        )
        mine = slice(self.rank, None, self.world_size)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            if self.aug is None:
                idx = idx[mine]
            x = self.images[idx].float().div_(255)
            y = self.labels[idx]
            if self.aug is not None:  # drawn for the whole global batch, then this rank's rows
                y = F.one_hot(y, self.num_classes).float()
                mask = self._flip_mask(idx, index, g)
                x, y = augment(x, y, self.aug, g, mask)
                x, y = x[mine], y[mine]
                idx, mask = idx[mine], None if mask is None else mask[mine]
            else:
                mask = None
            self.views = (idx, mask)
            yield self.prepare(x), y

    def _flip_mask(self, idx: torch.Tensor, index: int, g: torch.Generator):
        """Which images of the batch are mirrored: alternating, or the random half that
        `augment.flip` would draw (drawn here, from the same generator: the same stream)."""
        if not self.aug.flip:
            return None
        if self.flipped is not None:
            return self.flipped[idx] ^ bool(index % 2)
        return torch.rand(len(idx), generator=g, device=self.device) < 0.5

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize a [0, 1] batch to the model's input size and normalise it."""
        return prepare(
            x,
            self.input_size,
            self.mean,
            self.std,
            self.channels_last,
            self.interpolation,
            self.resize_steps,
        )


def batch_share(i: int, batch_size: int, n: int, rank: int, world_size: int) -> float:
    """Process `rank`'s share of global batch i of n items: its rows (`rank::world_size`) over
    the batch's rows; 1 in a world of one."""
    rows = min(batch_size, n - i * batch_size)
    return len(range(rank, rows, world_size)) / rows


def prepare(
    x,
    input_size: int,
    mean,
    std,
    channels_last: bool = False,
    interpolation: str = "bilinear",
    resize_steps: tuple[int, ...] = (),
) -> torch.Tensor:
    """Resize through `resize_steps` (e.g. the seed's 32 -> 64 -> 224) to `input_size` with
    `interpolation` (the pretrained weights' own mode), then normalise."""
    corners = None if interpolation == "nearest" else False
    for size in (*resize_steps, input_size):
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=corners)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
