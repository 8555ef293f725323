"""`cifarlab tune`: Optuna trials as MLflow child runs, pruning, a resumable study, best.yaml."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from mlflow import MlflowClient

import cifarlab
from cifarlab.core.errors import UserError
from cifarlab.rundir import RunDir
from cifarlab.track.tracker import MlflowTracker
from cifarlab.tune import load_space, tune

from .test_tracking import Server

SPACE = (
    "train.lr: {type: float, low: 0.001, high: 0.05, log: true}\n"
    "model.dropout: {type: categorical, choices: [0.0, 0.2]}\n"
)


class PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report, and nothing else: a deterministic pruned trial."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow_tune"))
    yield s
    s.stop()


def test_a_study_is_one_parent_run_with_a_child_run_per_trial_and_a_pruned_one(
    server, tiny_folder, tiny_recipe, tmp_path
):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    result = tune(
        tiny_recipe, tiny_folder, 3, tmp_path / "study", space=space, study="s1",
        storage=f"sqlite:///{tmp_path / 'tune.db'}", tracker=MlflowTracker(server.uri),
        progress=False, pruner=PruneTrialOne(),
    )  # fmt: skip
    states = [r["state"] for r in result["trials"]]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE"]
    pruned_history = RunDir(tmp_path / "study/trial-1").read_history()
    assert len(pruned_history) == 1  # of 3 epochs: the pruner ended it after the first
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("cifarlab")
    parents = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'tune s1'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert sorted(c.data.tags["optuna.state"] for c in children) == [
        "COMPLETE",
        "COMPLETE",
        "PRUNED",
    ]
    assert all("train.lr" in c.data.params for c in children)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"trials.md", "trials.csv", "best.yaml", "history.png"} <= artifacts
    # the best trial's recipe trains as any recipe does, with its settings
    best = yaml.safe_load((tmp_path / "study/best.yaml").read_text())
    winner = result["best"]
    assert best["train"]["lr"] == pytest.approx(winner["params"]["train.lr"])
    assert best["data"]["test"] is None and best["data"]["source"] is None
    again = cifarlab.train(tmp_path / "study/best.yaml", tiny_folder, tmp_path / "best-run")
    assert again["val"]["accuracy"] >= 0
    assert "| trial | state | val_accuracy | train.lr | model.dropout |" in (
        (tmp_path / "study/trials.md").read_text()
    )


def test_a_killed_tune_continues_its_study_and_retries_the_interrupted_trial(
    tiny_folder, tiny_recipe, tmp_path
):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    cmd = [
        sys.executable, "-m", "cifarlab", "tune", "--recipe", str(tiny_recipe),
        "--data", str(tiny_folder), "--trials", "3", "--space", str(space), "--study", "s2",
        "--storage", f"sqlite:///{tmp_path / 'tune.db'}", "--out", str(tmp_path / "study"),
        "--no-track", "--epochs", "40",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "study/trial-1/last.pt").exists():  # trial 2 is training
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cmd[cmd.index("--epochs") + 1] = "2"  # the rest may be short
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trial 1 was interrupted; its settings are tried again" in done.stderr
    study = optuna.load_study(study_name="s2", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") + states.count("PRUNED") == 3
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    retried = study.trials[failed.number + 1 :]
    assert any(t.params == failed.params for t in retried)  # the same settings, tried again


def test_a_bad_space_is_a_one_line_error(tmp_path):
    recipe = cifarlab.config.load_recipe("fast")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train.lr: {type: float, low: 0.1}\n")
    with pytest.raises(UserError, match=r"train.lr \(float\) needs high"):
        load_space(recipe, bad)
    bad.write_text("train.nope: {type: int, low: 1, high: 2}\n")
    with pytest.raises(UserError, match="unknown recipe key 'train.nope'"):
        load_space(recipe, bad)
    bad.write_text("train.lr: {type: uniform, low: 1, high: 2}\n")
    with pytest.raises(UserError, match="needs type: float | int | categorical"):
        load_space(recipe, bad)


@pytest.mark.parametrize("name", ["fast", "seed-cnn", "lite0-transfer"])
def test_the_shipped_spaces_name_real_keys_and_hold_the_recipes_values(name):
    recipe = cifarlab.config.load_recipe(name)
    space = load_space(recipe, None)
    assert space
    for key, spec in space.items():
        value = recipe
        for part in key.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        if spec["type"] == "categorical":
            assert value in spec["choices"], key
        elif not (name == "seed-cnn" and key == "train.weight_decay"):  # 0 = off, said so
            assert spec["low"] <= value <= spec["high"], key


def test_pruning_waits_for_the_end_of_the_lr_warm_up():
    from types import SimpleNamespace

    from cifarlab.tune import Pruning

    class Trial:
        number, reported = 0, []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return True  # a pruner that would end every trial

    trial = Trial()
    prune = Pruning(trial)
    t = SimpleNamespace(state={"history": []}, row={"val_accuracy": 0.3}, step=50, warmup=100)
    t.stop_run = False
    prune.on_validation_end(t)
    assert not t.stop_run and trial.reported == [(1, 0.3)]  # reported, not pruned mid warm-up
    t.step = 100
    t.state["history"].append({})
    prune.on_validation_end(t)
    assert t.stop_run and prune.pruned and trial.reported[-1] == (2, 0.3)
