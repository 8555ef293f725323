"""The one console logger: progress lines on stderr (stdout is kept for results), flushed at
once so that a killed run's log ends where it stopped."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
