import asyncio
import contextlib
import io
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

import cifarlab
from cifarlab.data.image import decode_image
from cifarlab.deploy.serve import bind, create_app
from cifarlab.deploy.serve.batching import MicroBatcher

from .conftest import CLASSES
from .test_export import train_tiny

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(run):
    return cifarlab.load(run[0])


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor)) as c:
        yield c


def png(path) -> bytes:
    return path.read_bytes()


def jpeg(size=64, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def huge_png(megapixels=100) -> bytes:
    """A 100-megapixel PNG of a few KB: one bit per pixel, all zeros, compresses to nothing."""
    side = int((megapixels * 1e6) ** 0.5)
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


@contextlib.contextmanager
def running_server(app):
    """A real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_health_metadata_and_page(client, predictor):
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["classes"] == CLASSES and meta["image_size"] == 32 and meta["input_size"] == 32
    assert meta["model"] == "seed_cnn" and meta["version"] == cifarlab.__version__
    assert meta["limits"]["max_files"] >= 1
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "//cdn" not in page.text and "https://" not in page.text


def test_predict_returns_top_k_per_image_in_upload_order(client, predictor, run):
    paths = [run[1] / c / "003.png" for c in CLASSES]
    files = [
        ("file", (p.name + c, png(p), "image/png")) for p, c in zip(paths, CLASSES, strict=True)
    ]
    r = client.post("/predict", files=files, params={"top_k": 2})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [f"003.png{c}" for c in CLASSES]
    expected = predictor.probs(np.stack([decode_image(png(p), 32) for p in paths]))
    for pred, probs in zip(preds, expected, strict=True):
        assert len(pred["top"]) == 2
        assert pred["top"][0]["label"] == CLASSES[int(probs.argmax())]
        assert pred["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert pred["top"][0]["probability"] >= pred["top"][1]["probability"]


def test_openapi_schema_describes_the_upload(client):
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/metadata"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    for code in ("200", "413", "415", "422"):
        assert code in schema["paths"]["/predict"]["post"]["responses"]


BAD_UPLOADS = {
    "text file": (415, lambda: {"file": ("notes.txt", b"hello, not an image", "text/plain")}),
    "truncated jpeg": (422, lambda: {"file": ("cut.jpg", jpeg()[:2000], "image/jpeg")}),
    "zero bytes": (400, lambda: {"file": ("empty.png", b"", "image/png")}),
    "100 megapixel png": (413, lambda: {"file": ("bomb.png", huge_png(), "image/png")}),
    "20 MB body": (413, lambda: {"file": ("big.jpg", b"\xff" * (20 * 2**20), "image/jpeg")}),
    "17 files": (
        400,
        lambda: [("file", (f"{i}.jpg", jpeg(8, i), "image/jpeg")) for i in range(17)],
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_a_json_4xx_and_the_server_carries_on(client, case):
    status, files = BAD_UPLOADS[case]
    r = client.post("/predict", files=files())
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and len(r.json()["error"]) > 10
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "request_kw, status, message",
    [
        ({}, 422, "no image"),
        ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422, ""),
        ({"params": {"top_k": 0}, "files": {"file": ("a.jpg", jpeg())}}, 422, "top_k"),
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, 422, "no image"),
    ],
)
def test_malformed_requests_get_json_errors(client, request_kw, status, message):
    r = client.post("/predict", **request_kw)
    assert r.status_code == status and message in r.json()["error"]


def test_body_limit_holds_without_a_content_length(predictor):
    """A chunked upload (no Content-Length) is counted as it streams in."""
    app = create_app(predictor, max_upload_bytes=100_000)

    def chunks():
        boundary = b"--b\r\nContent-Disposition: form-data; name=file; filename=x.jpg\r\n\r\n"
        yield boundary
        for _ in range(50):
            yield b"\0" * 10_000

    with TestClient(app) as c:
        r = c.post(
            "/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 413 and "over 100,000 bytes" in r.json()["error"]


def test_micro_batcher_groups_concurrent_requests_and_keeps_them_apart():
    calls = []

    def run_batch(x):
        calls.append(len(x))
        time.sleep(0.01)
        return x * 10

    async def submit_all(batcher, n):
        out = await asyncio.gather(*(batcher.submit(np.array([i])) for i in range(n)))
        await batcher.close()
        return out

    out = asyncio.run(submit_all(MicroBatcher(run_batch, max_batch=8, max_wait_ms=20), 50))
    assert [int(o[0]) for o in out] == [10 * i for i in range(50)]
    assert sum(calls) == 50 and max(calls) <= 8 and len(calls) < 50
    calls.clear()
    asyncio.run(submit_all(MicroBatcher(run_batch, max_batch=1), 5))
    assert calls == [1] * 5

    def failing(x):
        raise RuntimeError("model broke")

    with pytest.raises(RuntimeError, match="model broke"):
        asyncio.run(submit_all(MicroBatcher(failing), 3))


@pytest.fixture(scope="module")
def server(predictor):
    app = create_app(predictor, max_batch=32, max_wait_ms=20)
    with running_server(app) as url:
        yield url, app


def test_real_server_predicts_and_refuses_bad_uploads(server, run):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/predict", files={"file": ("a.png", png(run[1] / "dog/000.png"))})
        assert r.status_code == 200 and r.json()["predictions"][0]["top"][0]["label"] in CLASSES
        for case, (status, files) in BAD_UPLOADS.items():
            r = http.post("/predict", files=files())
            assert r.status_code == status, (case, r.text)
            assert "error" in r.json()
        assert http.get("/health").status_code == 200


def test_concurrent_requests_share_model_calls(server, run):
    url, app = server
    batcher = app.state.batcher
    data = png(run[1] / "ship/001.png")
    n = 32

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(http.post("/predict", files={"file": (f"{i}.png", data)}) for i in range(n))
            )

    before = (batcher.batches, batcher.images)
    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    labels = {r.json()["predictions"][0]["top"][0]["label"] for r in responses}
    assert len(labels) == 1  # the same image gets the same answer in whatever batch it landed
    batches, images = batcher.batches - before[0], batcher.images - before[1]
    assert images == n
    assert batches < n / 2, f"{n} concurrent requests took {batches} model calls"


def test_cli_serve_runs_an_onnx_model_and_stops_on_ctrl_c(run, tmp_path):
    onnx_path, _ = cifarlab.api.export(run[0], out=tmp_path / "m.onnx")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifarlab", "serve", str(onnx_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stderr.read()
        url = f"http://127.0.0.1:{match.group(1)}"
        for _ in range(100):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.1)
        r = httpx.post(f"{url}/predict", files={"file": ("a.png", png(run[1] / "cat/000.png"))})
        assert r.status_code == 200 and r.json()["model"] == "seed_cnn"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
