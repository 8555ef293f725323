"""The official CIFAR-10 archives (binary and python versions): download, recognize, read."""

from __future__ import annotations

import io
import pickle
import posixpath
from pathlib import Path
from typing import Literal

import numpy as np

from cifarlab.core.errors import UserError
from cifarlab.data.archive import is_archive, iter_members, member_names
from cifarlab.data.cache import cifarlab_home
from cifarlab.data.dataset import ImageSet
from cifarlab.data.download import download

BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
PYTHON_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_BATCH_DIRS = ("cifar-10-batches-bin", "cifar-10-batches-py")
_BINARY_META, _PYTHON_META = "batches.meta.txt", "batches.meta"
_MARKERS = {_BINARY_META, _PYTHON_META, "data_batch_1", "data_batch_1.bin", "test_batch.bin"}
_RECORD = 1 + 3 * 32 * 32
_REDOWNLOAD = "download CIFAR-10 again (data source 'cifar10') or pass a complete copy"


def download_cifar10(
    root: Path | None = None, url: str = BINARY_URL, md5: str = BINARY_MD5, progress: bool = True
) -> Path:
    """Download the CIFAR-10 archive into `root` (default: cifarlab_home()/datasets); its path."""
    root = Path(root) if root is not None else cifarlab_home() / "datasets"
    name = posixpath.basename(url.split("?")[0]) or "cifar-10-binary.tar.gz"
    return download(url, root / name, md5, progress=progress)


def _batch_dir(path: Path) -> Path | None:
    """The folder holding the batch files: `path` itself or its cifar-10-batches-* child."""
    for d in (path, *(path / n for n in _BATCH_DIRS)):
        if d.is_dir() and any((d / m).is_file() for m in _MARKERS):
            return d
    return None


def is_cifar10(path: Path) -> bool:
    """Whether `path` is an official CIFAR-10 archive or extracted folder (either version)."""
    path = Path(path)
    if path.is_dir():
        return _batch_dir(path) is not None
    if not (path.is_file() and is_archive(path)):
        return False
    if path.name.lower() in ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"):
        return True
    try:  # the official archives start with their cifar-10-batches-* folder
        names = member_names(path, limit=20)
    except UserError:
        return False
    for name in names:
        parts = name.rstrip("/").split("/")
        if parts[-1] in _MARKERS or any(p in _BATCH_DIRS for p in parts):
            return True
    return False


def _read_files(path: Path, names: set[str]) -> dict[str, bytes]:
    """Bytes of the wanted batch files (by base name) from a folder or an archive."""
    found: dict[str, bytes] = {}
    if path.is_dir():
        d = _batch_dir(path) or path
        for n in names:
            if (d / n).is_file():
                found[n] = (d / n).read_bytes()
        return found
    for member, data in iter_members(path, want=lambda m: posixpath.basename(m) in names):
        found.setdefault(posixpath.basename(member), data)
    return found


def parse_binary_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes (CHW) -> (uint8 NHWC images, int64 labels)."""
    if len(data) % _RECORD:
        raise UserError(f"{name} is {len(data)} bytes, not whole 3073-byte records; {_REDOWNLOAD}")
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rec[:, 0].astype(np.int64)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays and plain builtins (what CIFAR batches hold)."""

    source = "<pickle>"
    _SAFE_BUILTINS = {
        "list", "dict", "tuple", "set", "frozenset", "bytearray",
        "bytes", "str", "int", "float", "complex", "bool", "slice",
    }  # fmt: skip

    # numpy's own reconstructors, found from its reductions (numpy.core vs numpy._core differ)
    _NUMPY = {
        ("multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numeric", "_frombuffer"): np.empty(1).__reduce_ex__(5)[0],
    }

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in self._SAFE_BUILTINS:
            return super().find_class("builtins", name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("_codecs", "codecs") and name == "encode":  # bytes in protocol < 3
            return super().find_class("_codecs", "encode")
        if module.startswith(("numpy.core.", "numpy._core.")):
            obj = self._NUMPY.get((module.rsplit(".", 1)[1], name))
            if obj is not None:
                return obj
        raise UserError(
            f"refusing to unpickle {module}.{name} from {self.source}: CIFAR-10 batches only hold "
            f"numpy arrays and lists, so this file is not a genuine batch; {_REDOWNLOAD}"
        )


def restricted_loads(data: bytes, source: str) -> object:
    """Unpickle `data` with RestrictedUnpickler (Python 2 strings come back as bytes)."""
    up = RestrictedUnpickler(io.BytesIO(data), encoding="bytes")
    up.source = source
    try:
        return up.load()
    except UserError:
        raise
    except Exception as err:  # malformed pickles raise many types
        raise UserError(f"{source} is not a readable pickle ({err}); {_REDOWNLOAD}") from err


def _get(d: dict, key: str):
    return d.get(key.encode(), d.get(key))


def parse_python_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A python-version batch (pickled dict: data (N, 3072) uint8, labels) -> (images, labels)."""
    d = restricted_loads(data, name)
    pixels = _get(d, "data") if isinstance(d, dict) else None
    labels = _get(d, "labels") if isinstance(d, dict) else None
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.shape[1:] != (3072,)
    ):
        raise UserError(f"{name} has no (N, 3072) uint8 'data' array; {_REDOWNLOAD}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(pixels),):
        raise UserError(f"{name} has {labels.size} labels for {len(pixels)} images; {_REDOWNLOAD}")
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _class_names(meta: bytes | None, binary: bool, source: str) -> list[str]:
    if meta is None:
        return list(CLASSES)
    if binary:
        return [line.strip() for line in meta.decode("utf-8").splitlines() if line.strip()]
    d = restricted_loads(meta, source)
    names = _get(d, "label_names") if isinstance(d, dict) else None
    if not isinstance(names, list) or not names:
        raise UserError(f"{source} has no 'label_names' list; {_REDOWNLOAD}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def read_cifar10(path: Path, split: Literal["train", "test"] = "train") -> ImageSet:
    """Read one split of official CIFAR-10 from its archive or extracted folder (either version).

    Archives are read in memory, never extracted; python-version pickles go through
    RestrictedUnpickler.
    """
    path = Path(path)
    if split not in _BATCHES:
        raise UserError(f"CIFAR-10 has splits 'train' and 'test', not {split!r}; pick one of them")
    if not is_cifar10(path):
        raise UserError(
            f"{path} is not an official CIFAR-10 archive or folder (no cifar-10-batches-bin/ or "
            "cifar-10-batches-py/ files found); pass the .tar.gz or the extracted folder"
        )
    wanted = {_BINARY_META, _PYTHON_META, *_BATCHES[split], *(b + ".bin" for b in _BATCHES[split])}
    files = _read_files(path, wanted)
    binary = _BINARY_META in files or any(n.endswith(".bin") for n in files)
    suffix, meta_name = (".bin", _BINARY_META) if binary else ("", _PYTHON_META)
    batches = [b + suffix for b in _BATCHES[split]]
    missing = [b for b in batches if b not in files]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} for split {split!r}; {_REDOWNLOAD}")
    parse = parse_binary_batch if binary else parse_python_batch
    parts = [parse(files[b], f"{path}:{b}") for b in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    classes = _class_names(files.get(meta_name), binary, f"{path}:{meta_name}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise UserError(
            f"{path} has label {int(labels.max())} but only {len(classes)} class names; "
            + _REDOWNLOAD
        )
    return ImageSet(images, labels, classes)
