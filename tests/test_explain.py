"""Explanations (Grad-CAM): the maths on a hand-computed case, that a heatmap finds the object,
and the command line, report and service around it."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cifarlab
from cifarlab.cli import main
from cifarlab.eval.explain import cam_layer, gradcam, overlay

from .conftest import CLASSES
from .test_export import train_tiny

SQUARE_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
SIDE = 10  # the square's side in a 32 x 32 image (twice that at 64 px)


class CamNet(nn.Module):
    """conv 1x1 -> ReLU -> global average pool -> linear: Grad-CAM equals the class activation
    map relu(sum_k w_ck A_k), which can be written down by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

    def cam_layer(self):
        return self.conv


def test_gradcam_is_the_class_activation_map_of_a_pooled_linear_model():
    torch.manual_seed(0)
    net = CamNet()
    x = torch.randn(3, 3, 6, 6)
    maps, probs = gradcam(net, cam_layer(net), x, torch.tensor([0, 1, 1]))
    a = net.conv(x).detach()
    for i, c in enumerate([0, 1, 1]):
        expected = torch.relu((net.fc.weight[c].detach()[:, None, None] * a[i]).sum(0))
        expected = expected / expected.max()
        np.testing.assert_allclose(maps[i], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(net(x), 1).detach().numpy(), atol=1e-6)
    plus, _ = gradcam(net, net.conv, x, torch.tensor([0, 1, 1]), method="gradcam++")
    assert plus.shape == maps.shape and 0 <= plus.min() and plus.max() <= 1 + 1e-6


def test_gradcam_leaves_the_model_as_it_was():
    net = CamNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gradcam(net, net.conv, torch.randn(2, 3, 5, 5))
    assert net.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.conv._forward_hooks  # hook removed


