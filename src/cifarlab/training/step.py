"""The one training step: forward under the run's precision, loss, backward, optimizer update.

The training loop, the budget planner, the precision check (`decide_precision`) and the
benchmarks all call it, so what is timed is what trains."""

from __future__ import annotations

import contextlib
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
    accumulate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of `opt`'s parameters on batch (x, y); the loss is computed in fp32.
    `scale` multiplies the loss that is differentiated (not the one returned): under DDP it is
    world size x this process's share of the global batch, so that DDP's average of the
    processes' gradients is the gradient of the global batch's mean loss even where the batch
    does not divide evenly. `accumulate` > 1 runs the batch as that many micro-batches (for a
    batch that does not fit in memory): their gradients add up to the batch's (DDP averages
    them across processes once, at the last). Returns (loss, logits) of the whole batch, still
    on the device (no host sync)."""
    opt.zero_grad(set_to_none=True)
    if accumulate == 1:
        loss, logits = _forward_backward(net, x, y, bf16, loss_fn, scale)
    else:
        parts = []
        chunks = list(zip(x.tensor_split(accumulate), y.tensor_split(accumulate), strict=True))
        for i, (xc, yc) in enumerate(chunks):
            last = i == len(chunks) - 1
            no_sync = getattr(net, "no_sync", None)  # DistributedDataParallel
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                part = _forward_backward(net, xc, yc, bf16, loss_fn, scale * len(xc) / len(x))
            parts.append(part)
        loss = sum(p[0].detach() * len(c[0]) for p, c in zip(parts, chunks, strict=True)) / len(x)
        logits = torch.cat([p[1] for p in parts])
    opt.step()
    return loss, logits


def _forward_backward(net, x, y, bf16: bool, loss_fn: LossFn, scale: float):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
    loss = loss_fn(logits.float(), y, x)
    (loss * scale if scale != 1.0 else loss).backward()
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
