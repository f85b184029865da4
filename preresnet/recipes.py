"""The papers' training recipes as named presets; every field can be overridden from train.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError
from .loaders import CROP_PADDINGS
from .wording import counted


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
    # how the 4-pixel border of the random crop is filled: "zeros" (the mean colour: normalise, then
    # pad, as fb.resnet.torch does) or "reflect" (the image mirrored at its edge, as Zagoruyko &
    # Komodakis do); the default keeps what the checkpoints written before this field trained with
    crop_padding: str = "zeros"



RECIPES: dict[str, Recipe] = {
    # He et al. 2016, "Identity Mappings in Deep Residual Networks", section 4 and appendix:
    # lr 0.1 divided by 10 at 32k and 48k iterations (epochs 81 and 122 at batch 128), 64k in all;
    # lr 0.01 until training error falls below 80%, about 400 iterations.
    "paper": Recipe(
        epochs=164, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
        milestones=(81, 122), lr_decay=0.1, warmup_iters=400, warmup_lr=0.01, dropout=0.0,
    ),
    # Zagoruyko & Komodakis 2016, "Wide Residual Networks", section 3, and their code
    # (scripts/train_cifar.sh, train.lua): Nesterov momentum 0.9, weight decay 5e-4, lr 0.1
    # multiplied by 0.2 "at 60, 120 and 160 epochs", 200 epochs, batch 128, crops padded by
    # reflection. Their train.lua counts epochs from 1 and multiplies the lr at the start of its
    # epochs 60, 120 and 160 (their log: epoch 60 trains at 0.02), after 59, 119 and 159 epochs:
    # milestones 59, 119, 159 here. Dropout 0.3 between the convolutions is their optional variant
    # (--dropout 0.3); the figure this project targets (5.02%, WRN-16-4) is without it.
    "wrn": Recipe(
        epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
        milestones=(59, 119, 159), lr_decay=0.2, warmup_iters=0, warmup_lr=0.0, dropout=0.0,
        crop_padding="reflect",
    ),
    # Fine-tuning from weights (train.py --init, unless --recipe names another): a tenth of the
    # from-scratch lr and no warm-up, so that the first steps do not undo the weights (the paper
    # recipe's lr of 0.1 took PreResNet-20's DEFAULT from 11.8% to 31.2% test error in its first
    # epochs, docs/training.md), and a short schedule that divides the lr by 10 after two thirds;
    # momentum, weight decay and crop padding of the paper recipe.
    "finetune": Recipe(
        epochs=15, batch_size=128, lr=0.01, momentum=0.9, nesterov=False, weight_decay=1e-4,
        milestones=(10,), lr_decay=0.1, warmup_iters=0, warmup_lr=0.0, dropout=0.0,
    ),
}

DEFAULT_RECIPE = {"normal": "paper", "bottleneck": "paper", "wide": "wrn"}
FINETUNE_RECIPE = "finetune"  # a run started from weights (--init) without --recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve_recipe(name: str, **overrides) -> Recipe:
    """The named recipe with the given fields replaced (None means keep the recipe's value), for a
    new run (a resumed run keeps the recipe its checkpoint holds).

    When `epochs` changes, the milestones (unless `milestones` is given) and the warm-up (unless
    `warmup_iters` is given) keep their place in the schedule: scaled by new/old epochs and rounded,
    each milestone to at least epoch 1 and a warm-up to at least one step, so that a shortened run
    still leaves its warm-up early and decays its lr. A milestone after the last epoch would never
    take effect: it is refused (one at the last epoch is kept: it decays the lr of a run extended
    with --resume --epochs).
    """
    recipe = get_recipe(name)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    unknown = set(overrides) - {field.name for field in dataclasses.fields(Recipe)}
    if unknown:
        raise TypeError(f"not recipe fields: {sorted(unknown)}")
    if "epochs" in overrides:
        scale = overrides["epochs"] / recipe.epochs
        if "milestones" not in overrides:
            overrides["milestones"] = tuple(sorted({max(1, round(m * scale)) for m in recipe.milestones}))
        if "warmup_iters" not in overrides and recipe.warmup_iters:
            overrides["warmup_iters"] = max(1, round(recipe.warmup_iters * scale))
    resolved = dataclasses.replace(recipe, **overrides)
    check_recipe(resolved)
    late = late_milestones(resolved)
    if late:
        raise UserError(f"milestone {late[0]} is after the last epoch ({resolved.epochs}): it would never lower the "
                        f"lr; give --milestones up to {resolved.epochs}, or more --epochs")
    return resolved


def late_milestones(recipe: Recipe) -> list[int]:
    """The milestones after the last epoch: they would never lower the lr (one at the last epoch is
    kept: it decays the lr of a run extended with --resume --epochs)."""
    return [m for m in recipe.milestones if m > recipe.epochs]


def resumed_recipe(recipe: Recipe, epochs: int, epochs_done: int, steps_per_epoch: int | None) -> Recipe:
    """The recipe of a run resumed after epochs_done epochs with --epochs `epochs`: its own
    milestones and warm-up (nothing is scaled again), checked as a new run's schedule is. A
    longer run keeps what it has (a run saved before the warm-up scaled continues with its
    warm-up); a run that would train no epoch, or whose milestones or warm-up would fall past its
    new end, is refused. steps_per_epoch: None where the checkpoint cannot tell (no epoch done)."""
    resumed = dataclasses.replace(recipe, epochs=epochs)
    check_recipe(resumed)
    if epochs == recipe.epochs:
        return resumed
    if epochs <= epochs_done:
        raise UserError(f"--resume --epochs {epochs}: the run has trained {counted(epochs_done, 'epoch')} of its "
                        f"{recipe.epochs}, so it would train none and end inconsistent with its checkpoint; give more "
                        f"than {epochs_done} to extend it")
    late = late_milestones(resumed)
    if late:
        raise UserError(f"--resume --epochs {epochs}: the run's milestone {late[0]} is after the last epoch, so its lr "
                        f"would never be lowered there (a resumed run keeps its milestones); give --epochs {late[-1]} or "
                        f"more, or start a new run with --milestones")
    if epochs < recipe.epochs and steps_per_epoch:
        check_schedule(resumed, steps_per_epoch)
    return resumed


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
    if recipe.crop_padding not in CROP_PADDINGS:
        raise UserError(f"unknown crop padding {recipe.crop_padding!r}: choose one of {', '.join(CROP_PADDINGS)}")
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


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimizer steps of an epoch: the last incomplete batch is dropped (preresnet.loaders.plan_epoch)."""
    if batch_size > train_images:
        raise UserError(f"batch size {batch_size} is more than the {train_images} training images: an epoch would "
                        f"have no step; give a smaller --batch-size")
    return train_images // batch_size


def schedule_phases(recipe: Recipe, steps_per_epoch: int) -> list[tuple[float, int, int, bool]]:
    """The run's stretches of steps at one lr, as learning_rate gives them: (lr, first step, end step
    (exclusive), whether it is the warm-up), steps counted from 0 over the run."""
    total = recipe.epochs * steps_per_epoch
    bounds = sorted({0, min(recipe.warmup_iters, total), total,
                     *(m * steps_per_epoch for m in recipe.milestones if m * steps_per_epoch < total)})
    phases: list[tuple[float, int, int, bool]] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        lr, warmup = learning_rate(recipe, start // steps_per_epoch, start), start < recipe.warmup_iters
        if phases and phases[-1][0] == lr and phases[-1][3] == warmup:  # a milestone inside the warm-up
            phases[-1] = (lr, phases[-1][1], end, warmup)
        else:
            phases.append((lr, start, end, warmup))
    return phases


def describe_schedule(recipe: Recipe, steps_per_epoch: int) -> str:
    """The lr of every stretch of the run and its steps: "0.01 for 400 steps (warm-up), 0.1 to epoch
    81 (31190 steps), ..., 0.001 to epoch 164 (16380 steps); 390 steps an epoch, 63960 in all"."""
    parts = [f"{lr:g} for {counted(end - start, 'step')} (warm-up)" if warmup else
             f"{lr:g} to epoch {end // steps_per_epoch} ({counted(end - start, 'step')})"
             for lr, start, end, warmup in schedule_phases(recipe, steps_per_epoch)]
    return f"{', '.join(parts)}; {counted(steps_per_epoch, 'step')} an epoch, {recipe.epochs * steps_per_epoch} in all"


def check_schedule(recipe: Recipe, steps_per_epoch: int) -> None:
    """Refuse a new run's schedule that cannot work: a warm-up as long as the whole run."""
    total = recipe.epochs * steps_per_epoch
    if recipe.warmup_iters and recipe.warmup_iters >= total:
        raise UserError(f"the warm-up of {counted(recipe.warmup_iters, 'step')} lasts the whole run "
                        f"({counted(total, 'step')}, {steps_per_epoch} an epoch), so the lr would never leave "
                        f"--warmup-lr {recipe.warmup_lr:g}; give --warmup-iters below {total} (0: none), or more "
                        f"--epochs")
