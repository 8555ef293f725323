"""Reuse freed memory inside the process instead of handing it back to the kernel (glibc).

PyTorch's CPU allocator takes every tensor from malloc and frees it when the tensor dies. glibc
serves blocks above its mmap threshold (32 MiB at most) with fresh pages from the kernel and
unmaps them on free, so a training step, which frees and re-allocates the same big activation
buffers every time, faults in and zeroes gigabytes of new pages per second: `fast` at batch 1024
took 70,000-130,000 page faults per step and spent a tenth of its CPU time in the kernel. With
mmap turned off and the heap never trimmed, malloc hands the freed blocks out again and a step
takes no page faults at all (`python bench/heap.py`: 1.12x the training images/s of `fast`).

The price: the process keeps its peak heap until the block ends (then it is trimmed). The heap
needs a few steps to settle into reusable blocks; after that, a step maps no new pages. Other C
libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# restored at the end: glibc's settings as its own dynamic adjustment leaves them once a process
# has freed a large block (blocks above 32 MiB mapped, the heap trimmed above 64 MiB free)
_AFTER = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}

_depth = 0


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def reuse_freed_memory():
    """Within the block, malloc reuses freed memory instead of returning it (nests; glibc only)."""
    global _depth
    libc = _glibc()
    if libc is not None and _depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if libc is not None and _depth == 0:
            for option, value in _AFTER.items():
                libc.mallopt(option, value)
            libc.malloc_trim(0)
