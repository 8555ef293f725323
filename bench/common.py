"""Shared by the bench scripts: where results go and how they are written."""

import json
import platform
from pathlib import Path

import torch

from cifarlab.core.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg-train.tar.gz"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def save(name: str, result: dict) -> Path:
    """Print the result and write it to bench/results/NAME.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps({**result, "machine": machine()}, indent=2)
    atomic_write_text(path, text + "\n")
    print(text)
    return path
