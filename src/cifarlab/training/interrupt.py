"""Ctrl-C (and SIGTERM) during training: held until the current step is done, never inside
one. SIGTERM is what `kill`, a scheduler's preemption and torchrun's agent (stopping its
processes after Ctrl-C or a failed peer) send: it stops the run the same way, with its line."""

from __future__ import annotations

import contextlib
import signal
import threading


class CtrlC:
    """SIGINT while a training step runs is held until the step is done, then raised as
    KeyboardInterrupt (a KeyboardInterrupt raised inside a C++ op's callback or a `__del__`
    can be swallowed); anywhere else, and at a second Ctrl-C, it is raised at once."""

    def __init__(self):
        self.holding = self.asked = False

    def handler(self, signum, frame):
        if self.holding and not self.asked:
            self.asked = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.asked:
            self.asked = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


CTRL_C = CtrlC()
