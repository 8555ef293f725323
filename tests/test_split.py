import numpy as np
import pytest

from cifarlab.config import load_recipe
from cifarlab.core.errors import UserError
from cifarlab.data.split import split_data


def _val_pixels(folder, recipe, **overrides):
    resolved = load_recipe(str(recipe), {"data.source": str(folder), **overrides})
    train, val, _ = split_data(resolved)
    return train.images, val.images


def test_split_seed_keeps_the_held_out_images_while_the_run_seed_changes(tiny_folder, tiny_recipe):
    _, val0 = _val_pixels(tiny_folder, tiny_recipe, seed=0)
    _, val1 = _val_pixels(tiny_folder, tiny_recipe, seed=1)
    assert not np.array_equal(val0, val1)  # by default the run's seed draws the split
    train_fixed, val_fixed = _val_pixels(tiny_folder, tiny_recipe, seed=1, **{"data.split_seed": 0})
    assert np.array_equal(val_fixed, val0)
    train0, _ = _val_pixels(tiny_folder, tiny_recipe, seed=0)
    assert np.array_equal(train_fixed, train0)
    # and --limit's subset follows the split seed too
    limited = {"data.limit": 12, "data.split_seed": 0}
    assert np.array_equal(
        _val_pixels(tiny_folder, tiny_recipe, seed=3, **limited)[0],
        _val_pixels(tiny_folder, tiny_recipe, seed=0, **limited)[0],
    )


def test_bad_split_seed_is_refused_by_the_schema(tiny_recipe):
    with pytest.raises(UserError, match="split_seed"):
        load_recipe(str(tiny_recipe), {"data.split_seed": -1})
