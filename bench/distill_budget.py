"""Distillation at the same budget: `fast --budget B` without a teacher and with the teacher's
cached logits (`distill.cache`), for each seed, on one held-out split (`data.split_seed=0`,
the teacher's, so no student is scored on images the teacher trained on). The first taught run
computes the teacher's logits inside its budget (their one-off cost); the later ones read them.
Prints and saves, per run: held-out accuracy (TTA and plain), the epochs the budget gave,
training seconds, and how the teacher's logits were had and in how many seconds.

Usage: python bench/distill_budget.py --teacher RUN_DIR [--budget 15m] [--seeds 0,1] [--data PATH]
       python bench/distill_budget.py --teacher RUN_DIR --budget 15m --runs plain:DIR taught:DIR ...
         (collect runs made with the CLI instead, e.g. `cifarlab train --recipe fast --budget 15m
         --teacher RUN_DIR --set distill.cache=true --seed 1 --set data.split_seed=0`)

Writes bench/results/distill-<BUDGET>.json. Runs land in runs/distill-<BUDGET>/.
"""

import argparse
import csv
import json
from pathlib import Path

import yaml
from common import SHARED_DATA, save

import cifarlab


def summary(variant: str, out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    recipe = yaml.safe_load((out / "config.yaml").read_text())
    with open(out / "history.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    row = {
        "variant": variant,
        "run": str(out),
        "seed": recipe["seed"],
        "split_seed": recipe["data"].get("split_seed"),
        "widths": recipe["model"].get("widths"),
        "epochs": recipe["train"]["epochs"],
        "val_accuracy_tta": metrics["val"]["accuracy"],
        "val_accuracy_plain": float(last["val_accuracy"]),
        "train_seconds": metrics["train_seconds"],
        "teacher_cache": metrics.get("teacher_cache"),
        "runtime": metrics["runtime"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="a finished run directory (or best.pt)")
    p.add_argument("--budget", default="15m")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument("--runs", nargs="*", metavar="VARIANT:DIR", help="collect these runs instead")
    args = p.parse_args()
    teacher = str(Path(args.teacher).absolute())
    rows = []
    if args.runs:
        for item in args.runs:
            variant, _, out = item.partition(":")
            rows.append(summary(variant, Path(out)))
    else:
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant, extra in (("taught", {"distill.teacher": teacher, "distill.cache": True}),
                                   ("plain", {})):  # fmt: skip
                out = Path(f"runs/distill-{args.budget}/{variant}-seed{seed}")
                overrides = {"seed": seed, "data.split_seed": 0, **extra}
                cifarlab.train(
                    "fast", data=args.data, out=out, overrides=overrides, budget=args.budget,
                    progress=False,
                )  # fmt: skip
                rows.append(summary(variant, out))
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["variant"]] = r
    gains = {
        seed: round(100 * (v["taught"]["val_accuracy_tta"] - v["plain"]["val_accuracy_tta"]), 2)
        for seed, v in by_seed.items()
        if {"taught", "plain"} <= v.keys()
    }
    print(json.dumps({"gain_points_tta": gains}))
    save(
        f"distill-{args.budget}",
        {"teacher": teacher, "budget": args.budget, "rows": rows, "gain_points_tta": gains},
    )


if __name__ == "__main__":
    main()
