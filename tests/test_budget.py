import csv

import pytest
import torch
import yaml

import cifarlab
import cifarlab.config
from cifarlab.core.errors import UserError
from cifarlab.training.budget import parse_budget, scale_epochs


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
    phases = cifarlab.config.phases(
        cifarlab.config.resolve({"phases": [{"epochs": 10}, {"epochs": 5}]})
    )
    factor = scale_epochs(phases, [2.0, 4.0], fixed_seconds=10, available_seconds=130)
    assert sum(
        p.epochs * factor * s for p, s in zip(phases, [2.0, 4.0], strict=True)
    ) == pytest.approx(120)
    with pytest.raises(UserError, match="larger --budget"):
        scale_epochs(phases, [2.0, 4.0], fixed_seconds=200, available_seconds=130)


def recipe_of(train: dict) -> dict:
    """A resolved single-phase recipe with these `train` keys."""
    return cifarlab.config.resolve({"train": train})


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


def test_replan_stretches_or_shrinks_what_is_left_to_the_measured_speed():
    from cifarlab.training.budget import MARGIN, Plan

    written = recipe_of({"epochs": 9.7})
    plan = Plan({}, budget_s=100.0, epoch_seconds=[10.0], final_s=2.0, resized=False)
    slow = [{"phase": "train", "seconds": 20.0}]  # twice as slow as the plan thought
    recipe, steps = plan.replan(written, 0, 1, 10, slow, elapsed_s=25.0, log=lambda m: None)
    assert written["train"]["epochs"] == 9.7  # a new plan; the old recipe is left as it was
    expected = 1 + (100 * (1 - MARGIN) - 25 - 2) / 20
    assert steps == round(expected * 10)
    assert recipe["train"]["epochs"] == pytest.approx(expected, abs=1e-3)
    fast = [{"phase": "train", "seconds": 5.0}]
    recipe = recipe_of({"epochs": 9.7})
    recipe, steps = plan.replan(recipe, 0, 1, 10, fast, elapsed_s=10.0, log=lambda m: None)
    assert steps == round((1 + (100 * (1 - MARGIN) - 10 - 2) / 5) * 10)


def test_replan_never_reopens_a_finished_phase_or_undoes_done_steps():
    from cifarlab.training.budget import Plan

    plan = Plan({}, budget_s=100.0, epoch_seconds=[10.0], final_s=0.0, resized=False)
    done = recipe_of({"epochs": 2})
    rows = [{"phase": "train", "seconds": 1.0}] * 2
    assert plan.replan(done, 0, 2, 10, rows, elapsed_s=5.0, log=print)[1] == 20  # stays finished
    late = recipe_of({"epochs": 5})
    rows = [{"phase": "train", "seconds": 60.0}]
    assert plan.replan(late, 0, 1, 10, rows, elapsed_s=99.0, log=print)[1] == 11  # one step more


def test_a_budget_picks_the_larger_model_only_when_it_gets_enough_epochs(
    tiny_folder, tiny_fast_recipe, tmp_path
):
    from cifarlab.track.tracker import NullTracker

    class Recorder(NullTracker):
        def start(self, recipe, out):
            self.recipe = yaml.safe_load(yaml.safe_dump(recipe))

    tracker = Recorder()
    roomy = cifarlab.train(
        tiny_fast_recipe, tiny_folder, tmp_path / "a", progress=False, budget="10s", tracker=tracker
    )
    saved = yaml.safe_load((tmp_path / "a/config.yaml").read_text())
    assert saved["model"]["widths"] == [16, 24, 24]  # min_epochs 0: the largest size
    assert tracker.recipe["model"]["widths"] == [16, 24, 24]  # tracking records what trains
    assert tracker.recipe["train"]["epochs"] != 3  # the planned length, not the written one
    assert saved["augment"]["cutout"] == 4  # with all of its settings
    assert roomy["val"]["accuracy"] > 0
    whiten = cifarlab.load(tmp_path / "a").model.whiten  # the rebuilt model was whitened too
    assert torch.equal(whiten.weight[12:], -whiten.weight[:12])
    cifarlab.train(
        tiny_fast_recipe,
        tiny_folder,
        tmp_path / "b",
        progress=False,
        budget="10s",
        overrides={"budget.min_epochs": 1e9},
    )
    saved = yaml.safe_load((tmp_path / "b/config.yaml").read_text())
    assert saved["model"]["widths"] == [8, 16, 16]


