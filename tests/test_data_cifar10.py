"""Official CIFAR-10 layouts: download from a local server, binary and python versions, unpickling."""

from __future__ import annotations

import functools
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from cifarlab.core.errors import UserError
from cifarlab.data import download_cifar10, load_images
from cifarlab.data.cifar10 import CLASSES, is_cifar10, read_cifar10, restricted_loads
from cifarlab.data.download import file_md5

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_batches(n: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random (images NHWC uint8, labels) per official batch name."""
    rng = np.random.default_rng(seed)
    return {
        b: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
        for b in BATCHES
    }


def add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def binary_archive(path: Path, batches: dict) -> Path:
    """A .tar.gz in the official binary layout (cifar-10-batches-bin/*.bin, batches.meta.txt)."""
    with tarfile.open(path, "w:gz") as tf:
        top = tarfile.TarInfo("cifar-10-batches-bin")
        top.type = tarfile.DIRTYPE
        tf.addfile(top)
        add_file(
            tf, "cifar-10-batches-bin/batches.meta.txt", ("\n".join(CLASSES) + "\n\n").encode()
        )
        for name, (images, labels) in batches.items():
            chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
            records = np.concatenate([labels[:, None].astype(np.uint8), chw], axis=1)
            add_file(tf, f"cifar-10-batches-bin/{name}.bin", records.tobytes())
    return path


def python_folder(root: Path, batches: dict, protocol: int = 2) -> Path:
    """The official python layout (cifar-10-batches-py/: pickled dicts with bytes keys)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    for name, (images, labels) in batches.items():
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in labels],
            b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return root


def expected(batches: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = BATCHES[:5] if split == "train" else ["test_batch"]
    return (
        np.concatenate([batches[n][0] for n in names]),
        np.concatenate([batches[n][1] for n in names]),
    )


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields (base url, list of requested paths)."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(www))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requests
    httpd.shutdown()
    httpd.server_close()


def test_download_and_read_binary_roundtrip(server, home):
    base, www, requests = server
    batches = fake_batches()
    archive = binary_archive(www / "cifar-10-binary.tar.gz", batches)
    md5 = file_md5(archive)

    path = download_cifar10(url=f"{base}/cifar-10-binary.tar.gz", md5=md5, progress=False)
    assert path == home / "datasets" / "cifar-10-binary.tar.gz"
    assert is_cifar10(path)
    for split in ("train", "test"):
        data = read_cifar10(path, split)
        images, labels = expected(batches, split)
        np.testing.assert_array_equal(data.images, images)
        np.testing.assert_array_equal(data.labels, labels)
        assert data.labels.dtype == np.int64
        assert data.classes == CLASSES
    assert len(requests) == 1

    again = download_cifar10(url=f"{base}/cifar-10-binary.tar.gz", md5=md5, progress=False)
    assert again == path and len(requests) == 1  # present with the right md5: no request


def test_download_checksum_mismatch_leaves_nothing(server, home):
    base, www, _ = server
    binary_archive(www / "cifar-10-binary.tar.gz", fake_batches())
    url = f"{base}/cifar-10-binary.tar.gz"
    with pytest.raises(UserError, match="checksum mismatch") as err:
        download_cifar10(url=url, md5="0" * 32, progress=False)
    assert "0" * 32 in str(err.value) and url in str(err.value)
    assert os.listdir(home / "datasets") == []


def test_download_network_error_says_offline(home):
    with pytest.raises(UserError, match="offline") as err:
        download_cifar10(url="http://127.0.0.1:9/cifar-10-binary.tar.gz", md5="0" * 32)
    assert "path" in str(err.value)
    assert os.listdir(home / "datasets") == []


def test_http_404_is_user_error(server):
    base, _, _ = server
    with pytest.raises(UserError, match="404"):
        download_cifar10(url=f"{base}/missing.tar.gz", md5="0" * 32, progress=False)


def test_extracted_binary_folder_and_load_images(tmp_path):
    batches = fake_batches(seed=1)
    archive = binary_archive(tmp_path / "c.tar.gz", batches)
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    for src in (tmp_path / "x", tmp_path / "x" / "cifar-10-batches-bin", archive):
        data = load_images(src, split="test", progress=False)
        np.testing.assert_array_equal(data.images, batches["test_batch"][0])
    bigger = load_images(archive, image_size=40, split="test", progress=False)
    assert bigger.images.shape == (3, 40, 40, 3)


def test_python_version_roundtrip(tmp_path):
    batches = fake_batches(seed=2)
    root = python_folder(tmp_path / "py", batches)
    assert is_cifar10(root)
    data = read_cifar10(root, "train")
    images, labels = expected(batches, "train")
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.classes == CLASSES

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = read_cifar10(archive, "test")
    np.testing.assert_array_equal(data.images, batches["test_batch"][0])


def test_python_version_modern_pickle_protocol(tmp_path):
    batches = fake_batches(seed=3)
    data = read_cifar10(python_folder(tmp_path / "py", batches, protocol=5), "test")
    np.testing.assert_array_equal(data.images, batches["test_batch"][0])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="refusing to unpickle .*system"):
        restricted_loads(pickle.dumps({b"data": Evil()}), "evil")
    root = python_folder(tmp_path / "py", fake_batches())
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="refusing to unpickle"):
        read_cifar10(root, "test")
    for payload in (pickle.dumps(eval), pickle.dumps(getattr)):
        with pytest.raises(UserError, match="refusing to unpickle"):
            restricted_loads(payload, "evil")
    assert not (tmp_path / "pwned.txt").exists()


def test_bad_split_and_missing_batches(tmp_path):
    root = python_folder(tmp_path / "py", fake_batches())
    with pytest.raises(UserError, match="'train' and 'test'"):
        read_cifar10(root, "val")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        read_cifar10(root, "train")
