"""The Python API. The CLI is a thin layer over these functions."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from cifarlab import config
from cifarlab.core import distributed
from cifarlab.core.errors import UserError
from cifarlab.core.runtime import resolve_device
from cifarlab.data import load_images
from cifarlab.data.image import read_image
from cifarlab.data.split import align_classes, split_data
from cifarlab.deploy.export import export as export_model
from cifarlab.deploy.inference import expand_inputs, load_predictor
from cifarlab.deploy.interrupted import interrupted_predictor
from cifarlab.eval.metrics import metrics
from cifarlab.report import plots
from cifarlab.rundir import RunDir
from cifarlab.track import registry
from cifarlab.training.budget import parse_budget
from cifarlab.training.fit import fit


def train(
    recipe: str | Path = "seed-cnn",
    data: str | Path | None = "cifar10",
    out: str | Path | None = None,
    test: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    tracker=None,
    budget: str | float | None = None,
    callbacks: list | None = None,
) -> dict:
    """Train a recipe on `data` into run directory `out`; returns the run's metrics
    (with `run_dir`). `resume` continues a killed run from its directory. `budget` ('15m', or
    seconds) sizes the schedule to finish in about that time on this machine. `callbacks`
    (cifarlab.training.events.Callback) are called after the run's own."""
    budget_s = parse_budget(budget) if budget is not None else None
    resolved = train_recipe(recipe, data, test, overrides, resume)
    if resume is not None:
        run = RunDir(resume)
        result = fit(resolved, run.path, True, progress, tracker, callbacks=callbacks)
        return {**result, "run_dir": str(run)}
    run = RunDir(out or Path("runs") / f"{resolved['name']}-{datetime.now():%Y%m%d-%H%M%S}")
    if distributed.init(resolve_device(resolved["device"])).active:
        run = RunDir(distributed.broadcast(str(run)))  # rank 0's clock names the run
    if run.last.exists():
        raise UserError(
            f"{run} already holds a run; use --resume {run} to continue it or another --out"
        )
    result = fit(resolved, run.path, False, progress, tracker, budget_s, callbacks)
    return {**result, "run_dir": str(run)}


def train_recipe(
    recipe: str | Path = "seed-cnn",
    data: str | Path | None = "cifar10",
    test: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: str | Path | None = None,
) -> dict:
    """The whole recipe `train` would run with these arguments (the run's own, to resume it);
    what `train` refuses before it starts (a bad key or value, no data, nothing to resume) is
    refused here."""
    if resume is not None:
        run = RunDir(resume)
        if not run.resumable():
            raise UserError(
                f"{run} has no last.pt/config.yaml to resume from; pass a run directory"
            )
        return run.recipe(overrides)
    overrides = dict(overrides or {})
    if data is not None:
        overrides["data.source"] = absolute(data)
    if test is not None:
        overrides["data.test"] = absolute(test)
    resolved = config.load_recipe(recipe, overrides)
    if not resolved["data"]["source"]:
        raise UserError(
            "no training data: pass --data PATH (an image folder, an archive or 'cifar10')"
        )
    return resolved


def absolute(source: str | Path) -> str:
    """A path as an absolute one (so a run can be resumed or reported from anywhere); the word
    'cifar10' stays as it is."""
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


def load(
    path: str | Path, device: str = "cpu", precision: str = "auto", tracking_uri: str | None = None
):
    """A predictor for a run directory, a checkpoint file, an exported .onnx file (run by
    ONNX Runtime on the CPU) or a registered model (`models:/NAME@ALIAS`, `models:/NAME/3`, from
    the registry at `tracking_uri`): `.probs(uint8 images)`, `.top_k`, `.classes`, `.metadata`.
    `precision` auto: what the checkpoint was trained in (bf16 only where native here), else
    measured here (cifarlab.core.runtime)."""
    if str(path).startswith("models:/"):
        local, registered = registry.resolve(str(path), tracking_uri)
        predictor = load_predictor(local, device, precision)
        predictor.registered = registered
        return predictor
    return load_predictor(path, device, precision)


def register(
    run_dir: str | Path,
    name: str,
    alias: str | None = None,
    force: bool = False,
    tracking_uri: str | None = None,
) -> dict:
    """Register a tracked run's model as a new version of `name` (see cifarlab.track.registry)."""
    return registry.register(run_dir, name, tracking_uri, alias, force)


