"""ONNX Runtime vs eager PyTorch inference throughput (images/s) on this CPU.

Each model runs as `cifarlab.deploy.inference.Preprocessed` (uint8 NHWC images -> logits, preprocessing
included): eagerly in PyTorch (`Predictor`) and, exported and verified by `cifarlab.deploy.export`, in
ONNX Runtime (`OnnxPredictor`), with the same batch size and the same number of threads. The two
are timed alternately, round after round, so a busy shared CPU hits both alike; the ratio is of
the medians. Images are real CIFAR-10 validation images (the stratified seed-0 split; resized for
224-pixel models) when the shared archive is present, else synthetic ones.
Models: the seed CNN (random weights, 32 px), `fast` (FastNet, 32 px, if present) and
EfficientNet-Lite0 (timm tf_efficientnet_lite0, random weights, native 224 px).
On a shared, busy CPU, PyTorch's OpenMP threads suffer most from oversubscription, so every
thread count in --threads (default: 1 and all cores) is measured and reported separately.
Usage: python bench/bench_inference.py [--seconds 5] [--rounds 3] [--batch-size 64] [--threads 1,2]
Writes bench/results/inference.json.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import SHARED_DATA, save

from cifarlab import config
from cifarlab.core.version import __version__
from cifarlab.deploy.export import export_model, synthetic_images
from cifarlab.deploy.inference import OnnxPredictor, Predictor, fit_images
from cifarlab.models import CIFAR_MEAN, CIFAR_STD, build_model

CLASSES = [f"class{i}" for i in range(10)]


def cifar_images(n: int) -> tuple[np.ndarray, str]:
    if not SHARED_DATA.is_file():
        return synthetic_images(n, 32), "synthetic"
    from cifarlab.data import load_images, stratified_split

    data = load_images(SHARED_DATA, progress=False)
    _, val = stratified_split(data.labels, 0.1, 0)
    return data.images[val[:n]], f"CIFAR-10 validation split ({SHARED_DATA.name})"


def models() -> list[tuple[str, torch.nn.Module, dict]]:
    """(name, model in eval mode, checkpoint-style info) for each benchmarked model."""
    out = []
    for recipe in ("seed-cnn", "fast"):
        if recipe not in config.recipe_names():
            print(f"skipping {recipe}: no such recipe here")
            continue
        spec = config.load_recipe(recipe)["model"]
        try:
            model, pre = build_model(spec, len(CLASSES), 32, pretrained=False)
        except Exception as e:  # noqa: BLE001 - a model still being written elsewhere
            print(f"skipping {recipe}: {type(e).__name__}: {e}")
            continue
        out.append((recipe, model, info(spec, {**pre, "image_size": 32})))
    import timm

    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=len(CLASSES))
    spec = {"name": "timm", "arch": "tf_efficientnet_lite0"}
    pre = {"image_size": 224, "input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}
    out.append(("efficientnet-lite0 (224 px)", lite, info(spec, pre)))
    return out


def info(spec: dict, preprocess: dict) -> dict:
    return {
        "model": spec,
        "classes": CLASSES,
        "preprocess": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), **preprocess},
        "cifarlab_version": __version__,
    }


def images_per_s(predict, images: np.ndarray, batch: int, seconds: float) -> float:
    """Throughput of `predict` on successive batches for about `seconds` (after one warm-up)."""
    predict(images[:batch])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        start = done % (len(images) - batch + 1)
        predict(images[start : start + batch])
        done += batch
    return done / (time.perf_counter() - t0)


def bench(name, model, meta, images, args, workdir: Path) -> list[dict]:
    """One row per thread count: both backends, same batch size, same threads."""
    size = meta["preprocess"]["image_size"]
    images = fit_images(images, size)
    eager = Predictor(model, meta)
    path, report = export_model(
        model, meta, "onnx", workdir / f"{name.split()[0]}.onnx", images[:32], "bench"
    )
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        onnx = OnnxPredictor(path, threads=threads)
        runs = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.rounds):
            for backend, predictor in (("pytorch", eager), ("onnxruntime", onnx)):
                runs[backend].append(
                    images_per_s(
                        lambda x, p=predictor: p.probs(x, args.batch_size),
                        images,
                        args.batch_size,
                        args.seconds,
                    )
                )
        torch_ips, ort_ips = (statistics.median(runs[b]) for b in ("pytorch", "onnxruntime"))
        rows.append(
            {
                "model": name,
                "image_size": size,
                "threads": threads,
                "pytorch_images_per_s": round(torch_ips, 1),
                "onnxruntime_images_per_s": round(ort_ips, 1),
                "ratio_onnxruntime_vs_pytorch": round(ort_ips / torch_ips, 2),
                "rounds": {b: [round(v, 1) for v in r] for b, r in runs.items()},
                "export_max_abs_logit_diff": report["max_abs_logit_diff"],
                "onnx_bytes": report["bytes"],
            }
        )
        print(
            f"{name:<28} threads {threads}  pytorch {torch_ips:8.1f} img/s   "
            f"onnxruntime {ort_ips:8.1f} img/s   x{ort_ips / torch_ips:.2f}   "
            f"(export max |logit diff| {report['max_abs_logit_diff']:.1e})",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements per backend")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--threads",
        type=lambda text: sorted({int(t) for t in text.split(",")}),
        default=sorted({1, torch.get_num_threads()}),
        help="thread counts to measure, e.g. 1,2 (default: 1 and all cores)",
    )
    p.add_argument("--images", type=int, default=512, help="distinct images to cycle through")
    args = p.parse_args()
    images, source = cifar_images(args.images)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for m in models() for row in bench(*m, images, args, Path(tmp))]
    save(
        "inference",
        {
            "what": "inference images/s incl. preprocessing, ONNX Runtime vs eager PyTorch, CPU",
            "images": source,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "seconds_per_measurement": args.seconds,
            "rounds": args.rounds,
            "onnxruntime": onnxruntime.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
