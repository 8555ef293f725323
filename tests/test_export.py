import csv
import io
import json
import shutil

import numpy as np
import onnx
import pytest

import cifarlab
from cifarlab.cli import main
from cifarlab.deploy import export as export_module
from cifarlab.deploy.export import export, load_torchscript
from cifarlab.deploy.inference import OnnxPredictor, Predictor

from .conftest import CLASSES, make_folder

TINY_RECIPE = (  # fp32: the exported graph is fp32, and PyTorch must agree with it to 1e-5
    "name: tiny\nprecision: fp32\n"
    "model: {name: seed_cnn, widths: [8, 16], convs_per_block: 1, dense: 16, dropout: 0.1}\n"
    "data: {val_fraction: 0.25}\n"
    "train: {epochs: 2, batch_size: 8, lr: 0.01}\n"
)


def train_tiny(tmp_path_factory) -> tuple:
    """(run directory, image folder) of a tiny model trained once per test module."""
    root = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the autouse home fixture
        mp.setenv("CIFARLAB_HOME", str(root / "home"))
        folder = make_folder(root / "data")
        (root / "tiny.yaml").write_text(TINY_RECIPE)
        cifarlab.train(root / "tiny.yaml", folder, root / "run", progress=False)
    return root / "run", folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_export(run):
    return export(run[0])


def val_like_images(folder, n=12):
    """n images spread over the classes of the folder."""
    from cifarlab.data.image import read_image

    paths = sorted(folder.rglob("*.png"))[:: max(1, 60 // n)][:n]
    return np.stack([read_image(p, 32) for p in paths])


def test_onnx_export_is_verified_on_the_validation_split_and_self_describing(onnx_export, run):
    path, report = onnx_export
    assert path == run[0] / "best.onnx" and path.is_file()
    assert report["verify_images"].startswith("validation split")
    assert report["verified_on"] == 15  # the tiny run's validation split
    assert report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == CLASSES
    assert props["image_size"] == "32" and props["input_size"] == "32"
    assert len(json.loads(props["mean"])) == 3 and len(json.loads(props["std"])) == 3
    assert props["model"] == "seed_cnn" and props["cifarlab_version"] == cifarlab.__version__
    assert "uint8" in props["preprocessing"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch axis


def test_onnx_predictor_agrees_with_pytorch_at_any_batch_size(onnx_export, run):
    torch_pred = cifarlab.load(run[0])
    onnx_pred = cifarlab.load(onnx_export[0])
    assert isinstance(torch_pred, Predictor) and isinstance(onnx_pred, OnnxPredictor)
    assert onnx_pred.metadata == torch_pred.metadata
    images = val_like_images(run[1])
    for n in (1, 5, len(images)):
        a, b = torch_pred.probs(images[:n]), onnx_pred.probs(images[:n])
        assert a.shape == b.shape == (n, 3)
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert (a.argmax(1) == b.argmax(1)).all()
    big = np.repeat(np.repeat(images[:3], 3, axis=1), 2, axis=2)  # 96x64: resized like training
    np.testing.assert_allclose(torch_pred.probs(big), onnx_pred.probs(big), atol=1e-5)


def predict_cli(capsys, model, *args):
    assert main(["predict", str(model), *map(str, args), "--no-progress"]) == 0
    return capsys.readouterr()


def test_cli_predict_through_onnx_gives_the_pytorch_labels(onnx_export, run, capsys):
    out_onnx = predict_cli(capsys, onnx_export[0], run[1], "--json", "--top-k", "2").out
    out_torch = predict_cli(capsys, run[0], run[1], "--format", "jsonl", "--top-k", "2").out
    a = [json.loads(line) for line in out_onnx.splitlines()]
    b = [json.loads(line) for line in out_torch.splitlines()]
    assert len(a) == len(b) == 60
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["top"][0]["label"] for r in a] == [r["top"][0]["label"] for r in b]


def test_cli_predict_skips_unreadable_files_and_says_so(run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(run[1] / "cat", folder)
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes((folder / "000.png").read_bytes()[:60])
    out = predict_cli(
        capsys, run[0], folder, "--format", "csv", "--top-k", "3", "--batch-size", "7"
    )
    rows = list(csv.reader(io.StringIO(out.out)))
    assert rows[0] == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert len(rows) == 1 + 20
    assert all(abs(sum(float(r[i]) for i in (2, 4, 6)) - 1) < 1e-3 for r in rows[1:])
    err = out.err.splitlines()
    assert sum("skipped" in line and "notes.png" in line for line in err) == 1
    assert sum("skipped" in line and "cut.png" in line for line in err) == 1
    assert "skipped 2" in err[-1]
    table = predict_cli(capsys, run[0], folder / "000.png", "--top-k", "2").out.splitlines()
    assert len(table) == 1 and table[0].split()[0].endswith("000.png")
    assert table[0].split()[1] in CLASSES


def test_cli_predict_with_nothing_readable_is_an_error(run, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    assert main(["predict", str(run[0]), str(tmp_path / "a.jpg"), "--no-progress"]) == 2
    assert "cifarlab: error: none of the 1 inputs" in capsys.readouterr().err


def test_torchscript_export_loads_with_its_metadata_and_matches(run, tmp_path):
    path, report = export(run[0], "torchscript", tmp_path / "model.torchscript.pt")
    assert report["max_abs_logit_diff"] < 1e-4
    module, meta = load_torchscript(path)
    assert meta["classes"] == CLASSES and meta["image_size"] == 32
    images = val_like_images(run[1])
    import torch

    with torch.no_grad():
        got = torch.softmax(module(torch.from_numpy(images)), 1).numpy()
    np.testing.assert_allclose(got, cifarlab.load(run[0]).probs(images), atol=1e-5)


def test_a_failed_verification_leaves_no_file(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "TOLERANCE", 0.0)  # nothing can pass
    out = tmp_path / "m.onnx"
    assert main(["export", str(run[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "differs from PyTorch" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_lone_checkpoint_is_verified_on_given_or_synthetic_images(run, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    shutil.copy(run[0] / "best.pt", ckpt)
    path, report = export(ckpt, "torchscript")
    assert path == tmp_path / "model.torchscript.pt"
    assert report["verify_images"] == "synthetic" and report["verified_on"] == 128
    args = ["export", str(ckpt), "--format", "torchscript", "--images", str(run[1] / "dog")]
    assert main([*args, "--out", str(tmp_path / "d.torchscript.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify_images"] == "given" and report["verified_on"] == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "/no/such/run"], "not found"),
        (["export", "RUN", "--out", "model.pt"], "must end in .onnx"),
        (["predict", "FAKE.onnx", "x.png"], "not a loadable ONNX model"),
        (["predict", "/no/such/model.onnx", "x.png"], "not found"),
        (["serve", "/no/such/model.onnx"], "not found"),
    ],
)
def test_export_and_onnx_mistakes_are_one_line_errors(argv, message, run, tmp_path, capsys):
    (tmp_path / "FAKE.onnx").write_text("no model here")
    argv = [
        a.replace("RUN", str(run[0])).replace("FAKE.onnx", str(tmp_path / "FAKE.onnx"))
        for a in argv
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, missing, extra",
    [
        (["serve", "MODEL"], "python_multipart", "serve"),
        (["serve", "MODEL"], "fastapi", "serve"),
        (["predict", "MODEL.onnx", "IMG"], "onnxruntime", "serve"),
        (["export", "MODEL"], "onnx", "serve"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(argv, missing, extra, monkeypatch, capsys):
    import sys

    from cifarlab.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install 'cifarlab[{extra}]'" in err[0] and missing in err[0]
