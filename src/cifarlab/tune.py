"""`cifarlab tune`: search a recipe's settings with Optuna.

Each trial trains the recipe with settings drawn from a search space (YAML over recipe keys,
recipes/spaces/<recipe>.yaml by default) into `<out>/trial-<n>`, scored on the validation split
(the test split is never used); a pruner reads each epoch's validation accuracy and ends bad
trials early. The study lives in an Optuna storage (SQLite by default, ./tune.db beside
./mlflow.db), so a killed `tune` continues with the same `--study`: a trial that was running
when the process died is marked failed and its settings tried again. MLflow gets one parent run
for the study and one child run per trial (state tag `optuna.state`), wired here rather than
through Optuna's MLflow callback, which loses the parent run (optuna#5148, #4088).

Under torchrun (`cifarlab tune --nproc-per-node N`) trials run one after another, each one
distributed: rank 0 owns the study, the pruner, MLflow and the files, and sends each trial's
settings to the other ranks (`follow`), which train it with it.

At the end, in `<out>`: best.yaml (the recipe with the best trial's settings, for
`cifarlab train --recipe best.yaml`), trials.md / trials.csv, and Optuna's optimisation-history
and parameter-importance plots as PNG (also logged to the parent run).
"""

from __future__ import annotations

import copy
import csv
import io
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as ov  # noqa: E402

from cifarlab import api, config  # noqa: E402
from cifarlab.core import distributed  # noqa: E402
from cifarlab.core.errors import UserError  # noqa: E402
from cifarlab.core.files import atomic_path, atomic_write_text  # noqa: E402
from cifarlab.core.log import log  # noqa: E402
from cifarlab.core.runtime import resolve_device  # noqa: E402
from cifarlab.training.events import Callback  # noqa: E402

SPACES = resources.files("cifarlab") / "recipes" / "spaces"
KINDS = ("float", "int", "categorical")


def load_space(recipe: dict, path: str | Path | None) -> dict[str, dict]:
    """The search space: {recipe key: {type: float|int|categorical, low, high, log, choices}},
    each key checked against the recipe."""
    if path is None:
        shipped = SPACES / f"{recipe['name']}.yaml"
        if not shipped.is_file():
            raise UserError(
                f"no search space ships for recipe {recipe['name']!r}; pass --space FILE.yaml "
                "(recipe keys with type float/int/categorical, low/high or choices)"
            )
        text, where = shipped.read_text(), shipped.name
    else:
        if not Path(path).is_file():
            raise UserError(f"--space {path}: no such file; pass a YAML search space")
        text, where = Path(path).read_text(), str(path)
    space = config.read_yaml(text, where)
    for key, spec in space.items():
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            raise UserError(f"{where}: {key} needs type: {' | '.join(KINDS)}")
        need = ("choices",) if spec["type"] == "categorical" else ("low", "high")
        missing = [n for n in need if n not in spec]
        if missing:
            raise UserError(f"{where}: {key} ({spec['type']}) needs {', '.join(missing)}")
        config.set_key(copy.deepcopy(recipe), key, None)  # an unknown key fails here
    return space


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, Any]:
    values = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            values[key] = trial.suggest_float(
                key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log"))
            )
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(
                key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log"))
            )
        else:
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
    return values


class Pruning(Callback):
    """Reports each epoch's validation accuracy to the trial; once the phase's LR warm-up is
    over, ends the run when the pruner says so (the trial is then recorded as pruned)."""

    name = "pruning"

    def __init__(self, trial: optuna.Trial):
        self.trial, self.pruned = trial, False

    def on_validation_end(self, t) -> None:  # a decision: before the epoch is recorded
        epochs = len(t.state["history"]) + 1
        self.trial.report(t.row["val_accuracy"], epochs)
        if t.step < t.warmup:  # mid warm-up, accuracy tells of the schedule, not the settings
            return  # (a first sweep pruned 9 of 12 `fast` trials there)
        if self.trial.should_prune():
            self.pruned = t.stop_run = True
            log(f"tune: trial {self.trial.number} pruned after {epochs} epoch(s)")


def open_study(name: str, storage: str, seed: int, pruner) -> optuna.Study:
    """Create or continue a study; trials left RUNNING by a killed process are failed and
    their settings queued again."""
    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as e:  # noqa: BLE001 - a bad URL or unwritable file: the user's input
        raise UserError(f"cannot open the study storage {storage} ({e}); check --storage") from None
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        log(f"tune: trial {trial.number} was interrupted; its settings are tried again")
    return study


