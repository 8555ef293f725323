"""Experiment tracking. The training loop talks to a tracker through three calls (`start`,
`log_metrics`, `finish`); NullTracker records nothing, MlflowTracker records the run in MLflow.

MLflow is imported only when a tracker talks to it, and no MLflow failure ever reaches training:
the first one prints one warning and turns the tracker off."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cifarlab.core.runtime import resolve_device
from cifarlab.core.version import __version__
from cifarlab.deploy.inference import Predictor, load_predictor
from cifarlab.rundir import RunDir

DEFAULT_EXPERIMENT = "cifarlab"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
NOT_METRICS = ("phase", "epoch", "step", "planned_epochs")  # history.csv columns, not metrics
# MLflow's HTTP client retries a dead server for minutes by default; a tracker gives up sooner.
MLFLOW_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class NullTracker:
    def start(self, recipe: dict, out: Path) -> None:
        pass

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def finish(self, result: dict, out: Path) -> None:
        pass

    def start_parent(self, name: str, params: dict | None = None) -> None:
        pass

    def child(self) -> NullTracker:
        return self

    def set_tag(self, key: str, value: str) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the local store ./mlflow.db (an absolute URI)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / LOCAL_DB}"


def local_artifact_root(uri: str) -> Path | None:
    """Where a SQLite store keeps its artifacts: `mlartifacts/` beside the database file."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).absolute().parent / LOCAL_ARTIFACTS


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.001}} -> {'train.lr': '0.001'}; lists of mappings are numbered
    (phases.0.lr), other lists are kept whole ('[32, 64, 128]')."""
    if isinstance(tree, dict):
        pairs = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        pairs = enumerate(tree)
    else:
        return {prefix: str(tree)}
    out: dict[str, str] = {}
    for key, value in pairs:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def environment_tags() -> dict[str, str]:
    """Versions, host and (if the working directory is in a git repository) its commit."""
    import timm  # 1.2 s to import: only when tracking

    tags = {
        "cifarlab.version": __version__,
        "torch.version": torch.__version__,
        "timm.version": timm.__version__,
        "host": socket.gethostname(),
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def check_server(uri: str) -> None:
    """Fail fast when an http(s) tracking URI has no MLflow server behind it."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
            reply.read()
    except OSError as e:
        raise RuntimeError(f"no MLflow server answers: {e}") from None


@contextlib.contextmanager
def mlflow_settings() -> Iterator[None]:
    """Around each tracker call: bounded HTTP retries, no progress bars, no log chatter (a
    failure is reported once by the tracker itself), MLflow's own prints (run links) on stderr
    so that stdout stays the command's; the user's environment settings win."""
    import mlflow  # noqa: F401 - on first import it sets up its loggers and warning filters

    unset = [k for k in MLFLOW_ENV if k not in os.environ]
    os.environ.update({k: MLFLOW_ENV[k] for k in unset})
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        for k in unset:
            os.environ.pop(k, None)


