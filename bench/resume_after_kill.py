"""Kill -9 a real training run in the middle of an epoch, resume it, and compare its final
metrics with an uninterrupted run of the same recipe and seed.
Usage: python bench/resume_after_kill.py [DATA] (default: the shared CIFAR-10 JPEG archive)"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, save

ARGS = ["--recipe", "seed-cnn", "--limit", "2000", "--epochs", "3", "--no-progress"]


def train(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "cifarlab",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *ARGS,
        *extra,
    ]


if __name__ == "__main__":
    data = sys.argv[1] if len(sys.argv) > 1 else SHARED_DATA
    tmp = Path(tempfile.mkdtemp())
    subprocess.run(train(data, tmp / "clean"), check=True, capture_output=True)
    proc = subprocess.Popen(train(data, tmp / "killed"), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the first epoch's summary line: the run is now in epoch 2
        if line.startswith("train   1/"):
            break
    time.sleep(2.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len((tmp / "killed/history.csv").read_text().splitlines()) - 1
    subprocess.run(
        [sys.executable, "-m", "cifarlab", "train", "--resume", str(tmp / "killed")],
        check=True,
        capture_output=True,
    )
    clean = json.loads((tmp / "clean/metrics.json").read_text())["val"]
    resumed = json.loads((tmp / "killed/metrics.json").read_text())["val"]
    save(
        "resume_after_kill",
        {
            "killed_after_epochs": killed_at,
            "clean": {k: clean[k] for k in ("accuracy", "loss")},
            "resumed": {k: resumed[k] for k in ("accuracy", "loss")},
            "identical": clean["loss"] == resumed["loss"]
            and clean["confusion"] == resumed["confusion"],
        },
    )