def tune(
    recipe: str | Path,
    data: str | Path,
    trials: int,
    out: str | Path | None = None,
    budget_per_trial: str | None = None,
    space: str | Path | None = None,
    study: str | None = None,
    storage: str | None = None,
    overrides: dict[str, Any] | None = None,
    tracker=None,
    progress: bool = True,
    pruner=None,
    seed: int = 0,
) -> dict:
    """Run (or continue) a study until it holds `trials` finished (complete or pruned) trials;
    returns {"best": {...}, "trials": [...], "out": ...}. `pruner` defaults to Optuna's median
    pruner (from the third trial; never during a phase's LR warm-up, see `Pruning`)."""
    if trials < 1:
        raise UserError("--trials must be at least 1")
    overrides = {**(overrides or {}), "data.test": None}  # trials never see a test split
    base = config.load_recipe(recipe, overrides)
    search = load_space(base, space)
    name = study or f"{base['name']}-tune"
    out = Path(out) if out else Path("runs") / "tune" / name
    if not distributed.init(resolve_device(base["device"])).main:
        return follow(recipe, data, overrides, budget_per_trial)
    storage = storage or "sqlite:///tune.db"
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = open_study(name, storage, seed, pruner)
    out.mkdir(parents=True, exist_ok=True)
    if tracker is not None:
        tracker.start_parent(f"tune {name}", {"recipe": base["name"], "trials": trials})
    try:
        while (done := len(finished(st))) < trials:
            log(f"tune: trial {done + 1}/{trials} of study {name}")
            run_trial(st, recipe, data, out, search, overrides, budget_per_trial, tracker, progress)
        distributed.broadcast(None)  # the other ranks: no more trials
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    result = summarize(st, base, search, out)
    if tracker is not None:
        for path in [out / "trials.md", out / "trials.csv", out / "best.yaml", *out.glob("*.png")]:
            if path.is_file():  # no best.yaml when every trial was pruned
                tracker.log_artifact(path)
        tracker.end("FINISHED")
    return result


def follow(recipe, data, overrides: dict, budget: str | None) -> dict:
    """A rank other than 0: train each trial rank 0 sends, until it says there are no more."""
    while (trial := distributed.broadcast(None)) is not None:
        api.train(
            recipe, data, trial["run_dir"], None, {**overrides, **trial["values"]},
            progress=False, budget=budget,
        )  # fmt: skip
    return {"best": None, "trials": [], "out": None}


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def run_trial(study, recipe, data, out, search, overrides, budget, tracker, progress) -> None:
    trial = study.ask()
    values = suggest(trial, search)
    child = tracker.child() if tracker is not None else None
    prune = Pruning(trial)
    run_dir = out / f"trial-{trial.number}"
    distributed.broadcast({"run_dir": str(run_dir), "values": values})  # under torchrun
    try:
        result = api.train(
            recipe, data, run_dir, None, {**overrides, **values}, progress=progress,
            tracker=child, budget=budget, callbacks=[prune],
        )  # fmt: skip
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if child is not None:
            child.end("FAILED")
        raise
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("train_seconds", result["train_seconds"])
    state = "PRUNED" if prune.pruned else "COMPLETE"
    if child is not None:
        child.set_tag("optuna.state", state)
        child.set_tag("optuna.trial", str(trial.number))
    if prune.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, result["val"]["accuracy"])
    log(f"tune: trial {trial.number} {state.lower()}: val accuracy {result['val']['accuracy']:.4f}")


def summarize(study, base: dict, search: dict, out: Path) -> dict:
    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            "val_accuracy": t.value,
            **t.params,
            "train_seconds": t.user_attrs.get("train_seconds"),
        }
        for t in study.get_trials(deepcopy=False)
    ]
    write_trials(rows, list(search), out)
    complete = [t for t in finished(study) if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    if best is not None:
        tuned = copy.deepcopy(base)
        for key, value in best.params.items():
            config.set_key(tuned, key, value)
        tuned["name"] = f"{base['name']}-tuned"
        tuned["data"]["source"] = None  # given with --data, as for any recipe
        tuned["summary"] = f"{base['name']} with the settings of tune trial {best.number}"
        atomic_write_text(out / "best.yaml", config.dump(config.resolve(tuned)))
    plots(study, out, len(complete))
    return {
        "best": None
        if best is None
        else {"trial": best.number, "value": best.value, "params": best.params},
        "trials": rows,
        "out": str(out),
    }


def write_trials(rows: list[dict], keys: list[str], out: Path) -> None:
    columns = ["trial", "state", "val_accuracy", *keys, "train_seconds"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "trials.csv", text.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [_cell(r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "trials.md", "\n".join(lines) + "\n")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plots(study, out: Path, complete: int) -> None:
    """Optuna's optimisation history and (with two or more complete trials) parameter
    importances, as PNG."""
    figures = [("history.png", ov.plot_optimization_history)]
    if complete >= 2:
        figures.append(("importance.png", ov.plot_param_importances))
    for name, plot in figures:
        try:
            with warnings.catch_warnings():  # "experimental" and equal-importance notices
                warnings.simplefilter("ignore")
                ax = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances of a constant parameter
            log(f"tune: no {name} ({e})")
            continue
        with atomic_path(out / name, suffix=".png") as tmp:
            ax.figure.tight_layout()
            ax.figure.savefig(tmp, dpi=100)
        plt.close(ax.figure)
