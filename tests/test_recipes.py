import dataclasses
import re
from pathlib import Path

import pytest
import torch

from preresnet import UserError, get_model
from preresnet.recipes import (RECIPES, check_schedule, describe_schedule, learning_rate, resolve_recipe,
                               resumed_recipe, schedule_phases, steps_per_epoch)

from preresnet.steps import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
# a schedule line as train.py prints it: phases, then "; S steps an epoch, T in all"
PHASE = re.compile(r"(\S+) (?:for (\d+) steps? \(warm-up\)|to epoch (\d+) \((\d+) steps?\))")


def parse_schedule(line: str) -> tuple[list[tuple], int, int]:
    """The numbers of a schedule line: each phase as (lr, None, steps) for the warm-up or (lr, last
    epoch, steps), then the steps an epoch and in all. Anything else in the line fails to parse."""
    phases, tail = line.rsplit("; ", 1)
    ending = re.fullmatch(r"(\d+) steps? an epoch, (\d+) in all", tail)
    assert ending, line
    parsed = []
    for part in phases.split(", "):
        match = PHASE.fullmatch(part)
        assert match, (part, line)
        lr, warmup, epoch, steps = match.groups()
        parsed.append((float(lr), None, int(warmup)) if warmup else (float(lr), int(epoch), int(steps)))
    return parsed, int(ending.group(1)), int(ending.group(2))


def test_paper_recipe_warmup_then_steps():
    paper = RECIPES["paper"]
    assert (paper.epochs, paper.batch_size, paper.momentum, paper.nesterov, paper.weight_decay) == (164, 128, 0.9, False, 1e-4)
    assert learning_rate(paper, 0, 0) == 0.01
    assert learning_rate(paper, 1, 399) == 0.01
    assert learning_rate(paper, 1, 400) == 0.1
    assert learning_rate(paper, 80, 40_000) == 0.1
    assert learning_rate(paper, 81, 40_000) == pytest.approx(0.01)
    assert learning_rate(paper, 121, 60_000) == pytest.approx(0.01)
    assert learning_rate(paper, 122, 60_000) == pytest.approx(0.001)


def test_wrn_recipe_as_the_authors_trained_it():
    """Zagoruyko & Komodakis's log of WRN-40-4 (wide-residual-networks logs/wide-resnet_1121914561,
    its epochs counted from 1): epochs 1-59 at lr 0.1, 60-119 at 0.02, 120-159 at 0.004, 160-200 at
    0.0008; scripts/train_cifar.sh: Nesterov, reflection padding; train.lua: weight decay 5e-4."""
    wrn = RECIPES["wrn"]
    assert (wrn.epochs, wrn.batch_size, wrn.momentum, wrn.nesterov, wrn.weight_decay) == (200, 128, 0.9, True, 5e-4)
    assert (wrn.crop_padding, wrn.dropout, wrn.warmup_iters) == ("reflect", 0.0, 0)
    logged = {1: 0.1, 59: 0.1, 60: 0.02, 119: 0.02, 120: 0.004, 159: 0.004, 160: 0.0008, 200: 0.0008}
    rates = {epoch: learning_rate(wrn, epoch - 1, 10_000) for epoch in logged}
    assert rates == pytest.approx(logged)


def test_paper_recipe_pads_crops_with_zeros():
    """fb.resnet.torch (datasets/cifar10.lua): ColorNormalize, then RandomCrop(32, 4), whose border is zeros."""
    assert RECIPES["paper"].crop_padding == "zeros"
    with pytest.raises(UserError, match="unknown crop padding 'edge'"):
        resolve_recipe("paper", crop_padding="edge")


def test_the_finetune_recipe_starts_low_without_a_warm_up():
    """A tenth of the from-scratch lr from the first step (no warm-up: the weights are trained), a
    short schedule whose lr falls tenfold after two thirds; scaled with --epochs as any recipe."""
    finetune = RECIPES["finetune"]
    assert (finetune.epochs, finetune.lr, finetune.warmup_iters, finetune.milestones, finetune.lr_decay) == \
        (15, RECIPES["paper"].lr / 10, 0, (10,), 0.1)
    assert [learning_rate(finetune, epoch, 390 * epoch) for epoch in (0, 9, 10, 14)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001])
    assert resolve_recipe("finetune", epochs=30).milestones == (20,)
    assert resolve_recipe("finetune", epochs=3).milestones == (2,) and resolve_recipe("finetune", epochs=3).warmup_iters == 0


