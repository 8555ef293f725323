"""Every recipe key refuses values of the wrong type and out of range, through the CLI: exit 2,
one line on stderr, no traceback, no run directory, before any data is read."""

import pytest
import yaml

from cifarlab import config
from cifarlab.cli import main

SKIP = {
    "name",
    "summary",
    "description",
    "data.source",
    "data.test",
    "distill.teacher",
}  # free text and paths

# values outside each number's range, written by hand (not derived from the checks under test)
OUT_OF_RANGE = {
    "seed": [-1],
    "threads": [0, -4],
    "data.image_size": [0, -32, 4],
    "data.limit": [0, -10],
    "data.val_fraction": [0, 1, 1.5, -0.1],
    "augment.rotate": [-5, 400],
    "augment.zoom": [-0.1, 1, 3],
    "augment.translate": [-1, 16, 99],
    "augment.brightness": [-0.5, 2],
    "augment.contrast": [-0.5, 2],
    "augment.cutout": [-1, 33, 100],
    "augment.mixup": [-1],
    "augment.cutmix": [-1],
    "augment.mix_prob": [-0.1, 1.5],
    "train.epochs": [0, -3],
    "train.batch_size": [0, -8],
    "train.lr": [0, -0.1],
    "train.momentum": [1, -0.1, 3],
    "train.muon_lr": [0, -0.1],
    "train.muon_momentum": [1, -0.1, 3],
    "train.weight_decay": [-1e-4],
    "train.warmup_epochs": [-1],
    "train.lr_start": [-0.1, 1.5],
    "train.lr_end": [-0.1, 1.5],
    "train.label_smoothing": [-0.1, 1, 2],
    "train.early_stopping": [-1],
    "train.feature_views": [0],
    "train.layer_decay": [0, -0.5, 1.5],
    "train.ema": [-0.1, 1, 2],
    "train.lookahead": [-0.1, 1],
    "train.eval_tta": [-1, 3],
    "train.accumulate": [0, -2],
    "distill.temperature": [0, -1],
    "distill.weight": [-0.1, 1.5],
    "budget.min_epochs": [-1],
    "train.dropout": [],  # not a key: see test_unknown_keys (kept out of the defaults)
}
WRONG_TYPE = {int: ["abc", "[1, 2]", "1.5"], float: ["abc", "[1]", "{a: 1}"]}


def defaults_keys():
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k != "model":
                walk(v, f"{key}.")
            elif k != "model":
                flat[key] = v

    walk(config.defaults(), "")
    return {k: v for k, v in flat.items() if k not in SKIP}


def bad_values(key, default):
    if key == "threads":  # auto or a count
        return ["many", "1.5"] + [str(v) for v in OUT_OF_RANGE[key]]
    if isinstance(default, bool):
        return ["maybe", "3", "[true]"]
    if isinstance(default, int | float):
        kinds = WRONG_TYPE[int if isinstance(default, int) and key != "train.epochs" else float]
        return kinds[:1] + kinds[1:2] + [str(v) for v in OUT_OF_RANGE[key]]
    if isinstance(default, list):
        return ["abc", "5"]
    if default is None:
        return ["abc", "[1]"] + [str(v) for v in OUT_OF_RANGE.get(key, [])]
    return ["5", "bogus-value", "[1]"]  # a choice of words


def cases():
    keys = defaults_keys()
    out = [(k, v) for k, d in keys.items() for v in bad_values(k, d)]
    out += [("phases.0.lr", "abc"), ("phases.1.epochs", "-2"), ("phases.0.freeze", "most")]
    return out


def test_every_number_key_has_out_of_range_cases():
    numeric = {
        k
        for k, v in defaults_keys().items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    numeric |= {"data.limit", "train.layer_decay"}  # null by default, numbers when set
    missing = numeric - set(OUT_OF_RANGE) - {"train.epochs"} - {"epochs"}
    assert not missing, f"add out-of-range values for {sorted(missing)}"


def test_the_sweep_tries_every_key_and_is_large():
    tried = {k for k, _ in cases()}
    assert set(defaults_keys()) <= tried
    assert len(cases()) > 120


@pytest.mark.parametrize("key, value", cases())
def test_a_bad_value_is_one_line_and_exit_2(key, value, tiny_folder, tmp_path, capsys):
    recipe = "lite0-transfer" if key.startswith("phases.") else "seed-cnn"
    out = tmp_path / "run"
    argv = ["train", "--recipe", recipe, "--data", str(tiny_folder), "--out", str(out)]
    argv += ["--set", f"{key}={value}", "--no-track", "--no-progress"]
    assert main(argv) == 2, (key, value)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifarlab: error: ") and key in err[0], err
    assert "Traceback" not in err[0]
    assert not out.exists()


def test_good_values_of_the_shipped_recipes_pass():
    for name in config.recipe_names():
        config.load_recipe(name)  # every shipped recipe validates
    r = config.load_recipe("fast", {"train.eval_tta": True, "threads": 2, "data.limit": 100})
    assert yaml.safe_load(config.dump(r))["threads"] == 2


def test_fewer_epochs_keep_the_warmups_share_of_the_schedule():
    # --epochs 3 on fast (warm-up 2.3 of 10 epochs) warms up for 23% of 3, not for 77% of it
    fast = config.load_recipe("fast", {"train.epochs": 3, "*phases.epochs": 3})
    assert fast["train"]["warmup_epochs"] == pytest.approx(0.69)
    pinned = config.load_recipe("fast", {"train.epochs": 3, "train.warmup_epochs": 1.0})
    assert pinned["train"]["warmup_epochs"] == 1.0  # set together: taken as given
    assert config.load_recipe("fast")["train"]["warmup_epochs"] == 2.3
    lite = config.load_recipe("lite0-transfer", {"train.epochs": 6, "*phases.epochs": 6})
    assert lite["phases"][1]["warmup_epochs"] == pytest.approx(0.2)  # 0.1 of 3 -> 0.2 of 6
    assert "warmup_epochs" not in lite["phases"][0]  # a phase without a warm-up gets none


def test_the_recipe_list_keeps_every_name_apart_from_its_summary(capsys):
    from cifarlab import config
    from cifarlab.cli import main

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in config.recipe_names():  # e.g. densenet121-transfer ran into its summary
        line = next(x for x in lines if x.startswith(name + " "))
        assert line[len(name) : len(name) + 2] == "  ", line
