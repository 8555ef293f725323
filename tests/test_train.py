import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cifarlab
from cifarlab.cli import main

from .conftest import crash_then_resume, make_folder


def test_train_writes_a_complete_run_directory(tiny_folder, tiny_recipe, tmp_path):
    out = tmp_path / "run"
    result = cifarlab.train(tiny_recipe, tiny_folder, out, progress=False)
    for name in (
        "config.yaml",
        "history.csv",
        "metrics.json",
        "best.pt",
        "last.pt",
        "curves.png",
        "confusion.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["n"] == 15 and metrics["n_train"] == 45
    assert metrics["val"]["accuracy"] == result["val"]["accuracy"]
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 3
    # colours separate the classes: even three tiny epochs learn them
    assert result["val"]["accuracy"] > 0.6


def test_same_seed_same_metrics_on_cpu(tiny_folder, tiny_recipe, tmp_path):
    a = cifarlab.train(tiny_recipe, tiny_folder, tmp_path / "a", progress=False)
    b = cifarlab.train(tiny_recipe, tiny_folder, tmp_path / "b", progress=False)
    assert a["val"]["loss"] == b["val"]["loss"]
    assert (tmp_path / "a/history.csv").read_text().split("seconds")[0] == (
        tmp_path / "b/history.csv"
    ).read_text().split("seconds")[0]


def history_without_timings(path):
    rows = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name not in ("seconds", "train_images_per_s")]
    return [[r[i] for i in keep] for r in rows]


def test_resume_after_a_crash_mid_epoch_matches_a_clean_run(
    tiny_folder, tiny_recipe, tmp_path, monkeypatch
):
    clean = cifarlab.train(tiny_recipe, tiny_folder, tmp_path / "clean", progress=False)

    resumed = crash_then_resume(
        tiny_recipe, tiny_folder, tmp_path, monkeypatch, at_step=8
    )  # second epoch, third batch
    assert resumed["val"]["loss"] == clean["val"]["loss"]
    assert history_without_timings(tmp_path / "killed/history.csv") == history_without_timings(
        tmp_path / "clean/history.csv"
    )


def slow_recipe(tmp_path, epochs: int, augment: str = "{}"):
    """A recipe whose epochs take long enough to be stopped in the middle of (pinned fp32 and
    contiguous: the same numerics in every process)."""
    path = tmp_path / "slow.yaml"
    path.write_text(
        "name: slow\nprecision: fp32\nmemory_format: contiguous\n"
        "model: {name: seed_cnn, widths: [16, 32], convs_per_block: 2, dense: 32}\n"
        f"data: {{val_fraction: 0.25}}\naugment: {augment}\n"
        f"train: {{epochs: {epochs}, batch_size: 4, lr: 0.003}}\n"
    )
    return path


def test_kill_9_then_resume_matches_clean_run(tmp_path):
    tiny_folder = make_folder(tmp_path / "data", per_class=100)
    recipe = slow_recipe(tmp_path, epochs=4, augment="{flip: true, translate: 2}")
    cmd = [sys.executable, "-m", "cifarlab", "train", "--recipe", str(recipe)]
    cmd += ["--data", str(tiny_folder), "--no-progress", "--no-track"]
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], check=True, capture_output=True)
    proc = subprocess.Popen(
        cmd + ["--out", str(tmp_path / "killed")], stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:  # the first epoch's summary: the run is now inside epoch 2
        if line.startswith("train   1/4"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    history = (tmp_path / "killed/history.csv").read_text().splitlines()
    assert len(history) == 2 and not (tmp_path / "killed/metrics.json").exists()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cifarlab",
            "train",
            "--resume",
            str(tmp_path / "killed"),
            "--no-progress",
            "--no-track",
        ],
        check=True,
        capture_output=True,
    )
    clean = json.loads((tmp_path / "clean/metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed/metrics.json").read_text())
    assert resumed["val"]["loss"] == clean["val"]["loss"]
    assert resumed["val"]["confusion"] == clean["val"]["confusion"]


