"""Transfer learning: freeze policies, per-stage learning rates, the feature cache, the seed's
two-phase ResNet50 recipe end to end (shrunk: resnet18 at 32 px, one epoch per phase)."""

import csv
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

import cifarlab
from cifarlab import config
from cifarlab.cli import main
from cifarlab.core.errors import UserError
from cifarlab.data.split import split_data
from cifarlab.models import build_model
from cifarlab.models.transfer import build_transfer
from cifarlab.rundir import RunDir

from .conftest import crash_then_resume

ARCH = "resnet18"  # stages: conv1/bn1 (stem), layer1..layer4
SHRINK = [
    "--set",
    f"model.arch={ARCH}",
    "--set",
    "model.input_size=32",
    "--set",
    "model.resize_steps=[48]",
    "--epochs",
    "1",
    "--no-progress",
    "--no-track",
]


def tiny_net(head=(16, 8)):
    spec = {"name": "timm", "arch": ARCH, "head": list(head), "pretrained_source": "none"}
    model, _ = build_model({**spec, "input_size": 32}, 3, 32, pretrained=False)
    return model


def backbone_trainable(model) -> set[str]:
    return {n for n, p in model.backbone.named_parameters() if p.requires_grad}


def batchnorms(model):
    return [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]


def test_head_policy_freezes_the_whole_backbone_in_eval_mode():
    model = tiny_net()
    model.train()
    model.set_trainable("head")
    assert backbone_trainable(model) == set()
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(m.training for m in model.backbone.modules())
    assert all(m.training for m in model.head.modules())  # the head's BatchNorm/Dropout train


def test_conv_only_trains_conv_weights_and_keeps_batchnorm_frozen():
    model = tiny_net()
    model.train()
    model.set_trainable("conv-only")
    convs = {
        f"{n}.{pn}"
        for n, m in model.backbone.named_modules()
        if isinstance(m, nn.Conv2d)
        for pn, _ in m.named_parameters(recurse=False)
    }
    assert convs and backbone_trainable(model) == convs
    for _, bn in batchnorms(model):
        assert not bn.training and not bn.weight.requires_grad
    before = {n: bn.running_mean.clone() for n, bn in batchnorms(model)}
    model(torch.rand(4, 3, 32, 32))  # a training-mode forward must not move frozen BN statistics
    assert all(torch.equal(before[n], bn.running_mean) for n, bn in batchnorms(model))


@pytest.mark.parametrize("n, first_trainable", [(1, "layer4."), (2, "layer3."), (5, "conv1.")])
def test_last_n_trains_the_last_n_stages(n, first_trainable):
    model = tiny_net()
    model.train()
    model.set_trainable(f"last-{n}")
    stages = ["conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."]
    keep = stages[stages.index(first_trainable) :]
    expected = {
        name for name, _ in model.backbone.named_parameters() if name.startswith(tuple(keep))
    }
    assert backbone_trainable(model) == expected
    for name, bn in batchnorms(model):
        assert bn.training == f"{name}.".startswith(tuple(keep)), name


@pytest.mark.parametrize("policy", ["none", "all"])
def test_none_and_all_train_everything(policy):
    model = tiny_net()
    model.set_trainable("head")
    model.train()
    model.set_trainable(policy)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("policy", ["last-x", "everything", "conv"])
def test_unknown_freeze_policy_is_a_user_error(policy):
    with pytest.raises(UserError, match="unknown freeze policy"):
        tiny_net().set_trainable(policy)


def test_layer_decay_and_weight_decay_scope_shape_the_optimizer_groups():
    model = tiny_net()
    model.set_trainable("none")
    keys = {"lr": 0.1, "weight_decay": 0.01, "layer_decay": 0.5, "weight_decay_scope": "head"}
    (phase,) = config.phases(config.resolve({"train": keys}))
    lr_of, wd_of = {}, {}
    for group in model.param_groups(phase):
        for p in group["params"]:
            lr_of[id(p)], wd_of[id(p)] = group["lr"], group["weight_decay"]
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every trainable parameter, once
    assert lr_of[id(named["head.0.weight"])] == pytest.approx(0.1)
    assert lr_of[id(named["backbone.layer4.0.conv1.weight"])] == pytest.approx(0.05)
    assert lr_of[id(named["backbone.conv1.weight"])] == pytest.approx(0.1 * 0.5**5)
    decayed = {n for n, p in named.items() if wd_of[id(p)] > 0}
    assert decayed == {"head.0.weight", "head.4.weight", "head.8.weight"}  # dense kernels only
    model.set_trainable("head")  # frozen parameters are left out of the optimizer
    assert sum(len(g["params"]) for g in model.param_groups(phase)) == len(
        list(model.head.parameters())
    )


