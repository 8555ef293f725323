"""Image folders and their archives: modes, sizes, bad files, unsafe members, layout errors."""

from __future__ import annotations

import io
import logging
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.core.errors import UserError
from cifarlab.data.archive import iter_members
from cifarlab.data.folder import read_image_folder


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "home"))


def save(path: Path, mode: str, size: tuple[int, int], fmt: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        img = img.convert("RGB").quantize(16)
    elif mode == "I;16":
        img = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    img.save(path, format=fmt, **({"transparency": 0} if fmt == "PNG" and mode == "P" else {}))


def mixed_folder(root: Path) -> Path:
    """3 classes, 8 images: PNG/JPEG/BMP in modes L, LA, RGBA, P, RGB, I;16, CMYK, mixed sizes."""
    save(root / "cat" / "a.png", "RGBA", (32, 32), "PNG", 1)
    save(root / "cat" / "b.JPG", "L", (50, 40), "JPEG", 2)
    save(root / "dog" / "c.bmp", "P", (20, 20), "BMP", 3)
    save(root / "dog" / "d.png", "P", (32, 32), "PNG", 4)
    save(root / "bird" / "e.jpeg", "RGB", (32, 32), "JPEG", 5)
    save(root / "bird" / "f.png", "LA", (64, 16), "PNG", 6)
    save(root / "bird" / "g.png", "I;16", (32, 32), "PNG", 7)
    save(root / "dog" / "h.jpg", "CMYK", (33, 31), "JPEG", 8)
    (root / "bird" / "notes.txt").write_text("not an image")
    (root / "README").write_text("readme")
    return root


def tar_of(folder: Path, dest: Path, top: str = "train") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=top)
    return dest


def zip_of(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder).as_posix())
        zf.writestr("__MACOSX/cat/._a.png", b"junk")
        zf.writestr("cat/.DS_Store", b"junk")
    return dest


def test_folder_tar_zip_agree(tmp_path):
    folder = mixed_folder(tmp_path / "imgs")
    sets = [
        read_image_folder(src, 24, progress=False)
        for src in (
            folder,
            tar_of(folder, tmp_path / "a.tar.gz"),
            zip_of(folder, tmp_path / "a.zip"),
        )
    ]
    for data in sets:
        assert data.images.shape == (8, 24, 24, 3) and data.images.dtype == np.uint8
        assert data.classes == ["bird", "cat", "dog"]
        assert data.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
        np.testing.assert_array_equal(data.images, sets[0].images)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    folder = mixed_folder(tmp_path / "imgs")
    data = read_image_folder(folder, 32, progress=False)
    expected = np.asarray(Image.open(folder / "bird" / "g.png"), dtype=np.float64) / 257
    np.testing.assert_array_equal(data.images[2, :, :, 0], np.rint(expected).astype(np.uint8))


def test_right_size_is_not_resampled(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "f" / c / "x.png")
    data = read_image_folder(tmp_path / "f", 32, progress=False)
    np.testing.assert_array_equal(data.images[0], pixels)


def test_pool_matches_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr("cifarlab.data.folder.POOL_MIN_IMAGES", 1)
    folder = mixed_folder(tmp_path / "imgs")
    pooled = read_image_folder(folder, 16, progress=False, workers=2)
    single = read_image_folder(folder, 16, progress=False, workers=1)
    np.testing.assert_array_equal(pooled.images, single.images)


def test_corrupt_image_named_and_skippable(tmp_path, caplog):
    folder = mixed_folder(tmp_path / "imgs")
    (folder / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match=r"broken\.jpg.*--skip-bad"):
        read_image_folder(folder, 16, progress=False)
    with caplog.at_level(logging.WARNING):
        data = read_image_folder(folder, 16, skip_bad=True, progress=False)
    assert len(data) == 8
    assert "skipped 1 unreadable" in caplog.text


def test_corrupt_image_in_archive_named(tmp_path):
    folder = mixed_folder(tmp_path / "imgs")
    (folder / "cat" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match=r"train/cat/zz\.png"):
        read_image_folder(tar_of(folder, tmp_path / "a.tgz"), 16, progress=False)


def test_layout_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_image_folder(tmp_path / "nope", 32)
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "a.png", "RGB", (8, 8), "PNG")
    with pytest.raises(UserError, match="no class folders"):
        read_image_folder(tmp_path / "flat", 32)
    save(tmp_path / "one" / "cat" / "a.png", "RGB", (8, 8), "PNG")
    with pytest.raises(UserError, match="only one class folder"):
        read_image_folder(tmp_path / "one", 32)
    folder = mixed_folder(tmp_path / "imgs")
    (folder / "empty").mkdir()
    (folder / "textonly").mkdir()
    (folder / "textonly" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="no images.*empty, textonly"):
        read_image_folder(folder, 32)
    with pytest.raises(UserError, match="empty"):
        read_image_folder(tar_of(folder, tmp_path / "e.tar.gz"), 32)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="neither a folder nor"):
        read_image_folder(tmp_path / "x.csv", 32)


def test_split_folders(tmp_path):
    for split in ("train", "test"):
        for c in ("a", "b"):
            save(tmp_path / "d" / split / c / f"{split}.png", "RGB", (8, 8), "PNG")
    assert len(read_image_folder(tmp_path / "d", 8, split="test")) == 2
    only_train = tar_of(tmp_path / "d" / "train", tmp_path / "t.tar")
    assert len(read_image_folder(only_train, 8)) == 2
    with pytest.raises(UserError, match="only another split's folder"):
        read_image_folder(only_train, 8, split="test")
    plain = tmp_path / "d" / "test"  # class folders without split folders: the whole set, any split
    assert len(read_image_folder(plain, 8, split="test")) == 2


def test_oversized_image_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("cifarlab.data.image.MAX_PIXELS", 1000)
    folder = mixed_folder(tmp_path / "imgs")
    with pytest.raises(UserError, match="megapixel limit"):
        read_image_folder(folder, 16, progress=False)


def evil_tar(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w") as tf:
        good = tarfile.TarInfo("train/cat/a.png")
        good.size = 3
        tf.addfile(good, io.BytesIO(b"abc"))
        if kind == "dotdot":
            bad = tarfile.TarInfo("train/../../evil.png")
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        else:
            bad = tarfile.TarInfo("train/dog/link.png")
            bad.type = tarfile.SYMTYPE
            bad.linkname = "/etc/passwd"
            tf.addfile(bad)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_unsafe_tar_members_refused(tmp_path, kind):
    archive = evil_tar(tmp_path / "evil.tar", kind)
    member = "evil.png" if kind == "dotdot" else "link.png"
    with pytest.raises(UserError, match=member):
        read_image_folder(archive, 8)
    with pytest.raises(UserError, match=member):
        list(iter_members(archive))
    assert not (tmp_path / "evil.png").exists()  # archives are read in place, never extracted


def test_unsafe_zip_members_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/a.png", b"abc")
        zf.writestr("../evil.png", b"evil")
    with pytest.raises(UserError, match=r"\.\./evil\.png"):
        list(iter_members(archive))
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("cat/link.png")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UserError, match="link"):
        read_image_folder(archive, 8)
    assert not (tmp_path / "evil.png").exists()
