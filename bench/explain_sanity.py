"""Do a trained model's heatmaps follow the object? Validation images, shrunk to half size and
pasted into a random quadrant of a grey canvas, explained for their true class: the share of
heatmap peaks that fall in the object's quadrant (chance: 25%), per method, beside the model's
accuracy on the pasted images. A 3 x 3 map (FastNet at 32 px) has cells that straddle the
quadrants, so its share is a lower bound.
Usage: python bench/explain_sanity.py RUN_DIR [--n 400]. Writes bench/results/explain_sanity.json.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from common import save

import cifarlab
from cifarlab.core.runtime import cpu_name
from cifarlab.data.split import split_data
from cifarlab.rundir import RunDir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    run = RunDir(args.run)
    _, val, _ = split_data(run.recipe({"data.test": None}))
    predictor = cifarlab.load(run.path)
    size, half = predictor.image_size, predictor.image_size // 2
    images, labels = val.images[: args.n], val.labels[: args.n]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    small = F.interpolate(x, size=(half, half), mode="bilinear", antialias=True)
    small = small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    quadrant = np.random.default_rng(0).integers(0, 4, len(images))
    canvas = np.full((len(images), size, size, 3), 128, np.uint8)
    for i, q in enumerate(quadrant):
        y, x0 = (q // 2) * half, (q % 2) * half
        canvas[i, y : y + half, x0 : x0 + half] = small[i]
    correct = predictor.probs(canvas).argmax(1) == labels
    result = {"run": str(run), "model": predictor.model_name, "images": len(images)}
    result["accuracy_pasted"] = float(correct.mean())
    for method in ("gradcam", "gradcam++"):
        maps, _ = predictor.explain(canvas, [int(c) for c in labels], method)
        peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
        hit = np.array(
            [
                (py // half) * 2 + px // half == q
                for (py, px), q in zip(peaks, quadrant, strict=True)
            ]
        )
        result[method] = {
            "peak_in_quadrant": float(hit.mean()),
            "among_correct": float(hit[correct].mean()),
        }
    save("explain_sanity", {"cpu": cpu_name(), **result})


if __name__ == "__main__":
    main()
