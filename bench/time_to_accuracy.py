"""Held-out accuracy against training time for finished runs: JSON and a PNG plot.
Usage: python bench/time_to_accuracy.py NAME RUN_DIR [RUN_DIR ...]"""

import sys
from pathlib import Path

from common import RESULTS, save

from cifarlab.bench import plot_time_to_accuracy, time_to_accuracy

if __name__ == "__main__":
    name, runs = sys.argv[1], sys.argv[2:]
    curves = {Path(r).name: time_to_accuracy(Path(r)) for r in runs}
    save(f"time_to_accuracy-{name}", {"curves": curves})
    plot_time_to_accuracy(curves, RESULTS / f"time_to_accuracy-{name}.png")
