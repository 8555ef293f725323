"""The real shared CIFAR-10 JPEG archive (slow: decodes 50,000 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cifarlab.data import load_images
from cifarlab.data.cifar10 import CLASSES

NAME = "cifar10-jpeg-train.tar.gz"
CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "data" / NAME,
    Path("/work/shared/data") / NAME,
]
ARCHIVE = next((p for p in CANDIDATES if p.is_file()), None)


@pytest.mark.slow
@pytest.mark.skipif(ARCHIVE is None, reason=f"{NAME} not found in shared/data")
def test_shared_cifar10_jpeg_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "home"))
    data = load_images(ARCHIVE, image_size=32, progress=False)
    assert data.images.shape == (50_000, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.classes == CLASSES
    assert data.class_counts().tolist() == [5000] * 10
    again = load_images(ARCHIVE, image_size=32, progress=False)  # from the cache
    np.testing.assert_array_equal(again.images, data.images)
