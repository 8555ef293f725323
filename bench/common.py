"""Shared by the bench scripts: where results go and how they are written."""

import json
import os
import platform
from pathlib import Path

import torch

from cifarlab.core import runtime
from cifarlab.core.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg-train.tar.gz"


def machine() -> dict:
    """What a figure was measured on: the CPU's name and class (native bf16 or not, and any
    emulation cap in the environment), threads, torch and the GPU if any."""
    _, why = runtime.native_bf16()
    caps = {
        k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ
    }
    return {
        "cpu": runtime.cpu_name() or platform.machine(),
        "cpu_bf16": why,
        "emulation": caps or None,
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
