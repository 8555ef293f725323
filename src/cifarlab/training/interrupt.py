"""Ctrl-C (and SIGTERM) during training: held until the current step is done, never inside
one. SIGTERM is what `kill`, a scheduler's preemption and torchrun's agent (stopping its
processes after Ctrl-C or a failed peer) send: it stops the run the same way, with its line.

Under torchrun each process gets every stop twice: Ctrl-C reaches the whole process group, and
the agent, stopped by the same Ctrl-C, sends it on to its processes a moment later. That second
signal is no user's second press, so a torchrun process ignores every stop after its first
(`stopping`): it must cut neither the step short nor the leaving of the process group (gloo's
threads then abort the process at exit: "terminate called without an active exception"). What
bounds a process that then fails to stop (a stuck collective, an interrupt swallowed in a
`__del__`) is a watchdog that ends it STOP_WITHIN_S after its first stop, besides the agent's
SIGKILL 30 s into its own shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOPS = (signal.SIGINT, signal.SIGTERM)
STOP_WITHIN_S = 60.0  # a stopping torchrun process still running then exits (code 130)


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (then it trains, it does not launch;
    read from the environment, without importing torch)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


class CtrlC:
    """SIGINT while a training step runs is held until the step is done, then raised as
    KeyboardInterrupt (a KeyboardInterrupt raised inside a C++ op's callback or a `__del__`
    can be swallowed); anywhere else, and at a second Ctrl-C, it is raised at once."""

    def __init__(self):
        self.holding = self.asked = False

    def handler(self, signum, frame):
        stopping()  # under torchrun, the agent's repeat of this stop is ignored
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
        previous = {s: signal.signal(s, self.handler) for s in STOPS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                if signal.getsignal(s) == self.handler:  # not if `stopping` set it since
                    signal.signal(s, handler)


CTRL_C = CtrlC()


def stopping() -> None:
    """A torchrun process that is stopping (interrupted, or failed) ignores further stop
    signals, such as the agent's repeat: see the module's docstring. Elsewhere nothing changes."""
    if not under_torchrun() or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # the first stop: start the watch
        watchdog = threading.Timer(STOP_WITHIN_S, os._exit, (130,))
        watchdog.daemon = True
        watchdog.start()
    for s in STOPS:
        signal.signal(s, signal.SIG_IGN)
