"""MLflow tracking: a real tracking server started on a loopback port, the default local store,
and failures that must never stop training."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import cifarlab
from cifarlab.cli import main
from cifarlab.data.image import read_image
from cifarlab.track.tracker import MlflowTracker, flatten, parent_run

RUN_FILES = ("config.yaml", "history.csv", "metrics.json", "best.pt", "last.pt", "report.html")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts under `root`."""

    def __init__(self, root):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.log = open(root / "server.log", "wb")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'server.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the workers too
            env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError("the MLflow server did not answer /health within 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow_server"))
    yield s
    s.stop()


def train_args(recipe, data, out, *extra):
    return [
        "train",
        "--recipe",
        str(recipe),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def some_images(folder, n=5):
    paths = sorted(folder.rglob("*.png"))[:: 60 // n][:n]
    return np.stack([read_image(p, 32) for p in paths])


def git_head() -> str | None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else None


def tracking_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "tracking disabled" in line]


def test_a_training_run_is_recorded_on_a_tracking_server(
    server, tiny_folder, tiny_recipe, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "tracked-run"
    commit_before = git_head()
    argv = train_args(tiny_recipe, tiny_folder, out, "--epochs", "2", "--tracking-uri", server.uri)
    assert main(argv) == 0
    assert not tracking_warnings(capsys.readouterr().err)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("cifarlab")
    [run] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{out.name}'")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"

    # params: the whole resolved recipe, flattened
    params = run.data.params
    assert params["train.epochs"] == "2" and params["train.lr"] == "0.01"
    assert params["model.name"] == "seed_cnn" and params["model.widths"] == "[8, 16]"
    assert params["data.source"] == str(tiny_folder) and params["name"] == "tiny"
    assert params["precision"] == "fp32" and params["memory_format"] == "contiguous"  # decided

    # per-epoch metrics are the history.csv rows; final metrics are metrics.json's
    history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()]
    column = history[0].index("val_accuracy")
    logged = client.get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in logged] == [1, 2]
    assert [m.value for m in logged] == [float(row[column]) for row in history[1:]]
    assert len(client.get_metric_history(run_id, "train_loss")) == 2
    local = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["final_val_accuracy"] == local["val"]["accuracy"]
    assert run.data.metrics["final_val_loss"] == local["val"]["loss"]
    assert 0 <= run.data.metrics["final_val_ece"] <= 1

    tags = run.data.tags
    assert tags["cifarlab.version"] == cifarlab.__version__
    assert tags["torch.version"] == torch.__version__ and tags["timm.version"]
    assert tags["device"] == "cpu" and tags["host"] == socket.gethostname()
    assert tags["cifarlab.run_dir"] == str(out.absolute())
    if commit_before:  # (a commit may land while the test runs)
        assert tags["mlflow.source.git.commit"] in (commit_before, git_head())

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "history.csv", "metrics.json", "report.html", "curves.png"} <= artifacts
    report = client.download_artifacts(run_id, "report.html", str(tmp_path))
    assert open(report, "rb").read() == (out / "report.html").read_bytes()

    # the model: linked to the run, loadable with mlflow.pyfunc, same probabilities as cifarlab
    [model] = [
        m
        for m in client.search_logged_models([experiment.experiment_id])
        if m.source_run_id == run_id
    ]
    assert model.name == "model"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert [s.type for s in pyfunc.metadata.get_input_schema().inputs] == [np.dtype(np.uint8)]
    images = some_images(tiny_folder)
    probs = pyfunc.predict(images)
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(probs, cifarlab.load(out).probs(images), rtol=1e-5, atol=1e-6)

    # `evaluate` records a small run with its scores
    assert main(["evaluate", str(out), "--json", "--tracking-uri", server.uri]) == 0
    scores = json.loads(capsys.readouterr().out)
    [evaluation] = client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = 'evaluate-{out.name}'"
    )
    assert evaluation.data.metrics["eval_accuracy"] == scores["accuracy"]
    assert evaluation.data.params["model"] == str(out.absolute())


def test_compare_rows_are_child_runs_of_one_parent(server, tiny_folder, tiny_recipe, tmp_path):
    with parent_run("compare-test", server.uri, params={"rows": 2}) as parent:
        for lr in (0.01, 0.003):
            cifarlab.train(
                tiny_recipe,
                tiny_folder,
                tmp_path / f"lr{lr}",
                overrides={"train.epochs": 1, "train.lr": lr},
                progress=False,
                tracker=parent.child(),
            )
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("cifarlab")
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert sorted(c.data.params["train.lr"] for c in children) == ["0.003", "0.01"]


