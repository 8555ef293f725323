"""What an optimizer step costs beside the training step it follows: `fast`'s network at each
of its widths, one 1024-image forward + backward (the recipe's precision and memory format as
`auto` decides them here) against an SGD step and a Muon step on the same gradients, in the
same process (medians of 5 after 2 warm-up steps).

Usage: python bench/optimizer_step.py
"""

import statistics
import time

import torch
import torch.nn.functional as F
from common import save

from cifarlab import config
from cifarlab.core import runtime
from cifarlab.models import build_model
from cifarlab.training.optim import make_optimizer
from cifarlab.training.step import train_step


def median_seconds(fn, repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def one_width(widths: list[int], bf16: bool, channels_last: bool) -> dict:
    recipe = config.load_recipe("fast", {"model.widths": widths})
    model, _ = build_model(recipe["model"], 10, 32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(1024, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (1024,))

    def backward():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    row = {"widths": widths, "forward_backward_s": median_seconds(backward, repeat=3, warmup=1)}
    for name in ("sgd", "muon"):
        phase = config.phases(config.load_recipe("fast", {"train.optimizer": name}))[0]
        opt = make_optimizer(model.param_groups(phase), phase)
        row[f"{name}_step_s"] = median_seconds(opt.step)
    row["muon_share_of_training_step"] = (row["muon_step_s"] - row["sgd_step_s"]) / (
        row["forward_backward_s"] + row["sgd_step_s"]
    )
    return row


def main():
    recipe = config.load_recipe("fast")
    threads = runtime.set_threads("auto")
    net = build_model(recipe["model"], 10, 32)[0]
    choice = runtime.decide(
        "auto", "auto", torch.device("cpu"), threads, model=net, train_step=train_step
    )
    widths = [s.get("model.widths", recipe["model"]["widths"]) for s in recipe["budget"]["sizes"]]
    rows = [
        one_width(w, choice.bf16, choice.channels_last) for w in dict.fromkeys(map(tuple, widths))
    ]
    for r in rows:
        print(
            f"widths {r['widths']}: forward+backward {r['forward_backward_s']:.3f} s, "
            f"sgd step {r['sgd_step_s'] * 1e3:.1f} ms, muon step {r['muon_step_s'] * 1e3:.1f} ms "
            f"(+{r['muon_share_of_training_step']:.1%} of a training step)"
        )
    save("optimizer_step", {"precision": choice.as_dict(), "rows": rows})


if __name__ == "__main__":
    main()
