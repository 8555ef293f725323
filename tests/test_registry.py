"""The MLflow model registry against a real `mlflow server` on loopback: register, aliases that
move only to a better model, serving and predicting by alias, one-line errors."""

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

import cifarlab
from cifarlab.api import register
from cifarlab.cli import main
from cifarlab.core.errors import UserError
from cifarlab.deploy.serve import create_app
from cifarlab.track.tracker import MlflowTracker

from .test_tracking import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow_registry"))
    yield s
    s.stop()


def tracked_run(recipe, data, out, uri, **overrides):
    cifarlab.train(
        recipe, data, out, overrides=overrides, progress=False, tracker=MlflowTracker(uri)
    )
    return out


def test_register_alias_serve_and_metadata(server, tiny_folder, tiny_recipe, tmp_path):
    good = tracked_run(tiny_recipe, tiny_folder, tmp_path / "good", server.uri)
    first = register(good, "tiny", alias="champion", tracking_uri=server.uri)
    assert first["version"] == "1" and first["moved"]
    version = MlflowClient(server.uri).get_model_version("tiny", "1")
    assert float(version.tags["val_accuracy"]) == pytest.approx(
        cifarlab.evaluate(good)["accuracy"], abs=0.2
    )  # the run's held-out metrics ride on the version
    bad = tracked_run(
        tiny_recipe,
        tiny_folder,
        tmp_path / "bad",
        server.uri,
        **{"train.lr": 1e-7, "train.epochs": 1},
    )
    second = register(bad, "tiny", alias="champion", tracking_uri=server.uri)
    assert second["version"] == "2" and not second["moved"] and "does not beat" in second["reason"]
    champion = MlflowClient(server.uri).get_model_version_by_alias("tiny", "champion")
    assert champion.version == "1"
    forced = register(bad, "tiny", alias="champion", force=True, tracking_uri=server.uri)
    assert forced["moved"] and forced["version"] == "3"
    register(good, "tiny", alias="champion", force=True, tracking_uri=server.uri)  # version 4
    predictor = cifarlab.load("models:/tiny@champion", tracking_uri=server.uri)
    assert predictor.registered == "tiny/4"
    with TestClient(create_app(predictor)) as client:
        assert client.get("/metadata").json()["registered"] == "tiny/4"
    by_number = cifarlab.load("models:/tiny/2", tracking_uri=server.uri)
    assert by_number.registered == "tiny/2" and by_number.classes == predictor.classes


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/nobody@champion", "no registered model 'nobody'"),
        ("models:/named@nope", "has no alias @nope"),
        ("models:/named/99", "has no version 99"),
        ("models:/named", "is not a registry URI"),
    ],
)
def test_registry_uris_fail_in_one_line(server, tiny_folder, uri, message, capsys):
    client = MlflowClient(server.uri)  # a name of its own: the tests may run in any order
    if not client.search_registered_models("name = 'named'"):
        client.create_registered_model("named")
    argv = ["predict", uri, str(tiny_folder / "cat"), "--tracking-uri", server.uri]
    assert main(argv) == 2  # the CLI in this process (a subprocess would cost 5 s each)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unreachable_registry_and_an_untracked_run_are_user_errors(
    tiny_folder, tiny_recipe, tmp_path
):
    with pytest.raises(UserError, match="unreachable"):
        cifarlab.load("models:/tiny@champion", tracking_uri="http://127.0.0.1:9")
    run = tmp_path / "untracked"
    cifarlab.train(tiny_recipe, tiny_folder, run, progress=False)
    with pytest.raises(UserError, match="was not tracked"):
        register(run, "tiny", tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}")
