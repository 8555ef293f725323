"""Training steps of a recipe's model with glibc's default malloc against heap.reuse_freed_memory
(what training uses), alternating in one process so machine noise hits both alike; page faults
per step from getrusage. Usage: python bench/heap.py [RECIPE] [ROUNDS]"""

import contextlib
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from common import save

from cifarlab import config
from cifarlab.heap import reuse_freed_memory
from cifarlab.models import build_model


def main(recipe_name: str = "fast", rounds: int = 5, steps: int = 4) -> dict:
    recipe = config.load_recipe(recipe_name)
    model, pre = build_model(recipe["model"], 10, 32, pretrained=False)
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

    rates = {"glibc default": [], "reuse_freed_memory": []}
    faults = {k: [] for k in rates}
    for _ in range(rounds):
        for name in rates:
            with reuse_freed_memory() if name != "glibc default" else contextlib.nullcontext():
                step()  # settle
                start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                rates[name].append(steps * batch / (time.perf_counter() - start))
                end_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                faults[name].append((end_faults - start_faults) / steps)
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "recipe": recipe_name,
        "batch": batch,
        "images_per_s": rates,
        "page_faults_per_step": faults,
        "median_images_per_s": median,
        "speedup": median["reuse_freed_memory"] / median["glibc default"],
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    save("heap", main(args[0] if args else "fast", int(args[1]) if len(args) > 1 else 5))
