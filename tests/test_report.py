"""HTML reports: contents, calibration numbers, several runs side by side, and the page as a
browser renders it."""

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cifarlab
from cifarlab.cli import main
from cifarlab.data.split import split_data
from cifarlab.eval.metrics import calibration, expected_calibration_error
from cifarlab.report.html import run_report
from cifarlab.rundir import RunDir

from .conftest import make_folder

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ("summary", "curves", "confusion", "per-class", "mistakes", "calibration", "recipe")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny finished runs (different learning rates) on the same data."""
    root = tmp_path_factory.mktemp("report_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_HOME", str(root / "home"))
        data = make_folder(root / "data")
        recipe = root / "tiny.yaml"
        recipe.write_text(
            "name: tiny\n"
            "model: {name: seed_cnn, widths: [8, 16], convs_per_block: 1, dense: 16}\n"
            "data: {val_fraction: 0.25}\n"
            "train: {epochs: 2, batch_size: 8, lr: 0.01}\n"
        )
        for name, lr in (("a", 0.01), ("b", 0.001)):
            cifarlab.train(recipe, data, root / name, overrides={"train.lr": lr}, progress=False)
        yield root


def embedded_images(page: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(b64)))
        for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_ece_of_a_small_known_example():
    # two predictions at confidence 0.95 (one right) and two at 0.65 (both right)
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.35, 0.65]])
    labels = np.array([0, 1, 1, 1])
    # bin (0.9, 1]: accuracy 0.5 vs confidence 0.95; bin (0.6, 0.7]: accuracy 1 vs 0.65
    direct = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.65)
    assert expected_calibration_error(probs, labels) == pytest.approx(direct)
    cal = calibration(probs, labels)
    assert cal["counts"].tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    assert cal["accuracy"][9] == 0.5 and cal["confidence"][6] == pytest.approx(0.65)
    one_hot_right = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(one_hot_right, np.array([0, 1, 2, 1])) == 0
    assert expected_calibration_error(one_hot_right, np.array([1, 2, 0, 0])) == 1


def test_every_run_directory_gets_a_self_contained_report(runs):
    page = (runs / "a" / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert not re.search(r'(src|href)="(?!data:)', page), "external resource"
    assert "<script" not in page
    images = embedded_images(page)
    assert len(images) >= 4 and all(img.width > 300 and img.height > 200 for img in images)
    assert "lr: 0.01" in page and "val_fraction: 0.25" in page  # the resolved recipe


def test_report_shows_mistakes_and_the_ece_of_the_validation_predictions(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "a", run)
    labels = split_data(RunDir(run).recipe())[1].labels
    # predictions with known mistakes: every third image confidently wrong
    probs = np.full((len(labels), 3), 0.05, dtype=np.float32)
    probs[np.arange(len(labels)), labels] = 0.9
    wrong = np.arange(0, len(labels), 3)
    probs[wrong] = 0.05
    probs[wrong, (labels[wrong] + 1) % 3] = 0.9
    np.save(run / "val_probs.npy", probs)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    shown = float(re.search(r"Expected calibration error \(10 bins\): <b>([\d.]+)</b>", page)[1])
    assert 0 <= shown <= 1
    assert shown == pytest.approx(expected_calibration_error(probs, labels), abs=1e-4)
    assert shown == pytest.approx(abs(0.9 - (1 - len(wrong) / len(labels))), abs=1e-4)
    mistakes = page.split('<section id="mistakes">')[1].split("</section>")[0]
    assert len(embedded_images(mistakes)) == 1


def test_report_without_the_data_still_renders_the_rest(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "a", run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace(str(runs / "data"), str(tmp_path / "gone")))
    page = run_report(run).read_text()
    assert "validation images could not be loaded" in page
    assert len(embedded_images(page)) >= 3  # curves, confusion, per-class


def test_several_runs_side_by_side(runs, tmp_path, capsys):
    out = tmp_path / "compare.html"
    assert main(["report", str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    table = page.split('<section id="comparison">')[1].split("</section>")[0]
    rows = re.findall(r"<tr[^>]*><td>([^<]*)</td>", table)
    assert rows == ["a", "b"]
    metrics = [json.loads((runs / n / "metrics.json").read_text()) for n in ("a", "b")]
    accuracy = [f"{m['val']['accuracy']:.4f}" for m in metrics]
    assert all(f"<td>{a}</td>" in table for a in accuracy)
    assert len(embedded_images(page)) >= 3  # overlaid curves, per-class bars, confusions


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "{tmp}"], "no metrics.json"),
        (["report", "{a}", "--out", "{tmp}/no/such/dir/r.html"], "does not exist"),
    ],
)
def test_report_mistakes_are_one_line_errors(runs, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, a=runs / "a") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")
def test_report_loads_in_headless_chromium_without_errors(runs, tmp_path):
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "report.png"
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            page.goto((runs / "a" / "report.html").as_uri())
            loaded = page.evaluate(
                "[...document.images].map(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(loaded) >= 4 and all(loaded)
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape[1] >= 1000 and image.shape[0] >= 2000  # the whole page, plots included
    assert image.std() > 20  # not a blank page


def test_an_interrupted_run_can_be_reported_and_evaluated(
    tiny_folder, tiny_recipe, tmp_path, monkeypatch, capsys
):
    import torch

    import cifarlab
    from cifarlab.cli import main

    real_step, calls = torch.optim.Adam.step, {"n": 0}

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # inside epoch 2 (5 steps an epoch)
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        cifarlab.train(tiny_recipe, tiny_folder, out, progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert not (out / "metrics.json").exists()
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "interrupted after epoch 1" in page and "scored last.pt" in page
    assert "confusion matrix" in page  # scored, not only the curves
    capsys.readouterr()
    assert main(["evaluate", str(out), "--no-track"]) == 0
    printed = capsys.readouterr().out
    assert f"scored: {out / 'last.pt'} (interrupted after epoch 1)" in printed
