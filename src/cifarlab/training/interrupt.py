"""Ctrl-C during training: held until the current step is done, never inside one."""

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
        previous = signal.signal(signal.SIGINT, self.handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


CTRL_C = CtrlC()