@pytest.mark.slow  # a server of its own: ~20 s
def test_server_killed_mid_run_warns_once_and_training_completes(
    tiny_folder, tiny_recipe, tmp_path, capsys
):
    doomed = Server(tmp_path / "doomed")

    class KillsTheServerAfterEpoch1(MlflowTracker):
        def log_metrics(self, values, step):
            if step == 2:
                doomed.stop()
            super().log_metrics(values, step)

    tracker = KillsTheServerAfterEpoch1(doomed.uri)
    out = tmp_path / "run"
    try:
        result = cifarlab.train(tiny_recipe, tiny_folder, out, progress=False, tracker=tracker)
    finally:
        doomed.stop()
    assert len(tracking_warnings(capsys.readouterr().err)) == 1
    assert not tracker.enabled
    assert all((out / name).is_file() for name in RUN_FILES)
    assert json.loads((out / "metrics.json").read_text())["val"] == result["val"]


def test_no_server_listening_warns_once_and_training_completes(
    tiny_folder, tiny_recipe, tmp_path, capsys
):
    out = tmp_path / "run"
    uri = f"http://127.0.0.1:{free_port()}"
    assert (
        main(train_args(tiny_recipe, tiny_folder, out, "--epochs", "1", "--tracking-uri", uri)) == 0
    )
    [warning] = tracking_warnings(capsys.readouterr().err)
    assert uri in warning and "Traceback" not in warning
    assert all((out / name).is_file() for name in RUN_FILES)


def test_default_store_is_mlflow_db_in_the_working_directory(
    tiny_folder, tiny_recipe, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(train_args(tiny_recipe, tiny_folder, "run", "--epochs", "1")) == 0
    assert not tracking_warnings(capsys.readouterr().err)
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifarlab")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    artifact_dir = tmp_path / "mlartifacts" / run.info.run_id / "artifacts"
    assert run.info.artifact_uri == artifact_dir.as_uri()
    assert (artifact_dir / "config.yaml").read_text() == (tmp_path / "run/config.yaml").read_text()


def test_environment_variable_and_no_track(
    server, tiny_folder, tiny_recipe, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(train_args(tiny_recipe, tiny_folder, "run", "--epochs", "1", "--no-track")) == 0
    assert [p.name for p in work.iterdir()] == ["run"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert main(["evaluate", "run", "--json"]) == 0
    assert not tracking_warnings(capsys.readouterr().err)
    assert [p.name for p in work.iterdir()] == ["run"]  # no local store
    client = MlflowClient(server.uri)
    [evaluation] = client.search_runs(
        [client.get_experiment_by_name("cifarlab").experiment_id],
        f"tags.`cifarlab.command` = 'evaluate' and params.model = '{work / 'run'}'",
    )
    assert "eval_accuracy" in evaluation.data.metrics


def test_ui_refuses_what_it_cannot_open(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["ui"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:5000"]) == 2
    assert "open it in a browser" in capsys.readouterr().err


@pytest.mark.slow
def test_ui_serves_the_local_store(tiny_folder, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(train_args(tiny_recipe, tiny_folder, "run", "--epochs", "1")) == 0
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "cifarlab", "ui", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.3)
        client = MlflowClient(base)
        [run] = client.search_runs([client.get_experiment_by_name("cifarlab").experiment_id])
        url = f"{base}/get-artifact?path=config.yaml&run_uuid={run.info.run_id}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.read().decode() == (tmp_path / "run/config.yaml").read_text()
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait()


def test_recipes_flatten_to_dotted_params():
    recipe = {
        "seed": 0,
        "model": {"name": "seed_cnn", "widths": [8, 16]},
        "train": {"lr": 0.001, "schedule": None},
        "phases": [{"epochs": 2}, {"epochs": 3, "lr": 1e-4}],
        "empty": [],
    }
    assert flatten(recipe) == {
        "seed": "0",
        "model.name": "seed_cnn",
        "model.widths": "[8, 16]",
        "train.lr": "0.001",
        "train.schedule": "None",
        "phases.0.epochs": "2",
        "phases.1.epochs": "3",
        "phases.1.lr": "0.0001",
        "empty": "[]",
    }
