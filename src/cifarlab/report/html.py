"""HTML reports: one self-contained page per run (`report.html` in its directory) and one page
comparing several runs. Plots are embedded as base64 PNGs: no external resources, no scripts."""

from __future__ import annotations

import base64
import html
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

from cifarlab import config
from cifarlab.core.errors import UserError
from cifarlab.core.files import atomic_write_text
from cifarlab.core.version import __version__
from cifarlab.data.dataset import ImageSet
from cifarlab.data.split import split_data
from cifarlab.deploy.inference import Predictor
from cifarlab.deploy.interrupted import score_interrupted
from cifarlab.eval.metrics import BINS, calibration
from cifarlab.report import plots
from cifarlab.rundir import RunDir

MISTAKES = 32  # images in the grid of most confident mistakes
HEATMAP_NOTE = (
    "<p>Each mistake beside its Grad-CAM map for the predicted class: red is where the model "
    "found the evidence for it (cifarlab explain gives the same for any image).</p>"
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
       margin-top: 1.6em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
tr.best td { font-weight: bold; background: #eef7ee; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.row { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
.row > section { flex: 1 1 420px; min-width: 0; }
.row figure { margin: 0; } figcaption { color: #666; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
#recipe pre { column-count: 2; column-gap: 2em; }
.note { color: #a15c00; }
"""


def read_run(run_dir: str | Path) -> dict:
    """metrics.json, history.csv and config.yaml of a run; an interrupted run (no metrics.json,
    but last.pt) is scored here from last.pt on its validation split (`interrupted` set)."""
    run = RunDir(run_dir)
    extra = {}
    if run.finished():
        metrics = run.read_metrics()
    elif run.last.is_file():
        metrics, probs, val_set, predictor = score_interrupted(run)
        extra = {"probs": probs, "val_set": val_set, "predictor": predictor}
    else:
        raise UserError(f"{run} has no metrics.json or last.pt; pass a training run's directory")
    recipe_text = run.recipe_text()
    recipe = config.read_yaml(recipe_text, str(run.config)) if recipe_text else {}
    return {
        "dir": run.path,
        "name": run.path.absolute().name,
        "metrics": metrics,
        "history": run.read_history(),
        "recipe": recipe,
        "recipe_text": recipe_text,
        **extra,
    }


def validation_set(run_dir: Path, n: int) -> tuple[ImageSet | None, str]:
    """The run's validation images, recomputed from its recipe (or None and why not)."""
    try:
        recipe = RunDir(run_dir).recipe({"data.test": None})  # only the validation split
        _, val, _ = split_data(recipe)
    except (UserError, OSError) as e:
        return None, f"the validation images could not be loaded ({e})"
    if len(val) != n:
        return None, f"the data now gives {len(val)} validation images, the run scored {n}"
    return val, ""


def run_report(
    run_dir: str | Path, val_set: ImageSet | None = None, out: str | Path | None = None
) -> Path:
    """Write the report of one run (default RUN_DIR/report.html) and return its path.
    `val_set` saves re-decoding the data when the caller has the validation split at hand."""
    run = read_run(run_dir)
    run_dir = Path(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        figures, notes, cal = run_figures(run, run_dir, val_set, Path(tmp))
    body = run_body(run, run_dir, figures, notes, cal)
    return write_page(Path(out) if out else RunDir(run_dir).report, run["name"], body)


def run_figures(
    run: dict, run_dir: Path, val_set: ImageSet | None, png: Path
) -> tuple[dict[str, str], list[str], dict | None]:
    """The report's embedded figures by section, its notes, and the calibration (or None)."""
    m = run["metrics"]
    val = m.get("val")
    notes: list[str] = []
    figures: dict[str, str] = {}
    if run["history"]:
        plots.curves(run["history"], png / "curves.png")
        figures["curves"] = embed(png / "curves.png", "loss and accuracy per epoch")
    if val:
        plots.confusion(np.array(val["confusion"]), val["classes"], png / "confusion.png")
        figures["confusion"] = embed(png / "confusion.png", "confusion matrix")
        per_class = {c: v["accuracy"] for c, v in val["per_class"].items()}
        plots.class_accuracy({run["name"]: per_class}, png / "classes.png")
        figures["classes"] = embed(png / "classes.png", "per-class accuracy")
    probs_path = RunDir(run_dir).probs_path("val")
    if "probs" in run:  # an interrupted run, scored just now
        notes.append(
            f"interrupted after epoch {m['interrupted_after_epoch']}: "
            "scored last.pt (plain, no test-time augmentation)"
        )
        val_set = run["val_set"]
    if not val:
        return figures, notes, None
    if "probs" not in run and not probs_path.is_file():
        notes.append("val_probs.npy is missing: no calibration or mistakes")
        return figures, notes, None
    probs = run["probs"] if "probs" in run else np.load(probs_path)
    if val_set is None:
        val_set, why = validation_set(run_dir, len(probs))
        notes += [why] if why else []
    if val_set is None:
        return figures, notes, None
    explainer, why = explainer_of(run_dir, run.get("predictor"))
    notes += [why] if why else []
    cal = probability_figures(probs, val_set, val["classes"], explainer, png, figures)
    return figures, notes, cal


def probability_figures(
    probs: np.ndarray, val_set: ImageSet, classes: list[str], explainer, png: Path, figures: dict
) -> dict:
    """Calibration, the most confident mistakes and one explained correct example per class,
    from the validation probabilities, into `figures`; returns the calibration."""
    cal = calibration(probs, val_set.labels)
    plots.reliability(
        cal["confidence"], cal["accuracy"], cal["counts"], cal["ece"], png / "cal.png"
    )
    figures["calibration"] = embed(png / "cal.png", "reliability diagram")
    worst = most_confident_mistakes(probs, val_set.labels)
    if len(worst):
        predicted = probs[worst].argmax(1)
        plots.mistakes(
            val_set.images[worst],
            [classes[i] for i in val_set.labels[worst]],
            [classes[i] for i in predicted],
            probs[worst].max(1),
            png / "mistakes.png",
            heat=heat_of(explainer, val_set.images[worst], predicted),
        )
        figures["mistakes"] = embed(png / "mistakes.png", "most confident mistakes")
    right = most_confident_correct(probs, val_set.labels)
    if explainer is not None and len(right):
        plots.examples(
            val_set.images[right],
            heat_of(explainer, val_set.images[right], val_set.labels[right]),
            [
                f"{classes[c]} {probs[i, c]:.0%}"
                for i, c in zip(right, val_set.labels[right], strict=True)
            ],
            png / "correct.png",
        )
        figures["correct"] = embed(png / "correct.png", "one correct example per class")
    return cal


def run_body(run: dict, run_dir: Path, figures: dict, notes: list[str], cal) -> list[str]:
    """The report page's HTML sections."""
    m = run["metrics"]
    return [
        f"<h1>{esc(run['name'])}</h1>",
        f'<p class="sub">cifarlab run report · {esc(run_dir.absolute())} · '
        f"generated {datetime.now():%Y-%m-%d %H:%M} by cifarlab {__version__}</p>",
        *(f'<p class="note">{esc(n)}</p>' for n in notes),
        section("summary", "Summary", summary_table(run, cal)),
        section(
            "curves",
            "Learning curves",
            figures.get("curves", "<p>no history.csv</p>") + phase_table(m.get("phases", [])),
        ),
        '<div class="row">',
        section("confusion", "Confusion matrix (validation split)", figures.get("confusion", "")),
        section(
            "calibration",
            "Calibration (validation split)",
            (
                f"<p>Expected calibration error ({BINS} bins): <b>{cal['ece']:.4f}</b></p>"
                + figures["calibration"]
                if cal
                else "<p>not available</p>"
            ),
        ),
        "</div>",
        section(
            "per-class",
            "Per-class accuracy (validation split)",
            figures.get("classes", "") + class_table(m.get("val")),
        ),
        section(
            "mistakes",
            f"Most confident mistakes (top {MISTAKES}, validation split)",
            (HEATMAP_NOTE if "correct" in figures else "")
            + figures.get("mistakes", "<p>none to show</p>"),
        ),
        section(
            "explained",
            "Where the model looks: one correct example per class (validation split)",
            figures.get("correct", "<p>not available</p>"),
        ),
        section("recipe", "Resolved recipe", f"<pre>{esc(run['recipe_text'])}</pre>"),
    ]


def comparison_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write one page comparing several runs: a table and overlaid validation curves."""
    runs = [read_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    for i, r in enumerate(runs):
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']} ({i + 1})"
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp)
        figures = []
        histories = {r["name"]: r["history"] for r in runs if r["history"]}
        if histories:
            plots.overlay(histories, png / "overlay.png")
            figures.append(embed(png / "overlay.png", "validation curves of all runs"))
        per_class = {
            r["name"]: {c: v["accuracy"] for c, v in r["metrics"]["val"]["per_class"].items()}
            for r in runs
            if "val" in r["metrics"]
        }
        if per_class and len({tuple(v) for v in per_class.values()}) == 1:
            plots.class_accuracy(per_class, png / "classes.png")
            figures.append(embed(png / "classes.png", "per-class accuracy of all runs"))
        confusions = []
        for i, r in enumerate(runs):
            if "val" in r["metrics"]:
                v = r["metrics"]["val"]
                plots.confusion(np.array(v["confusion"]), v["classes"], png / f"c{i}.png")
                confusions.append(
                    f"<figure>{embed(png / f'c{i}.png', r['name'], 520)}"
                    f"<figcaption>{esc(r['name'])}</figcaption></figure>"
                )
    body = [
        f"<h1>Comparison of {len(runs)} runs</h1>",
        f'<p class="sub">generated {datetime.now():%Y-%m-%d %H:%M} by cifarlab {__version__}</p>',
        section("comparison", "Runs", comparison_table(runs)),
        section("curves", "Validation curves and per-class accuracy", "".join(figures)),
        section(
            "confusion",
            "Confusion matrices (validation split)",
            f'<div class="row">{"".join(confusions)}</div>',
        ),
    ]
    return write_page(Path(out), f"comparison of {len(runs)} runs", body)


def explainer_of(run_dir: Path, scored=None):
    """(a predictor of the weights that were scored — `scored`, an interrupted run's, else
    best.pt's — or None, and why not)."""
    try:
        predictor = scored or Predictor.from_checkpoint(RunDir(run_dir).best)
    except UserError as e:
        return None, f"no heatmaps: {e}"
    refusal = predictor.explain_refusal()  # a model family without a cam_layer: said why
    return (None, f"no heatmaps: {refusal}") if refusal else (predictor, "")


def heat_of(explainer, images: np.ndarray, classes: np.ndarray) -> np.ndarray | None:
    """Grad-CAM maps of `images` for `classes`, in batches (None without a model)."""
    if explainer is None:
        return None
    maps = [
        explainer.explain(images[i : i + 64], [int(c) for c in classes[i : i + 64]])[0]
        for i in range(0, len(images), 64)
    ]
    return np.concatenate(maps)


def most_confident_correct(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class (in class order), the correctly classified image with the highest probability."""
    right = probs.argmax(1) == labels
    picks = []
    for c in range(probs.shape[1]):
        idx = np.flatnonzero(right & (labels == c))
        if len(idx):
            picks.append(idx[probs[idx, c].argmax()])
    return np.array(picks, dtype=int)


def most_confident_mistakes(probs: np.ndarray, labels: np.ndarray, n: int = MISTAKES):
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    return wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:n]


def summary_table(run: dict, cal: dict | None) -> str:
    m = run["metrics"]
    rows = [("recipe", m.get("recipe", "")), ("model", model_name(run))]
    for split in ("val", "test"):
        if split in m:
            rows += [
                (f"{split} accuracy", f"{m[split]['accuracy']:.4f}"),
                (f"{split} loss", f"{m[split]['loss']:.4f}"),
                (f"{split} images", m[split]["n"]),
            ]
    if cal:
        rows.append(("val expected calibration error", f"{cal['ece']:.4f}"))
    best = m.get("best", {})
    if best:
        rows.append(("best epoch", f"{best.get('phase', '')} {best.get('epoch', '')}"))
    rows += [
        ("parameters", f"{m.get('parameters', 0) / 1e6:.2f}M"),
        ("train images", m.get("n_train", "")),
        ("train time", f"{m.get('train_seconds', 0):.0f} s"),
        ("device", m.get("device", "")),
    ]
    return table(["", "value"], rows)


def phase_table(phases: list[dict]) -> str:
    if not phases:
        return ""
    rows = [
        (p["phase"], p["epochs"], f"{p['val_accuracy']:.4f}", f"{p['val_loss']:.4f}")
        for p in phases
    ]
    return "<p>End of each phase:</p>" + table(
        ["phase", "epochs", "val accuracy", "val loss"], rows
    )


def class_table(val: dict | None) -> str:
    if not val:
        return ""
    rows = [
        (name, f"{c['accuracy']:.4f}", f"{c['precision']:.4f}", f"{c['recall']:.4f}", c["support"])
        for name, c in val["per_class"].items()
    ]
    return table(["class", "accuracy", "precision", "recall", "images"], rows)


def comparison_table(runs: list[dict]) -> str:
    header = ["run", "recipe", "model", "parameters", "epochs", "train time", "val accuracy"]
    header += ["val loss", "val ECE", "test accuracy", "directory"]
    best = max((r["metrics"].get("val", {}).get("accuracy", -1) for r in runs), default=-1)
    lines = []
    for r in runs:
        m = r["metrics"]
        val, test = m.get("val", {}), m.get("test", {})
        cells = [
            r["name"],
            m.get("recipe", ""),
            model_name(r),
            f"{m.get('parameters', 0) / 1e6:.2f}M",
            len(r["history"]),
            f"{m.get('train_seconds', 0):.0f} s",
            fmt(val.get("accuracy")),
            fmt(val.get("loss")),
            fmt(val.get("ece")),
            fmt(test.get("accuracy")),
            str(r["dir"].absolute()),
        ]
        row = "".join(f"<td>{esc(c)}</td>" for c in cells)
        css = ' class="best"' if val.get("accuracy") == best else ""
        lines.append(f"<tr{css}>{row}</tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def model_name(run: dict) -> str:
    model = run["recipe"].get("model", {})
    return str(model.get("arch", model.get("name", "")))


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(header: list[str], rows) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def embed(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}"{size}>'


def esc(value) -> str:
    return html.escape(str(value))


def write_page(path: Path, title: str, body: list[str]) -> Path:
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; create it")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} - cifarlab report</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    atomic_write_text(path, page)
    return path
