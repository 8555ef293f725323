"""Recipes: small YAML files merged over `recipes/defaults.yaml`, overridable key by key."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cifarlab.config import schema
from cifarlab.core.errors import UserError

RECIPES = resources.files("cifarlab") / "recipes"
FREE_SECTIONS = ("model",)  # sections whose keys are model arguments, not checked against defaults


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def recipe_names() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in RECIPES.iterdir()
        if p.name.endswith(".yaml") and p.name != "defaults.yaml"
    )


def read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a YAML mapping of sections (model, data, train, ...)")
    return data


def defaults() -> dict:
    return read_yaml((RECIPES / "defaults.yaml").read_text(), "defaults.yaml")


def load_recipe(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> dict:
    """A recipe by name (see `cifarlab recipes`) or YAML path, merged over the defaults,
    with `overrides` ({'train.epochs': 3, ...}) applied last."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(
                f"recipe file {path} not found; pass an existing YAML file or a recipe name"
            )
        recipe = read_yaml(path.read_text(), str(path))
    elif str(name_or_path) in recipe_names():
        recipe = read_yaml((RECIPES / f"{name_or_path}.yaml").read_text(), f"{name_or_path}.yaml")
    else:
        raise UserError(
            f"unknown recipe {str(name_or_path)!r}; choose one of {', '.join(recipe_names())} or a .yaml file"
        )
    return resolve(recipe, overrides)


def resolve(recipe: dict, overrides: dict[str, Any] | None = None) -> dict:
    """Merge a (partial) recipe over the defaults, check its keys, apply overrides."""
    merged = defaults()
    _merge(merged, recipe, "")
    written = _schedules(merged)
    for key, value in (overrides or {}).items():
        if key.startswith("*phases."):  # a CLI flag: applies to every phase too
            for phase in merged["phases"]:
                phase[key.removeprefix("*phases.")] = value
        else:
            set_key(merged, key, value)
    _keep_warmup_share(merged, written)
    if not schema.PHASES.check(merged["phases"]):
        raise UserError(
            f"recipe key phases = {merged['phases']!r} is not allowed: use a list of mappings "
            "of `train` keys (fix the recipe)"
        )
    for i, phase in enumerate(merged["phases"]):
        unknown = set(phase) - set(merged["train"]) - {"name"}
        if unknown:
            raise UserError(
                f"phases[{i}] has unknown key(s) {sorted(unknown)}; use keys of `train`"
            )
    return schema.validate(merged)


def _schedules(recipe: dict) -> list[tuple[Any, Any]]:
    """(epochs, warmup_epochs) of each phase as written (a phase inherits `train`'s)."""
    train = recipe["train"]
    items = recipe["phases"] if isinstance(recipe["phases"], list) and recipe["phases"] else [{}]
    return [
        (p.get("epochs", train.get("epochs")), p.get("warmup_epochs", train.get("warmup_epochs")))
        if isinstance(p, dict)
        else (None, None)
        for p in items
    ]


def _keep_warmup_share(recipe: dict, written: list[tuple[Any, Any]]) -> None:
    """An override of a phase's epochs (`--epochs 3`) that leaves its warm-up alone keeps the
    warm-up's share of the schedule, as `--budget` does: `fast` warms up for 2.3 of 10 epochs,
    so 0.69 of 3 (not 2.3 of 3, 77% of the run). Setting warmup_epochs too pins it."""
    now = _schedules(recipe)
    if len(now) != len(written):
        return
    for i, ((epochs, warmup), (new_epochs, new_warmup)) in enumerate(
        zip(written, now, strict=True)
    ):
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool)
            for v in (epochs, warmup, new_epochs)
        )
        if not numbers or epochs <= 0 or new_epochs <= 0:
            continue  # nothing to scale (a bad value is the schema's to report)
        if new_epochs != epochs and warmup and new_warmup == warmup:
            section = recipe["phases"][i] if recipe["phases"] else recipe["train"]
            section["warmup_epochs"] = round(warmup * new_epochs / epochs, 3)


def _merge(base: dict, update: dict, prefix: str) -> None:
    for key, value in update.items():
        where = f"{prefix}{key}"
        if key not in base and prefix.rstrip(".") not in FREE_SECTIONS:
            raise UserError(f"unknown recipe key {where!r}; see `cifarlab recipes --show defaults`")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value, f"{where}.")
        else:
            base[key] = copy.deepcopy(value)


def set_key(recipe: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` (or `phases.1.lr`) in a resolved recipe, checking the key exists."""
    parts = dotted.split(".")
    node: Any = recipe
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    section = parts[0] if len(parts) > 1 else ""
    if isinstance(node, list):
        raise UserError(f"cannot set {dotted!r}: name a key inside the list item")
    if last not in node and section not in FREE_SECTIONS and not (section == "phases"):
        raise UserError(f"unknown recipe key {dotted!r}; see `cifarlab recipes --show defaults`")
    node[last] = value


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise UserError(f"{where!r}: index out of range (the list has {len(node)} items)")
        return node[int(part)]
    if not isinstance(node, dict) or part not in node:
        raise UserError(f"unknown recipe key {where!r}; see `cifarlab recipes --show defaults`")
    return node[part]


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); values are parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects KEY=VALUE (e.g. train.lr=3e-4), got {text!r}")
    try:
        return key.strip(), yaml.load(value, Loader=_Loader)
    except yaml.YAMLError:
        return key.strip(), value


@dataclass(frozen=True)
class Phase:
    """One phase of training, typed: the recipe's `train` section overridden by a `phases`
    entry (see recipes/defaults.yaml for what each key means). Built by `phases(recipe)`; the
    recipe (a mapping that `schema` has validated) stays the one thing written to config.yaml."""

    name: str
    epochs: float
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    muon_lr: float
    muon_momentum: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    lr_start: float
    lr_end: float
    label_smoothing: float
    early_stopping: int
    freeze: str
    feature_cache: bool
    feature_views: int
    layer_decay: float | None
    weight_decay_scope: str
    ema: float
    lookahead: float
    eval_tta: int
    accumulate: int

    @classmethod
    def from_dict(cls, d: dict) -> Phase:
        cast = {"float": float, "int": int, "bool": bool, "str": str}
        kw = {}
        for f in fields(cls):
            value = d[f.name]
            kind = str(f.type).split(" ")[0]
            kw[f.name] = None if value is None and "None" in str(f.type) else cast[kind](value)
        return cls(**kw)


def phases(recipe: dict) -> list[Phase]:
    """The training phases: `train` alone, or `train` overridden by each entry of `phases`."""
    if not recipe["phases"]:
        return [Phase.from_dict({**recipe["train"], "name": "train"})]
    return [
        Phase.from_dict({**recipe["train"], "name": f"phase{i + 1}", **p})
        for i, p in enumerate(recipe["phases"])
    ]


def with_phase_keys(recipe: dict, phase: int, **values) -> dict:
    """A copy of the recipe with schedule keys (`epochs`, `warmup_epochs`) of phase `phase`
    set: in `phases[phase]`, or in `train` for a single-phase recipe."""
    new = copy.deepcopy(recipe)
    (new["phases"][phase] if new["phases"] else new["train"]).update(values)
    return new


DECIDED = ("precision", "memory_format", "threads")  # `auto` here is decided by the run


def same_settings(saved: dict, wanted: dict) -> bool:
    """Whether a run's saved recipe is the wanted one; an `auto` of `DECIDED` matches the value
    the run decided on."""
    wanted = {**wanted, **{k: saved.get(k) for k in DECIDED if wanted.get(k) == "auto"}}
    return saved == wanted


def dump(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)
