"""The MLflow model registry: a tracked run's logged model as a version of a registered name,
aliases that move only to a better model, and `models:/NAME@ALIAS` / `models:/NAME/VERSION`
URIs that predict, evaluate and serve load.

A version carries its run's held-out metrics as tags (`val_accuracy`, `val_loss`, `val_ece`) and
`cifarlab.val_split`, a fingerprint of the validation split it was scored on (data source,
seed, val_fraction, image size, image count): an alias such as `champion` moves to a new
version only when it scored higher on the *same* split, or with `force`. (Stages are deprecated
since MLflow 2.9; aliases replace them.)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from cifarlab.core.errors import UserError
from cifarlab.data.split import split_seed
from cifarlab.rundir import RunDir
from cifarlab.track.tracker import DEFAULT_EXPERIMENT, check_server, mlflow_settings, tracking_uri

URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def client(uri: str | None):
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    try:
        check_server(uri)
    except RuntimeError as e:
        raise UserError(
            f"the model registry at {uri} is unreachable ({e}); start it or pass --tracking-uri"
        ) from None
    return MlflowClient(uri), uri


def split_fingerprint(run: RunDir) -> str:
    """What the run's validation split is made of, as a short hash."""
    recipe, metrics = run.recipe(), run.read_metrics()
    d = recipe["data"]
    facts = [
        d["source"],
        split_seed(recipe),
        d["val_fraction"],
        d["image_size"],
        metrics["val"]["n"],
    ]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def register(
    run_dir: str | Path,
    name: str,
    uri: str | None = None,
    alias: str | None = None,
    force: bool = False,
) -> dict:
    """Register a finished, tracked run's logged model as a new version of `name`; with
    `alias`, move the alias to it if it beats the alias's version on the same validation split
    (or `force`). Returns {name, version, alias, moved, reason}."""
    run = RunDir(run_dir)
    if not run.finished():
        raise UserError(f"{run} has no metrics.json; register a finished run")
    metrics = run.read_metrics()
    c, uri = client(uri)
    with mlflow_settings():
        exp = c.get_experiment_by_name(DEFAULT_EXPERIMENT)
        runs = [] if exp is None else c.search_runs(
            [exp.experiment_id],
            f"tags.`cifarlab.run_dir` = '{run.path.absolute()}' and tags.`cifarlab.command` = 'train'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )  # fmt: skip
        if not runs:
            raise UserError(
                f"{run} was not tracked in {uri}; train it with tracking on (not --no-track) "
                "or pass the --tracking-uri it was tracked in"
            )
        run_id = runs[0].info.run_id
        models = c.search_logged_models([exp.experiment_id], f"source_run_id = '{run_id}'")
        if not models:
            raise UserError(
                f"the MLflow run of {run} has no logged model; retrain with tracking on"
            )
        model = models[0]
        try:
            c.get_registered_model(name)
        except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException: missing
            c.create_registered_model(name)
        val = metrics["val"]
        tags = {
            "val_accuracy": str(val["accuracy"]),
            "val_loss": str(val["loss"]),
            "val_ece": str(val.get("ece", "")),
            "cifarlab.val_split": split_fingerprint(run),
            "cifarlab.run_dir": str(run.path.absolute()),
            "cifarlab.recipe": str(metrics["recipe"]),
        }
        version = c.create_model_version(
            name, f"models:/{model.model_id}", run_id=run_id, tags=tags, model_id=model.model_id
        )
        result = {"name": name, "version": version.version, "alias": alias, "moved": False}
        if alias:
            result.update(move_alias(c, name, alias, version, force))
    return result


def move_alias(c, name: str, alias: str, version, force: bool) -> dict:
    try:
        current = c.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no version holds the alias yet
        current = None
    if current is not None and not force:
        if current.tags.get("cifarlab.val_split") != version.tags.get("cifarlab.val_split"):
            return {"reason": f"@{alias} (version {current.version}) was scored on another "
                              "validation split; pass --force to move it anyway"}  # fmt: skip
        if float(version.tags["val_accuracy"]) <= float(current.tags.get("val_accuracy", "-1")):
            return {"reason": f"version {version.version} ({float(version.tags['val_accuracy']):.4f}) "
                              f"does not beat @{alias}, version {current.version} "
                              f"({float(current.tags['val_accuracy']):.4f}); pass --force to move it"}  # fmt: skip
    c.set_registered_model_alias(name, alias, version.version)
    return {"moved": True, "reason": ""}


def resolve(model_uri: str, uri: str | None = None) -> tuple[Path, str]:
    """A `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI -> (a local best.pt, "NAME/VERSION")."""
    import mlflow

    m = URI.match(model_uri)
    if not m:
        raise UserError(
            f"{model_uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    name, alias, number = m["name"], m["alias"], m["version"]
    c, uri = client(uri)
    with mlflow_settings():
        try:
            c.get_registered_model(name)
        except Exception:  # noqa: BLE001
            raise UserError(
                f"no registered model {name!r} in {uri}; register one: cifarlab register RUN_DIR {name}"
            ) from None
        try:
            version = (
                c.get_model_version_by_alias(name, alias)
                if alias
                else c.get_model_version(name, number)
            )
        except Exception:  # noqa: BLE001
            what = f"alias @{alias}" if alias else f"version {number}"
            raise UserError(f"registered model {name!r} has no {what}; see `cifarlab ui`") from None
        model_id = version.model_id or str(version.source).removeprefix("models:/")
        location = c.get_logged_model(model_id).artifact_location
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri))
    found = sorted(local.glob("artifacts/*.pt"))
    if not found:
        raise UserError(f"models:/{name}/{version.version} holds no cifarlab checkpoint")
    return found[0], f"{name}/{version.version}"
