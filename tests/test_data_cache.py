"""The decoded-image cache and the public load_images / describe entry points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cifarlab.data.folder as folder_mod
from cifarlab.core.errors import UserError
from cifarlab.data import describe, load_images
from cifarlab.data.cache import cache_key, cifarlab_home


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in ("b", "a"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    return root


def test_home_from_env(home):
    assert cifarlab_home() == home


def test_second_load_comes_from_cache(tmp_path, monkeypatch, home):
    src = make(tmp_path / "imgs")
    first = load_images(src, image_size=16, progress=False)
    assert len(list((home / "cache").glob("*.npz"))) == 1

    def boom(*_args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_mod, "decode_image", boom)
    second = load_images(src, image_size=16, progress=False)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert second.classes == first.classes == ["a", "b"]
    assert second.labels.dtype == np.int64
    with pytest.raises(AssertionError, match="decoded again"):
        load_images(src, image_size=16, cache=False, progress=False)


def test_key_follows_content_and_params(tmp_path):
    src = make(tmp_path / "imgs")
    params = {"image_size": 32}
    key = cache_key(src, params)
    assert cache_key(src, params) == key
    assert cache_key(src, {"image_size": 64}) != key
    (src / "a" / "0.png").write_bytes((src / "b" / "0.png").read_bytes() + b"x")
    assert cache_key(src, params) != key

    archive = tmp_path / "x.tar"
    archive.write_bytes(b"one")
    key = cache_key(archive, params)
    archive.write_bytes(b"two")
    assert cache_key(archive, params) != key


def test_corrupt_cache_file_is_rebuilt(tmp_path, home):
    src = make(tmp_path / "imgs")
    first = load_images(src, progress=False)
    (cache_file,) = (home / "cache").glob("*.npz")
    cache_file.write_bytes(b"garbage")
    again = load_images(src, progress=False)
    np.testing.assert_array_equal(first.images, again.images)


def test_describe_and_errors(tmp_path):
    data = load_images(make(tmp_path / "imgs", n=2), image_size=8, progress=False)
    assert describe(data) == {
        "n": 4,
        "classes": ["a", "b"],
        "per_class": {"a": 2, "b": 2},
        "image_size": 8,
    }
    with pytest.raises(UserError, match="does not exist"):
        load_images(tmp_path / "missing")
    with pytest.raises(UserError, match="image size"):
        load_images(tmp_path / "imgs", image_size=0)
