"""Safe reading of .tar, .tar.gz/.tgz and .zip archives: members are checked (no path escape,
no links) and read in memory; nothing is ever extracted to disk."""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cifarlab.core.errors import UserError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def is_archive(path: Path) -> bool:
    """Whether `path` names a supported archive (by its suffix)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_junk(relpath: str) -> bool:
    """OS clutter that is never data: __MACOSX/, .DS_Store, AppleDouble `._*` files, Thumbs.db."""
    parts = relpath.split("/")
    name = parts[-1]
    return "__MACOSX" in parts or name in _JUNK_NAMES or name.startswith("._")


def _refuse(archive: Path, member: str, why: str) -> UserError:
    return UserError(
        f"refusing to read archive {archive}: member {member!r} {why}; "
        "this archive is unsafe or malformed, rebuild it with plain files and folders only"
    )


def _safe_name(archive: Path, name: str) -> str:
    """The member's normalized relative posix path, or UserError if it is absolute or escapes."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise _refuse(archive, name, "has an absolute path")
    norm = posixpath.normpath(posix)
    if norm == ".." or norm.startswith("../"):
        raise _refuse(archive, name, "points outside the archive root ('..')")
    return "" if norm == "." else norm


def _unreadable(archive: Path, err: Exception) -> UserError:
    return UserError(
        f"cannot read archive {archive} ({type(err).__name__}: {err}); "
        "the file may be incomplete or corrupt, download or create it again"
    )


def _tar_members(archive: Path, tf: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    for m in tf:
        name = _safe_name(archive, m.name)
        if m.issym() or m.islnk():
            raise _refuse(archive, m.name, "is a link")
        if not (m.isreg() or m.isdir()):
            raise _refuse(archive, m.name, "is a device, fifo or other special file")
        if name:
            yield name, m


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> Iterator[tuple[str, zipfile.ZipInfo]]:
    for info in zf.infolist():
        name = _safe_name(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _refuse(archive, info.filename, "is a link")
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _refuse(archive, info.filename, "is a device, fifo or other special file")
        if name:
            yield name, info


def member_names(archive: Path, limit: int | None = None) -> list[str]:
    """Safe non-junk member names (directories end in '/'), at most `limit`, without reading data."""
    names: list[str] = []
    archive = Path(archive)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = ((n, i.is_dir()) for n, i in _zip_members(archive, zf))
                names = _take(members, limit)
        else:
            with tarfile.open(archive, "r:*") as tf:
                names = _take(((n, m.isdir()) for n, m in _tar_members(archive, tf)), limit)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError) as err:
        raise _unreadable(archive, err) from err
    except OSError as err:
        raise _unreadable(archive, err) from err
    return names


def _take(members: Iterator[tuple[str, bool]], limit: int | None) -> list[str]:
    out: list[str] = []
    for name, is_dir in members:
        if limit is not None and len(out) >= limit:
            break
        if not is_junk(name):
            out.append(name + "/" if is_dir else name)
    return out


def iter_members(
    archive: Path,
    want: Callable[[str], bool] | None = None,
    seen: list[str] | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Yield (relative posix path, bytes) of the regular files in `archive`, in archive order.

    Nothing is written to disk. Unsafe members (absolute, escaping with '..', links, devices)
    raise UserError; directories and junk (__MACOSX/, .DS_Store) are skipped. Only members for
    which `want(path)` is true are read. If `seen` is given, every safe non-junk member name is
    appended to it (directories with a trailing '/'), wanted or not.
    """
    archive = Path(archive)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name, info in _zip_members(archive, zf):
                    if is_junk(name):
                        continue
                    if seen is not None:
                        seen.append(name + "/" if info.is_dir() else name)
                    if not info.is_dir() and (want is None or want(name)):
                        yield name, zf.read(info)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for name, m in _tar_members(archive, tf):
                    if is_junk(name):
                        continue
                    if seen is not None:
                        seen.append(name + "/" if m.isdir() else name)
                    if m.isreg() and (want is None or want(name)):
                        f = tf.extractfile(m)
                        yield name, f.read() if f is not None else b""
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError) as err:
        raise _unreadable(archive, err) from err
    except OSError as err:  # gzip.BadGzipFile, truncated files
        raise _unreadable(archive, err) from err