def test_preprocessing_follows_the_weights_config():
    lite, pre = build_transfer(
        {"arch": "tf_efficientnet_lite0", "pretrained_source": "lite-pypi"}, 10, "auto", False
    )
    assert pre["input_size"] == 224 and pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
    assert pre["interpolation"] == timm.get_pretrained_cfg("tf_efficientnet_lite0").interpolation
    _, pre = build_transfer({"arch": ARCH, "pretrained_source": "none"}, 10, 96, False)
    assert pre["input_size"] == 96
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(UserError, match="not a timm architecture"):
        build_transfer({"arch": "no_such_net"}, 10, 32, False)
    with pytest.raises(UserError, match="unknown model argument"):
        build_transfer({"arch": ARCH, "widths": [3]}, 10, 32, False)


def head_recipe(tmp_path, name="cached", cache=True, views=1, phases=""):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        "precision: fp32\nmemory_format: contiguous\n"  # pinned: each run would measure its own
        f"model: {{name: timm, arch: {ARCH}, pretrained_source: none, input_size: 32, "
        "head: [16], dropout: 0.1}\n"
        "data: {val_fraction: 0.25}\n"
        "augment: {flip: true}\n"
        f"train: {{epochs: 4, batch_size: 8, lr: 0.01, freeze: head, feature_cache: {cache}, "
        f"feature_views: {views}}}\n" + phases
    )
    return path


def history_without_timings(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in rows
    ]


def test_feature_cache_phase_trains_the_head_like_the_image_loop(tiny_folder, tmp_path):
    """Without augmentation the cache is exact: same batches, same losses, same checkpoints."""
    runs = {}
    for cache in (True, False):
        out = tmp_path / f"cache-{cache}"
        recipe = head_recipe(tmp_path, f"r{cache}", cache)
        runs[cache] = cifarlab.train(
            recipe, tiny_folder, out, overrides={"augment.flip": False}, progress=False
        )
        for name in ("history.csv", "best.pt", "last.pt", "metrics.json"):
            assert (out / name).is_file()
    cached, plain = (
        history_without_timings(tmp_path / f"cache-{c}/history.csv") for c in (True, False)
    )
    assert [r["phase"] for r in cached] == ["train"] * 4 and len(plain) == 4
    for a, b in zip(cached, plain, strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]
    assert runs[True]["val"]["accuracy"] > 0.6  # colours separate the classes
    assert runs[True]["val"]["accuracy"] == runs[False]["val"]["accuracy"]
    a, b = (torch.load(tmp_path / f"cache-{c}/best.pt")["state_dict"] for c in (True, False))
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=1e-4, atol=1e-5)


def test_feature_views_add_augmented_views_and_resume_recomputes_the_cache(
    tiny_folder, tmp_path, monkeypatch
):
    recipe = head_recipe(tmp_path, views=3)
    clean = cifarlab.train(recipe, tiny_folder, tmp_path / "clean", progress=False)
    resumed = crash_then_resume(
        recipe, tiny_folder, tmp_path, monkeypatch, at_step=12
    )  # third epoch
    assert resumed["val"]["loss"] == pytest.approx(clean["val"]["loss"], rel=1e-6)
    assert history_without_timings(tmp_path / "killed/history.csv") == history_without_timings(
        tmp_path / "clean/history.csv"
    )
    one_view = cifarlab.train(
        recipe, tiny_folder, tmp_path / "one", overrides={"train.feature_views": 1}, progress=False
    )
    assert one_view["val"]["loss"] != clean["val"]["loss"]  # the extra views were trained on


