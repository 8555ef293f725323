"""Read an image folder ROOT/<class>/*.{png,jpg,...} (or an archive of one) into an ImageSet."""

from __future__ import annotations

import logging
import multiprocessing
import os
import posixpath
import sys
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cifarlab.core.errors import UserError
from cifarlab.data.archive import ARCHIVE_SUFFIXES, is_archive, is_junk, iter_members
from cifarlab.data.dataset import ImageSet
from cifarlab.data.image import IMAGE_EXTENSIONS, BadImage, decode_image, is_image_name

POOL_MIN_IMAGES = 2000  # fewer images decode faster in this process than in a pool
SPLIT_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
LAYOUT = "expected ROOT/<class>/<image>.jpg (png, jpeg, bmp, webp also work)"
log = logging.getLogger(__name__)


def _decode_chunk(srcs: list, size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a list of images; returns the array and (index, reason) for each failure."""
    out = np.zeros((len(srcs), size, size, 3), dtype=np.uint8)
    bad = []
    for i, src in enumerate(srcs):
        try:
            out[i] = decode_image(src, size)
        except BadImage as err:
            bad.append((i, str(err)))
    return out, bad


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _decode_all(srcs: list, size: int, workers: int, progress: bool) -> tuple[np.ndarray, list]:
    """Decode every source, in a process pool when it pays; returns (images, [(index, reason)])."""
    images = np.zeros((len(srcs), size, size, 3), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    disable = None if progress else True
    if workers <= 1 or len(srcs) < POOL_MIN_IMAGES:
        step = 256
        with tqdm(total=len(srcs), desc="decoding images", unit="img", disable=disable) as bar:
            for start in range(0, len(srcs), step):
                chunk, chunk_bad = _decode_chunk(srcs[start : start + step], size)
                images[start : start + len(chunk)] = chunk
                bad += [(start + i, why) for i, why in chunk_bad]
                bar.update(len(chunk))
        return images, bad
    step = max(64, min(1024, len(srcs) // (workers * 8)))
    # fork on Linux: workers start at once and need not re-import __main__ (as torch's DataLoader)
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending = {
            pool.submit(_decode_chunk, srcs[s : s + step], size): s
            for s in range(0, len(srcs), step)
        }  # submitted before the progress bar starts its monitor thread, so forks see one thread
        with tqdm(total=len(srcs), desc="decoding images", unit="img", disable=disable) as bar:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    start = pending.pop(fut)
                    chunk, chunk_bad = fut.result()
                    images[start : start + len(chunk)] = chunk
                    bad += [(start + i, why) for i, why in chunk_bad]
                    bar.update(len(chunk))
    return images, sorted(bad)


def _list_folder(path: Path) -> tuple[list[str], dict[str, str]]:
    """All entry names under a folder (directories end in '/'), and image name -> file path."""
    names, images = [], {}
    for dirpath, dirs, files in os.walk(path):
        rel_dir = os.path.relpath(dirpath, path).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if not d.startswith(".") and not is_junk(rel_dir + d)]
        names += [rel_dir + d + "/" for d in dirs]
        for f in files:
            rel = rel_dir + f
            if is_junk(rel) or f.startswith("."):
                continue
            names.append(rel)
            if is_image_name(f):
                images[rel] = os.path.join(dirpath, f)
    return names, images


def _read_archive(path: Path, progress: bool) -> tuple[list[str], dict[str, bytes]]:
    """All member names of an archive (directories end in '/'), and image name -> bytes."""
    names: list[str] = []
    images: dict[str, bytes] = {}
    disable = None if progress else True
    with tqdm(desc=f"reading {path.name}", unit="img", disable=disable) as bar:
        for name, data in iter_members(path, want=is_image_name, seen=names):
            images[name] = data
            bar.update()
    return names, images


def _tree(names: list[str]) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Subfolders of each folder, and the number of images directly in each folder ('' = top)."""
    subdirs: dict[str, set[str]] = defaultdict(set)
    n_images: dict[str, int] = defaultdict(int)
    for name in names:
        parts = name.rstrip("/").split("/")
        hidden = any(p.startswith(".") for p in parts[:-1] if p)
        if hidden or (name.endswith("/") and parts[-1].startswith(".")):
            continue
        dirs = parts if name.endswith("/") else parts[:-1]
        for i, d in enumerate(dirs):
            subdirs["/".join(dirs[:i])].add(d)
        if not name.endswith("/") and is_image_name(parts[-1]):
            n_images["/".join(dirs)] += 1
    return subdirs, n_images


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _find_root(names: list[str], split: str, where: Path) -> tuple[str, list[str]]:
    """The folder holding the class folders, and the sorted class names.

    Descends through a lone wrapper folder (e.g. `train/`), and into the folder named after
    `split` when a level holds only split folders (train/, val/, test/).
    """
    subdirs, n_images = _tree(names)
    root, chose_split, other_split = "", False, False
    aliases = SPLIT_NAMES.get(split, (split,))
    while True:
        subs = sorted(subdirs.get(root, ()))
        is_split = [s for s in subs if any(s.lower() in a for a in SPLIT_NAMES.values())]
        if subs and len(is_split) == len(subs) and not n_images.get(root) and len(subs) > 1:
            match = [s for s in subs if s.lower() in aliases]
            if not match:
                raise UserError(
                    f"{where} has split folders {', '.join(subs)} but none for split {split!r}; "
                    "choose one of those splits"
                )
            root, chose_split = _join(root, match[0]), True
            continue
        if len(subs) == 1 and not n_images.get(root) and subdirs.get(_join(root, subs[0])):
            root = _join(root, subs[0])
            other_split = other_split or any(
                subs[0].lower() in a for k, a in SPLIT_NAMES.items() if k != split
            )
            continue
        break
    if other_split and not chose_split:
        raise UserError(
            f"split {split!r} was asked for, but {where} holds only another split's folder "
            f"({root}); pass a folder with a {split}/ folder or a plain class-folder tree"
        )
    where_root = f"{where}/{root}" if root else str(where)
    if not subs:
        found = "images directly in it" if n_images.get(root) else "nothing usable"
        raise UserError(f"{where_root} has no class folders ({found}); {LAYOUT}")
    if len(subs) == 1:
        raise UserError(
            f"{where_root} has only one class folder ({subs[0]}); a classifier needs at least two: "
            f"add a folder per class, {LAYOUT}"
        )
    return root, subs


def read_image_folder(
    path: Path,
    image_size: int,
    skip_bad: bool = False,
    progress: bool = True,
    split: str = "train",
    workers: int | None = None,
) -> ImageSet:
    """Decode ROOT/<class>/* images (folder or .tar/.tar.gz/.tgz/.zip) to (N, S, S, 3) uint8.

    Classes are the sorted class-folder names; images in nested subfolders belong to their class
    folder. Files without an image extension are ignored. Unreadable images raise UserError, or
    with skip_bad are skipped and counted in one logged warning. Decoding runs in a process pool
    of `workers` (default: all usable CPUs).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; pass an image folder or archive ({LAYOUT})")
    if path.is_dir():
        names, sources = _list_folder(path)
    elif is_archive(path):
        names, sources = _read_archive(path, progress)
    else:
        raise UserError(
            f"{path} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive; "
            f"pass an image folder ({LAYOUT}) or an archive of one"
        )
    root, classes = _find_root(names, split, path)
    prefix = f"{root}/" if root else ""
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for name in sources:
        if name.startswith(prefix):
            parts = name[len(prefix) :].split("/")
            if (
                len(parts) > 1
                and parts[0] in by_class
                and not any(p.startswith(".") for p in parts)
            ):
                by_class[parts[0]].append(name)
    empty = [c for c, files in by_class.items() if not files]
    if empty:
        raise UserError(
            f"class folder(s) with no images in {path}: {', '.join(empty)}; "
            f"add images ({', '.join(IMAGE_EXTENSIONS)}) or remove the folder(s)"
        )
    order = [(n, label) for label, c in enumerate(classes) for n in sorted(by_class[c])]
    srcs = [sources[n] for n, _ in order]
    labels = np.array([label for _, label in order], dtype=np.int64)
    images, bad = _decode_all(srcs, image_size, workers or _cpus(), progress)
    if bad and not skip_bad:
        i, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(
            f"cannot read image {_where(path, order[i][0])}: {why}{more}; fix or delete the "
            "file, or pass --skip-bad to skip unreadable images"
        )
    if bad:
        keep = np.ones(len(order), dtype=bool)
        keep[[i for i, _ in bad]] = False
        images, labels = images[keep], labels[keep]
        log.warning(
            "skipped %d unreadable image file(s) in %s (first: %s: %s)",
            len(bad), path, posixpath.basename(order[bad[0][0]][0]), bad[0][1],
        )  # fmt: skip
    data = ImageSet(images, labels, classes)
    data.check_trainable()
    return data


def _where(path: Path, name: str) -> str:
    return str(path / name) if path.is_dir() else f"{name} (in {path})"
