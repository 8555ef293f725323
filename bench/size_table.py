"""The accuracy table that `--budget` chooses a model size by: held-out accuracy (the recipe's
final test-time augmentation) of each of a recipe's `budget.sizes` trained for several epoch
counts, each count its own run with its own LR schedule (warm-up at the recipe's share), as a
budgeted run of that length would train it.

Usage: python bench/size_table.py --data PATH [--recipe fast] [--only N ...] [--epochs E ...]

Writes bench/results/size_table-RECIPE.json after every run (a stopped sweep keeps what it
measured and a rerun skips it) and prints the `budget.accuracy` block to paste into the recipe.
Accuracy at a fixed epoch count does not depend on how busy the machine is, so this may run
beside other work; its seconds do.
"""

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from common import RESULTS, save, train_for

from cifarlab import config

# epoch counts per size index of `fast` (quarter, half, half for short runs, base for short
# runs, base, wide): from the shortest a slow laptop CPU affords in 15 minutes to the longest an
# AMX Xeon affords in 60
EPOCHS = {"fast": {0: [8, 16, 32], 1: [8, 16], 2: [8, 16], 3: [3, 6], 4: [3, 6, 12], 5: []}}


def one_run(recipe: str, data: str, size: int, epochs: float, runs: Path) -> dict:
    settings = config.load_recipe(recipe)["budget"]["sizes"][size]
    tag = hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:6]
    out = runs / f"{recipe}-size{size}-{tag}-{epochs:g}ep"
    return {"size": size, "settings": settings, **train_for(recipe, data, out, settings, epochs)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--only", type=int, nargs="*", help="size indexes to run (default: all)")
    p.add_argument("--epochs", type=float, nargs="*", help="epoch counts (default: the table's)")
    p.add_argument("--runs", help="keep the run directories here")
    args = p.parse_args()
    name = f"size_table-{args.recipe}"
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = Path(args.runs or tempfile.mkdtemp(prefix="size_table-"))
    sizes = config.load_recipe(args.recipe)["budget"]["sizes"]
    plan = EPOCHS.get(args.recipe, {})
    for size in args.only if args.only is not None else range(len(sizes)):
        for epochs in args.epochs or plan.get(size, [5, 10]):
            if any(
                r["size"] == size and r["epochs"] == epochs and r["settings"] == sizes[size]
                for r in rows
            ):
                continue
            rows.append(one_run(args.recipe, args.data, size, epochs, runs))
            save(name, {"recipe": args.recipe, "data": str(args.data), "runs": rows})
    print("budget.accuracy for the recipe (one mapping per size, epochs: accuracy):")
    for size, settings in enumerate(sizes):
        points = {
            f"{r['epochs']:g}": round(r["val_accuracy"], 4)
            for r in sorted(rows, key=lambda r: r["epochs"])
            if r["size"] == size and r["settings"] == settings
        }
        print(f"    - {{{', '.join(f'{k}: {v}' for k, v in points.items())}}}  # {settings}")


if __name__ == "__main__":
    main()
