import math

import pytest
import torch
from torch import nn

from preresnet import UserError, build_model, get_model, list_models
from preresnet.models import MODEL_ARCHS, PreActBasicBlock, PreActBottleneck

# (registry name, paper name, parameters the papers give)
PAPER_MODELS = [
    ("preresnet20", "PreResNet-20", 0.27e6),
    ("preresnet56", "PreResNet-56", 0.85e6),
    ("preresnet110", "PreResNet-110", 1.7e6),
    ("preresnet164", "PreResNet-164", 1.7e6),
    ("preresnet1001", "PreResNet-1001", 10.2e6),
    ("wrn16_4", "WRN-16-4", 2.7e6),
    ("wrn28_10", "WRN-28-10", 36.5e6),
]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_paper_models():
    assert list_models() == [name for name, _, _ in PAPER_MODELS]


@pytest.mark.parametrize("name, paper, params", PAPER_MODELS)
def test_parameter_count_matches_paper(name, paper, params):
    with torch.device("meta"):  # counts without allocating WRN-28-10's weights
        model = get_model(name)
    assert model.paper_name == paper
    assert abs(count_parameters(model) - params) / params < 0.02


@pytest.mark.parametrize("type, depth, width, layers", [
    ("normal", 18, 1, 110), ("bottleneck", 18, 1, 164), ("wide", 2, 4, 16), ("wide", 4, 10, 28),
])
def test_layer_count_follows_the_papers(type, depth, width, layers):
    """He et al. count the stem, the convs of the residual branches and the classifier; the WRN
    names (6n+4) count two projection shortcuts on top, whether or not the first stage has one."""
    with torch.device("meta"):
        model = build_model(type, depth, width)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [m for m in convs if m.kernel_size == (1, 1) and m in {getattr(u, "shortcut", None) for u in model.modules()}]
    counted = len(convs) - len(shortcuts) + 1 + (2 if type == "wide" else 0)
    assert counted == layers


@pytest.mark.parametrize("type, depth, width, channels", [
    ("normal", 2, 1, (16, 32, 64)), ("bottleneck", 1, 1, (64, 128, 256)), ("wide", 1, 3, (48, 96, 192)),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_stage_shapes_and_logits(type, depth, width, channels, batch):
    torch.manual_seed(0)
    model = build_model(type, depth, width, num_classes=7)
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    logits = model(torch.randn(batch, 3, 32, 32))
    assert logits.shape == (batch, 7)
    assert shapes == {"layer1": (batch, channels[0], 32, 32), "layer2": (batch, channels[1], 16, 16),
                      "layer3": (batch, channels[2], 8, 8)}


def test_units_are_full_preactivation_with_projection_only_where_shapes_change():
    model = build_model("normal", 2)
    units = [u for u in model.modules() if isinstance(u, PreActBasicBlock)]
    assert len(units) == 6
    # identity everywhere but the first unit of stages 2 and 3, which downsample on their first 3x3 conv
    assert [u.shortcut is not None for u in units] == [False, False, True, False, True, False]
    assert [u.conv1.stride for u in units] == [(1, 1)] * 2 + [(2, 2), (1, 1)] * 2
    for unit in units:
        if unit.shortcut is not None:
            assert unit.shortcut.kernel_size == (1, 1) and unit.shortcut.bias is None
    bottleneck = build_model("bottleneck", 1)
    first = next(u for u in bottleneck.modules() if isinstance(u, PreActBottleneck))
    assert first.shortcut is not None and first.shortcut.stride == (1, 1)  # 16 -> 64 channels
    assert [u.conv2.stride for u in bottleneck.modules() if isinstance(u, PreActBottleneck)] == [(1, 1), (2, 2), (2, 2)]


def test_projection_shortcut_reads_the_preactivated_input():
    torch.manual_seed(0)
    unit = PreActBasicBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    preact = torch.relu(unit.bn1(x))
    branch = unit.conv2(torch.relu(unit.bn2(unit.conv1(preact))))
    torch.testing.assert_close(unit(x), branch + unit.shortcut(preact))
    identity = PreActBasicBlock(16, 16).eval()
    branch = identity.conv2(torch.relu(identity.bn2(identity.conv1(torch.relu(identity.bn1(x))))))
    torch.testing.assert_close(identity(x), branch + x)


def test_initialisation_he_fan_out_and_unit_batchnorm():
    torch.manual_seed(0)
    model = build_model("wide", 1, 4)
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3: enough weights for a tight estimate
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_dropout_sits_between_the_convs_of_wide_units():
    model = build_model("wide", 1, 2, dropout=0.3)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 3 and all(d.p == 0.3 for d in dropouts)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))


def test_get_model_passes_options():
    model = get_model("preresnet20", num_classes=100)
    assert model.fc.out_features == 100
    assert MODEL_ARCHS["wrn16_4"] == ("wide", 2, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(type="plain", depth=3), "unknown model type"),
    (dict(type="normal", depth=0), "depth"),
    (dict(type="normal", depth=2.5), "depth"),
    (dict(type="normal", depth=3, width=2), "width 2 is only for --type wide"),
    (dict(type="bottleneck", depth=3, width=4), "width 4 is only for --type wide"),
    (dict(type="wide", depth=2, width=0), "width"),
    (dict(type="normal", depth=3, dropout=0.3), "dropout"),
    (dict(type="wide", depth=2, width=4, dropout=1.0), "dropout"),
    (dict(type="normal", depth=3, num_classes=1), "num_classes"),
    (dict(type="wide", depth=1, width=2, dropout=0.3, fused=True), "do not apply dropout"),
])
def test_bad_arguments_raise_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_model(**kwargs)


def test_unknown_registry_name():
    with pytest.raises(UserError, match="unknown model 'resnet50'"):
        get_model("resnet50")


@pytest.mark.parametrize("type, width, first_reads", [("normal", 1, "activation"), ("wide", 1, "input")])
def test_first_unit_shortcut_follows_its_paper(type, width, first_reads):
    """He et al. (appendix): the activation after conv1 comes before the first unit splits, so its
    identity shortcut reads relu(bn(x)); later identity units, and Zagoruyko & Komodakis's, read x."""
    torch.manual_seed(0)
    model = build_model(type, 2, width).eval()
    x = torch.randn(2, 16, 8, 8)
    for index, unit in enumerate(model.layer1):
        with torch.no_grad():
            preact = torch.relu(unit.bn1(x))
            branch = unit.conv2(torch.relu(unit.bn2(unit.conv1(preact))))
            reads = "activation" if index == 0 and first_reads == "activation" else "input"
            expected = branch + (preact if reads == "activation" else x)
            torch.testing.assert_close(unit(x), expected)
            other = branch + (x if reads == "activation" else preact)
            assert (unit(x) - other).abs().max() > 1e-3  # the two readings are told apart