def test_replan_ignores_one_stalled_epoch():
    from cifarlab.training.budget import MARGIN, Plan

    plan = Plan({}, budget_s=1000.0, epoch_seconds=[10.0], final_s=0.0, resized=False)
    recipe = recipe_of({"epochs": 50})
    rows = [{"phase": "train", "seconds": s} for s in (10.0, 90.0, 10.0)]  # another process ran
    recipe, steps = plan.replan(recipe, 0, 3, 10, rows, elapsed_s=110.0, log=print)
    assert steps == round((3 + (1000 * (1 - MARGIN) - 110) / 10) * 10)


def test_a_budget_size_may_not_change_the_data(tiny_folder, tiny_fast_recipe, tmp_path):
    with pytest.raises(UserError, match="model, augment and train keys only"):
        cifarlab.train(
            tiny_fast_recipe,
            tiny_folder,
            tmp_path / "a",
            progress=False,
            budget="10s",
            overrides={"budget.sizes": [{}, {"data.image_size": 16}]},
        )


def test_replan_counts_a_compiled_first_epoch_as_time_spent_not_as_a_rate():
    from cifarlab.training.budget import MARGIN, Plan

    plan = Plan({}, budget_s=100.0, epoch_seconds=[1.0], final_s=0.0, resized=False)
    rows = [{"phase": "train", "seconds": 18.0}]  # 17 s of it was torch.compile
    room = 100 * (1 - MARGIN) - 19.0
    recipe = recipe_of({"epochs": 80, "warmup_epochs": 18.4})
    recipe, steps = plan.replan(
        recipe, 0, 1, 10, rows, elapsed_s=19.0, log=print, one_off_first=True
    )
    assert steps == round((1 + room / 1.0) * 10)  # the planned rate, less the time spent
    recipe = recipe_of({"epochs": 80, "warmup_epochs": 18.4})
    recipe, steps = plan.replan(recipe, 0, 1, 10, rows, elapsed_s=19.0, log=print)
    assert steps == round((1 + room / 18.0) * 10)  # taken as a rate it would cut the run short
    rows += [{"phase": "train", "seconds": 2.0}] * 2  # later epochs set the rate
    recipe = recipe_of({"epochs": 80, "warmup_epochs": 18.4})
    recipe, steps = plan.replan(
        recipe, 0, 3, 10, rows, elapsed_s=23.0, log=print, one_off_first=True
    )
    assert steps == round((3 + (100 * (1 - MARGIN) - 23.0) / 2.0) * 10)


def test_replan_keeps_the_warmups_share_until_it_is_over():
    from cifarlab.training.budget import Plan

    plan = Plan({}, budget_s=100.0, epoch_seconds=[10.0], final_s=0.0, resized=False)
    recipe = recipe_of({"epochs": 10, "warmup_epochs": 2.3})
    rows = [{"phase": "train", "seconds": 20.0}]  # twice as slow: the run shrinks to ~4.9 epochs
    recipe, _ = plan.replan(recipe, 0, 1, 10, rows, elapsed_s=20.0, log=print)
    train = recipe["train"]
    assert train["epochs"] < 5
    assert train["warmup_epochs"] / train["epochs"] == pytest.approx(0.23, abs=1e-3)
    recipe = recipe_of({"epochs": 10, "warmup_epochs": 2.3})
    rows = [{"phase": "train", "seconds": 20.0}] * 3
    recipe, _ = plan.replan(
        recipe, 0, 3, 10, rows, elapsed_s=60.0, log=print
    )  # the LR peaked at 2.3
    assert recipe["train"]["warmup_epochs"] == 2.3


