"""Lookahead weight averaging as the fastest CIFAR-10 trainings use it (airbench, 2404.00498):
every `every` steps the slow weights move toward the fast ones by (1 - decay) and the model is
reset to them. The decay ramps up with the cube of training progress, so averaging only bites
late in the schedule, and at the end the model takes the slow weights."""

from __future__ import annotations

import torch

from cifarlab.training.events import Callback


class Lookahead:
    def __init__(self, model: torch.nn.Module, decay: float, every: int = 5):
        self.model, self.decay, self.every = model, decay, every
        self.slow = {k: v.detach().clone() for k, v in self._floats().items()}

    def _floats(self) -> dict[str, torch.Tensor]:
        """Parameters and float buffers (BN statistics); not counters."""
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int, total: int) -> None:
        """Call after optimizer step number `step` (1-based) of `total`."""
        if step >= total:
            self.sync(1.0)
        elif step % self.every == 0:
            self.sync(self.decay**self.every * (step / total) ** 3)

    @torch.no_grad()
    def sync(self, decay: float) -> None:
        for name, fast in self._floats().items():
            slow = self.slow[name]
            slow.lerp_(fast, 1 - decay)
            fast.copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.slow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.slow[name].copy_(value)


class LookaheadAveraging(Callback):
    """Recipe key `lookahead`: the decay; 0 = off. Steps after every optimizer step; at the
    phase's last step the model takes the slow weights."""

    name = "lookahead"

    def __init__(self):
        self.lookahead: Lookahead | None = None

    def on_phase_start(self, t) -> None:
        self.lookahead = Lookahead(t.model, t.phase.lookahead) if t.phase.lookahead else None

    def on_step_end(self, t) -> None:
        if self.lookahead is not None:
            self.lookahead.step(t.step, t.horizon)

    def state_dict(self) -> dict:
        return self.lookahead.state_dict() if self.lookahead is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.lookahead is not None and state:
            self.lookahead.load_state_dict(state)