def test_transfer_checkpoint_reloads_and_predicts_as_in_training(tiny_folder, tmp_path):
    phases = (
        "phases:\n  - {name: head, epochs: 2}\n"
        "  - {name: tune, freeze: last-1, epochs: 1, lr: 0.001, layer_decay: 0.5}\n"
    )
    recipe = head_recipe(tmp_path, phases=phases)
    out = tmp_path / "run"
    cifarlab.train(
        recipe,
        tiny_folder,
        out,
        overrides={"model.resize_steps": [48], "model.interpolation": "bicubic"},
        progress=False,
    )
    predictor = cifarlab.load(out)
    assert predictor.preprocess["resize_steps"] == [48]
    assert predictor.preprocess["interpolation"] == "bicubic"
    _, val_set, _ = split_data(RunDir(out).recipe())
    probs = predictor.probs(val_set.images)
    np.testing.assert_allclose(probs, np.load(out / "val_probs.npy"), atol=1e-5)
    top = predictor.predict_files([tiny_folder / "cat" / "000.png"], k=2)
    assert len(next(iter(top))["top"]) == 2
    for name in ("phase1.pt", "phase2.pt"):  # each phase's final model, loadable on its own
        assert cifarlab.load(out / name).probs(val_set.images[:2]).shape == (2, 3)


def test_seed_resnet50_runs_end_to_end_from_a_local_weights_file(tiny_folder, tmp_path, capsys):
    """The seed's two phases through the CLI with --weights: phase 1 leaves the backbone as
    loaded; phase 2 moves only conv weights (BatchNorm stays frozen)."""
    weights = tmp_path / "r18.pt"
    donor = timm.create_model(ARCH, num_classes=0)
    torch.save(donor.state_dict(), weights)
    out = tmp_path / "seed"
    argv = ["train", "--recipe", "seed-resnet50", "--data", str(tiny_folder), "--out", str(out)]
    assert main(argv + ["--weights", str(weights)] + SHRINK) == 0
    assert f"pretrained: file from {weights}: " in capsys.readouterr().err
    resolved = RunDir(out).recipe()
    assert [(p.name, p.freeze, p.lr) for p in config.phases(resolved)] == [
        ("training", "head", 1e-4),
        ("fine-tuning", "conv-only", 1e-5),
    ]
    assert resolved["model"]["head"] == [256, 128, 64] and resolved["model"]["dropout"] == 0.6
    with open(out / "history.csv", newline="") as f:
        assert [r["phase"] for r in csv.DictReader(f)] == ["training", "fine-tuning"]
    source = donor.state_dict()
    bn_names = {
        f"{m_name}.{t_name}"
        for m_name, m in donor.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for t_name, _ in m.state_dict().items()
    }
    after = [torch.load(out / f"phase{i}.pt")["state_dict"] for i in (1, 2)]
    for name, tensor in source.items():
        assert torch.equal(after[0][f"backbone.{name}"], tensor), name  # phase 1: frozen
        if name in bn_names:
            assert torch.equal(after[1][f"backbone.{name}"], tensor), name  # phase 2: BN frozen
    conv = "conv1.weight"  # (block convs of a fresh timm ResNet get no gradient: zero-init BN)
    assert not torch.equal(after[1][f"backbone.{conv}"], source[conv])  # phase 2: conv trains
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["phase"] for p in metrics["phases"]] == ["training", "fine-tuning"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "seed-cnn", "--weights", "w.pt"], "apply to pretrained models"),
        (["--recipe", "seed-resnet50", "--pretrained-source", "nowhere"], "unknown pretrained"),
        (["--recipe", "seed-resnet50", "--pretrained-source", "lite-pypi"], "lite-pypi only"),
    ],
)
def test_pretrained_flag_mistakes_are_one_line_errors(tiny_folder, tmp_path, argv, message, capsys):
    code = main(["train", "--data", str(tiny_folder), "--out", str(tmp_path / "r")] + argv + SHRINK)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and err[-1].startswith("cifarlab: error:")
    assert "Traceback" not in "\n".join(err)


PRETRAINED_RECIPES = [
    n for n in config.recipe_names() if config.load_recipe(n)["model"]["name"] == "timm"
]


