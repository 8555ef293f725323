"""Scoring a run that did not finish: the weights its last.pt holds, on its validation split."""

from __future__ import annotations

import numpy as np

from cifarlab.data.dataset import ImageSet
from cifarlab.data.split import split_data
from cifarlab.deploy.inference import Predictor
from cifarlab.eval.metrics import metrics, phase_summaries
from cifarlab.models import count_parameters, load_model
from cifarlab.rundir import RunDir


def interrupted_predictor(run_dir, device: str = "cpu") -> tuple[Predictor, int]:
    """A predictor of the weights last.pt holds (those validated: the average where the run
    kept an EMA), in the architecture, preprocessing and precision best.pt records; with the
    number of finished epochs."""
    run = RunDir(run_dir)
    model, info = load_model(run.best)
    last = run.read_state()
    model.load_state_dict(last.get("scored") or last["model"])
    return Predictor(model, info, device), len(last["state"]["history"])


def score_interrupted(run_dir) -> tuple[dict, np.ndarray, ImageSet, Predictor]:
    """metrics.json's fields for a run that did not finish: last.pt scored (plain, no TTA) on
    the run's validation split, as `cifarlab evaluate` scores it; with the predictor scored."""
    run = RunDir(run_dir)
    recipe = run.recipe({"data.test": None})
    train_set, val_set, _ = split_data(recipe)
    predictor, epochs = interrupted_predictor(run)
    probs = predictor.probs(val_set.images)
    history = run.read_history()
    result = {
        "recipe": recipe["name"],
        "interrupted_after_epoch": epochs,
        "scored": "last.pt",
        "classes": val_set.classes,
        "n_train": len(train_set),
        "parameters": count_parameters(predictor.model),
        "device": "cpu",
        "train_seconds": sum(r["seconds"] for r in history),
        "best": predictor.info.get("metrics", {}),
        "phases": phase_summaries(history),
        "val": metrics(probs, val_set.labels, val_set.classes),
    }
    return result, probs, val_set, predictor