def test_overrides_replace_fields_and_none_keeps_them():
    recipe = resolve_recipe("paper", lr=0.05, weight_decay=None, milestones=(3, 5), epochs=6)
    assert (recipe.lr, recipe.weight_decay, recipe.milestones, recipe.epochs) == (0.05, 1e-4, (3, 5), 6)


def test_shorter_schedule_scales_milestones():
    assert resolve_recipe("paper", epochs=10).milestones == (5, 7)
    assert resolve_recipe("wrn", epochs=20).milestones == (6, 12, 16)  # 59, 119, 159 of 200, scaled and rounded


def test_the_warm_up_scales_with_the_epochs_as_the_milestones_do():
    """400 of 164 epochs' steps: 2 epochs warm up for 5 steps, not for most of the run."""
    warmups = [resolve_recipe("paper", epochs=epochs).warmup_iters for epochs in (1, 2, 10, 164, 328)]
    assert warmups == [2, 5, 24, 400, 800]
    assert resolve_recipe("paper").warmup_iters == 400  # the full recipe is the paper's
    assert resolve_recipe("paper", epochs=2, warmup_iters=400).warmup_iters == 400  # given: kept
    assert resolve_recipe("paper", epochs=2, milestones=(1,)).warmup_iters == 5  # scaled on its own
    assert resolve_recipe("wrn", epochs=2).warmup_iters == 0


def test_the_schedule_gives_the_steps_at_each_lr():
    """The line's numbers worked by hand from the paper's schedule (a 400-step warm-up at 0.01, then
    0.1, divided by 10 at epochs 81 and 122 of 164) on CIFAR-10's 50,000 images at batch 128."""
    per_epoch = 50_000 // 128  # 390: the last, incomplete batch dropped
    assert parse_schedule(describe_schedule(RECIPES["paper"], per_epoch)) == (
        [(0.01, None, 400), (0.1, 81, 81 * per_epoch - 400), (0.01, 122, (122 - 81) * per_epoch),
         (0.001, 164, (164 - 122) * per_epoch)], per_epoch, 164 * per_epoch)
    # 2 epochs: the warm-up scaled to round(400 x 2/164) = 5 steps, both milestones to epoch 1
    assert parse_schedule(describe_schedule(resolve_recipe("paper", epochs=2), per_epoch)) == (
        [(0.01, None, 5), (0.1, 1, per_epoch - 5), (0.01, 2, per_epoch)], per_epoch, 2 * per_epoch)
    # a warm-up past both milestones (epochs 1 and 2 of 3, at 12 steps an epoch): 0.1 and 0.01 never
    # come, and the 3 x 12 - 30 steps left run at 0.001
    assert parse_schedule(describe_schedule(resolve_recipe("paper", epochs=3, warmup_iters=30), 12)) == (
        [(0.01, None, 30), (0.001, 3, 3 * 12 - 30)], 12, 36)
    assert describe_schedule(resolve_recipe("paper", epochs=1), 1).startswith("0.01 for 1 step (warm-up)")


@pytest.mark.parametrize("recipe", [RECIPES["wrn"], resolve_recipe("paper", epochs=5),
                                    resolve_recipe("paper", epochs=4, warmup_iters=13, milestones=(1, 3, 4)),
                                    resolve_recipe("paper", epochs=3, lr_decay=1.0)])
