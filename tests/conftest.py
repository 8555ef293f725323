import numpy as np
import pytest
import torch
from PIL import Image

# Tests train tiny models: one thread is as fast, and immune to a busy machine's other processes
# (two processes each spinning two OpenMP threads on two cores slow small ops down 50-fold).
torch.set_num_threads(1)

CLASSES = ["cat", "dog", "ship"]
COLORS = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]])


def make_folder(root, per_class=20, size=32, seed=0):
    """An image folder whose classes differ by colour, so a tiny model can learn it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(COLORS[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def cifarlab_home(tmp_path_factory, monkeypatch):
    """Keep caches and tracking out of the user's home and working directory."""
    home = tmp_path_factory.mktemp("cifarlab_home")
    monkeypatch.setenv("CIFARLAB_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the CLI subprocesses, as above
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    return home


@pytest.fixture
def tiny_folder(tmp_path):
    return make_folder(tmp_path / "tiny")


@pytest.fixture
def tiny_recipe(tmp_path):
    """A seed-cnn shaped recipe small enough to train in a second."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: tiny\n"
        "precision: fp32\nmemory_format: contiguous\n"  # pinned: same numerics in every process
        "model: {name: seed_cnn, widths: [8, 16], convs_per_block: 1, dense: 16, dropout: 0.1}\n"
        "data: {val_fraction: 0.25}\n"
        "augment: {flip: true, rotate: 10.0, zoom: 0.1}\n"
        "train: {epochs: 3, batch_size: 8, lr: 0.01}\n"
    )
    return path


@pytest.fixture
def tiny_fast_recipe(tmp_path):
    """The `fast` recipe shrunk to train in a second: lookahead, alternating flip, TTA level 2."""
    path = tmp_path / "tiny-fast.yaml"
    path.write_text(
        "name: tiny-fast\n"
        "precision: auto\n"
        "model: {name: fastnet, widths: [8, 16, 16]}\n"
        "data: {val_fraction: 0.25}\n"
        "augment: {flip: alternate, translate: 2}\n"
        "train: {epochs: 3, batch_size: 8, optimizer: sgd, lr: 0.2, momentum: 0.85,\n"
        "        weight_decay: 0.001, schedule: linear, warmup_epochs: 0.5,\n"
        "        label_smoothing: 0.2, lookahead: 0.95, eval_tta: 2}\n"
        "budget:\n"
        "  min_epochs: 0\n"
        "  sizes: [{}, {model.widths: [16, 24, 24], augment.cutout: 4}]\n"
    )
    return path


def crash_then_resume(
    recipe, data, tmp_path, monkeypatch, at_step: int, optimizer=torch.optim.Adam
) -> dict:
    """Train into tmp_path/killed, crash at the `at_step`-th `optimizer` step (as a kill would),
    then resume the run; returns the resumed run's metrics."""
    import cifarlab

    real_step = optimizer.step
    calls = {"n": 0}

    def crashing_step(self, *a, **kw):
        if all(g["lr"] == 0 for g in self.param_groups):  # a timing step on a copy (lr 0)
            return real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(optimizer, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        cifarlab.train(recipe, data, tmp_path / "killed", progress=False)
    monkeypatch.setattr(optimizer, "step", real_step)
    return cifarlab.train(resume=tmp_path / "killed", progress=False)
