"""DDP on one machine: N processes x (cores / N) threads against 1 process x all cores, the same
recipe, global batch, seed and epochs. Prints and saves training images/s (the median epoch
after the first), held-out accuracy and wall time of each, and their ratio.

Usage: python bench/ddp_scaling.py [--recipe fast] [--epochs 4] [--nproc 2] [DATA]
(default data: the shared CIFAR-10 JPEG archive)."""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, save

from cifarlab.core.runtime import physical_cores
from cifarlab.rundir import RunDir


def run(data, out: Path, recipe: str, epochs: int, *extra: str) -> dict:
    cmd = [
        sys.executable, "-m", "cifarlab", "train", "--recipe", recipe, "--data", str(data),
        "--epochs", str(epochs), "--out", str(out), "--no-track", "--no-progress", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    history = RunDir(out).read_history()
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "command": " ".join(cmd[1:]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_images_per_s": round(
            statistics.median(h["train_images_per_s"] for h in history[1:] or history), 1
        ),
        "val_accuracy": metrics["val"]["accuracy"],
        "runtime": metrics["runtime"],
        "first_line": done.stderr.splitlines()[0],
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("data", nargs="?", default=SHARED_DATA)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args()
    cores = physical_cores()
    tmp = Path(tempfile.mkdtemp())
    one = run(a.data, tmp / "one", a.recipe, a.epochs, "--threads", str(cores))
    many = run(a.data, tmp / "ddp", a.recipe, a.epochs, "--nproc-per-node", str(a.nproc))
    save(
        f"ddp_scaling-{a.recipe}",
        {
            "recipe": a.recipe,
            "epochs": a.epochs,
            "physical_cores": cores,
            f"1_process_x_{cores}_threads": one,
            f"{a.nproc}_processes_x_{max(1, cores // a.nproc)}_threads": many,
            "images_per_s_ratio_ddp_over_1": round(
                many["train_images_per_s"] / one["train_images_per_s"], 3
            ),
            "wall_ratio_ddp_over_1": round(many["wall_seconds"] / one["wall_seconds"], 3),
        },
    )
