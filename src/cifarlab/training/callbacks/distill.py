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
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from cifarlab.core.errors import UserError
from cifarlab.core.log import log
from cifarlab.core.runtime import memory_format
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
        seen = prepare(
            images, int(self.pre["input_size"]), self.tmean, self.tstd, self.channels_last,
            self.pre.get("interpolation", "bilinear"), tuple(self.pre.get("resize_steps") or ()),
        )  # fmt: skip
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(seen).float()

    def seconds_per_image(self, x: torch.Tensor, repeats: int = 2) -> float:
        """Measured cost of the teacher in a training step (for the budget's plan)."""
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
        t.loss_fn = lambda logits, targets, x: self.loss(labels_loss, logits, targets, x)

    def loss(self, labels_loss, logits, targets, x) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.softmax(self.teacher.logits(x) / t, dim=1),
            reduction="batchmean",
        )
        return (1 - self.weight) * labels_loss(logits, targets, x) + self.weight * t * t * soft
