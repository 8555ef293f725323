"""Use a trained model: a predictor wraps a model with its preprocessing and class names.

`Predictor` runs a checkpoint in PyTorch, `OnnxPredictor` runs a file written by `cifarlab export`
in ONNX Runtime; both take uint8 RGB images (N, H, W, 3) of any size and answer the same calls.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.core import runtime
from cifarlab.core.errors import UserError, require
from cifarlab.data.image import IMAGE_EXTENSIONS, read_image
from cifarlab.data.loader import prepare
from cifarlab.deploy.metadata import read_metadata
from cifarlab.eval import explain
from cifarlab.eval.predict import image_views
from cifarlab.models import load_model


class Preprocessed(torch.nn.Module):
    """A model with its preprocessing in front: uint8 (N, image_size, image_size, 3) RGB -> logits.

    Scale to [0, 1], resize to the model's input size (its preprocessing's interpolation and
    resize steps; bilinear by default), normalise: exactly the evaluation path of training. Eager
    inference runs this module and `cifarlab export` writes it out, so an exported model takes
    the same uint8 images as the Python API.
    """

    def __init__(self, model: torch.nn.Module, preprocess: dict):
        super().__init__()
        self.model = model
        self.input_size = int(preprocess["input_size"])
        self.interpolation = preprocess.get("interpolation", "bilinear")
        self.resize_steps = tuple(preprocess.get("resize_steps") or ())
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255
        x = prepare(
            x, self.input_size, self.mean, self.std, False, self.interpolation, self.resize_steps
        )
        return self.model(x)


def fit_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) at size x size, contiguous; resized (bilinear, antialiased) if needed."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # e.g. straight from Pillow: torch wants to own writable data
        images = images.copy()
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1:3] == (size, size):
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class BasePredictor:
    """What every predictor shares: classes, preprocessing facts, top-k, batch prediction of files.
    Subclasses implement `_logits` for one batch of uint8 images at `image_size`."""

    def __init__(self, classes: list[str], preprocess: dict, model_name: str, version: str | None):
        self.classes: list[str] = list(classes)
        self.preprocess: dict = preprocess
        self.model_name = model_name
        self.version = version
        self.registered: str | None = None  # "NAME/VERSION" when loaded from the registry

    @property
    def image_size(self) -> int:
        return int(self.preprocess["image_size"])

    @property
    def metadata(self) -> dict:
        return {
            "model": self.model_name,
            "classes": self.classes,
            "image_size": self.image_size,
            "input_size": int(self.preprocess["input_size"]),
            "mean": [float(v) for v in self.preprocess["mean"]],
            "std": [float(v) for v in self.preprocess["std"]],
            "version": self.version,
            "registered": self.registered,
        }

    def _logits(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def explain_refusal(self) -> str:
        """Why this predictor cannot explain ("" when it can)."""
        return (
            f"{self.model_name}: an exported (ONNX) model cannot be explained: ONNX Runtime gives "
            "no gradients; explain the run directory or its best.pt instead"
        )

    def explain(self, images: np.ndarray, classes=None, method: str = "gradcam"):
        raise UserError(self.explain_refusal())

    def probs(self, images: np.ndarray, batch_size: int = 256, tta: int = 0) -> np.ndarray:
        """Class probabilities (N, classes) for uint8 RGB images (N, H, W, 3) of any size;
        `tta` > 0 averages over the views training scores with (`tta_views`, in the model's
        input pixels)."""
        out = []
        for i in range(0, len(images), batch_size):
            fitted = fit_images(images[i : i + batch_size], self.image_size)
            out.append(
                sum(
                    w * softmax(self._logits(view).astype(np.float32))
                    for w, view in image_views(fitted, tta)
                )
            )
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[dict]]:
        k = min(k, len(self.classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            [{"label": self.classes[j], "probability": float(p[j])} for j in row]
            for p, row in zip(probs, order, strict=True)
        ]

    def predict_files(
        self, paths: Iterable[Path], k: int = 5, batch_size: int = 64
    ) -> Iterator[dict]:
        """Yield {"path", "top"} per readable image and {"path", "error"} per unreadable one,
        in input order within each batch (errors come out as soon as they are found)."""
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        batch: list[tuple[Path, np.ndarray]] = []
        for path in paths:
            try:
                batch.append((path, read_image(path, self.image_size)))
            except UserError as e:
                yield {"path": str(path), "error": str(e)}
                continue
            if len(batch) == batch_size:
                yield from self._flush(batch, k)
                batch = []
        if batch:
            yield from self._flush(batch, k)

    def _flush(self, batch: list[tuple[Path, np.ndarray]], k: int) -> Iterator[dict]:
        tops = self.top_k(self.probs(np.stack([img for _, img in batch])), k)
        for (path, _), top in zip(batch, tops, strict=True):
            yield {"path": str(path), "top": top}


class Predictor(BasePredictor):
    """A checkpoint ready for inference in PyTorch. `precision` and `memory_format` follow
    training's rule (cifarlab.core.runtime): `auto` uses what the checkpoint was trained in (bf16 only
    on a CPU with native bf16), and for a checkpoint without that record times a few forward
    passes in each candidate; `choice` says what was chosen."""

    def __init__(
        self,
        model: torch.nn.Module,
        info: dict,
        device: str = "cpu",
        precision: str = "auto",
        memory_format: str = "auto",
    ):
        spec = info["model"]
        super().__init__(
            info["classes"],
            info["preprocess"],
            spec.get("arch", spec["name"]),
            info.get("cifarlab_version"),
        )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        size = int(self.preprocess["input_size"])
        trained_in = info.get("trained_in") or {}
        if precision == "auto" and trained_in and self.device.type == "cpu":
            # what the run trained and scored in, so predictions match its metrics; bf16 only
            # where this CPU has it natively (a model trained on AMX may run on a laptop)
            precision = trained_in["precision"]
            if precision == "bf16" and not runtime.native_bf16()[0]:
                precision = "fp32"
            memory_format = trained_in.get("memory_format", memory_format)
        self.choice = runtime.decide(
            precision,
            memory_format,
            self.device,
            torch.get_num_threads(),
            model=self.model,
            input_size=size,
            batch=runtime.probe_batch(size, 64),
        )
        self.model.to(memory_format=runtime.memory_format(self.choice.channels_last))
        self.info = info
        self.pipeline = Preprocessed(self.model, self.preprocess).to(self.device).eval()
        self.mean, self.std = self.pipeline.mean, self.pipeline.std
        self._explained: torch.nn.Module | None = None  # explain's own copy, made on first use

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", precision: str = "auto"
    ) -> Predictor:
        model, info = load_model(path)
        return cls(model, info, device, precision)

    @torch.no_grad()
    def _logits(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.choice.bf16):
            return self.pipeline(x).float().cpu().numpy()

    def explain_refusal(self) -> str:
        try:
            explain.cam_layer(self.model)
        except UserError as e:
            return str(e)
        return ""

    def explain(
        self, images: np.ndarray, classes: list[int] | None = None, method: str = "gradcam"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(maps (N, image_size, image_size) in [0, 1], probabilities (N, classes)) for uint8
        images: where the model saw `classes` (default: its prediction), by Grad-CAM
        (cifarlab.eval.explain), in fp32. It runs on a private copy of the model, so it may run
        in another thread than predictions (hooks and gradients never touch the served model)."""
        if self._explained is None:
            self._explained = copy.deepcopy(self.model).float().eval()
            self._explained.to(memory_format=torch.contiguous_format)
            self._explained.requires_grad_(False)  # gradients w.r.t. the input path only
            self._cam_layer = explain.cam_layer(self._explained)
        images = fit_images(images, self.image_size)
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255
        x = prepare(
            x, self.pipeline.input_size, self.mean, self.std, False,
            self.pipeline.interpolation, self.pipeline.resize_steps,
        ).requires_grad_(True)  # fmt: skip
        wanted = None if classes is None else torch.tensor(classes, dtype=torch.long)
        maps, probs = explain.gradcam(self._explained, self._cam_layer, x, wanted, method)
        if maps.shape[-1] != self.image_size:  # back from the model's input size
            maps = F.interpolate(
                torch.from_numpy(maps)[:, None], size=(self.image_size,) * 2, mode="bilinear"
            )[:, 0].numpy()
        return maps, probs