def test_the_schedule_phases_are_the_steps_learning_rate_gives(recipe):
    per_epoch = 7
    rates = [learning_rate(recipe, step // per_epoch, step) for step in range(recipe.epochs * per_epoch)]
    phases = schedule_phases(recipe, per_epoch)
    assert [step for _, start, end, _ in phases for step in range(start, end)] == list(range(len(rates)))
    assert all(rates[step] == lr for lr, start, end, _ in phases for step in range(start, end))


def test_the_training_page_prints_the_schedule_the_code_runs():
    """docs/training.md's schedule line is the paper recipe's on CIFAR-10's 50,000 training images at
    batch 128: 390 steps an epoch (the last, incomplete batch dropped), 63,960 in all."""
    line = re.search(r"^lr schedule: (.*)$", (ROOT / "docs" / "training.md").read_text(), flags=re.MULTILINE).group(1)
    assert line == describe_schedule(RECIPES["paper"], steps_per_epoch(50_000, 128))
    assert "390 steps an epoch, 63960 in all" in line  # 50,000 // 128 = 390; 390 x 164 = 63,960


def test_a_resumed_run_changes_its_epochs_as_a_new_run_may():
    """--resume --epochs: a longer run keeps its milestones and warm-up (even a warm-up longer than the
    run, saved before warm-ups scaled); a run that would train no epoch, or whose milestone would
    fall after its new end, is refused; a shortened one is checked as a new run's schedule is."""
    paper = RECIPES["paper"]
    assert resumed_recipe(paper, 200, 46, 390) == dataclasses.replace(paper, epochs=200)
    assert resumed_recipe(paper, 164, 164, 390) == paper  # unchanged: nothing to check
    assert resumed_recipe(paper, 122, 46, 390).milestones == (81, 122)  # the last epoch's milestone is kept
    old = resolve_recipe("paper", epochs=1, warmup_iters=400)
    assert resumed_recipe(old, 2, 1, 12).warmup_iters == 400
    with pytest.raises(UserError, match=r"milestone 81 .*--epochs 122 or more"):
        resumed_recipe(paper, 50, 46, 390)
    with pytest.raises(UserError, match=r"--resume --epochs 5: .*trained 12 epochs.*train none"):
        resumed_recipe(resolve_recipe("paper", epochs=12), 5, 12, 390)
    with pytest.raises(UserError, match="would train none"):
        resumed_recipe(resolve_recipe("paper", epochs=12), 8, 8, 390)
    shortened = resolve_recipe("paper", epochs=12, warmup_iters=300, milestones=(2,))
    with pytest.raises(UserError, match=r"warm-up of 300 steps lasts the whole run \(200 steps"):
        resumed_recipe(shortened, 2, 1, 100)
    with pytest.raises(UserError, match="epochs must be at least 1"):
        resumed_recipe(paper, 0, 0, None)


def test_a_schedule_that_cannot_work_is_refused():
    with pytest.raises(UserError, match=r"the warm-up of 2 steps lasts the whole run \(2 steps, 2 an epoch\)"):
        check_schedule(resolve_recipe("paper", epochs=1), 2)
    check_schedule(resolve_recipe("paper", epochs=1), 3)
    check_schedule(resolve_recipe("paper", epochs=1, warmup_iters=0), 1)
    with pytest.raises(UserError, match=r"milestone 4 is after the last epoch \(3\): it would never lower the lr"):
        resolve_recipe("paper", epochs=3, milestones=(1, 4))
    assert resolve_recipe("paper", epochs=3, milestones=(3,)).milestones == (3,)  # decays a run extended later
    assert resolve_recipe("wrn", epochs=2).milestones == (1, 2)  # scaled: never after the last epoch
    assert steps_per_epoch(192, 16) == 12 and steps_per_epoch(193, 16) == 12  # the last partial batch is dropped
    with pytest.raises(UserError, match="batch size 193 is more than the 192 training images"):
        steps_per_epoch(192, 193)


@pytest.mark.parametrize("overrides, message", [
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch size"),
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(milestones=(5, 3)), "milestones"),
    (dict(momentum=0.0, nesterov=True), "Nesterov"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_recipe("paper", **overrides)


def test_unknown_recipe():
    with pytest.raises(UserError, match="unknown recipe"):
        resolve_recipe("sgdr")


@pytest.mark.parametrize("name", ["paper", "wrn"])
def test_weight_decay_reaches_every_parameter(name):
    """Both authors' codes decay every parameter, BatchNorm's and the classifier's bias included
    (Torch's optim.sgd over model:getParameters(); the PyTorch port's SGD over all params)."""
    recipe = RECIPES[name]
    model = get_model("wrn16_4" if name == "wrn" else "preresnet20")
    optimizer = make_optimizer(model, recipe, torch.device("cpu"))
    [group] = optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    assert (group["weight_decay"], group["momentum"], group["nesterov"], group["dampening"]) == (
        recipe.weight_decay, 0.9, recipe.nesterov, 0)
