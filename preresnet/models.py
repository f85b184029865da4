"""Pre-activation ResNets (He et al. 2016) and Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR.

`depth` counts residual units per stage, as in the original Lasagne code, so the layer count is
6n+2 for `normal` (two 3x3 convs a unit), 9n+2 for `bottleneck` (1x1-3x3-1x1, 4x expansion) and
6n+4 for `wide` (two 3x3 convs a unit, widths multiplied by `width`; the 4 counts the stem, the
head and the two projection shortcuts, as the WRN paper names its networks).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import UserError

MODEL_TYPES = ("normal", "bottleneck", "wide")
STAGE_PLANES = (16, 32, 64)
STEM_CHANNELS = 16


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the shortcut (normal and wide networks)."""

    expansion = 1
    # The identity shortcut reads relu(bn1(x)) instead of x: He et al.'s first unit, whose activation
    # comes "right after conv1 and before splitting into two paths" (appendix; set by PreActResNet
    # on an identity unit only).
    activate_before_split = False

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dropout: float = 0.0, fused: bool = False):
        super().__init__()
        self.fused = fused
        out_channels = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.forward_fused(x, None)[0]
        preact = torch.relu(self.bn1(x))
        # A projection shortcut reads the pre-activated input; the identity reads x itself, but for
        # He et al.'s first unit
        residual = preact if self.activate_before_split else x if self.shortcut is None else self.shortcut(preact)
        out = self.conv1(preact)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + residual

    def forward_fused(self, x: torch.Tensor, stats):
        """The same unit in fused kernels; stats are x's batch mean and variance when known.
        Returns the output and its statistics."""
        from .kernels.layers import batchnorm_moments, fused_conv, fused_conv_carrying

        if self.activate_before_split:
            # both paths read the activation, so it is materialised once, by the module itself, and
            # conv1 is a plain conv of it
            out, out_stats, residual = fused_conv_carrying(torch.relu(self.bn1(x)), None, self.conv1,
                                                           emit_stats=self.training)
        else:
            bn1 = batchnorm_moments(self.bn1, x, stats)
            if self.shortcut is None:  # the identity reads x, carried through conv1's layer
                out, out_stats, residual = fused_conv_carrying(x, bn1, self.conv1, emit_stats=self.training)
            else:
                residual = fused_conv(x, bn1.read_only(), self.shortcut, emit_stats=False)[0]
                out, out_stats = fused_conv(x, bn1, self.conv1, emit_stats=self.training)
        return fused_conv(out, batchnorm_moments(self.bn2, out, out_stats), self.conv2, residual,
                          emit_stats=self.training)


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 (4x expansion), plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dropout: float = 0.0, fused: bool = False):
        super().__init__()  # dropout is a wide-network option; check_model_args rejects it here
        self.fused = fused
        out_channels = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.forward_fused(x, None)[0]
        preact = torch.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(preact)
        out = self.conv1(preact)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return out + residual

    def forward_fused(self, x: torch.Tensor, stats):
        from .kernels.layers import batchnorm_moments, fused_conv, fused_conv_carrying

        bn1 = batchnorm_moments(self.bn1, x, stats)
        if self.shortcut is None:  # the identity reads x, carried through conv1's layer
            out, out_stats, residual = fused_conv_carrying(x, bn1, self.conv1, emit_stats=self.training)
        else:
            residual = fused_conv(x, bn1.read_only(), self.shortcut, emit_stats=False)[0]
            out, out_stats = fused_conv(x, bn1, self.conv1, emit_stats=self.training)
        out, out_stats = fused_conv(out, batchnorm_moments(self.bn2, out, out_stats), self.conv2,
                                    emit_stats=self.training)
        return fused_conv(out, batchnorm_moments(self.bn3, out, out_stats), self.conv3, residual,
                          emit_stats=self.training)


def make_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d | None:
    """Identity (None) when shapes match, else a 1x1 projection without bias."""
    if stride == 1 and in_channels == out_channels:
        return None
    return conv1x1(in_channels, out_channels, stride)