def test_replan_rates_epochs_by_the_wall_time_between_replans():
    from cifarlab.training.budget import MARGIN, Plan

    plan = Plan({}, budget_s=100.0, epoch_seconds=[1.0], final_s=0.0, resized=False)
    recipe = recipe_of({"epochs": 90, "warmup_epochs": 0})
    rows, elapsed = [], 5.0
    for epoch in range(1, 5):  # 1 s of training and validation, 0.5 s of checkpoints and logs
        rows.append({"phase": "train", "seconds": 1.0})
        elapsed += 1.5
        recipe, steps = plan.replan(recipe, 0, epoch, 10, rows, elapsed_s=elapsed, log=print)
    assert steps == round((4 + (100 * (1 - MARGIN) - elapsed) / 1.5) * 10)


def test_expected_accuracy_interpolates_in_log_epochs_and_distrusts_the_unmeasured():
    from cifarlab.training.budget import UNMEASURED_DROP, expected_accuracy

    points = {4: 0.80, 16: 0.90}
    assert expected_accuracy(points, 4) == pytest.approx(0.80)
    assert expected_accuracy(points, 8) == pytest.approx(0.85)  # halfway in log(epochs)
    assert expected_accuracy(points, 64) == pytest.approx(0.90)  # no unmeasured gain
    assert expected_accuracy(points, 2) == pytest.approx(0.80 - 0.05)  # first segment's slope
    flat = {10: 0.9, 20: 0.9}
    assert expected_accuracy(flat, 5) == pytest.approx(0.9 - UNMEASURED_DROP)