def evaluate(
    model: str | Path,
    data: str | Path | None = None,
    tta: int | None = None,
    device: str = "cpu",
) -> dict:
    """Metrics of a model on `data` (all of it; the test split for CIFAR-10). Without `data`,
    a run directory is scored on its own held-out validation split. `tta`: the test-time
    augmentation level (0 none, 1 mirror, 2 mirror + 1-pixel shifts; True = 1); None scores a run
    directory as its training scored it (its recipe's `train.eval_tta`), a bare checkpoint
    without. The level used is returned as `tta`."""
    run = RunDir(model)
    if tta is None:
        tta = run.recipe()["train"]["eval_tta"] if run.config.is_file() else 0
    scored = str(checkpoint_path(run.path))
    if run.path.is_dir() and not run.finished() and run.last.is_file():
        predictor, epochs = interrupted_predictor(run, device)  # its latest weights
        scored = f"{run.last} (interrupted after epoch {epochs})"
    else:
        predictor = load(model, device)
    if data is None:
        if not run.config.is_file():
            raise UserError("pass --data PATH, or a run directory to score on its validation split")
        _, dataset, _ = split_data(run.recipe())
    else:
        dataset = load_images(data, image_size=predictor.image_size, split="test")
    dataset = align_classes(dataset, predictor.classes)
    probs = predictor.probs(dataset.images, tta=int(tta))
    return {**metrics(probs, dataset.labels, predictor.classes), "scored": scored, "tta": int(tta)}


def checkpoint_path(model: Path) -> Path:
    """The file a model path means: a run directory's best.pt, else the path itself."""
    return RunDir(model).best if model.is_dir() else model


def predict(
    model: str | Path,
    inputs: list[str],
    top_k: int = 5,
    device: str = "cpu",
    batch_size: int = 64,
) -> list[dict]:
    """Top-k classes for image files, folders or globs; unreadable files come back with `error`."""
    return list(load(model, device).predict_files(expand_inputs(inputs), top_k, batch_size))


def export(
    model: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    images: list[str] | None = None,
) -> tuple[Path, dict]:
    """Export a run directory or checkpoint to ONNX or TorchScript, verified against PyTorch;
    returns (path, report). See cifarlab.deploy.export for what the exported model takes."""
    return export_model(model, fmt, out, images)


def explain(
    model: str | Path,
    inputs: list[str],
    out: str | Path = "explained",
    class_name: str | None = None,
    method: str = "gradcam",
    top_k: int = 5,
    device: str = "cpu",
) -> list[dict]:
    """For each image (files, folders or globs): a PNG in `out` with the image, its Grad-CAM map
    for the predicted class (or `class_name`) and the top-k bars. Returns one row per image:
    {path, png, class, probability, top} or {path, error}. ONNX files cannot be explained."""
    predictor = load(model, device)
    if class_name is not None and class_name not in predictor.classes:
        raise UserError(
            f"--class {class_name!r} is not one of the model's classes: {', '.join(predictor.classes)}"
        )
    paths = expand_inputs(inputs)
    if predictor.explain_refusal():  # before any image is read
        raise UserError(predictor.explain_refusal())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, used = [], set()
    for path in paths:
        try:
            image = read_image(path, predictor.image_size)
        except UserError as e:
            rows.append({"path": str(path), "error": str(e)})
            continue
        probs = predictor.probs(image[None])[0]
        wanted = predictor.classes.index(class_name) if class_name else int(probs.argmax())
        heat = predictor.explain(image[None], [wanted], method)[0][0]
        name = f"{path.stem}-cam.png"
        for n in range(2, len(paths) + 2):  # two inputs with the same name: two files
            if name not in used:
                break
            name = f"{path.stem}-{n}-cam.png"
        used.add(name)
        label = predictor.classes[wanted]
        title = f"{method}: {label} ({probs[wanted]:.0%})"
        plots.explanation(image, heat, probs, predictor.classes, title, out / name, top_k)
        rows.append(
            {
                "path": str(path),
                "png": str(out / name),
                "class": label,
                "probability": float(probs[wanted]),
                "top": predictor.top_k(probs[None], top_k)[0],
            }
        )
    return rows
