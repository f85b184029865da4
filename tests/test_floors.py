"""bench.floors: the estimates on paper (meta device, a few seconds)."""

import pytest
import torch
from torch import nn

from bench import floors


def test_counting_matches_hand_count_for_one_conv():
    cin, cout, h, w = 5, 7, 6, 4
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False))
    flops, elements = floors.count_forward(model, torch.empty(1, cin, h, w, device="meta"))
    assert flops == 2 * cin * cout * 9 * h * w
    assert elements == cout * h * w


def test_counting_strided_conv_and_hooks_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 8, 1, bias=False))
    x = torch.empty(2, 3, 8, 8, device="meta")
    flops, elements = floors.count_forward(model, x)
    assert flops == 2 * 2 * (3 * 4 * 9 * 4 * 4 + 4 * 8 * 4 * 4)  # batch 2, 4x4 outputs
    assert elements == 2 * (4 * 4 * 4 + 8 * 4 * 4)
    assert all(not m._forward_hooks for m in model.modules())


def test_preresnet110_training_flops():
    assert floors.training_flops("preresnet110") == pytest.approx(1.5e9, rel=0.10)


def test_preresnet110_activation_bytes():
    assert floors.minimal_activation_bytes("preresnet110") == pytest.approx(10e6, rel=0.15)
    assert floors.minimal_activation_bytes("preresnet110", 4) == 2 * floors.minimal_activation_bytes("preresnet110")


def test_preresnet110_schedule_floor_on_h100():
    assert floors.default_epochs("preresnet110") == 164
    h100 = floors.DEVICES["H100 SXM"]
    seconds = floors.floor_seconds("preresnet110", 164, peak_flops=h100["peak_flops"], bandwidth=h100["bandwidth"])
    assert 15 < seconds < 60
    assert floors.floor_seconds("preresnet110") == pytest.approx(seconds)


def test_wide_networks_use_the_wrn_schedule_and_wider_costs_more():
    assert floors.default_epochs("wrn16_4") == 200
    assert floors.training_flops("wrn28_10") > floors.training_flops("wrn16_4")


def test_fraction_of_floor_is_one_at_the_floor():
    rate = floors.floor_images_per_second("preresnet110")
    assert floors.fraction_of_floor(rate, "preresnet110") == pytest.approx(1.0)
    assert floors.fraction_of_floor(rate / 4, "preresnet110", device="H100 SXM") == pytest.approx(0.25)