def sized_recipe(tmp_path, accuracy):
    """The tiny fast recipe with two sizes and a measured accuracy table."""
    path = tmp_path / "sized.yaml"
    recipe = yaml.safe_load(
        (tmp_path / "tiny-fast.yaml").read_text()
    )  # written by the tiny_fast_recipe fixture
    recipe["budget"] = {
        "sizes": [{}, {"model.widths": [16, 24, 24], "augment.cutout": 4}],
        "accuracy": accuracy,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_budget_picks_the_size_with_the_best_expected_accuracy(
    tiny_folder, tiny_fast_recipe, tmp_path
):
    # the small size measured better at every length: it wins although the larger one fits
    recipe = sized_recipe(tmp_path, [{1: 0.9, 1000: 0.95}, {1: 0.5, 1000: 0.6}])
    cifarlab.train(recipe, tiny_folder, tmp_path / "a", progress=False, budget="6s")
    assert yaml.safe_load((tmp_path / "a/config.yaml").read_text())["model"]["widths"] == [
        8,
        16,
        16,
    ]
    recipe = sized_recipe(tmp_path, [{1: 0.5, 1000: 0.6}, {1: 0.9, 1000: 0.95}])
    cifarlab.train(recipe, tiny_folder, tmp_path / "b", progress=False, budget="6s")
    saved = yaml.safe_load((tmp_path / "b/config.yaml").read_text())
    assert saved["model"]["widths"] == [16, 24, 24] and saved["augment"]["cutout"] == 4


def test_planning_stops_timing_sizes_once_its_allowance_is_spent(monkeypatch):
    import time

    from cifarlab.training import budget

    timed = []

    def slow_steps(model, loader, phase, bf16, **kw):
        timed.append(model)
        time.sleep(0.3)
        return 0.01

    monkeypatch.setattr(budget, "time_steps", slow_steps)
    monkeypatch.setattr(budget, "time_eval", lambda *a, **k: 0.001)
    monkeypatch.setattr(budget, "overhead_allowance", lambda s: 0.5)

    class Loader:
        input_size = 32

        def __init__(self, n=10):
            self.n = n

        def __len__(self):
            return self.n

        def epoch(self, *a, **k):
            yield torch.zeros(4, 3, 32, 32), None

    recipe = cifarlab.config.load_recipe("fast")
    logged = []
    built = []
    started = time.perf_counter()

    def loader_for(phase, batch=None):
        return Loader()

    def build(cfg):  # another size: (model, preprocess, loader_for, val_loader)
        built.append(cfg)
        return torch.nn.Linear(1, 1), None, loader_for, Loader(2)

    budget.plan(
        recipe, torch.nn.Linear(1, 1), loader_for, Loader(2), False,
        600.0, lambda: 0.0, logged.append, build=build,
    )  # fmt: skip
    # 0.3 s spent, 1.5 x 0.3 s more would pass the 0.5 s allowed: one size timed, no more
    assert len(timed) == 1 < len(recipe["budget"]["sizes"])
    assert time.perf_counter() - started < 2.0  # 0.3 s slept; slack for a busy machine
    assert any("not timed" in line for line in logged)


def test_a_budget_too_small_to_train_says_so_before_training(
    tiny_folder, tiny_recipe, tmp_path, monkeypatch, capsys
):
    from cifarlab.cli import main
    from cifarlab.training import budget

    monkeypatch.setattr(budget, "time_steps", lambda *a, **k: 100.0)  # a very slow machine
    argv = ["train", "--recipe", str(tiny_recipe), "--data", str(tiny_folder)]
    argv += ["--out", str(tmp_path / "run"), "--budget", "1m", "--no-track"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "affords" in err and "training steps" in err and "larger --budget" in err
    assert not (tmp_path / "run").exists()  # nothing half-written left behind


def test_replan_after_a_cached_head_phase_keeps_the_backbone_phases_planned_rate():
    """A head epoch on cached features takes a second where the plan may have guessed more or
    less; that says nothing of the fine-tuning phase, which runs the backbone."""
    from cifarlab.training.budget import MARGIN, Cost, Plan

    recipe = cifarlab.config.resolve(
        {"phases": [{"name": "head", "epochs": 5}, {"name": "tune", "epochs": 3}]}
    )
    cost = Cost([0.5, 100.0], 10.0, [50.0, 0.0], [True, False])
    plan = Plan({}, 1000.0, cost.seconds, cost.final_s, resized=False, cost=cost)
    rows = [
        {"phase": "head", "seconds": 50.0},
        {"phase": "head", "seconds": 1.0},
    ]  # cache, then 1 s
    new, steps = plan.replan(recipe, 0, 2, 10, rows, 52.0, print, one_off_first=True)
    head, tune = cifarlab.config.phases(new)
    assert steps == 50 and head.epochs == 5  # the cached phase keeps its length
    room = 1000 * (1 - MARGIN) - 52.0 - 10.0
    assert tune.epochs * 100.0 + 3 * 1.0 == pytest.approx(room, rel=0.01)  # tune fills the room
    # without the Cost, the head's 2x would be taken as every phase's rate: tune halved
    new, _ = Plan({}, 1000.0, cost.seconds, 10.0, False).replan(recipe, 0, 2, 10, rows, 52.0, print)
    assert cifarlab.config.phases(new)[1].epochs < 0.6 * tune.epochs


def test_replan_of_a_backbone_phase_reserves_a_later_cached_phase_and_leaves_it_alone():
    from cifarlab.training.budget import MARGIN, Cost, Plan

    recipe = cifarlab.config.resolve(
        {"phases": [{"name": "tune", "epochs": 3}, {"name": "head", "epochs": 5}]}
    )
    cost = Cost([100.0, 0.5], 10.0, [0.0, 40.0], [False, True])
    plan = Plan({}, 1000.0, cost.seconds, cost.final_s, resized=False, cost=cost)
    rows = [{"phase": "tune", "seconds": 200.0}]  # twice as slow as planned
    new, steps = plan.replan(recipe, 0, 1, 10, rows, 210.0, print)
    tune, head = cifarlab.config.phases(new)
    assert head.epochs == 5  # not stretched, and not slowed by the backbone's rate
    room = 1000 * (1 - MARGIN) - 210.0 - 10.0 - 40.0 - 5 * 0.5  # its cache pass is reserved
    assert (tune.epochs - 1) * 200.0 == pytest.approx(room, abs=20.0)  # to a step (of 10 an epoch)
