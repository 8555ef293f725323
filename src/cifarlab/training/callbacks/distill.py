"""Knowledge distillation (recipe section `distill`, `cifarlab train --teacher RUN_DIR`): the
student learns from a trained teacher's softened predictions as well as from the labels.

    loss = (1 - weight) * the recipe's loss (labels, smoothing, mixup targets)
           + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))     (Hinton et al.)

The teacher sees exactly the student's augmented batch: the batch is taken back from the
student's normalisation to [0, 1] and prepared as the teacher was trained (its input size,
resize steps, interpolation and normalisation, from its checkpoint), so any cifarlab model can
teach any other on the same classes. It runs forward only, in the run's precision, inside the
training step; a budget counts its measured cost per image from the first plan on.
Frozen-backbone phases on cached features are not distilled (their batches are features).

`distill.cache: true` trades exactness for the teacher's cost: its logits are computed once per
training image and orientation (plain and mirrored: 2 forward passes an image, before training,
stored under $CIFARLAB_HOME/teacher-logits by a hash of the teacher file, the images and the
precision, so the next run with the same teacher and data reads them), and each step looks its
rows up by image and flip. Exact for flips (where the student trains at the stored image size;
a student that resizes its input showed the live teacher a resized copy); under shifts and
cutout the teacher's answer is that for the whole, unshifted image. Augmentations that change an image more (rotation, zoom,
brightness, contrast, MixUp, CutMix) are refused with the cache.
Under torchrun each process computes its share of the images and receives the whole table;
rank 0 alone reads or writes the file.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.core import checkpoint, distributed
from cifarlab.core.errors import UserError
from cifarlab.core.files import atomic_path
from cifarlab.core.log import log
from cifarlab.core.runtime import memory_format
from cifarlab.data.cache import cifarlab_home, file_sha256
from cifarlab.data.dataset import ImageSet
from cifarlab.data.loader import prepare
from cifarlab.models import count_parameters, load_model
from cifarlab.training.events import Callback


class Teacher:
    """A trained model that answers for the student's batches, in its own preprocessing."""

    def __init__(self, path: str):
        """Read the teacher (before the data, so that a bad path fails first); `place` it."""
        self.path = path
        self.model, self.info = load_model(path)
        self.pre = self.info["preprocess"]
        self.table: torch.Tensor | None = None  # cached logits (images, plain/mirrored, classes)
        self.cache: dict | None = None  # how the cache was had: computed or read, and its seconds

    def place(self, classes: list[str], device, student: dict, choice) -> Teacher:
        """Check its classes against the data's; move it to the run's device, precision and
        layout, with the student's normalisation to undo."""
        if list(self.info["classes"]) != list(classes):
            raise UserError(
                f"the teacher {self.path} knows the classes {', '.join(self.info['classes'])}, "
                f"not this data's {', '.join(classes)}: distil from a model trained on these classes"
            )
        self.channels_last, self.bf16 = choice.channels_last, choice.bf16
        self.model.to(device, memory_format=memory_format(self.channels_last)).requires_grad_(False)
        self.tmean, self.tstd = _stats(self.pre, device)
        self.smean, self.sstd = _stats(student, device)
        return self

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for a batch prepared for the student."""
        images = (x.float() * self.sstd + self.smean).clamp_(0, 1)  # the student's view, in [0, 1]
        return self.logits_of(images)

    @torch.no_grad()
    def logits_of(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for a float batch (N, 3, H, W) in [0, 1]."""
        seen = prepare(
            images, int(self.pre["input_size"]), self.tmean, self.tstd, self.channels_last,
            self.pre.get("interpolation", "bilinear"), tuple(self.pre.get("resize_steps") or ()),
        )  # fmt: skip
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(seen).float()

    def cache_views(self, train: ImageSet, device, batch: int = 500) -> None:
        """Compute (or read) the teacher's logits of every training image, plain and mirrored,
        for `lookup` (module docstring: what this approximates; the recipe's check refuses the
        augmentations it cannot stand for)."""
        key = {
            "version": 1,
            "teacher": file_sha256(checkpoint.resolve_path(self.path)),
            "images": hashlib.sha256(np.ascontiguousarray(train.images).data).hexdigest(),
            "bf16": self.bf16,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        path = cifarlab_home() / "teacher-logits" / f"{digest[:32]}.npy"
        start, w = time.perf_counter(), distributed.world()
        # rank 0 alone reads and writes the file (other machines' homes need not hold it); under
        # torchrun each process computes its share of the images and all get the whole table
        shape = (len(train), 2, len(self.info["classes"]))
        table = _read_table(path, shape) if w.main else None
        if distributed.broadcast(table is not None):
            table = distributed.from_main(table)
            how, what = "read", f"read from {path}"
        else:
            mine = self._all_views(distributed.share(train).images, device, batch)
            table = distributed.gather_rows(mine, len(train))
            saved = _write_table(path, table) if w.main else ""
            by = f" by {w.size} processes" if w.active else ""
            how = "computed"
            what = f"computed{by} in {time.perf_counter() - start:.1f}s{saved}"
        self.table = torch.from_numpy(table).to(device)
        self.cache = {"logits": how, "seconds": round(time.perf_counter() - start, 2)}
        log(f"distill: teacher logits of {len(train)} images x 2 (plain, mirrored) {what}")

    def _all_views(self, images: np.ndarray, device, batch: int) -> np.ndarray:
        """The teacher's logits of uint8 images (N, H, W, 3), plain and mirrored: (N, 2, classes)."""
        out = [np.zeros((0, 2, len(self.info["classes"])), np.float32)]  # for a share of none
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).to(device)
            x = x.permute(0, 3, 1, 2).float().div_(255)
            out.append(torch.stack([self.logits_of(x), self.logits_of(x.flip(3))], 1).cpu().numpy())
        return np.concatenate(out)

    def lookup(self, idx: torch.Tensor, mirrored: torch.Tensor | None) -> torch.Tensor:
        """Cached logits of images `idx` in the orientation each was shown."""
        view = torch.zeros_like(idx) if mirrored is None else mirrored.long()
        return self.table[idx, view]

    def seconds_per_image(self, x: torch.Tensor, repeats: int = 2) -> float:
        """Measured cost of the teacher in a training step (for the budget's plan): nothing
        but a lookup once its logits are cached (their one-off cost is spent before planning)."""
        if self.table is not None:
            return 0.0
        self.logits(x)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            self.logits(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / (repeats * len(x))

    def describe(self) -> str:
        accuracy = self.info.get("metrics", {}).get("val_accuracy")
        return (
            f"teacher {self.path} ({self.info['model']['name']}, "
            f"{count_parameters(self.model) / 1e6:.2f}M params"
            + (f", val accuracy {accuracy:.4f}" if accuracy is not None else "")
            + ")"
        )


def _read_table(path, shape: tuple) -> np.ndarray | None:
    """The cached logits at `path`, or None where there are none to trust (no file, or one that
    is damaged or of another shape: then they are computed again and the file replaced)."""
    if not path.is_file():
        return None
    try:
        table = np.load(path, allow_pickle=False)
        if table.shape == shape and table.dtype == np.float32:
            return table
        why = f"{table.dtype} {table.shape}, not float32 {shape}"
    except (OSError, ValueError, EOFError) as err:
        why = str(err)
    log(f"distill: ignoring the teacher-logits file {path} ({why}); computing them again")
    return None


def _write_table(path, table: np.ndarray) -> str:
    """Save the logits for the next run (atomically); a home that cannot be written costs only
    that."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, table)
    except OSError as err:
        return f", not saved ({err}: set CIFARLAB_HOME to a writable folder to keep them)"
    return f", saved to {path}"


def _stats(preprocess: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(
        torch.tensor(preprocess[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std")
    )


class Distill(Callback):
    name = "distill"

    def __init__(self, teacher: Teacher, temperature: float, weight: float):
        self.teacher, self.temperature, self.weight = teacher, temperature, weight

    def on_fit_start(self, t) -> None:
        log(
            f"distill: {self.teacher.describe()}, temperature {self.temperature:g}, "
            f"weight {self.weight:g}"
        )

    def on_phase_start(self, t) -> None:
        if t.net is not t.model:  # cached features: no images to show the teacher
            return
        labels_loss = t.loss_fn
        self.loader, self.views, self.row = t.train_loader, None, 0
        t.loss_fn = lambda logits, targets, x: self.loss(labels_loss, logits, targets, x)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for `x`: the batch out of the loader, or the next rows of it
        (a step's micro-batches come in order)."""
        if self.teacher.table is None:
            return self.teacher.logits(x)
        if self.loader.views is not self.views:  # a new batch
            self.views, self.row = self.loader.views, 0
        idx, mirrored = self.views
        rows = slice(self.row, self.row + len(x))
        self.row += len(x)
        return self.teacher.lookup(idx[rows], None if mirrored is None else mirrored[rows])

    def loss(self, labels_loss, logits, targets, x) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.softmax(self.teacher_logits(x) / t, dim=1),
            reduction="batchmean",
        )
        return (1 - self.weight) * labels_loss(logits, targets, x) + self.weight * t * t * soft
