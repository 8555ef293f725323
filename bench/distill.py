"""Distillation into the `fast` network: the same student trained without a teacher, with the
teacher running in every step, and with the teacher's logits cached (`distill.cache`), same
seed and epochs. Prints and saves held-out accuracy (the recipe's TTA), training seconds and
seconds per epoch of each, so the gain of the teacher, its share of the time and what the
cache's approximation costs come from one run of this script on one machine.

Usage: python bench/distill.py --teacher RUN_DIR [--data PATH] [--epochs 8] [--seed 0]
       [--set KEY=VALUE ...]   (student settings; default: the half-width size of `fast`)

Writes bench/results/distill-<EPOCHS>ep.json. Each variant is its own `cifarlab train` run under a
temporary folder; the teacher's logits cache lives in $CIFARLAB_HOME (a rerun reads it: pass
a fresh CIFARLAB_HOME to time its computation again).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, save

import cifarlab
from cifarlab.config import parse_override

HALF = ["model.widths=[32,128,128]", "augment.cutout=4"]  # fast's budget size 2


def one_run(name: str, data: str, out: Path, overrides: dict, epochs: int) -> dict:
    started = time.perf_counter()
    result = cifarlab.train(
        "fast",
        data=data,
        out=out / name,
        overrides={**overrides, "train.epochs": epochs},
        progress=False,
    )
    metrics = json.loads((out / name / "metrics.json").read_text())
    row = {
        "variant": name,
        "val_accuracy_tta": result["val"]["accuracy"],
        "train_seconds": metrics["train_seconds"],
        "seconds_per_epoch": metrics["train_seconds"] / epochs,
        "wall_seconds": time.perf_counter() - started,
        "runtime": metrics["runtime"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="a finished run directory (or best.pt)")
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    args = p.parse_args()
    student = dict(parse_override(s) for s in (args.set or HALF))
    student["seed"] = args.seed
    teacher = str(Path(args.teacher).absolute())
    variants = {
        "plain": {},
        "teacher": {"distill.teacher": teacher},
        "teacher-cached": {"distill.teacher": teacher, "distill.cache": True},
    }
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            one_run(name, args.data, Path(tmp), {**student, **extra}, args.epochs)
            for name, extra in variants.items()
        ]
    plain = rows[0]
    for r in rows[1:]:
        r["gain_points"] = round(100 * (r["val_accuracy_tta"] - plain["val_accuracy_tta"]), 2)
        r["time_ratio"] = round(r["train_seconds"] / plain["train_seconds"], 3)
    save(
        f"distill-{args.epochs}ep",
        {"teacher": teacher, "student": student, "epochs": args.epochs, "rows": rows},
    )


if __name__ == "__main__":
    main()
