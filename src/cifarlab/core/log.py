"""The one console logger: progress lines on stderr (stdout is kept for results), flushed at
once so that a killed run's log ends where it stopped. Under torchrun only rank 0 speaks."""

from __future__ import annotations

import os
import sys


def speaks() -> bool:
    """Under torchrun, rank 0 alone prints (read from torchrun's environment: no torch import,
    so the CLI can ask before loading anything)."""
    return os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    if speaks():
        print(msg, file=sys.stderr, flush=True)
