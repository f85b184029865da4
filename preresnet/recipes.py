"""The papers' training recipes as named presets; every field can be overridden from train.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    milestones: tuple[int, ...]  # epochs (counted from 0) at whose start the lr is multiplied by lr_decay
    lr_decay: float
    warmup_iters: int  # the first warmup_iters optimizer steps use warmup_lr
    warmup_lr: float
    dropout: float


RECIPES: dict[str, Recipe] = {
    # He et al. 2016, "Identity Mappings in Deep Residual Networks", section 4 and appendix:
    # lr 0.1 divided by 10 at 32k and 48k iterations (epochs 81 and 122 at batch 128), 64k in all;
    # lr 0.01 until training error falls below 80%, about 400 iterations.
    "paper": Recipe(
        epochs=164, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
        milestones=(81, 122), lr_decay=0.1, warmup_iters=400, warmup_lr=0.01, dropout=0.0,
    ),
    # Zagoruyko & Komodakis 2016, "Wide Residual Networks", section 3: Nesterov momentum 0.9,
    # weight decay 5e-4, lr 0.1 multiplied by 0.2 at epochs 60, 120 and 160, 200 epochs, batch 128;
    # dropout 0.3 between the convolutions is their optional variant (--dropout 0.3).
    "wrn": Recipe(
        epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
        milestones=(60, 120, 160), lr_decay=0.2, warmup_iters=0, warmup_lr=0.0, dropout=0.0,
    ),
}

DEFAULT_RECIPE = {"normal": "paper", "bottleneck": "paper", "wide": "wrn"}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve_recipe(name: str, **overrides) -> Recipe:
    """The named recipe with the given fields replaced (None means keep the recipe's value).

    When `epochs` changes and `milestones` is not given, the milestones keep their place in the
    schedule (scaled by new/old epochs, rounded), so a shortened run still decays its lr.
    """
    recipe = get_recipe(name)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    unknown = set(overrides) - {field.name for field in dataclasses.fields(Recipe)}
    if unknown:
        raise TypeError(f"not recipe fields: {sorted(unknown)}")
    if "epochs" in overrides and "milestones" not in overrides:
        scale = overrides["epochs"] / recipe.epochs
        overrides["milestones"] = tuple(sorted({max(1, round(m * scale)) for m in recipe.milestones}))
    resolved = dataclasses.replace(recipe, **overrides)
    check_recipe(resolved)
    return resolved


def check_recipe(recipe: Recipe) -> None:
    if recipe.epochs < 1:
        raise UserError(f"epochs must be at least 1, got {recipe.epochs}")
    if recipe.batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {recipe.batch_size}")
    for name in ("lr", "weight_decay", "momentum", "warmup_lr", "lr_decay"):
        value = getattr(recipe, name)
        if not value >= 0:  # also rejects NaN
            raise UserError(f"{name.replace('_', ' ')} must be non-negative, got {value}")
    if recipe.warmup_iters < 0:
        raise UserError(f"warmup iterations must be non-negative, got {recipe.warmup_iters}")
    if recipe.nesterov and recipe.momentum == 0:
        raise UserError("Nesterov momentum needs a momentum above 0")
    if any(m < 1 for m in recipe.milestones) or list(recipe.milestones) != sorted(set(recipe.milestones)):
        raise UserError(f"milestones must be increasing positive epochs, got {list(recipe.milestones)}")


def learning_rate(recipe: Recipe, epoch: int, iteration: int) -> float:
    """The lr of the optimizer step `iteration` (counted from 0 over the run) in `epoch` (from 0)."""
    if iteration < recipe.warmup_iters:
        return recipe.warmup_lr
    decays = sum(1 for milestone in recipe.milestones if epoch >= milestone)
    return recipe.lr * recipe.lr_decay**decays
