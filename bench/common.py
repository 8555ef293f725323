"""Shared by the bench scripts: where results go and how they are written, and a training run
of a fixed length."""

import csv
import json
import os
import time
from pathlib import Path

import torch

import cifarlab
from cifarlab import config
from cifarlab.core import runtime
from cifarlab.core.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg-train.tar.gz"


def cpu_id() -> str:
    """The CPU's name with its x86 family and model where /proc/cpuinfo has them: a KVM guest
    may name a Zen 3 and a Zen 5 both "AMD EPYC" (family 25 model 1 and family 26 model 2)."""
    fields = runtime.cpu_fields()
    name = runtime.cpu_name()
    if "cpu family" in fields and "model" in fields:
        return f"{name}, family {fields['cpu family']} model {fields['model']}"
    return name


def machine() -> dict:
    """What a figure was measured on: the CPU's name and class (native bf16 or not, and any
    emulation cap in the environment), threads, torch and the GPU if any."""
    _, why = runtime.native_bf16()
    caps = {
        k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ
    }
    return {
        "cpu": cpu_id(),
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


def train_for(recipe: str, data: str, out: Path, overrides: dict, epochs: float) -> dict:
    """Train `recipe` with `overrides` for exactly `epochs`, its warm-up at the recipe's share of
    them (or `warmup_share` in `overrides`), as a budgeted run of that length would train it:
    held-out accuracy with the recipe's TTA and plain, and the seconds."""
    base = config.load_recipe(recipe)
    overrides = dict(overrides)
    share = overrides.pop(
        "warmup_share", float(base["train"]["warmup_epochs"]) / float(base["train"]["epochs"])
    )
    started = time.perf_counter()
    result = cifarlab.train(
        recipe,
        data=data,
        out=out,
        overrides={
            **overrides,
            "train.epochs": epochs,
            "train.warmup_epochs": round(share * epochs, 3),
        },
        progress=False,
    )
    with open(out / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    return {
        "epochs": epochs,
        "val_accuracy": result["val"]["accuracy"],
        "plain_val_accuracy": float(history[-1]["val_accuracy"]),
        "train_seconds": result["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "runtime": result["runtime"],
    }
