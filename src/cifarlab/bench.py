"""Speed measurements: training/inference images per second, FLOPs, achieved GFLOP/s against the
machine's measured matmul peak, data-path throughput, and time-to-accuracy curves.

Every speed figure comes with a baseline measured in the same process (a plain eager PyTorch
loop: fp32, contiguous tensors, no autocast), so results are also ratios."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cifarlab import config
from cifarlab.core.heap import reuse_freed_memory
from cifarlab.core.runtime import Choice, use_compile
from cifarlab.data import ImageSet
from cifarlab.data.augment import AugmentConfig
from cifarlab.data.loader import BatchLoader
from cifarlab.models import build_model
from cifarlab.rundir import RunDir
from cifarlab.training.budget import with_size
from cifarlab.training.step import decide_precision, train_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _best_ms(fn, repeats: int) -> float:
    """Best of `repeats` timed calls of `fn`, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def matmul_peak(dtype: torch.dtype, n: int | None = None, repeats: int = 5, seconds=0.5) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype`. Without `n`, the product grows from 256 up to
    2048 on a CPU (8192 on a GPU, which needs large products to reach its peak) while one product
    takes under 1/20 of `seconds`, so the whole measurement stays a fraction of a second even
    where the dtype is slow (bf16 without native support: ~2 GFLOP/s)."""
    if n is None:
        top, n = (8192 if DEVICE == "cuda" else 2048), 256
        while n < top:
            once = _best_ms(_product(n, dtype), 1) / 1e3  # inputs made outside the timing
            if once * 20 > seconds:
                break
            n *= 2
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2 * n**3 / _best_ms(lambda: a @ b, repeats) / 1e6


def _product(n: int, dtype: torch.dtype):
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return lambda: a @ b


def flops_per_image(model: torch.nn.Module, input_size: int, train: bool) -> float:
    """FLOPs of one image's forward (and backward when `train`), counted by PyTorch."""
    x = torch.randn(2, 3, input_size, input_size)
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if train:
            out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def _steps_per_second(step, steps: int, warmup: int) -> float:
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def speed(
    model,
    batch: int,
    input_size: int,
    bf16: bool,
    channels_last: bool,
    train: bool,
    steps: int = 10,
    warmup: int = 3,
    reuse_memory: bool = True,
    compile: bool = False,
) -> float:
    """Images/s of training steps (forward, backward, SGD update) or of inference, on random data;
    `reuse_memory` as training runs (heap.py), off for the plain-PyTorch baseline; `compile` as
    training runs on CUDA (the compile happens in the untimed warm-up steps)."""
    device = DEVICE
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train(train)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    net = torch.compile(model) if compile else model
    x = torch.randn(batch, 3, input_size, input_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        if train:
            train_step(net, opt, x, y, bf16)
        else:
            with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=bf16):
                net(x)

    with reuse_freed_memory() if reuse_memory else contextlib.nullcontext():
        return batch * _steps_per_second(step, steps, warmup)


def model_speeds(recipe_name: str) -> list[dict]:
    """`model_speed` of the recipe, and of each larger size `--budget` may choose for it."""
    sizes = config.load_recipe(recipe_name)["budget"]["sizes"]
    return [model_speed(recipe_name, size=i) for i in range(max(1, len(sizes)))]


def _sized_model(recipe_name: str, size: int) -> tuple[dict, dict, torch.nn.Module, int, Choice]:
    """The recipe with budget size number `size` applied, the settings of that size, its model,
    the model's input size and the precision and memory format it trains in on this machine
    (decided as training decides them: measured)."""
    recipe = config.load_recipe(recipe_name)
    settings = recipe["budget"]["sizes"][size] if recipe["budget"]["sizes"] else {}
    recipe = with_size(recipe, settings)
    model, pre = build_model(recipe["model"], 10, recipe["data"]["image_size"], pretrained=False)
    input_size = int(pre["input_size"])
    choice = decide_precision(
        recipe, model.to(DEVICE), input_size, torch.device(DEVICE), torch.get_num_threads()
    )
    return recipe, settings, model, input_size, choice


def model_speed(recipe_name: str, batch: int | None = None, steps: int = 10, size: int = 0) -> dict:
    """Speed of a recipe's model (or of its budget size number `size`): cifarlab's settings (the
    recipe's precision, channels_last) against the plain eager fp32 baseline, with FLOPs and
    achieved GFLOP/s."""
    recipe, settings, model, input_size, choice = _sized_model(recipe_name, size)
    bf16 = choice.bf16
    batch = batch or int(recipe["train"]["batch_size"])
    train_flops = flops_per_image(model, input_size, train=True)
    infer_flops = flops_per_image(model, input_size, train=False)
    peak_before = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
    base = {
        k: speed(model, batch, input_size, False, False, k == "train", steps, reuse_memory=False)
        for k in ("train", "infer")
    }
    channels_last = choice.channels_last
    compiled = use_compile(recipe["compile"], torch.device(DEVICE))  # as fit() trains
    ours = {
        "train": speed(
            model, batch, input_size, bf16, channels_last, True, steps, compile=compiled
        ),
        "infer": speed(model, batch, input_size, bf16, channels_last, False, steps),
    }
    # the best peak seen before and after: a slow moment of a shared machine must not flatter
    peak = max(peak_before, matmul_peak(torch.bfloat16 if bf16 else torch.float32))
    return {
        "recipe": recipe_name,
        "budget_size": settings,
        "input_size": input_size,
        "batch": batch,
        "precision": choice.precision,
        "memory_format": choice.memory_format,
        "compiled": compiled,
        "train_gflops_per_image": train_flops / 1e9,
        "infer_gflops_per_image": infer_flops / 1e9,
        "train_images_per_s": ours["train"],
        "infer_images_per_s": ours["infer"],
        "baseline_train_images_per_s": base["train"],
        "baseline_infer_images_per_s": base["infer"],
        "train_speedup": ours["train"] / base["train"],
        "infer_speedup": ours["infer"] / base["infer"],
        "train_gflop_per_s": ours["train"] * train_flops / 1e9,
        "matmul_peak_gflop_per_s": peak,
        "train_fraction_of_peak": ours["train"] * train_flops / 1e9 / peak,
    }


def _conv_cost(conv, shape, input_grad: bool, batch: int, dtype, fmt, repeats: int) -> dict:
    """Best-of-`repeats` milliseconds of a convolution's forward, input-gradient (when its input
    needs one in training) and weight-gradient (when its weight trains) passes."""
    x = torch.randn(batch, *shape[1:], device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    w = conv.weight.detach().to(DEVICE, dtype).contiguous(memory_format=fmt)
    k = conv.kernel_size
    padding = [(k[0] - 1) // 2, (k[1] - 1) // 2] if conv.padding == "same" else list(conv.padding)
    geometry = (list(conv.stride), padding, list(conv.dilation), False, [0, 0], conv.groups)
    grad = torch.randn_like(torch.ops.aten.convolution(x, w, None, *geometry))
    flops = 2 * grad.numel() * w[0].numel()  # multiply-adds of one pass, the same for all three

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(grad, x, w, None, *geometry, mask)

    parts = {"forward": lambda: torch.ops.aten.convolution(x, w, None, *geometry)}
    if input_grad:
        parts["input_grad"] = backward([True, False, False])
    if conv.weight.requires_grad:
        parts["weight_grad"] = backward([False, True, False])
    ms = {name: _best_ms(fn, repeats) for name, fn in parts.items()}
    return {
        "input": [batch, *shape[1:]],
        "weight": list(w.shape),
        "gflop_per_pass": flops / 1e9,
        "ms": ms,
        "tflop_per_s": {name: flops / t / 1e9 for name, t in ms.items()},
    }


def conv_costs(recipe_name: str, batch: int | None = None, size: int = 0, repeats: int = 5) -> dict:
    """Where a training step's time goes: each convolution of the recipe's model timed alone
    (forward, input gradient, weight gradient) in the recipe's precision and memory format, its
    TFLOP/s, and the bound that follows: the fraction of the matmul peak a training step would
    reach if everything but the convolutions took no time at all."""
    recipe, _, model, input_size, choice = _sized_model(recipe_name, size)
    bf16 = choice.bf16
    batch = batch or int(recipe["train"]["batch_size"])
    dtype = torch.bfloat16 if bf16 else torch.float32
    fmt = torch.channels_last if choice.channels_last else torch.contiguous_format
    seen = []  # (conv, its input's shape, whether its input needs a gradient)

    def record(conv, inputs, output):
        seen.append((conv, tuple(inputs[0].shape), inputs[0].requires_grad))

    hooks = [
        m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    model.train()(torch.randn(2, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    peak_before = matmul_peak(dtype)
    with reuse_freed_memory():  # as in training
        rows = [_conv_cost(*s, batch, dtype, fmt, repeats) for s in seen]

    conv_flops = sum(r["gflop_per_pass"] * len(r["ms"]) for r in rows)
    conv_ms = sum(sum(r["ms"].values()) for r in rows)
    step_ms = batch / speed(model, batch, input_size, bf16, fmt == torch.channels_last, True) * 1e3
    peak = max(peak_before, matmul_peak(dtype))  # the best seen, as in model_speed
    return {
        "recipe": recipe_name,
        "batch": batch,
        "precision": "bf16" if bf16 else "fp32",
        "convolutions": rows,
        "conv_gflop_per_step": conv_flops,
        "conv_ms_per_step": conv_ms,
        "train_step_ms": step_ms,
        "conv_share_of_step": conv_ms / step_ms,
        "matmul_peak_gflop_per_s": peak,
        "step_fraction_of_peak": conv_flops / step_ms * 1e3 / peak,
        "conv_only_bound_fraction_of_peak": conv_flops / conv_ms * 1e3 / peak,
    }


def data_speed(recipe_name: str, n: int = 10000, epochs: int = 2) -> dict:
    """Images/s the batch loader delivers with the recipe's augmentation, against the recipe
    model's training images/s (the data path must stay far ahead)."""
    recipe = config.load_recipe(recipe_name)
    size = recipe["data"]["image_size"]
    rng = np.random.default_rng(0)
    data = ImageSet(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        rng.integers(0, 10, n),
        [str(i) for i in range(10)],
    )
    model, pre = build_model(recipe["model"], 10, size, pretrained=False)
    choice = decide_precision(
        recipe,
        model.to(DEVICE),
        int(pre["input_size"]),
        torch.device(DEVICE),
        torch.get_num_threads(),
    )
    loader = BatchLoader(
        data,
        int(recipe["train"]["batch_size"]),
        torch.device("cpu"),
        pre,
        aug=AugmentConfig(**recipe["augment"]),
        shuffle=True,
        drop_last=True,
    )
    start = time.perf_counter()
    served = sum(len(x) for e in range(epochs) for x, _ in loader.epoch(e))
    data_rate = served / (time.perf_counter() - start)
    batch = int(recipe["train"]["batch_size"])
    model_rate = speed(
        model, batch, int(pre["input_size"]), choice.bf16, choice.channels_last, train=True
    )
    return {
        "recipe": recipe_name,
        "augment": recipe["augment"],
        "data_images_per_s": data_rate,
        "model_train_images_per_s": model_rate,
        "ratio": data_rate / model_rate,
    }


def time_to_accuracy(run_dir: Path) -> list[dict]:
    """(cumulative training seconds, val accuracy) per epoch of a run."""
    elapsed, out = 0.0, []
    for r in RunDir(run_dir).read_history():
        elapsed += r["seconds"]
        out.append(
            {
                "seconds": elapsed,
                "val_accuracy": r["val_accuracy"],
                "epoch": r["epoch"],
                "phase": r["phase"],
            }
        )
    return out


def steady_curve(curve: list[dict]) -> list[dict]:
    """A time-to-accuracy curve with its first epoch at the median epoch's time: without the
    one-time costs (torch.compile on CUDA) that published time-to-accuracy figures leave out."""
    ends = [p["seconds"] for p in curve]
    times = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    extra = max(0.0, times[0] - float(np.median(times))) if times else 0.0
    return [{**point, "seconds": point["seconds"] - extra} for point in curve]


def plot_time_to_accuracy(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max((p["seconds"] for points in curves.values() for p in points), default=0)
    unit, scale = ("minutes", 60) if longest > 300 else ("seconds", 1)  # a GPU's runs are short
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        ax.plot(
            [p["seconds"] / scale for p in points],
            [p["val_accuracy"] for p in points],
            marker=".",
            label=name,
        )
    ax.set_xlabel(f"training time ({unit})")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
