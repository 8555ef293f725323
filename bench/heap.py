"""Training steps of a recipe's model with glibc's default malloc against heap.reuse_freed_memory
(what training uses). Each measurement is its own process, the two settings alternating, so
machine noise hits both alike; page faults per step from getrusage.
Usage: python bench/heap.py [RECIPE] [ROUNDS]
       python bench/heap.py --predict CHECKPOINT [ROUNDS]   (inference: Predictor.probs,
       batches of 64 uint8 images, what `cifarlab predict/evaluate/serve` run; heap-predict.json)"""

import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

from common import save


def one(recipe_name: str, reuse: bool, warmup: int = 3, steps: int = 6) -> dict:
    """Images/s and page faults per step of training steps in this process."""
    import torch
    import torch.nn.functional as F

    from cifarlab import config
    from cifarlab.core.heap import reuse_freed_memory
    from cifarlab.models import build_model

    recipe = config.load_recipe(recipe_name)
    model, _ = build_model(recipe["model"], 10, 32, pretrained=False)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = int(recipe["train"]["batch_size"])
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with reuse_freed_memory() if reuse else contextlib.nullcontext():
        for _ in range(warmup):
            step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"images_per_s": steps * batch / seconds, "page_faults_per_step": faults / steps}


def one_predict(ckpt: str, reuse: bool, seconds: float = 2.0) -> dict:
    """Images/s and page faults per batch of a checkpoint's Predictor in this process."""
    import numpy as np

    from cifarlab.core.heap import reuse_freed_memory
    from cifarlab.deploy.inference import Predictor

    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    size = predictor.image_size
    batch = np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    with reuse_freed_memory() if reuse else contextlib.nullcontext():
        for _ in range(3):
            predictor.probs(batch)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            predictor.probs(batch)
            done += 1
        elapsed = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"images_per_s": done * len(batch) / elapsed, "page_faults_per_batch": faults / done}


def main(recipe_name: str, rounds: int, mode: str = "--one") -> dict:
    runs = {"glibc default": [], "reuse_freed_memory": []}
    for _ in range(rounds):
        for name in runs:
            command = [sys.executable, __file__, mode, recipe_name, str(name != "glibc default")]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(output))
    median = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    return {
        "recipe_or_checkpoint": recipe_name,
        "runs": runs,
        "median_images_per_s": median,
        "speedup": median["reuse_freed_memory"] / median["glibc default"],
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--one"]:
        print(json.dumps(one(args[1], args[2] == "True")))
    elif args[:1] == ["--one-predict"]:
        print(json.dumps(one_predict(args[1], args[2] == "True")))
    elif args[:1] == ["--predict"]:
        rounds = int(args[2]) if len(args) > 2 else 4
        save("heap-predict", main(args[1], rounds, mode="--one-predict"))
    else:
        save("heap", main(args[0] if args else "fast", int(args[1]) if len(args) > 1 else 4))