class PreActResNet(nn.Module):
    """Stem conv3x3(16) -> three stages of pre-activation units -> BN-ReLU-avgpool-linear."""

    def __init__(
        self,
        block: type[PreActBasicBlock] | type[PreActBottleneck],
        units_per_stage: int,
        width: int = 1,
        num_classes: int = 10,
        dropout: float = 0.0,
        paper_name: str = "",
        fused: bool = False,
        activate_before_first_split: bool = True,
    ):
        super().__init__()
        self.paper_name = paper_name
        self.fused = fused
        self.conv1 = conv3x3(3, STEM_CHANNELS)
        channels = STEM_CHANNELS
        stages = []
        for index, planes in enumerate(STAGE_PLANES):
            stride = 1 if index == 0 else 2
            units = []
            for unit in range(units_per_stage):
                units.append(block(channels, planes * width, stride if unit == 0 else 1, dropout, fused))
                channels = planes * width * block.expansion
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        # He et al. activate conv1's output before the first unit splits (their appendix and code);
        # Zagoruyko & Komodakis's identity units read the raw input, the first one too. With a
        # projection (every bottleneck and wider network) both paths read the activation anyway.
        first = self.layer1[0]
        first.activate_before_split = activate_before_first_split and first.shortcut is None

        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from .kernels.layers import fused_conv

            # the stem's kernel measures its output for the first unit's BatchNorm, unless that unit
            # activates before its split (it normalises through its module)
            out, stats = fused_conv(x, None, self.conv1,
                                    emit_stats=self.training and not self.layer1[0].activate_before_split)
            for unit in (*self.layer1, *self.layer2, *self.layer3):
                out, stats = unit.forward_fused(out, stats)
        else:
            out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = torch.relu(self.bn(out))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def paper_name(type: str, depth: int, width: int = 1) -> str:
    """The name the papers give the network: PreResNet-110, PreResNet-164, WRN-16-4."""
    if type == "normal":
        return f"PreResNet-{6 * depth + 2}"
    if type == "bottleneck":
        return f"PreResNet-{9 * depth + 2}"
    return f"WRN-{6 * depth + 4}-{width}"


# torchvision's old pretrained=True, answered with its current spelling
PRETRAINED_REFUSED = ('there is no pretrained= argument: use weights="DEFAULT" (the entry with the lowest test '
                      'error for the network) or an entry name of preresnet.list_weights(), as torchvision spells it '
                      '(weights=None for a random initialisation)')
# what get_model passes on to build_model: its name fixes the network itself
GET_MODEL_ARGUMENTS = ("num_classes", "fused", "dropout", "weights")


