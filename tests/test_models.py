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


# --- the networks against the authors' code, transcribed unit by unit ----------------------------
# Each function restates one of the authors' model files as the list of its convolutions in the
# order the file adds them (residual branch, then shortcut): (C_in, C_out, kernel, stride, padding,
# input size). A model's convs, recorded by forward hooks in module order, must be this list.


def he_bottleneck_convs(n: int) -> list[tuple[int, int, int, int, int, int]]:
    """KaimingHe/resnet-1k-layers, resnet-pre-act.lua (ResNet-164 for n=18): nStages {16, 64, 128,
    256}; bottleneck(nIn, nOut, stride): 1x1 nIn->nOut/4 at *stride*, 3x3 at 1, 1x1 ->nOut at 1,
    and a 1x1 projection at stride where nIn ~= nOut."""
    convs, size = [(3, 16, 3, 1, 1, 32)], 32
    for n_in, n_out, stride in ((16, 64, 1), (64, 128, 2), (128, 256, 2)):
        for unit in range(n):
            unit_in, unit_stride, inner = (n_in, stride, n_out // 4) if unit == 0 else (n_out, 1, n_out // 4)
            after = size // unit_stride
            convs += [(unit_in, inner, 1, unit_stride, 0, size), (inner, inner, 3, 1, 1, after),
                      (inner, n_out, 1, 1, 0, after)]
            if unit_in != n_out:
                convs.append((unit_in, n_out, 1, unit_stride, 0, size))
            size = after
    return convs


def basic_convs(n: int, widths: tuple[int, int, int]) -> list[tuple[int, int, int, int, int, int]]:
    """Two 3x3 convs a unit, the first at stride, and a 1x1 projection at stride where the channels
    change: Zagoruyko's wide_basic (wide-residual-networks models/wide-resnet.lua, nStages {16, 16k,
    32k, 64k}), and He et al.'s basic unit with projection shortcuts (the Lasagne original's
    residual_block; fb.resnet.torch's preresnet.lua with shortcutType B)."""
    convs, size, channels = [(3, 16, 3, 1, 1, 32)], 32, 16
    for width, stride in zip(widths, (1, 2, 2)):
        for unit in range(n):
            unit_stride = stride if unit == 0 else 1
            after = size // unit_stride
            convs += [(channels, width, 3, unit_stride, 1, size), (width, width, 3, 1, 1, after)]
            if channels != width:
                convs.append((channels, width, 1, unit_stride, 0, size))
            channels, size = width, after
    return convs


AUTHORS_CONVS = {
    "preresnet20": basic_convs(3, (16, 32, 64)),
    "preresnet110": basic_convs(18, (16, 32, 64)),
    "preresnet164": he_bottleneck_convs(18),
    "wrn16_4": basic_convs(2, (64, 128, 256)),
    "wrn28_10": basic_convs(4, (160, 320, 640)),
}


def recorded_convs(model: nn.Module) -> list[tuple[int, int, int, int, int, int]]:
    """Each conv's (C_in, C_out, kernel, stride, padding, input size) as a forward pass meets it,
    listed in module order (a unit's shortcut runs before its branch, but is added after it)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    seen = {}

    def record(conv, inputs, _output):
        seen[conv] = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                      inputs[0].shape[-1])

    hooks = [m.register_forward_hook(record) for m in convs]
    model(torch.empty(1, 3, 32, 32, device="meta"))
    for hook in hooks:
        hook.remove()
    return [seen[m] for m in convs]


def macs(convs) -> int:
    """Multiply-accumulates of the convs for one image: k*k*C_in*C_out per output pixel."""
    return sum(k * k * c_in * c_out * ((size + 2 * pad - k) // stride + 1) ** 2
               for c_in, c_out, k, stride, pad, size in convs)


@pytest.mark.parametrize("name", AUTHORS_CONVS)
def test_every_conv_is_the_authors(name):
    """Kernel, stride, padding, channels and input size of each conv, in order, as the authors'
    model file adds them; the bottleneck strides its first 1x1 conv, not its 3x3."""
    with torch.device("meta"):
        model = get_model(name)
    assert recorded_convs(model) == AUTHORS_CONVS[name]


def test_preresnet164_macs_as_he_et_al_structure_gives_them():
    """PreResNet-164's convs by He et al.'s structure, counted by hand. Stem: 3*3*3*16 at 32x32.
    Each stage: 17 units of 1x1 4c->c, 3x3 c->c, 1x1 c->4c, and a first unit that reads the previous
    stage's channels and adds a projection; in stages 2 and 3 its 1x1 reduce and projection stride
    2, so every conv of the stage runs on its output grid (16x16, then 8x8)."""
    def stage(pixels, c_in, c):
        return pixels * (17 * (4 * c * c + 9 * c * c + c * 4 * c) + (c_in * c + 9 * c * c + c * 4 * c + c_in * 4 * c))

    stage1, stage2, stage3 = stage(32 * 32, 16, 16), stage(16 * 16, 64, 32), stage(8 * 8, 128, 64)
    by_hand = 3 * 3 * 3 * 16 * 32 * 32 + stage1 + stage2 + stage3
    with torch.device("meta"):
        model = get_model("preresnet164")
    assert macs(recorded_convs(model)) == macs(he_bottleneck_convs(18)) == by_hand
    # striding the 3x3 instead (the unit's other reading) runs its first 1x1 at the full grid
    assert by_hand < macs([(c_in, c_out, k, 1 if k == 1 and c_out < c_in else s, p, size)
                           for c_in, c_out, k, s, p, size in he_bottleneck_convs(18)])


def test_initialisation_follows_each_family_s_code():
    """He et al. (resnet-pre-act.lua ConvInit, BNInit): convs normal with std sqrt(2 / (k*k*C_out)),
    BatchNorm scale 1. Zagoruyko & Komodakis (models/utils.lua MSRinit after their init fix, and
    model:reset() drawing Torch's BatchNormalization weight:uniform()): std sqrt(2 / (k*k*C_in)),
    BatchNorm scale uniform in [0, 1). Both: BatchNorm shift 0, classifier bias 0, classifier weight
    within +-1/sqrt(C_in) (Torch's Linear:reset)."""
    torch.manual_seed(0)
    checks = {"preresnet164": ("layer3", 0, "conv1", lambda c: c.out_channels), "wrn16_4": ("layer3", 0, "conv1",
                                                                                             lambda c: c.in_channels)}
    for name, (stage, unit, conv_name, fan_channels) in checks.items():
        model = get_model(name)
        conv = getattr(getattr(model, stage)[unit], conv_name)  # 512 -> 64 (1x1) / 128 -> 256 (3x3): fans differ
        assert conv.in_channels != conv.out_channels
        fan = fan_channels(conv) * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan), rel=0.05)
        scales = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
        shifts = torch.cat([m.bias.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
        assert torch.all(shifts == 0)
        if name == "preresnet164":
            assert torch.all(scales == 1)
        else:
            assert scales.min() >= 0 and scales.max() < 1 and scales.mean().item() == pytest.approx(0.5, abs=0.02)
        assert torch.all(model.fc.bias == 0)
        assert model.fc.weight.abs().max() <= 1 / math.sqrt(model.fc.in_features)
        assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_a_total_depth_is_refused_by_the_library_as_by_the_command_line():
    with pytest.raises(UserError, match=r"PreResNet-662.*get_model\('preresnet110'\)"):
        build_model("normal", 110)
    with pytest.raises(UserError, match=r"WRN-100-4.*build_model\('wide', 2, 4\)"):
        build_model("wide", 16, 4)
    with torch.device("meta"):
        assert build_model("normal", units=110).paper_name == "PreResNet-662"  # on purpose
        assert build_model("bottleneck", 18).paper_name == "PreResNet-164"
    with pytest.raises(UserError, match="give the residual units per stage once"):
        build_model("normal", 3, units=3)


def test_dropout_sits_between_the_convs_of_wide_units():
    """Zagoruyko & Komodakis (wide-resnet.lua 57-61): BN-ReLU, then dropout, then the second conv.
    In train mode conv2 reads relu(bn2(.)) with each element either dropped (0) or kept and scaled
    by 1/(1-p); the shortcut is untouched; in eval mode nothing is dropped."""
    torch.manual_seed(0)
    p = 0.3
    model = build_model("wide", 1, 2, dropout=p)
    unit = model.layer2[0]  # a projection unit: its shortcut reads the activation, not the dropped one
    seen = {}
    unit.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("activated", torch.relu(o)))
    unit.conv2.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv2_in", i[0]))
    x = torch.randn(8, 32, 16, 16)
    unit.train()
    out = unit(x)
    activated, read = seen["activated"], seen["conv2_in"]
    live = activated > 0
    dropped = live & (read == 0)
    assert 0.2 < dropped.sum().item() / live.sum().item() < 0.4  # about p of the live elements
    torch.testing.assert_close(read[live & ~dropped], activated[live & ~dropped] / (1 - p))
    shortcut = unit.shortcut(torch.relu(unit.bn1(x)))
    torch.testing.assert_close(out, unit.conv2(read) + shortcut)
    unit.eval()
    out = unit(x)
    torch.testing.assert_close(seen["conv2_in"], seen["activated"])
    assert not [m for m in build_model("wide", 1, 2).modules() if isinstance(m, nn.Dropout)]  # p = 0: no layer


def test_get_model_passes_options():
    model = get_model("preresnet20", num_classes=100)
    assert model.fc.out_features == 100
    assert MODEL_ARCHS["wrn16_4"] == ("wide", 2, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_type="plain", depth=3), "unknown model type"),
    (dict(model_type="normal", depth=0), "depth"),
    (dict(model_type="normal", depth=2.5), "depth"),
    (dict(model_type="normal", depth=3, width=2), "width 2 is only for --type wide"),
    (dict(model_type="bottleneck", depth=3, width=4), "width 4 is only for --type wide"),
    (dict(model_type="wide", depth=2, width=0), "width"),
    (dict(model_type="normal", depth=3, dropout=0.3), "dropout"),
    (dict(model_type="wide", depth=2, width=4, dropout=1.0), "dropout"),
    (dict(model_type="normal", depth=3, num_classes=1), "num_classes"),
    (dict(model_type="wide", depth=1, width=2, dropout=0.3, fused=True), "do not apply dropout"),
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


@pytest.mark.parametrize("name", ["preresnet20", "wrn16_4"])
def test_head_is_batchnorm_relu_average_pool_linear(name):
    """The authors' head (resnet-pre-act.lua and wide-resnet.lua: SBatchNorm, ReLU, Avg(8, 8),
    Linear) computed with functional ops from the last stage's output."""
    torch.manual_seed(0)
    model = get_model(name).train()
    features = {}
    model.layer3.register_forward_hook(lambda m, i, o: features.__setitem__("x", o))
    logits = model(torch.randn(4, 3, 32, 32))
    x, bn = features["x"], model.bn
    normalised = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                   + bn.eps)
    activated = torch.relu(normalised * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
    pooled = torch.nn.functional.avg_pool2d(activated, 8).flatten(1)
    torch.testing.assert_close(logits, pooled @ model.fc.weight.T + model.fc.bias, rtol=1e-4, atol=1e-5)


def test_batchnorm_momentum_and_eps_are_torch_s():
    """Torch's SpatialBatchNormalization (the authors' layer): eps 1e-5, running averages updated by
    0.1 of the batch's statistics, unbiased variance, as PyTorch's defaults."""
    model = get_model("preresnet164")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 * 18 * 3 + 1
    assert all(m.eps == 1e-5 and m.momentum == 0.1 and m.affine and m.track_running_stats for m in norms)