class OnnxPredictor(BasePredictor):
    """A model exported by `cifarlab export --format onnx`, run by ONNX Runtime on the CPU.
    `threads` sets ONNX Runtime's intra-op threads (default: as many as PyTorch uses)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        require("onnxruntime", what="running an .onnx model")
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"model {path} not found; pass a .onnx file written by cifarlab export")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # idle pool threads sleep instead of spinning: the CPU is shared with a web server's
        # event loop and decoders (measured: +40% requests/s under load, bench/load_test.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise UserError(
                f"{path} is not a loadable ONNX model ({type(e).__name__}); "
                "export one with `cifarlab export CHECKPOINT`"
            ) from None
        meta = read_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        super().__init__(meta["classes"], meta["preprocess"], meta["model"], meta["version"])
        self.path = path
        self.input_name = self.session.get_inputs()[0].name

    def _logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def load_predictor(path: str | Path, device: str = "cpu", precision: str = "auto") -> BasePredictor:
    """A predictor for a run directory, a checkpoint or an exported .onnx file (always fp32).
    `auto`: the precision the checkpoint was trained in (so `evaluate` agrees with the run's
    metrics.json; bf16 only where native here), measured here for a checkpoint without one."""
    if Path(path).suffix.lower() == ".onnx":
        return OnnxPredictor(path)
    return Predictor.from_checkpoint(path, device, precision)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns -> image paths."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            paths.append(p)
        elif any(ch in item for ch in "*?["):
            matches = (
                sorted(Path().glob(item))
                if not p.is_absolute()
                else sorted(Path(p.anchor).glob(str(p.relative_to(p.anchor))))
            )
            paths += [m for m in matches if m.is_file()]
        else:
            raise UserError(
                f"{item}: no such file or folder; pass image files, folders or glob patterns"
            )
    if not paths:
        raise UserError(
            "no images found in the given inputs; pass image files or folders of images"
        )
    return paths
