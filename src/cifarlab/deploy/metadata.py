"""The metadata an exported model carries (ONNX metadata_props / TorchScript extra files):
what a deployed model needs to be used without cifarlab's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from cifarlab.core.errors import UserError
from cifarlab.core.version import __version__

PREPROCESSING = (
    "input 'images': uint8 RGB (N, image_size, image_size, 3), NHWC, any N; inside the graph: "
    "x / 255, resize through resize_steps to input_size x input_size (interpolation), "
    "(x - mean) / std per channel; "
    "output 'logits': float32 (N, classes) in the order of 'classes'; softmax gives probabilities"
)


def metadata(info: dict) -> dict:
    """The facts a deployed model needs, from a checkpoint's info."""
    pre, spec = info["preprocess"], info["model"]
    return {
        "model": spec.get("arch", spec["name"]),
        "classes": list(info["classes"]),
        "image_size": int(pre["image_size"]),
        "input_size": int(pre["input_size"]),
        "mean": [float(v) for v in pre["mean"]],
        "std": [float(v) for v in pre["std"]],
        "interpolation": str(pre.get("interpolation", "bilinear")),
        "resize_steps": [int(s) for s in pre.get("resize_steps") or ()],
        "cifarlab_version": __version__,
        "preprocessing": PREPROCESSING,
    }


def read_metadata(props: dict[str, str], path: Path) -> dict:
    """An ONNX file's metadata_props -> {classes, preprocess, model, version}."""
    try:
        return {
            "classes": json.loads(props["classes"]),
            "preprocess": {
                "image_size": int(props["image_size"]),
                "input_size": int(props["input_size"]),
                "mean": json.loads(props["mean"]),
                "std": json.loads(props["std"]),
                "interpolation": props.get("interpolation", "bilinear"),
                "resize_steps": json.loads(props.get("resize_steps", "[]")),
            },
            "model": props.get("model", "unknown"),
            "version": props.get("cifarlab_version"),
        }
    except (KeyError, ValueError):
        raise UserError(
            f"{path} has no cifarlab metadata (classes, image_size, ...); "
            "export the model with `cifarlab export CHECKPOINT`"
        ) from None
