"""Use a trained model: `Predictor` wraps a checkpoint with its preprocessing and class names."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab import checkpoint
from cifarlab.data.image import IMAGE_EXTENSIONS, read_image
from cifarlab.errors import UserError
from cifarlab.loader import prepare


class Predictor:
    """A model ready for inference. `probs` takes uint8 images (N, H, W, 3) of any size."""

    def __init__(self, model: torch.nn.Module, info: dict, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.classes: list[str] = list(info["classes"])
        self.preprocess: dict = info["preprocess"]
        self.info = info
        self.mean = torch.tensor(self.preprocess["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.preprocess["std"], device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Predictor:
        model, info = checkpoint.load_model(path)
        return cls(model, info, device)

    @property
    def image_size(self) -> int:
        return int(self.preprocess["image_size"])

    @property
    def metadata(self) -> dict:
        return {
            "model": self.info["model"].get("arch", self.info["model"]["name"]),
            "classes": self.classes,
            "image_size": self.image_size,
            "input_size": int(self.preprocess["input_size"]),
            "mean": list(self.preprocess["mean"]),
            "std": list(self.preprocess["std"]),
            "version": self.info.get("cifarlab_version"),
        }

    @torch.no_grad()
    def probs(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255)
            if x.shape[-1] != self.image_size:  # as in training: stored size first, then input size
                x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
            x = prepare(x, int(self.preprocess["input_size"]), self.mean, self.std)
            out.append(F.softmax(self.model(x).float(), dim=1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[dict]]:
        k = min(k, len(self.classes))
        order = np.argsort(-probs, axis=1)[:, :k]
        return [
            [{"label": self.classes[j], "probability": float(p[j])} for j in row]
            for p, row in zip(probs, order, strict=True)
        ]

    def predict_files(self, paths: Iterable[Path], k: int = 5, batch_size: int = 64):
        """Yield {"path", "top"} per readable image and {"path", "error"} per unreadable one."""
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

    def _flush(self, batch, k):
        tops = self.top_k(self.probs(np.stack([img for _, img in batch])), k)
        for (path, _), top in zip(batch, tops, strict=True):
            yield {"path": str(path), "top": top}


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
