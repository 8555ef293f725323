"""Download one file over HTTP(S): streamed, MD5-checked, moved into place atomically."""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from cifarlab.core.errors import UserError
from cifarlab.core.files import atomic_path

TIMEOUT_S = 60
_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    """Hex MD5 of a file's content, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None, progress: bool = True) -> Path:
    """Fetch `url` to `dest` and return `dest`; skipped when `dest` exists with the right MD5.

    The bytes go to a temp file next to `dest`, are checked against `md5` (when given) and are
    then renamed into place, so `dest` is never a partial file.
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or file_md5(dest) == md5.lower()):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the download folder {dest.parent} ({err}); "
            "set CIFARLAB_HOME to a writable folder"
        ) from err
    try:
        h = hashlib.md5()
        with (
            atomic_path(dest, suffix=".part") as tmp,
            open(tmp, "wb") as out,
            urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp,
        ):
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"downloading {dest.name}",
                disable=None if progress else True,
            ) as bar:
                while block := resp.read(_CHUNK):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            actual = h.hexdigest()
            if md5 is not None and actual != md5.lower():
                raise UserError(
                    f"checksum mismatch for {url}: expected md5 {md5.lower()}, got {actual}; "
                    "the download is corrupt or the file changed upstream: try again, or download it "
                    "yourself and pass the local archive's path instead"
                )
    except urllib.error.HTTPError as err:
        raise UserError(
            f"download of {url} failed: the server answered HTTP {err.code} ({err.reason}); check "
            "the URL, or download the archive yourself and pass its local path as the data source"
        ) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise UserError(
            f"download of {url} failed ({reason}); this machine may be offline: copy the archive "
            "here by other means and pass the path of the archive (or of its extracted folder) "
            "as the data source instead"
        ) from err
    return dest