class MlflowTracker:
    """Records a run in MLflow: the resolved recipe as params, per-epoch and final metrics,
    environment tags, the run directory's files as artifacts and best.pt as a pyfunc model.
    Nested under `parent_run_id` when given (one `compare` row)."""

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        parent_run_id: str | None = None,
    ):
        self.uri = tracking_uri(uri)
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self.enabled = True
        self.parent: MlflowTracker | None = None
        self._client = None
        self._experiment_id: str | None = None

    # --- the training loop's three calls -------------------------------------------------------

    def start(self, recipe: dict, out: Path) -> None:
        self._guarded("start the run", self._start, recipe, Path(out))

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self._guarded("log metrics", self._log_metrics, values, step)

    def finish(self, result: dict, out: Path) -> None:
        self._guarded("record the results", self._finish, result, Path(out))

    # --- evaluate and compare ------------------------------------------------------------------

    def log_evaluation(self, model: str | Path, data: str | None, tta: int, m: dict) -> None:
        """A small run for `cifarlab evaluate`: what was scored on what, and the scores."""
        self._guarded("record the evaluation", self._log_evaluation, Path(model), data, tta, m)

    def start_parent(self, name: str, params: dict | None = None) -> None:
        """Open this tracker's run as the parent of `child()` runs (one per compare row)."""
        self._guarded("start the parent run", self._start_parent, name, params or {})

    def child(self):
        """A tracker for one row of a compare, nested under this parent run."""
        if not self.enabled or self.run_id is None:
            return NullTracker()
        child = MlflowTracker(self.uri, self.experiment, parent_run_id=self.run_id)
        child.parent = self
        return child

    def log_artifact(self, path: str | Path) -> None:
        self._guarded("log an artifact", lambda: self.client.log_artifact(self.run_id, str(path)))

    def set_tag(self, key: str, value: str) -> None:
        if self.run_id is not None:
            self._guarded("tag the run", lambda: self.client.set_tag(self.run_id, key, value))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._guarded("end the run", lambda: self.client.set_terminated(self.run_id, status))

    # --- internals -----------------------------------------------------------------------------

    def _guarded(self, what: str, fn, *args) -> None:
        if not self.enabled:
            return
        try:
            with mlflow_settings():
                fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            print(
                f"cifarlab: warning: tracking disabled: could not {what} in MLflow at {self.uri} "
                f"({reason}); training goes on without tracking",
                file=sys.stderr,
                flush=True,
            )
            self._disable()

    def _disable(self) -> None:
        self.enabled = False
        if self.parent is not None:
            self.parent._disable()

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            check_server(self.uri)
            self._client = MlflowClient(self.uri)
        return self._client

    def _experiment(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                root = local_artifact_root(self.uri)
                self._experiment_id = self.client.create_experiment(
                    self.experiment, artifact_location=root.as_uri() if root else None
                )
        return self._experiment_id

    def _new_run(self, name: str, tags: dict[str, str]) -> str:
        tags = {**environment_tags(), **tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self._experiment(), run_name=name, tags=tags)
        return run.info.run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def _start(self, recipe: dict, out: Path) -> None:
        self.run_id = self._new_run(
            out.name,
            {
                "mlflow.source.name": "cifarlab train",
                "cifarlab.command": "train",
                "cifarlab.recipe": str(recipe["name"]),
                "cifarlab.run_dir": str(out.absolute()),
                "device": str(resolve_device(recipe["device"])),
            },
        )
        self._log_params(flatten(recipe))
        run = RunDir(out)
        if run.last.is_file():  # resumed: log the earlier epochs
            for row in run.read_history():
                values = {k: v for k, v in row.items() if k not in NOT_METRICS}
                self._log_metrics(values, row["step"])

    def _finish(self, result: dict, out: Path) -> None:
        final = {"train_seconds": result["train_seconds"], "parameters": result["parameters"]}
        for key, rate in result.get("runtime", {}).get("measured_images_per_s", {}).items():
            final[f"measured_{key.replace('/', '_')}_images_per_s"] = rate  # the precision check
        for split in ("val", "test"):
            for key in ("accuracy", "loss", "ece"):
                if key in result.get(split, {}):
                    final[f"final_{split}_{key}"] = result[split][key]
        self._log_metrics(final, 0)
        run = RunDir(out)
        for path in run.artifacts():
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if run.best.is_file():
            self._log_model(run.best, result)
        self.client.set_terminated(self.run_id, "FINISHED")

    def _log_model(self, checkpoint: Path, result: dict) -> None:
        """best.pt as an MLflow pyfunc model: uint8 images (N, H, W, 3) in, probabilities out."""
        import mlflow
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.types import Schema, TensorSpec

        predictor = Predictor.from_checkpoint(checkpoint)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(predictor.classes)))]),
        )
        model = self.client.create_logged_model(
            self._experiment(), name="model", source_run_id=self.run_id
        )
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pyfunc.save_model(
                Path(tmp) / "model",
                python_model=pyfunc_model(),
                artifacts={"checkpoint": str(checkpoint)},
                signature=signature,
                pip_requirements=model_requirements(),
                metadata=predictor.metadata,
                mlflow_model=Model(run_id=self.run_id, model_id=model.model_id),
            )
            self.client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
        self.client.finalize_logged_model(model.model_id, "READY")

    def _log_evaluation(self, model: Path, data: str | None, tta: int, m: dict) -> None:
        run_dir = model if model.is_dir() else model.parent
        self.run_id = self._new_run(
            f"evaluate-{run_dir.name}",
            {"mlflow.source.name": "cifarlab evaluate", "cifarlab.command": "evaluate"},
        )
        self._log_params(
            {
                "model": str(model.absolute()),
                "data": str(data) if data else "the run's validation split",
                "tta": str(tta),
            }
        )
        self._log_metrics({f"eval_{k}": m[k] for k in ("accuracy", "loss", "n")}, 0)
        self.client.log_dict(self.run_id, m, "evaluation.json")
        self.client.set_terminated(self.run_id, "FINISHED")

    def _start_parent(self, name: str, params: dict) -> None:
        self.run_id = self._new_run(
            name, {"mlflow.source.name": "cifarlab compare", "cifarlab.command": "compare"}
        )
        if params:
            self._log_params(flatten(params))


@contextlib.contextmanager
def parent_run(
    name: str,
    uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    params: dict | None = None,
) -> Iterator[MlflowTracker]:
    """A parent run for `compare`: `with parent_run("compare-x") as p: train(..., tracker=p.child())`.
    It ends FINISHED, or FAILED when the block raises."""
    parent = MlflowTracker(uri, experiment)
    parent.start_parent(name, params)
    try:
        yield parent
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")


def model_requirements() -> list[str]:
    import mlflow
    import timm

    return [
        f"mlflow=={mlflow.__version__}",
        f"cifarlab=={__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"timm=={timm.__version__}",
        f"numpy=={np.__version__}",
    ]


def pyfunc_model():
    """An mlflow.pyfunc.PythonModel over `cifarlab.load` (built here so that importing this
    module does not import MLflow)."""
    import mlflow.pyfunc

    class CifarlabModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.predictor = load_predictor(context.artifacts["checkpoint"])

        def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
            return self.predictor.probs(np.asarray(model_input, dtype=np.uint8))

    return CifarlabModel()
