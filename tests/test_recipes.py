import pytest

from preresnet import UserError
from preresnet.recipes import RECIPES, learning_rate, resolve_recipe


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


def test_wrn_recipe_steps_by_a_fifth():
    wrn = RECIPES["wrn"]
    assert (wrn.epochs, wrn.nesterov, wrn.weight_decay) == (200, True, 5e-4)
    rates = [learning_rate(wrn, epoch, 10_000) for epoch in (0, 59, 60, 119, 120, 160, 199)]
    assert rates == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008])


def test_overrides_replace_fields_and_none_keeps_them():
    recipe = resolve_recipe("paper", lr=0.05, weight_decay=None, milestones=(3, 5), epochs=6)
    assert (recipe.lr, recipe.weight_decay, recipe.milestones, recipe.epochs) == (0.05, 1e-4, (3, 5), 6)


def test_shorter_schedule_scales_milestones():
    assert resolve_recipe("paper", epochs=10).milestones == (5, 7)
    assert resolve_recipe("wrn", epochs=20).milestones == (6, 12, 16)


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