def check_model_args(type: str, depth: int, width: int = 1, num_classes: int = 10, dropout: float = 0.0) -> None:
    """Raise UserError for combinations that do not describe a network of the papers."""
    if type not in MODEL_TYPES:
        raise UserError(f"unknown model type {type!r}: choose one of {', '.join(MODEL_TYPES)}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise UserError(f"depth must be a positive number of residual units per stage, got {depth!r}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise UserError(f"width must be a positive integer, got {width!r}")
    if type != "wide" and width != 1:
        raise UserError(f"width {width} is only for --type wide; {type} networks have width 1")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout > 0 and type != "wide":
        raise UserError("dropout is defined for wide networks only (--type wide)")


def build_model(
    type: str,
    depth: int,
    width: int = 1,
    num_classes: int | None = None,
    fused: bool = False,
    dropout: float = 0.0,
    weights=None,
    *,
    pretrained=None,
) -> PreActResNet:
    """Build a pre-activation network: `type` normal | bottleneck | wide, `depth` units per stage.

    num_classes: 10, or the classes of `weights`. fused=True runs every unit and the stem through
    the Triton kernels of `kernels` (same parameters, buffers and state_dict keys); on a machine
    without a GPU only under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported).
    weights: None, an entry name of `list_weights()`, a `WeightsEntry`, or "DEFAULT" (the entry
    with the lowest test error for this network): the network comes back in eval mode with them
    loaded (preresnet/pretrained.py). pretrained= (torchvision's old spelling) is refused with a
    pointer to weights=."""
    if pretrained is not None:
        raise UserError(PRETRAINED_REFUSED)
    check_model_args(type, depth, width, 10 if num_classes is None else num_classes, dropout)
    entry = None
    if weights is not None:
        from .pretrained import resolve_weights

        entry = resolve_weights(weights, type, depth, width, num_classes)
        num_classes = entry.meta["num_classes"]
    if fused:
        if dropout > 0:
            raise UserError("the fused kernels do not apply dropout: use fused=False (--no-fused) with --dropout")
        try:
            from .kernels import layers  # noqa: F401
        except ImportError as exc:
            raise UserError(f"fused=True needs Triton and the kernels package ({exc}); use fused=False") from None
    block = PreActBottleneck if type == "bottleneck" else PreActBasicBlock
    model = PreActResNet(block, depth, width, 10 if num_classes is None else num_classes, dropout,
                         paper_name(type, depth, width), fused, activate_before_first_split=type != "wide")
    if entry is not None:
        from .pretrained import load_weights

        load_weights(model, entry)
        model.eval()
    return model


# --- registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., PreActResNet]] = {}
MODEL_ARCHS: dict[str, tuple[str, int, int]] = {}


def register(type: str, depth: int, width: int = 1):
    def wrap(factory: Callable[..., PreActResNet]) -> Callable[..., PreActResNet]:
        _REGISTRY[factory.__name__] = factory
        MODEL_ARCHS[factory.__name__] = (type, depth, width)
        return factory

    return wrap


@register("normal", 3)
def preresnet20(**kwargs) -> PreActResNet:
    """PreResNet-20: 3 basic units per stage (He et al. 2016, "Identity Mappings in Deep Residual Networks")."""
    return build_model("normal", 3, **kwargs)


@register("normal", 9)
def preresnet56(**kwargs) -> PreActResNet:
    """PreResNet-56: 9 basic units per stage (He et al. 2016)."""
    return build_model("normal", 9, **kwargs)


@register("normal", 18)
def preresnet110(**kwargs) -> PreActResNet:
    """PreResNet-110: 18 basic units per stage, 1.7M parameters, 6.37% CIFAR-10 error (He et al. 2016)."""
    return build_model("normal", 18, **kwargs)


@register("bottleneck", 18)
def preresnet164(**kwargs) -> PreActResNet:
    """PreResNet-164: 18 bottleneck units per stage, 1.7M parameters, 5.46% CIFAR-10 error (He et al. 2016)."""
    return build_model("bottleneck", 18, **kwargs)


@register("bottleneck", 111)
def preresnet1001(**kwargs) -> PreActResNet:
    """PreResNet-1001: 111 bottleneck units per stage, 10.2M parameters, 4.62% CIFAR-10 error (He et al. 2016)."""
    return build_model("bottleneck", 111, **kwargs)


@register("wide", 2, 4)
def wrn16_4(**kwargs) -> PreActResNet:
    """WRN-16-4: 2 units per stage, width 4, 2.7M parameters, 5.02% CIFAR-10 error (Zagoruyko & Komodakis 2016)."""
    return build_model("wide", 2, 4, **kwargs)


@register("wide", 4, 10)
def wrn28_10(**kwargs) -> PreActResNet:
    """WRN-28-10: 4 units per stage, width 10, 36.5M parameters (Zagoruyko & Komodakis 2016)."""
    return build_model("wide", 4, 10, **kwargs)


def list_models() -> list[str]:
    """Names accepted by `get_model`, in registration order."""
    return list(_REGISTRY)


def get_model(name: str, **kwargs) -> PreActResNet:
    """Build a registered network by name; kwargs go to `build_model` (num_classes, fused, dropout,
    weights: get_model("preresnet110", weights="DEFAULT") is in eval mode with the best weights loaded)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(_REGISTRY)}")
    if "pretrained" in kwargs:
        raise UserError(PRETRAINED_REFUSED)
    unknown = [key for key in kwargs if key not in GET_MODEL_ARGUMENTS]
    if unknown:
        raise UserError(f"get_model({name!r}) takes {', '.join(GET_MODEL_ARGUMENTS)}, not {', '.join(unknown)} (its "
                        f"name fixes the network; build_model(type, depth, width) builds others)")
    return _REGISTRY[name](**kwargs)


# --- names a command line gives a network -----------------------------------------------------------

# Units per stage of the networks the papers name, by type (He et al. 2016 "Deep Residual Learning"
# and "Identity Mappings": ResNet-20 to -1202, PreResNet-110, -164, -1001; Zagoruyko & Komodakis
# 2016: WRN-16, -22, -28, -40 of any width): their total depths are what a reader may take --depth for.
PAPER_UNITS = {"normal": (3, 5, 7, 9, 18, 200), "bottleneck": (18, 111), "wide": (2, 3, 4, 6)}


def model_arch(name: str) -> tuple[str, int, int]:
    """(type, units per stage, width) of a list_models() name."""
    if name not in MODEL_ARCHS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODEL_ARCHS)}")
    return MODEL_ARCHS[name]


def paper_depths(type: str) -> dict[int, int]:
    """Total depth -> units per stage, of the papers' networks of type: {20: 3, 32: 5, ...} for normal."""
    layers = {"normal": (6, 2), "bottleneck": (9, 2), "wide": (6, 4)}[type]  # per unit, outside the units
    return {layers[0] * units + layers[1]: units for units in PAPER_UNITS[type]}


def check_depth_meant(type: str, depth: int, width: int = 1) -> None:
    """Refuse a --depth (units per stage) that is the total depth of one of the papers' networks of
    this type: --depth 110 would build PreResNet-662, not PreResNet-110. train.py's --units gives
    that many units per stage on purpose."""
    units = paper_depths(type).get(depth) if type in MODEL_TYPES else None
    if units is None:
        return
    meant = paper_name(type, units, width)
    flags = f"--type {type} --depth {units}" + (f" --width {width}" if type == "wide" else "")
    name = next((name for name, arch in MODEL_ARCHS.items() if arch == (type, units, width)), None)
    instead = f"--model {name} (or {flags})" if name else flags
    built = paper_name(type, depth, width)
    raise UserError(f"--depth {depth} counts residual units per stage and would build {built}; for {meant} use "
                    f"{instead}; to build {built} on purpose give --units {depth} instead of --depth")