def test_cli_train_evaluate_predict_end_to_end(tiny_folder, tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                str(tiny_recipe),
                "--data",
                str(tiny_folder),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--set",
                "train.eval_tta=2",  # scored with mirror + shifts, as `fast` is
                "--no-progress",
                "--no-track",
            ]
        )
        == 0
    )
    assert "val_accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--data", str(tiny_folder), "--json", "--no-track"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert (
        m["n"] == 60 and 0 <= m["accuracy"] <= 1 and set(m["per_class"]) == {"cat", "dog", "ship"}
    )
    # its own validation split, scored as training scored it: the recipe's TTA (level 2)
    trained = json.loads((out / "metrics.json").read_text())["val"]
    scored = {}
    for flags in ([], ["--tta"], ["--tta", "0"]):
        assert main(["evaluate", str(out), "--json", "--no-track", *flags]) == 0
        m = json.loads(capsys.readouterr().out)
        assert m["n"] == 15
        scored[m["tta"]] = m
    assert sorted(scored) == [0, 1, 2]
    assert scored[2]["accuracy"] == trained["accuracy"]
    assert scored[2]["loss"] == pytest.approx(trained["loss"], rel=1e-4)
    assert scored[0]["loss"] != pytest.approx(scored[2]["loss"], rel=1e-4)  # the views count
    assert (
        main(["predict", str(out / "best.pt"), str(tiny_folder / "cat"), "--json", "--top-k", "2"])
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 20 and all(len(r["top"]) == 2 for r in lines)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/no/such/dir"], "/no/such/dir"),
        (["train", "--recipe", "nope", "--data", "x"], "unknown recipe"),
        (["train", "--data", "x", "--set", "train.bogus=1"], "unknown recipe key"),
        (["evaluate", "/no/such/run"], "not found"),
        (["predict", "/no/such/ckpt.pt", "x.png"], "not found"),
    ],
)
def test_user_mistakes_are_one_line_errors_with_exit_2(
    argv, message, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written: no run directory, no store


def test_class_mismatch_between_model_and_data_is_refused(
    tiny_folder, tiny_recipe, tmp_path, capsys
):
    out = tmp_path / "run"
    cifarlab.train(tiny_recipe, tiny_folder, out, overrides={"train.epochs": 1}, progress=False)
    other = tmp_path / "other"
    (other / "cat").mkdir(parents=True)
    (other / "plane").mkdir()
    for name in ("cat", "plane"):
        (other / name / "a.png").write_bytes((tiny_folder / "cat" / "000.png").read_bytes())
    assert main(["evaluate", str(out), "--data", str(other), "--no-track"]) == 2
    assert "class mismatch" in capsys.readouterr().err


def test_fast_recipe_with_lookahead_resumes_exactly(
    tiny_folder, tiny_fast_recipe, tmp_path, monkeypatch
):
    # pinned: two runs' measured decisions can differ where the candidates are within 10% (a
    # resume reuses its own run's decision, but the clean run measures afresh)
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(
        tiny_fast_recipe.read_text().replace(
            "precision: auto", "precision: fp32\nmemory_format: contiguous"
        )
    )
    clean = cifarlab.train(pinned, tiny_folder, tmp_path / "clean", progress=False)
    resumed = crash_then_resume(
        pinned, tiny_folder, tmp_path, monkeypatch, at_step=12, optimizer=torch.optim.SGD
    )  # inside epoch 3, after lookahead syncs at steps 5 and 10
    assert resumed["val"]["loss"] == clean["val"]["loss"]
    assert history_without_timings(tmp_path / "killed/history.csv") == history_without_timings(
        tmp_path / "clean/history.csv"
    )


@pytest.mark.slow  # torch.compile on a CPU: ~30 s
@pytest.mark.skipif(
    shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler"
)
def test_compiled_training_matches_eager(tiny_folder, tiny_fast_recipe, tmp_path):
    over = {"train.epochs": 1, "train.lookahead": 0.0, "precision": "fp32"}
    eager = cifarlab.train(
        tiny_fast_recipe, tiny_folder, tmp_path / "e", overrides=over, progress=False
    )
    compiled = cifarlab.train(
        tiny_fast_recipe,
        tiny_folder,
        tmp_path / "c",
        overrides={**over, "compile": True},
        progress=False,
    )
    assert compiled["val"]["loss"] == pytest.approx(eager["val"]["loss"], rel=1e-3)


def test_bad_compile_setting_is_a_one_line_error(tiny_folder, tiny_recipe, tmp_path, capsys):
    code = main(
        ["train", "--recipe", str(tiny_recipe), "--data", str(tiny_folder), "--out",
         str(tmp_path / "r"), "--set", "compile=sometimes", "--no-track"]
    )  # fmt: skip
    assert code == 2
    assert "recipe key compile = 'sometimes' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_ctrl_c_before_the_first_epoch_ends_leaves_no_run_directory(
    tiny_folder, tiny_recipe, tmp_path, monkeypatch
):
    from cifarlab.core.errors import Interrupted

    def interrupt(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.Adam, "step", interrupt)
    with pytest.raises(Interrupted, match="nothing resumable was written"):
        cifarlab.train(tiny_recipe, tiny_folder, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_within_a_step_and_says_how_to_resume(tmp_path):
    data = make_folder(tmp_path / "data", per_class=100)
    recipe = slow_recipe(tmp_path, epochs=50)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cifarlab", "train", "--recipe", str(recipe), "--data", str(data)]
    proc = subprocess.Popen(
        cmd + ["--out", str(out), "--no-progress", "--no-track"], stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if line.startswith("train   1/50"):
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=30) == 130
    assert time.monotonic() - sent < 10
    assert "last.pt holds" in rest and f"--resume {out}" in rest and "Traceback" not in rest
    assert checkpoint_epochs(out / "last.pt") >= 1


def checkpoint_epochs(path) -> int:
    return len(torch.load(path, weights_only=True)["state"]["history"])
