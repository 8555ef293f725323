"""An exponential moving average of the weights (recipe key `ema`: its decay per step).

The average is what is validated, checkpointed and scored; it is updated after every step
(parameters and BatchNorm buffers) and saved in last.pt, so a resumed run averages on exactly."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cifarlab.training.events import Callback


class EMA(Callback):
    name = "ema"

    def __init__(self):
        self.average: AveragedModel | None = None

    def on_phase_start(self, t) -> None:
        decay = t.phase.ema
        self.average = (
            AveragedModel(t.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
            if decay
            else None
        )

    def on_step_end(self, t) -> None:
        if self.average is not None:
            self.average.update_parameters(t.model)

    def scored_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.average.module if self.average is not None else model

    def state_dict(self) -> dict:
        return self.average.state_dict() if self.average is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.average is not None and state:
            self.average.load_state_dict(state)
