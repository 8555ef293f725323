"""The one training step: forward under the run's precision, loss, backward, optimizer update.

The training loop, the budget planner, the precision check (`decide_precision`) and the
benchmarks all call it, so what is timed is what trains."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cifarlab.core import runtime

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, x: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The default loss: cross-entropy on class indices or (soft) one-hot targets. A loss
    also gets `x`, the batch, for losses that need it (e.g. distillation)."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
    loss_fn: LossFn = cross_entropy,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of `opt`'s parameters on batch (x, y); the loss is computed in fp32.
    `scale` multiplies the loss that is differentiated (not the one returned): under DDP it is
    world size x this process's share of the global batch, so that DDP's average of the
    processes' gradients is the gradient of the global batch's mean loss even where the batch
    does not divide evenly. Returns (loss, logits), both still on the device (no host sync)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
    loss = loss_fn(logits.float(), y, x)
    opt.zero_grad(set_to_none=True)
    (loss * scale if scale != 1.0 else loss).backward()
    opt.step()
    return loss, logits


def decide_precision(
    recipe: dict, model: torch.nn.Module, input_size: int, device: torch.device, threads: int
) -> runtime.Choice:
    """`decide` for training a recipe's model: its precision and memory_format settings, timed
    with training steps of a probe batch sized to its input."""
    return runtime.decide(
        recipe["precision"],
        recipe["memory_format"],
        device,
        threads,
        model=model,
        input_size=input_size,
        batch=runtime.probe_batch(input_size, recipe["train"]["batch_size"]),
        train_step=train_step,
    )
