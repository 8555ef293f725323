"""Knowledge distillation: the loss, the teacher seeing the student's own augmented batch in its
own preprocessing, and `cifarlab train --teacher` end to end."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cifarlab
from cifarlab.cli import main
from cifarlab.rundir import RunDir
from cifarlab.training.callbacks.distill import Distill, Teacher
from cifarlab.training.step import cross_entropy


class FixedLogits(torch.nn.Module):
    """A teacher network that records what it was shown and answers fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.seen = logits, None

    def forward(self, x):
        self.seen = x
        return self.logits


def teacher_of(model, pre=None) -> Teacher:
    """A Teacher around `model` (trained at `pre`) for a student normalised with 0.4 / 0.2."""
    t = Teacher.__new__(Teacher)
    t.model, t.bf16, t.channels_last, t.table = model, False, False, None
    t.pre = pre or {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}
    t.tmean, t.tstd = (torch.tensor(t.pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    t.smean, t.sstd = torch.full((1, 3, 1, 1), 0.4), torch.full((1, 3, 1, 1), 0.2)
    return t


def distill(model, weight, temperature=2.0):
    return Distill(teacher_of(model), temperature, weight)


def test_the_loss_mixes_labels_and_the_softened_teacher():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 3, 8, 8)
    teacher = torch.randn(4, 3)
    labels = cross_entropy(logits, targets, x)
    assert distill(FixedLogits(teacher), 0.0).loss(cross_entropy, logits, targets, x) == labels
    t = 2.0
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
    got = distill(FixedLogits(teacher), 0.3, t).loss(cross_entropy, logits, targets, x)
    torch.testing.assert_close(got, 0.7 * labels + 0.3 * t * t * kl)
    # a student that already agrees with its teacher learns nothing more from it
    same = distill(FixedLogits(logits), 1.0).loss(cross_entropy, logits, targets, x)
    assert abs(float(same)) < 1e-6


def test_the_teacher_sees_the_students_batch_in_its_own_preprocessing():
    """The student's normalised batch goes back to [0, 1], then to the teacher's size and
    normalisation."""
    images = torch.rand(2, 3, 8, 8)
    student_x = (images - 0.4) / 0.2
    teacher = FixedLogits(torch.zeros(2, 3))
    pre = {"input_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "nearest"}
    teacher_of(teacher, pre).logits(student_x)
    want = (F.interpolate(images, size=(16, 16), mode="nearest") - 0.5) / 0.25
    torch.testing.assert_close(teacher.seen, want)


def test_train_with_a_teacher_records_it_and_changes_what_is_learned(
    tiny_folder, tiny_recipe, tmp_path
):
    teacher = tmp_path / "teacher"
    cifarlab.train(tiny_recipe, tiny_folder, teacher, progress=False)
    args = ["train", "--recipe", str(tiny_recipe), "--data", str(tiny_folder), "--no-progress",
            "--no-track"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "student"), "--teacher", str(teacher)]) == 0
    student = RunDir(tmp_path / "student")
    assert student.recipe()["distill"]["teacher"] == str(teacher)  # resume keeps it
    assert json.loads(student.metrics.read_text())["teacher"] == str(teacher)
    plain = RunDir(tmp_path / "plain").read_history()
    assert [h["train_loss"] for h in student.read_history()] != [h["train_loss"] for h in plain]


