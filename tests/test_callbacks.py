"""The training loop's plug-in points: events, callback state in last.pt, stopping, the loss,
and the model registry."""

import pytest
import torch
from torch import nn

import cifarlab
from cifarlab.core.errors import UserError
from cifarlab.deploy.interrupted import interrupted_predictor
from cifarlab.models import build_model, model_label, register_model
from cifarlab.rundir import RunDir
from cifarlab.training.events import Callback
from cifarlab.training.step import cross_entropy


class Recorder(Callback):
    name = "recorder"

    def __init__(self):
        self.events, self.steps = [], 0

    def on_fit_start(self, t):
        self.events.append("fit_start")

    def on_phase_start(self, t):
        self.events.append(f"phase_start {t.phase.name}")

    def on_step_end(self, t):
        self.steps += 1

    def on_validation_end(self, t):
        self.events.append(f"validation_end {t.epoch + 1}")

    def on_epoch_end(self, t):
        self.events.append(f"epoch_end {t.epoch + 1} done={t.phase_done}")

    def on_phase_end(self, t):
        self.events.append("phase_end")

    def on_fit_end(self, t, result):
        self.events.append(f"fit_end {result['val']['accuracy'] >= 0}")

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_events_come_in_order_and_a_callbacks_state_goes_into_last_pt(
    tiny_folder, tiny_recipe, tmp_path
):
    rec = Recorder()
    out = tmp_path / "run"
    cifarlab.train(tiny_recipe, tiny_folder, out, progress=False, callbacks=[rec])
    assert rec.events == [
        "fit_start",
        "phase_start train",
        "validation_end 1",
        "epoch_end 1 done=False",
        "validation_end 2",
        "epoch_end 2 done=False",
        "validation_end 3",
        "epoch_end 3 done=True",
        "phase_end",
        "fit_end True",
    ]
    assert rec.steps == 3 * 5  # 45 training images in batches of 8, last partial one dropped
    assert RunDir(out).read_state()["callbacks"]["recorder"] == {"steps": 15}


def test_a_resumed_run_gives_callbacks_their_state_back(tiny_folder, tiny_recipe, tmp_path):
    class StopAfterFirstEpoch(Callback):  # as a kill after epoch 1 would leave the run
        def on_epoch_end(self, t):
            raise KeyboardInterrupt

    out = tmp_path / "run"
    first = Recorder()
    try:
        cifarlab.train(
            tiny_recipe, tiny_folder, out, progress=False,
            callbacks=[first, StopAfterFirstEpoch()],
        )  # fmt: skip
    except KeyboardInterrupt:
        pass
    assert RunDir(out).finished_epochs() == 1
    resumed = Recorder()
    cifarlab.train(resume=out, progress=False, callbacks=[resumed])
    assert resumed.steps == 15  # 5 restored from last.pt + 10 trained after the resume
    assert resumed.events[:2] == ["fit_start", "phase_start train"]
    assert resumed.events[2] == "validation_end 2"


def test_a_callback_can_stop_the_phase(tiny_folder, tiny_recipe, tmp_path):
    class StopAtOnce(Callback):
        def on_validation_end(self, t):
            t.stop_phase = True

    out = tmp_path / "run"
    cifarlab.train(tiny_recipe, tiny_folder, out, progress=False, callbacks=[StopAtOnce()])
    assert len(RunDir(out).read_history()) == 1  # of 3 epochs


def test_a_callback_can_change_the_loss(tiny_folder, tiny_recipe, tmp_path):
    seen = []

    class HalfLoss(Callback):
        def on_phase_start(self, t):
            def loss(logits, targets, x):
                seen.append(x.shape[0])
                return 0.5 * cross_entropy(logits, targets, x)

            t.loss_fn = loss

    plain, halved = tmp_path / "plain", tmp_path / "halved"
    cifarlab.train(tiny_recipe, tiny_folder, plain, progress=False, overrides={"train.epochs": 1})
    cifarlab.train(
        tiny_recipe, tiny_folder, halved, progress=False, overrides={"train.epochs": 1},
        callbacks=[HalfLoss()],
    )  # fmt: skip
    assert seen == [8] * 5  # called on every step, with the batch
    a, b = RunDir(plain).read_history()[0], RunDir(halved).read_history()[0]
    # the first step's loss is the same model's; the recorded epoch loss is the halved one
    assert b["train_loss"] < 0.75 * a["train_loss"]


