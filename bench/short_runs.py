"""Which settings suit a short `fast` run: held-out accuracy (the recipe's TTA, and plain) of
variants of one of `budget.sizes` (default: the short-run size, the one with `train.lr_end`;
`--size N` for the N-th, from 1) trained for a fixed number of epochs, each variant its own run
per seed, warm-up at the recipe's share.

Usage: python bench/short_runs.py --data PATH [--epochs 3] [--seeds 0 1] [--only NAME ...]
       python bench/short_runs.py --data PATH --size 2 --epochs 8 --only size triangle

Writes bench/results/short_runs-fast-EPOCHSep.json (with --size: short_runs-fast-sizeN-EPOCHSep.json)
after every run (a rerun skips the runs it has: same seed, settings, CPU and emulation) and
prints a table of each variant's mean per CPU (runs without emulation). Accuracy at a fixed
epoch count does not depend on how busy the machine is; its seconds do.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import RESULTS, machine, save, train_for

from cifarlab import config

# name: overrides on top of the short-run size as the recipe writes it. Each is one idea about
# what a 3-epoch run lacks against airbench94's own script at that length (85.6% with TTA in the
# issue's measurement), or a check that the size's own choice holds.
TRIANGLE = {"train.lr_start": 0.2, "train.lr_end": 0.07}  # airbench94's LR ends, of the peak
VARIANTS = {
    "size": {},
    "sgd": {"train.optimizer": "sgd"},  # conv filters by SGD too, as before Muon
    "nowarmup": {"warmup_share": 0.0},  # straight linear decay, as airbench94_muon
    "fp32": {"precision": "fp32"},  # bf16 autocast's rounding: does it cost a short run points?
    "batch512": {"train.batch_size": 512, "train.lr": 0.75},  # 2x the steps, same LR per image
    "warmup20": {"warmup_share": 0.2},  # airbench94 peaks at 20% of training, `fast` at 23%
    # for the half width (--size 2), where a slow CPU's 15 minutes buy about 7-8 epochs:
    "triangle": TRIANGLE,  # the short-run size's LR ends
    "triangle-nocutout": {**TRIANGLE, "augment.cutout": 0},
    "triangle-nocutout-b512": {
        **TRIANGLE,
        "augment.cutout": 0,
        "train.batch_size": 512,
        "train.lr": 0.75,
    },
}


def size_settings(recipe: dict, size: int | None) -> dict:
    """Budget size `size` (from 1), or the one written for short runs of the base width: it
    sets `train.lr_end` and keeps the recipe's widths."""
    sizes = recipe["budget"]["sizes"]
    if size:
        return sizes[size - 1]
    return next(s for s in sizes if "train.lr_end" in s and "model.widths" not in s)


def settings(name: str, size: int | None = None) -> dict:
    return {**size_settings(config.load_recipe("fast"), size), **VARIANTS[name]}


def one_run(data, name, epochs, seed, runs: Path, here: dict, size: int | None = None) -> dict:
    out = runs / f"fast-{f'size{size}' if size else 'short'}-{name}-{epochs:g}ep-s{seed}"
    written = settings(name, size)
    overrides = {**written, "seed": seed, "data.split_seed": 0}
    return {
        "variant": name,
        "settings": written,
        "emulation": here["emulation"],
        "cpu": here["cpu"],
        "seed": seed,
        **train_for("fast", data, out, overrides, epochs),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--size", type=int, help="budget size N (from 1; default: the short-run one)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants (default: all)")
    p.add_argument("--runs", help="keep the run directories here")
    args = p.parse_args()
    name = f"short_runs-fast-{f'size{args.size}-' if args.size else ''}{args.epochs:g}ep"
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = Path(args.runs or tempfile.mkdtemp(prefix="short_runs-"))
    here = machine()
    for seed in args.seeds:
        for variant in args.only or list(VARIANTS):
            key = (seed, settings(variant, args.size), here["emulation"], here["cpu"])
            if any((r["seed"], r["settings"], r["emulation"], r["cpu"]) == key for r in rows):
                continue
            rows.append(one_run(args.data, variant, args.epochs, seed, runs, here, args.size))
            save(name, {"recipe": "fast", "data": str(args.data), "runs": rows})
    print(f"{'variant':<12} {'runs':>4} {'TTA':>7} {'plain':>7} {'train s':>8}  cpu")
    for cpu in sorted({r["cpu"] for r in rows}):
        for variant in VARIANTS:
            written = settings(variant, args.size)
            mine = [
                r
                for r in rows
                if r["settings"] == written and r["cpu"] == cpu and not r["emulation"]
            ]
            if mine:
                tta = statistics.mean(r["val_accuracy"] for r in mine)
                plain = statistics.mean(r["plain_val_accuracy"] for r in mine)
                secs = statistics.mean(r["train_seconds"] for r in mine)
                print(f"{variant:<12} {len(mine):>4} {tta:>7.2%} {plain:>7.2%} {secs:>8.0f}  {cpu}")
    for r in rows:
        if r["emulation"]:
            print(
                f"{r['variant']} seed {r['seed']} under {r['emulation']}: {r['val_accuracy']:.2%}"
            )


if __name__ == "__main__":
    main()