def test_a_teacher_of_other_classes_is_a_one_line_error(tiny_folder, tiny_recipe, tmp_path, capsys):
    from .conftest import make_folder

    other = make_folder(tmp_path / "other")
    (other / "ship").rename(other / "truck")
    teacher = tmp_path / "teacher"
    cifarlab.train(tiny_recipe, other, teacher, progress=False)
    code = main(["train", "--recipe", str(tiny_recipe), "--data", str(tiny_folder), "--no-track",
                 "--no-progress", "--teacher", str(teacher), "--out", str(tmp_path / "s")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "knows the classes cat, dog, truck" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_teacher_that_is_not_a_model_is_a_one_line_error(
    where, tiny_folder, tiny_recipe, tmp_path, capsys
):
    path = tmp_path / where
    if where == "empty":
        path.mkdir()
    code = main(["train", "--recipe", str(tiny_recipe), "--data", str(tiny_folder), "--no-track",
                 "--no-progress", "--teacher", str(path), "--out", str(tmp_path / "s")])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_the_budget_counts_the_teachers_time(
    tiny_folder, tiny_recipe, tmp_path, monkeypatch, capsys
):
    """A teacher that costs 5 ms an image (45 images an epoch): the first plan fits far fewer
    epochs in 8 s (the re-plans then follow the measured epochs)."""
    teacher = tmp_path / "teacher"
    cifarlab.train(tiny_recipe, tiny_folder, teacher, progress=False)
    planned = []
    for name, extra in (("plain", {}), ("taught", {"distill.teacher": str(teacher)})):
        capsys.readouterr()
        cifarlab.train(
            tiny_recipe, tiny_folder, tmp_path / name, progress=False, budget="8s", overrides=extra
        )
        line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("budget 8s"))
        planned.append(float(re.search(r"training ([\d.]+) epochs", line).group(1)))
        monkeypatch.setattr(Teacher, "seconds_per_image", lambda self, x: 0.005)
    assert planned[1] < planned[0] / 3, planned


@pytest.mark.parametrize("flip", [True, "alternate"])
def test_the_loader_says_which_image_and_orientation_each_row_is(tiny_folder, flip):
    from cifarlab.data import load_images
    from cifarlab.data.augment import AugmentConfig
    from cifarlab.data.loader import BatchLoader

    data = load_images(tiny_folder)
    pre = {"input_size": 32, "mean": [0.4] * 3, "std": [0.2] * 3}
    loader = BatchLoader(
        data, 16, torch.device("cpu"), pre, aug=AugmentConfig(flip=flip), shuffle=True, seed=3
    )
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    mirrored_any = False
    for x, _ in loader.epoch(seed=5, index=1):
        idx, mirrored = loader.views
        want = torch.where(mirrored[:, None, None, None], images[idx].flip(3), images[idx])
        torch.testing.assert_close(x, (want - 0.4) / 0.2)
        mirrored_any |= bool(mirrored.any()) and not bool(mirrored.all())
    assert mirrored_any  # some rows mirrored, some not


def taught_args(tiny_folder, tiny_recipe, teacher, out):
    return ["train", "--recipe", str(tiny_recipe), "--data", str(tiny_folder), "--no-track",
            "--no-progress", "--teacher", str(teacher), "--out", str(out),
            "--set", "augment.rotate=0", "--set", "augment.zoom=0"]  # fmt: skip


def test_cached_teacher_logits_are_the_teachers_own_for_flipped_views(
    tiny_folder, tiny_recipe, tmp_path, cifarlab_home, capsys
):
    """With flips only, looking the teacher's logits up by (image, orientation) gives what the
    teacher answers for the student's batch; micro-batches get their own rows."""
    from types import SimpleNamespace

    from cifarlab.data import load_images
    from cifarlab.data.augment import AugmentConfig
    from cifarlab.data.loader import BatchLoader

    cifarlab.train(tiny_recipe, tiny_folder, tmp_path / "teacher", progress=False)
    data = load_images(tiny_folder)
    pre = {"input_size": 32, "mean": [0.4] * 3, "std": [0.2] * 3}
    choice = SimpleNamespace(channels_last=False, bf16=False)
    teacher = Teacher(str(tmp_path / "teacher")).place(data.classes, "cpu", pre, choice)
    teacher.cache_views(data, "cpu", batch=7)
    assert "computed in" in capsys.readouterr().err
    loader = BatchLoader(data, 12, torch.device("cpu"), pre, aug=AugmentConfig(flip=True),
                         shuffle=True)  # fmt: skip
    d = Distill(teacher, 2.0, 0.5)
    d.on_phase_start(SimpleNamespace(net=None, model=None, train_loader=loader, loss_fn=None))
    for x, _ in loader.epoch(seed=1):
        live = teacher.logits(x)
        first, rest = d.teacher_logits(x[:5]), d.teacher_logits(x[5:])  # two micro-batches
        torch.testing.assert_close(torch.cat([first, rest]), live, atol=1e-4, rtol=1e-4)
    again = Teacher(str(tmp_path / "teacher")).place(data.classes, "cpu", pre, choice)
    again.cache_views(data, "cpu")
    assert "read from" in capsys.readouterr().err  # the same teacher and images: from disk
    (saved,) = (cifarlab_home / "teacher-logits").glob("*.npy")
    torch.testing.assert_close(again.table, teacher.table)
    saved.write_bytes(saved.read_bytes()[:200])  # a damaged file: computed again and replaced
    third = Teacher(str(tmp_path / "teacher")).place(data.classes, "cpu", pre, choice)
    third.cache_views(data, "cpu")
    err = capsys.readouterr().err
    assert "ignoring the teacher-logits file" in err and "computed in" in err
    torch.testing.assert_close(third.table, teacher.table)
    assert np.load(saved).shape == tuple(teacher.table.shape)


def test_train_with_cached_teacher_logits(tiny_folder, tiny_recipe, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    cifarlab.train(tiny_recipe, tiny_folder, teacher, progress=False)
    args = taught_args(tiny_folder, tiny_recipe, teacher, tmp_path / "cached")
    assert main([*args, "--set", "distill.cache=true"]) == 0
    assert "distill: teacher logits of 45 images x 2" in capsys.readouterr().err
    assert RunDir(tmp_path / "cached").recipe()["distill"]["cache"] is True
    cache = json.loads(RunDir(tmp_path / "cached").metrics.read_text())["teacher_cache"]
    assert cache["logits"] == "computed" and cache["seconds"] > 0  # its cost, on record
    assert main([*taught_args(tiny_folder, tiny_recipe, teacher, tmp_path / "again"),
                 "--set", "distill.cache=true"]) == 0  # fmt: skip
    assert (
        json.loads(RunDir(tmp_path / "again").metrics.read_text())["teacher_cache"]["logits"]
        == "read"
    )
    capsys.readouterr()
    # an augmentation that changes the image beyond a flip makes a lookup wrong: refused
    args = taught_args(tiny_folder, tiny_recipe, teacher, tmp_path / "mixed")
    code = main([*args, "--set", "distill.cache=true", "--set", "augment.mixup=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "augment.mixup" in err and err.count("\n") == 1
    assert not (tmp_path / "mixed").exists()


def test_the_teacher_cache_is_spent_from_the_budget_not_from_the_planners_allowance(
    tiny_folder, tiny_fast_recipe, tmp_path, monkeypatch, capsys
):
    """A teacher's one-off logits may take minutes (Lite1 for 90,000 views: 141 s); counted as
    start-up, they left a 15-minute budget time to time only its smallest size."""
    import time

    from cifarlab.training import budget

    teacher = tmp_path / "teacher"
    cifarlab.train(
        tiny_fast_recipe, tiny_folder, teacher, progress=False, overrides={"train.epochs": 1}
    )
    compute = Teacher._all_views

    def slow_logits(self, *args, **kwargs):  # the teacher's passes over every image, made slow
        time.sleep(3.0)
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(Teacher, "_all_views", slow_logits)
    monkeypatch.setattr(budget, "overhead_allowance", lambda budget_s: 2.0)
    capsys.readouterr()
    cifarlab.train(
        tiny_fast_recipe, tiny_folder, tmp_path / "taught", progress=False, budget="10s",
        overrides={"distill.teacher": str(teacher), "distill.cache": True},
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "teacher logits of 45 images" in err
    assert "not timed" not in err and "budget: sizes 1)" in err and " 2) " in err  # both sizes