@pytest.mark.parametrize("name", PRETRAINED_RECIPES)
def test_every_shipped_backbone_recipe_builds_and_answers(name):
    """Each backbone recipe's network builds (random init: no download) at its input size and
    gives one logit per class; the backbone recipes of the seed's next steps are among them."""
    spec = {**config.load_recipe(name)["model"], "pretrained_source": "none"}
    model, pre = build_model(spec, 10, 32)
    size = int(pre["input_size"])
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, 10)


def test_backbone_recipes_of_the_seeds_next_steps_are_shipped():
    want = {"efficientnet-b0-transfer", "densenet121-transfer", "mobilenetv2-transfer"}
    assert want | {"lite1-transfer", "lite2-transfer"} <= set(PRETRAINED_RECIPES)


def test_stochastic_depth_on_a_backbone_without_it_is_a_user_error():
    spec = {"name": "timm", "arch": "densenet121", "pretrained_source": "none", "drop_path": 0.1}
    with pytest.raises(UserError, match="densenet121 has no stochastic depth"):
        build_model(spec, 10, 32)


def test_a_budget_plans_a_cached_head_phase_by_its_one_pass(tiny_folder, tmp_path, capsys):
    """The head phase costs one backbone pass, then almost nothing an epoch: the plan says so,
    keeps its epochs, and gives the rest of the budget to the fine-tuning (re-planning after
    cached epochs: test_budget)."""
    phases = (
        "phases:\n  - {name: head, epochs: 5}\n"
        "  - {name: tune, freeze: none, epochs: 1, lr: 0.001}\n"
    )
    out = tmp_path / "run"
    main(["train", "--recipe", str(head_recipe(tmp_path, phases=phases)), "--data",
          str(tiny_folder), "--out", str(out), "--budget", "15s", "--no-progress", "--no-track"])  # fmt: skip
    assert "once for cached features" in capsys.readouterr().err
    head, tune = config.phases(RunDir(out).recipe())
    assert head.epochs == 5  # a cached phase keeps its epochs: they add little
    assert tune.epochs > 1  # the budget stretched the fine-tuning


def test_a_budget_size_with_another_input_size_is_timed_and_trained_at_it(tiny_folder, tmp_path):
    """Sizes of a transfer recipe may change the resolution (or the backbone, with its own
    normalisation): the plan times each size on its own inputs, and the run trains the chosen one."""
    sizes = "budget: {sizes: [{model.input_size: 32}, {model.input_size: 48}]}\n"
    recipe = head_recipe(tmp_path, phases=sizes)
    out = tmp_path / "run"
    cifarlab.train(recipe, tiny_folder, out, progress=False, budget="15s")
    assert RunDir(out).recipe()["model"]["input_size"] == 48  # no table: the last size
    predictor = cifarlab.load(out)
    assert predictor.preprocess["input_size"] == 48
    _, val_set, _ = split_data(RunDir(out).recipe())
    probs = predictor.probs(val_set.images)
    np.testing.assert_allclose(probs, np.load(out / "val_probs.npy"), atol=1e-5)


def test_the_transfer_recipe_picks_lite0_when_time_is_short_and_lite1_for_an_hour():
    """The shipped accuracy table with the epoch times of a 2-core Zen 5 (fine-tuning: Lite0 at
    96 px ~330 s, Lite1 at 112 px ~420 s; the head's epochs on cached features ~1 s)."""
    from cifarlab.training import budget

    recipe = config.load_recipe("transfer")
    sizes, table = recipe["budget"]["sizes"], recipe["budget"]["accuracy"]
    costs = [
        budget.Cost([1.0, 330.0], 25.0, [110.0, 0.0], [True, False]),
        budget.Cost([1.0, 420.0], 30.0, [130.0, 0.0], [True, False]),
    ]
    for budget_s, wanted in (
        (15 * 60, "tf_efficientnet_lite0"),
        (60 * 60, "tf_efficientnet_lite1"),
    ):
        options = []
        for i, (size, cost) in enumerate(zip(sizes, costs, strict=True)):
            phases = config.phases(budget.with_size(recipe, size))
            factor = cost.factor(phases, budget_s * (1 - budget.MARGIN) - 20.0, strict=False)
            options.append((i, cost, cost.epochs(phases, factor)))
        (i, _, _), _ = budget.choose(options, table, 0.0)
        assert budget.with_size(recipe, sizes[i])["model"]["arch"] == wanted
