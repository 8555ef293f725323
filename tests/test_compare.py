"""`cifarlab compare`: the seed's rows plus recipes, in Markdown, CSV and JSON; rows that cannot
run are reported with their reason; finished rows are reused."""

import csv
import json

import pytest
import timm
import torch

import cifarlab
from cifarlab import compare as compare_module
from cifarlab.cli import main
from cifarlab.compare import compare

ARCH = "resnet18"


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
    tiny_folder, tiny_recipe, two_phase_recipe, weights, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(compare_module, "THROUGHPUT_SECONDS", 0.05)
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
        throughput_seconds=0.05,
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
