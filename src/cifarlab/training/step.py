"""The one training step: forward under the run's precision, loss, backward, optimizer update.

The training loop, the budget planner, the precision check and the benchmarks all call it, so
what is timed is what trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of `opt`'s parameters on batch (x, y); y: class indices or (soft) one-hot
    targets. Returns (loss, logits), both still on the device (no host sync)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits
