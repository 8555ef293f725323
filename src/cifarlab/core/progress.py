"""Progress bars: one place that decides whether they show. tqdm on stderr, only on a terminal,
and never with --no-progress (`enabled(False)`). Long steps (validation, scoring, feature
extraction, export checks) wrap their loops in `bar`."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm

_on = True


def enabled(on: bool | None = None) -> bool:
    """Turn the bars on or off for this process (`None`: just ask)."""
    global _on
    if on is not None:
        _on = bool(on)
    return _on


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", **kw) -> tqdm:
    """A bar that disappears when done (leave=False) and is silent off a terminal."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=kw.pop("leave", False),
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not _on or not sys.stderr.isatty(),
        **kw,
    )
