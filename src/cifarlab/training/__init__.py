"""Training: `fit` (one run), the `Trainer` loop and its events, the training step, the optimizer
and schedule, the budget planner; tricks and side effects are callbacks (callbacks/)."""
