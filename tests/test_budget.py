import csv

import pytest
import torch
import yaml

import cifarlab
from cifarlab.budget import parse_budget, scale_epochs
from cifarlab.errors import UserError


@pytest.mark.parametrize(
    "text, seconds",
    [("15m", 900), ("90s", 90), ("1h", 3600), ("1h30m", 5400), ("45", 45), (12.5, 12.5)],
)
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["soon", "15x", "-5", "0"])
def test_bad_budget_is_a_user_error(text):
    with pytest.raises(UserError):
        parse_budget(text)


def test_scale_fills_the_room_after_fixed_costs():
    phases = [{"epochs": 10}, {"epochs": 5}]
    factor = scale_epochs(phases, [2.0, 4.0], fixed_seconds=10, available_seconds=130)
    assert sum(
        p["epochs"] * factor * s for p, s in zip(phases, [2.0, 4.0], strict=True)
    ) == pytest.approx(120)
    with pytest.raises(UserError, match="larger --budget"):
        scale_epochs(phases, [2.0, 4.0], fixed_seconds=200, available_seconds=130)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fractional_epochs_stop_mid_epoch(tiny_folder, tiny_recipe, tmp_path):
    out = tmp_path / "run"
    cifarlab.train(tiny_recipe, tiny_folder, out, overrides={"train.epochs": 1.5}, progress=False)
    history = rows(out / "history.csv")
    assert len(history) == 2
    # 45 training images in batches of 8 (last partial batch dropped): 5 steps an epoch, 8 in all
    assert history[-1]["step"] == "2"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == 8


def test_budget_rewrites_the_epochs_in_the_saved_recipe(tiny_folder, tiny_recipe, tmp_path):
    out = tmp_path / "run"
    cifarlab.train(tiny_recipe, tiny_folder, out, progress=False, budget="8s")
    epochs = yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"]
    assert epochs != 3 and epochs > 3  # an 8 s budget fits far more than 3 tiny epochs
    assert len(rows(out / "history.csv")) == -(-epochs // 1)
