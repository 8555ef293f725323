"""Time to a target accuracy: train a recipe at several lengths and report the shortest whose
final held-out accuracy (the recipe's test-time augmentation) reaches the target, with its
training time. This is how the fastest CIFAR-10 trainings report "time to 94%": a schedule is
only as good as where it ends, so each length is its own run with its own LR schedule.

Usage: python bench/time_to_target.py --data PATH [--recipe fast] [--target 0.94]
           [--epochs 10 20 30] [--set key=value ...] [--name NAME]

Writes bench/results/time_to_target-NAME.json and .png after every run (a stopped sweep keeps
what it measured). `train_seconds` sums the epochs' times (training and the per-epoch validation; on
CUDA the first epoch also holds torch.compile's compile); `steady_seconds` counts the first
epoch at the median epoch's time instead, as published figures leave the compile out (the
plot shows these steady curves; per-epoch points are plain accuracy, the final one is not).
"""

import argparse
import tempfile
import time
from pathlib import Path

from common import RESULTS, save

import cifarlab
from cifarlab.bench import plot_time_to_accuracy, steady_curve, time_to_accuracy
from cifarlab.config import parse_override


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--target", type=float, default=0.94)
    p.add_argument("--epochs", type=float, nargs="+", default=[10, 20, 30])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", default=None)
    p.add_argument("--runs", default=None, help="keep the run directories here")
    return p.parse_args()


def one_run(args, epochs: float, overrides: dict, runs: Path) -> dict:
    out = runs / f"{args.recipe}-{epochs:g}ep"
    started = time.perf_counter()
    result = cifarlab.train(
        args.recipe,
        data=args.data,
        out=out,
        overrides={**overrides, "train.epochs": epochs},
        progress=False,
    )
    wall = time.perf_counter() - started
    curve = time_to_accuracy(out)
    return {
        "epochs": epochs,
        "val_accuracy": result["val"]["accuracy"],
        "train_seconds": curve[-1]["seconds"],
        "steady_seconds": steady_curve(curve)[-1]["seconds"],
        "wall_seconds": wall,
        "curve": curve,
    }


def main():
    args = parse_args()
    overrides = dict(parse_override(item) for item in args.set)
    name = args.name or args.recipe
    runs = Path(args.runs or tempfile.mkdtemp(prefix="time_to_target-"))
    rows = []
    for epochs in sorted(args.epochs):
        rows.append(one_run(args, epochs, overrides, runs))
        reached = [r for r in rows if r["val_accuracy"] >= args.target]
        curves = {f"{r['epochs']:g} epochs": r["curve"] for r in rows}
        save(
            f"time_to_target-{name}",
            {
                "recipe": args.recipe,
                "overrides": overrides,
                "data": str(args.data),
                "target": args.target,
                "reached": min(reached, key=lambda r: r["train_seconds"]) if reached else None,
                "runs": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
                "curves": curves,
            },
        )
        steady_curves = {k: steady_curve(v) for k, v in curves.items()}
        plot_time_to_accuracy(steady_curves, RESULTS / f"time_to_target-{name}.png")


if __name__ == "__main__":
    main()
