"""The one console logger: progress lines on stderr (stdout is kept for results), flushed at
once so that a killed run's log ends where it stopped. Under torchrun only rank 0 speaks."""

from __future__ import annotations

import os
import sys


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)
