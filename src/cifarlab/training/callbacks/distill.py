"""Knowledge distillation (recipe section `distill`, `cifarlab train --teacher RUN_DIR`): the
student learns from a trained teacher's softened predictions as well as from the labels.

    loss = (1 - weight) * the recipe's loss (labels, smoothing, mixup targets)
           + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))     (Hinton et al.)

The teacher sees exactly the student's augmented batch: the batch is taken back from the
student's normalisation to [0, 1] and prepared as the teacher was trained (its input size,
resize steps, interpolation and normalisation, from its checkpoint), so any cifarlab model can
teach any other on the same classes. It runs forward only, in the run's precision, inside the
training step, so its time is in every measured epoch (and a budget re-plans with it after the
first epoch; the first plan, timed without it, is corrected there). Frozen-backbone phases on
cached features are not distilled (their batches are features, not images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarlab.core.errors import UserError
from cifarlab.core.log import log
from cifarlab.core.runtime import memory_format
from cifarlab.data.loader import prepare
from cifarlab.models import count_parameters, load_model
from cifarlab.training.events import Callback


class Distill(Callback):
    name = "distill"

    def __init__(self, teacher: str, temperature: float, weight: float):
        self.path, self.temperature, self.weight = teacher, temperature, weight

    def on_fit_start(self, t) -> None:
        self.teacher, info = load_model(self.path)
        if list(info["classes"]) != list(t.classes):
            raise UserError(
                f"the teacher {self.path} knows the classes {', '.join(info['classes'])}, not "
                f"this data's {', '.join(t.classes)}: distil from a model trained on these classes"
            )
        self.channels_last = t.choice.channels_last
        self.teacher.to(t.device, memory_format=memory_format(self.channels_last))
        self.teacher.requires_grad_(False)
        self.pre = info["preprocess"]
        self.tmean, self.tstd = (
            torch.tensor(self.pre[k], device=t.device).view(1, 3, 1, 1) for k in ("mean", "std")
        )
        self.smean, self.sstd = (
            torch.tensor(t.preprocess[k], device=t.device).view(1, 3, 1, 1) for k in ("mean", "std")
        )
        self.bf16 = t.bf16
        accuracy = info.get("metrics", {}).get("val_accuracy")
        log(
            f"distill: teacher {self.path} ({info['model']['name']}, "
            f"{count_parameters(self.teacher) / 1e6:.2f}M params"
            + (f", val accuracy {accuracy:.4f}" if accuracy is not None else "")
            + f"), temperature {self.temperature:g}, weight {self.weight:g}"
        )

    def on_phase_start(self, t) -> None:
        if t.net is not t.model:  # cached features: no images to show the teacher
            return
        labels_loss = t.loss_fn
        t.loss_fn = lambda logits, targets, x: self.loss(labels_loss, logits, targets, x)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        images = (x.float() * self.sstd + self.smean).clamp_(0, 1)  # the student's view, in [0, 1]
        seen = prepare(
            images, int(self.pre["input_size"]), self.tmean, self.tstd, self.channels_last,
            self.pre.get("interpolation", "bilinear"), tuple(self.pre.get("resize_steps") or ()),
        )  # fmt: skip
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.teacher(seen).float()

    def loss(self, labels_loss, logits, targets, x) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.softmax(self.teacher_logits(x) / t, dim=1),
            reduction="batchmean",
        )
        return (1 - self.weight) * labels_loss(logits, targets, x) + self.weight * t * t * soft
