"""The training events, and the base class of everything that plugs into the loop.

The `Trainer` calls, on every callback in the order given:

    fit_start                once, before the first step (after any resume)
    phase_start              a phase's optimizer and schedule exist; set up per-phase state
    step_end                 after each optimizer step (and its LR step)
    validation_end           an epoch is trained and validated (`t.row`, `t.improved`): decide
                             here: stop the phase (`t.stop_phase = True`), change the plan
    epoch_end                the trainer has advanced its state: record here (files, logs)
    phase_end                the phase's last epoch is recorded
    fit_end(result)          the best model is scored and reported

Events are plain method calls on the callbacks the run was given (no attribute forwarding, no
exceptions for control flow). What a callback may change on the trainer: `t.net`, `t.batches`
and `t.val_probs` (what trains and how it is validated, e.g. on cached features), `t.loss_fn`
(e.g. a distillation loss), `t.stop_phase` (end this phase) and `t.stop_run` (end the
training; the best epoch so far is scored as usual), and the plan through `t.replan(recipe)`.
A callback's `state_dict()` goes into last.pt under its `name` and comes back through
`load_state_dict` when a run resumes inside the same phase, so resume stays exact.
"""

from __future__ import annotations

import torch


class Callback:
    name = "callback"  # the key of its state in last.pt

    def on_fit_start(self, t) -> None: ...
    def on_phase_start(self, t) -> None: ...
    def on_step_end(self, t) -> None: ...
    def on_validation_end(self, t) -> None: ...
    def on_epoch_end(self, t) -> None: ...
    def on_phase_end(self, t) -> None: ...
    def on_fit_end(self, t, result: dict) -> None: ...

    def scored_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The weights that are validated and checkpointed as the run's model (EMA: its
        average); default: the model as trained."""
        return model

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