def squares(
    n: int, seed: int, size: int = 32
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Noise images with one coloured square at a random place: the label is its colour."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 166, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    side = SIDE * size // 32
    corners = []
    for img, label in zip(images, labels, strict=True):
        y, x = rng.integers(0, size - side + 1, 2)
        img[y : y + side, x : x + side] = list(SQUARE_COLOURS.values())[label]
        corners.append((int(y), int(x)))
    return images, labels, corners


MODELS = {  # (model, image size). FastNet is not here: a small one trained on this task keys on
    # the whole image's colour (peak inside the square in 44% of images at 64 px); the shipped
    # `fast` model's peaks do follow the object (bench/explain_sanity.py)
    "seed_cnn": ("{name: seed_cnn, widths: [16, 32, 32], convs_per_block: 1, dense: 32}", 32),
}


@pytest.fixture(scope="module", params=list(MODELS))
def square_run(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("squares")
    model, size = MODELS[request.param]
    images, labels, _ = squares(900, seed=1, size=size)
    names = list(SQUARE_COLOURS)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / "data" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    (root / "squares.yaml").write_text(
        "name: squares\nprecision: fp32\nmemory_format: contiguous\n"
        f"model: {model}\n"
        f"data: {{val_fraction: 0.2, image_size: {size}}}\n"
        "train: {epochs: 6, batch_size: 32, lr: 0.003}\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_HOME", str(root / "home"))
        result = cifarlab.train(root / "squares.yaml", root / "data", root / "run", progress=False)
    return root / "run", result, size


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_the_heatmap_peak_falls_inside_the_square_the_label_comes_from(square_run, method):
    run, result, size = square_run
    assert result["val"]["accuracy"] > 0.95  # the model learned the task
    predictor = cifarlab.load(run)
    images, labels, corners = squares(200, seed=7, size=size)  # images the model never saw
    side = SIDE * size // 32
    names = list(SQUARE_COLOURS)
    wanted = [predictor.classes.index(names[label]) for label in labels]
    maps, probs = predictor.explain(images, wanted, method)
    assert (probs.argmax(1) == wanted).mean() > 0.95
    inside = 0
    for heat, (y, x) in zip(maps, corners, strict=True):
        py, px = np.unravel_index(heat.argmax(), heat.shape)
        inside += y <= py < y + side and x <= px < x + side
    assert inside / len(images) >= 0.9, f"peak inside the square in {inside} of {len(images)}"
    assert maps.shape == (200, size, size) and maps.max() <= 1 + 1e-6 and maps.min() >= 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_tiny(tmp_path_factory)


def test_explain_writes_one_png_per_image_with_the_predicted_class(tiny, tmp_path, capsys):
    run, folder = tiny
    out = tmp_path / "cams"
    main(["explain", str(run), str(folder / "cat"), "--out", str(out), "--json", "--top-k", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(list((folder / "cat").iterdir()))
    for r in rows:
        assert r["class"] in CLASSES and len(r["top"]) == 2 and r["top"][0]["label"] == r["class"]
        with Image.open(r["png"]) as im:
            assert im.size[0] > 2 * im.size[1]  # image, overlay and bars side by side
    main(["explain", str(run), str(folder / "cat"), "--out", str(out), "--class", "dog", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["class"] for r in rows} == {"dog"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--class", "zebra"], "--class 'zebra' is not one of the model's classes"),
        (["--top-k", "0"], "--top-k must be at least 1"),
    ],
)
def test_explain_refuses_bad_input_in_one_line(tiny, tmp_path, extra, message):
    run, folder = tiny
    done = subprocess.run(
        [sys.executable, "-m", "cifarlab", "explain", str(run), str(folder / "cat"), *extra],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_onnx_model_cannot_be_explained(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    run, folder = tiny
    onnx = tmp_path / "m.onnx"
    main(["export", str(run), "--out", str(onnx)])
    done = subprocess.run(
        [sys.executable, "-m", "cifarlab", "explain", str(onnx), str(folder / "cat")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "cannot be explained" in done.stderr
    assert "best.pt" in done.stderr and "Traceback" not in done.stderr


def test_the_report_shows_heatmaps_of_mistakes_and_of_a_correct_example_per_class(tiny):
    run, _ = tiny
    page = (run / "report.html").read_text()
    assert "Grad-CAM map for the predicted class" in page  # the mistakes grid's explanation
    explained = page.split('id="explained"')[1].split("</section>")[0]
    assert "data:image/png;base64," in explained


def test_overlay_keeps_the_image_size_and_colours_the_hot_part():
    image = np.full((8, 8, 3), 128, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[0, 0, 0] > out[7, 7, 0]  # 'jet': hot is red, cold is blue


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient

    from cifarlab.deploy.serve import create_app

    with TestClient(create_app(cifarlab.load(tiny[0]))) as c:
        yield c


def test_the_service_explains_an_upload_as_a_png_with_the_top_k(client, tiny):
    image = (tiny[1] / "dog" / "004.png").read_bytes()
    r = client.post("/explain?top_k=2", files={"file": ("dog.png", image, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == body["top"][0]["label"] and len(body["top"]) == 2
    assert body["method"] == "gradcam" and body["filename"] == "dog.png"
    png = decode_png(body["png"])
    assert png.format == "PNG" and png.size == (256, 256)  # 32 px scaled up 8x
    r = client.post("/explain?class=cat", files={"file": ("dog.png", image, "image/png")})
    assert r.json()["label"] == "cat"
    assert client.get("/metadata").json()["explain"] is True


@pytest.mark.parametrize(
    ("query", "data", "code", "message"),
    [
        ("", b"", 400, "is empty"),
        ("", b"not an image", 415, "is not an image"),
        ("?class=zebra", None, 400, "unknown class 'zebra'"),
        ("?method=lime", None, 422, "method"),
    ],
)
def test_explain_answers_bad_requests_like_predict(client, tiny, query, data, code, message):
    data = (tiny[1] / "dog" / "004.png").read_bytes() if data is None else data
    r = client.post(f"/explain{query}", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == code and message in r.json()["error"]


def test_explanations_wait_in_their_own_bounded_queue_and_predictions_do_not(tiny):
    """With the explain worker busy and its queue full, /explain answers 503 at once and
    /predict still answers."""
    import threading

    from fastapi.testclient import TestClient

    from cifarlab.deploy.serve import create_app

    predictor = cifarlab.load(tiny[0])
    release = threading.Event()
    original = predictor.explain

    def slow_explain(*args, **kwargs):
        release.wait(30)
        return original(*args, **kwargs)

    predictor.explain = slow_explain
    image = (tiny[1] / "dog" / "004.png").read_bytes()
    with TestClient(create_app(predictor, explain_queue=1)) as c:
        first = threading.Thread(
            target=lambda: c.post("/explain", files={"file": ("a.png", image, "image/png")})
        )
        first.start()
        for _ in range(200):  # until the first request holds the queue
            if c.app.state.explaining["n"]:
                break
            threading.Event().wait(0.01)
        busy = c.post("/explain", files={"file": ("b.png", image, "image/png")})
        assert busy.status_code == 503 and "try again" in busy.json()["error"]
        assert busy.headers["retry-after"] == "1"
        assert c.post("/predict", files={"file": ("c.png", image, "image/png")}).status_code == 200
        release.set()
        first.join(30)


def test_each_model_family_names_its_layer_and_is_explained():
    from cifarlab.models import build_model

    from .test_transfer import tiny_net

    timm_net = tiny_net()
    assert cam_layer(timm_net) is timm_net.backbone.get_submodule(
        timm_net.backbone.feature_info[-1]["module"]
    )  # timm's own name for its last feature stage, not a guess by name
    fastnet = build_model({"name": "fastnet", "widths": [8, 16, 16]}, 3, 32)[0]
    assert cam_layer(fastnet) is fastnet.blocks[-1]
    seed = build_model({"name": "seed_cnn", "widths": [8, 16]}, 3, 32)[0]
    assert cam_layer(seed) is seed.features[-2]  # the last conv block, before its pooling
    for net in (timm_net, fastnet, seed):
        x = torch.randn(2, 3, 32, 32)
        maps, probs = gradcam(net, cam_layer(net), x)
        assert maps.shape == (2, 32, 32) and probs.shape == (2, 3)
