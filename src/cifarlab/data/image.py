"""Decode one image (file or bytes) into the in-memory form: RGB uint8, square, a given size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cifarlab.core.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_PIXELS = 40_000_000  # refuse larger images (decompression bombs, absurd scans)


class BadImage(Exception):
    """One file that is not a decodable image within the limits."""


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; 16-bit and float images are rescaled, not clipped."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif im.mode != "F" and a.size and a.max() > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(src: bytes | str, size: int) -> np.ndarray:
    """Decode one image (bytes or a file path) to a (size, size, 3) uint8 RGB array."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"{w}x{h} is over the {MAX_PIXELS // 1_000_000} megapixel limit")
            im.draft("RGB", (size, size))  # JPEG: let libjpeg shrink big images cheaply
            if im.getexif().get(0x0112, 1) != 1:
                im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage(f"over the pixel limit ({err})") from err
    except Exception as err:  # Pillow raises many types on corrupt data
        raise BadImage(f"{type(err).__name__}: {err}") from err


def read_image(src: bytes | str | Path, size: int, name: str | None = None) -> np.ndarray:
    """`decode_image` for one user-given image: an unreadable one is a UserError naming it."""
    try:
        return decode_image(src if isinstance(src, bytes) else str(src), size)
    except BadImage as err:
        label = name or (str(src) if not isinstance(src, bytes) else "image")
        raise UserError(f"{label}: not a readable image ({err}); replace or remove it") from None
