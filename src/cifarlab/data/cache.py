"""cifarlab's home folder and a content-hashed on-disk cache of decoded ImageSets."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cifarlab.core.files import atomic_path
from cifarlab.data.dataset import ImageSet

CACHE_VERSION = 1
log = logging.getLogger(__name__)


def cifarlab_home() -> Path:
    """$CIFARLAB_HOME, or ~/.cache/cifarlab: downloads and caches live here."""
    env = os.environ.get("CIFARLAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cifarlab"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path) -> str:
    """Content fingerprint: a file's sha256, or a folder's sorted (path, size, mtime_ns) listing."""
    path = Path(path)
    if path.is_file():
        return "file:" + file_sha256(path)
    h = hashlib.sha256()
    entries = []
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            entries.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    for e in sorted(entries):
        h.update(e.encode("utf-8", "surrogateescape") + b"\n")
    return "dir:" + h.hexdigest()


def cache_key(source: Path, params: dict) -> str:
    """sha256 over the cache format version, the source's fingerprint and the decoding params."""
    blob = json.dumps(
        {"version": CACHE_VERSION, "source": fingerprint(source), "params": params}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _load(path: Path) -> ImageSet | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return ImageSet(
                z["images"], z["labels"].astype(np.int64), [str(c) for c in z["classes"]]
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.debug("ignoring unreadable cache file %s: %s", path, err)
        return None


def _save(path: Path, data: ImageSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, images=data.images, labels=data.labels, classes=np.array(data.classes, dtype=str)
        )


def cached(source_path: Path, params: dict, build: Callable[[], ImageSet]) -> ImageSet:
    """Return the ImageSet for (source content, params) from the cache, or build and store it."""
    path = cifarlab_home() / "cache" / f"{cache_key(Path(source_path), params)}.npz"
    if path.exists() and (hit := _load(path)) is not None:
        return hit
    data = build()
    try:
        _save(path, data)
    except OSError as err:
        log.warning(
            "could not write the decoded-image cache %s (%s); set CIFARLAB_HOME to a writable "
            "folder to avoid decoding again next time",
            path,
            err,
        )
    return data
