"""Every recipe key's type and valid range, checked once on the resolved recipe, before any data
is read or any file is written: a wrong value is one line naming the key, the value and what is
allowed. (The `model` section holds the model's own arguments; its builder checks them.)"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cifarlab.core.errors import UserError


@dataclass(frozen=True)
class Rule:
    """A check (value -> ok) and the words that say what it allows."""

    check: Callable[[Any], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(lo: int, hi: int | None = None) -> Rule:
    words = f"a whole number >= {lo}" + (f" and <= {hi}" if hi is not None else "")
    return Rule(lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi), words)


def number(lo: float, hi: float | None = None, lo_open=False, hi_open=False) -> Rule:
    def ok(v):
        if not _is_num(v) or v != v:  # NaN
            return False
        above = v > lo if lo_open else v >= lo
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    low = f"> {lo:g}" if lo_open else f">= {lo:g}"
    high = "" if hi is None else (f" and < {hi:g}" if hi_open else f" and <= {hi:g}")
    return Rule(ok, f"a number {low}{high}")


def one_of(*values) -> Rule:
    words = ", ".join("true" if v is True else "false" if v is False else str(v) for v in values)
    return Rule(lambda v: any(v is x if isinstance(x, bool) else v == x for x in values), words)


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.check(v), f"null or {rule.allowed}")


def either(a: Rule, b: Rule) -> Rule:
    return Rule(lambda v: a.check(v) or b.check(v), f"{a.allowed}, or {b.allowed}")


TEXT = Rule(lambda v: isinstance(v, str), "text")
BOOL = one_of(True, False)
FREEZE = Rule(
    lambda v: isinstance(v, str) and bool(re.fullmatch(r"none|head|conv-only|last-\d+", v)),
    "none, head, conv-only or last-N",
)
SIZES = Rule(
    lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v),
    "a list of mappings of recipe keys (as --set) to values",
)
ACCURACY = Rule(
    lambda v: (
        isinstance(v, list)
        and all(
            isinstance(t, dict)
            and all(_is_num(k) and k > 0 and _is_num(a) and 0 <= a <= 1 for k, a in t.items())
            for t in v
        )
    ),
    "a list (one per size) of {epochs: accuracy between 0 and 1}",
)
PHASES = Rule(lambda v: isinstance(v, list) and all(isinstance(p, dict) for p in v), "a list")

TRAIN = {
    "epochs": number(0, lo_open=True),
    "batch_size": integer(1),
    "optimizer": one_of("adam", "adamw", "sgd", "muon"),
    "lr": number(0, lo_open=True),
    "momentum": number(0, 1, hi_open=True),
    "nesterov": BOOL,
    "muon_lr": number(0, lo_open=True),
    "muon_momentum": number(0, 1, hi_open=True),
    "weight_decay": number(0),
    "schedule": one_of("constant", "cosine", "linear", "onecycle"),
    "warmup_epochs": number(0),
    "lr_start": number(0, 1),
    "lr_end": number(0, 1),
    "label_smoothing": number(0, 1, hi_open=True),
    "early_stopping": integer(0),
    "freeze": FREEZE,
    "feature_cache": BOOL,
    "feature_views": integer(1),
    "layer_decay": optional(number(0, 1, lo_open=True)),
    "weight_decay_scope": one_of("all", "weights", "head"),
    "ema": number(0, 1, hi_open=True),
    "lookahead": number(0, 1, hi_open=True),
    "eval_tta": either(integer(0, 2), BOOL),  # true = 1
    "accumulate": integer(1),
}

RULES: dict[str, Rule] = {
    "name": TEXT,
    "summary": TEXT,
    "description": TEXT,
    "seed": integer(0),
    "device": one_of("auto", "cpu", "cuda"),
    "threads": either(one_of("auto"), integer(1)),
    "precision": one_of("auto", "fp32", "bf16"),
    "memory_format": one_of("auto", "channels_last", "contiguous"),
    "compile": one_of("auto", True, False),
    "sync_bn": BOOL,
    "data.source": optional(TEXT),
    "data.test": optional(TEXT),
    "data.image_size": integer(8, 1024),
    "data.limit": optional(integer(1)),
    "data.val_fraction": number(0, 0.9, lo_open=True),
    "data.split_seed": optional(integer(0)),
    "data.skip_bad": BOOL,
    "augment.flip": one_of(True, False, "alternate"),
    "augment.rotate": number(0, 180),
    "augment.zoom": number(0, 1, hi_open=True),
    "augment.translate": integer(0),
    "augment.brightness": number(0, 1),
    "augment.contrast": number(0, 1),
    "augment.cutout": integer(0),
    "augment.mixup": number(0),
    "augment.cutmix": number(0),
    "augment.mix_prob": number(0, 1),
    **{f"train.{k}": rule for k, rule in TRAIN.items()},
    "distill.teacher": optional(TEXT),
    "distill.temperature": number(0, lo_open=True),
    "distill.weight": number(0, 1),
    "distill.cache": BOOL,
    "budget.sizes": SIZES,
    "budget.accuracy": ACCURACY,
    "budget.min_epochs": number(0),
    "phases": PHASES,
}


def _fail(key: str, value, allowed: str) -> None:
    shown = "null" if value is None else repr(value)
    raise UserError(
        f"recipe key {key} = {shown} is not allowed: use {allowed} "
        f"(fix the recipe or --set {key}=VALUE)"
    )


def validate(recipe: dict) -> dict:
    """Check every key of a resolved recipe (and of each phase) against its rule and the
    rules that join keys; returns the recipe."""
    for key, rule in RULES.items():
        node = recipe
        for part in key.split("."):
            node = node[part]
        if not rule.check(node):
            _fail(key, node, rule.allowed)
    for i, phase in enumerate(recipe["phases"]):
        for key, value in phase.items():
            if key == "name":
                if not isinstance(value, str):
                    _fail(f"phases.{i}.name", value, "text")
            elif key in TRAIN and not TRAIN[key].check(value):
                _fail(f"phases.{i}.{key}", value, TRAIN[key].allowed)
    size = recipe["data"]["image_size"]
    aug = recipe["augment"]
    if aug["cutout"] > size:
        _fail("augment.cutout", aug["cutout"], f"a whole number from 0 to the image size ({size})")
    if aug["translate"] >= size // 2:
        _fail("augment.translate", aug["translate"], f"a whole number below {size // 2}")
    changing = [
        k for k in ("rotate", "zoom", "brightness", "contrast", "mixup", "cutmix") if aug[k]
    ]
    if recipe["distill"]["cache"] and recipe["distill"]["teacher"] and changing:
        raise UserError(
            "distill.cache looks the teacher's logits up per image and flip, which "
            f"augment.{changing[0]} makes wrong: drop the cache or that augmentation"
        )
    sizes, table = recipe["budget"]["sizes"], recipe["budget"]["accuracy"]
    if table and len(table) != len(sizes):
        _fail(
            "budget.accuracy",
            f"{len(table)} tables",
            f"one table per size ({len(sizes)} sizes), or none",
        )
    return recipe