class Doubler(nn.Module):
    def __init__(self, num_classes: int, width: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x):
        return self.net(x)


@register_model("test_doubler", label="Doubler")
def _build(args, num_classes, input_size, pretrained):
    return Doubler(num_classes, **args), {"mean": [0.5, 0.5, 0.5]}


def test_a_registered_model_trains_from_a_recipe_and_rebuilds_from_its_checkpoint(
    tiny_folder, tmp_path
):
    recipe = tmp_path / "doubler.yaml"
    recipe.write_text(
        "name: doubler\nprecision: fp32\nmemory_format: contiguous\n"
        "model: {name: test_doubler, width: 6}\n"
        "data: {val_fraction: 0.25}\ntrain: {epochs: 1, batch_size: 8}\n"
    )
    out = tmp_path / "run"
    cifarlab.train(recipe, tiny_folder, out, progress=False)
    predictor = cifarlab.load(out)
    assert isinstance(predictor.model, Doubler) and predictor.model.net[0].out_channels == 6
    assert predictor.info["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert "no heatmaps: Doubler names no layer to explain" in (out / "report.html").read_text()
    assert model_label({"name": "test_doubler"}) == "Doubler"
    assert model_label({"name": "seed_cnn"}) == "Custom CNN"
    assert model_label({"name": "timm", "arch": "resnet50"}) == "resnet50"


def test_an_unknown_model_names_the_registered_ones():
    with pytest.raises(UserError, match=r"unknown model 'nope'.*fastnet.*seed_cnn"):
        build_model({"name": "nope"}, 10, 32)


def test_a_phase_is_typed():
    from cifarlab import config

    (phase,) = config.phases(config.load_recipe("fast"))
    assert isinstance(phase.lr, float) and isinstance(phase.batch_size, int)
    assert phase.layer_decay is None and phase.name == "train"
    keys = set(config.defaults()["train"]) | {"name"}
    assert keys == set(config.Phase.__dataclass_fields__)  # a train key without a field fails


def test_an_ema_run_scores_the_average_and_resumes_exactly(
    tiny_folder, tiny_recipe, tmp_path, monkeypatch
):
    from .conftest import crash_then_resume

    recipe = tmp_path / "ema.yaml"
    recipe.write_text(tiny_recipe.read_text().replace("lr: 0.01}", "lr: 0.01, ema: 0.8}"))
    clean = cifarlab.train(recipe, tiny_folder, tmp_path / "clean", progress=False)
    resumed = crash_then_resume(recipe, tiny_folder, tmp_path, monkeypatch, at_step=12)
    assert resumed["val"]["loss"] == clean["val"]["loss"]  # the average came back from last.pt
    assert RunDir(tmp_path / "killed").read_history() == [
        {**r, "seconds": r2["seconds"], "train_images_per_s": r2["train_images_per_s"]}
        for r, r2 in zip(
            RunDir(tmp_path / "clean").read_history(),
            RunDir(tmp_path / "killed").read_history(),
            strict=True,
        )
    ]
    state = RunDir(tmp_path / "clean").read_state()

    average = state["scored"]  # what was validated: the average
    assert average is not None and set(average) == set(state["model"])
    assert any(not torch.equal(average[k], state["model"][k]) for k in average)
    # an interrupted EMA run is scored with the average, as evaluate and report read it
    predictor, epochs = interrupted_predictor(tmp_path / "clean")
    assert epochs == 3
    assert all(torch.equal(predictor.model.state_dict()[k].cpu(), average[k]) for k in average)


def test_the_run_line_trusts_measured_epochs_over_the_plan():
    from types import SimpleNamespace

    from cifarlab.training.callbacks.console import RunClock

    phases = [SimpleNamespace(name="train", epochs=11)]
    history: list[dict] = []
    clock = RunClock(phases, [60.0], history, estimated=False)
    assert "about 11 min left" in clock.line()  # the plan: 11 x 60 s
    history.append({"phase": "train", "epoch": 1, "seconds": 30.0})
    assert "about 5 min left" in clock.line()  # the first epoch measured: 10 x 30 s
    history += [{"phase": "train", "epoch": e, "seconds": 42.0} for e in (2, 3)]
    assert "about 6 min left" in clock.line()  # later: the median after the first, 8 x 42 s
