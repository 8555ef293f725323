"""`history.csv`: one row per finished epoch, rewritten (atomically) after each."""

from __future__ import annotations

from cifarlab.training.events import Callback


class History(Callback):
    name = "history"

    def on_epoch_end(self, t) -> None:
        t.run.write_history(t.state["history"])
