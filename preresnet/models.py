"""Pre-activation ResNets (He et al. 2016) and Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR.

`depth` counts residual units per stage, as in the original Lasagne code, so the layer count is
6n+2 for `normal` (two 3x3 convs a unit), 9n+2 for `bottleneck` (1x1-3x3-1x1, 4x expansion) and
6n+4 for `wide` (two 3x3 convs a unit, widths multiplied by `width`; the 4 counts the stem, the
head and the two projection shortcuts, as the WRN paper names its networks).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import UserError
from .pretrained import load_weights, resolve_weights
from .registry import (MODEL_ARCHS, MODEL_TYPES, PRETRAINED_REFUSED, check_depth_meant, check_model_args,  # noqa: F401
                       get_model, list_models, paper_name, register)
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
        out, out_stats, residual = fused_first_layer(self, x, stats)
        batchnorm_moments, fused_conv, _ = fused_layers()
        return fused_conv(out, batchnorm_moments(self.bn2, out, out_stats), self.conv2, residual,
                          emit_stats=self.training)


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 (4x expansion), plus the shortcut. A
    downsampling unit strides its first 1x1 conv and runs the 3x3 at stride 1, as He et al.'s
    code does (resnet-1k-layers, resnet-pre-act.lua: Convolution(nInputPlane, nBottleneckPlane,
    1, 1, stride, stride, 0, 0), then the 3x3 at 1, 1)."""

    expansion = 4
    activate_before_split = False  # He et al.'s bottleneck networks start with a projection

    def __init__(self, in_channels: int, planes: int, stride: int = 1, fused: bool = False):
        super().__init__()
        self.fused = fused
        out_channels = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
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
        out, out_stats, residual = fused_first_layer(self, x, stats)
        batchnorm_moments, fused_conv, _ = fused_layers()
        out, out_stats = fused_conv(out, batchnorm_moments(self.bn2, out, out_stats), self.conv2,
                                    emit_stats=self.training)
        return fused_conv(out, batchnorm_moments(self.bn3, out, out_stats), self.conv3, residual,
                          emit_stats=self.training)


def fused_first_layer(unit: PreActBasicBlock | PreActBottleneck, x: torch.Tensor, stats):
    """A unit's BN1-ReLU-conv1 and its shortcut in fused kernels: (conv1's output, its statistics,
    the residual the unit's last conv adds)."""
    batchnorm_moments, fused_conv, fused_conv_carrying = fused_layers()
    if unit.activate_before_split:
        # both paths read the activation, so it is materialised once, by the module itself, and conv1
        # is a plain conv of it
        return fused_conv_carrying(torch.relu(unit.bn1(x)), None, unit.conv1, emit_stats=unit.training)
    bn1 = batchnorm_moments(unit.bn1, x, stats)
    if unit.shortcut is None:  # the identity reads x, carried through conv1's layer
        return fused_conv_carrying(x, bn1, unit.conv1, emit_stats=unit.training)
    residual = fused_conv(x, bn1.read_only(), unit.shortcut, emit_stats=False)[0]
    out, out_stats = fused_conv(x, bn1, unit.conv1, emit_stats=unit.training)
    return out, out_stats, residual


def make_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d | None:
    """Identity (None) when shapes match, else a 1x1 projection without bias."""
    if stride == 1 and in_channels == out_channels:
        return None
    return conv1x1(in_channels, out_channels, stride)


# How each family's authors initialise their networks (INIT_SCHEMES): convs normal(0, sqrt(2 / n))
# with n = k*k*C_out (He et al.: resnet-1k-layers resnet-pre-act.lua ConvInit, as fb.resnet.torch)
# or k*k*C_in (Zagoruyko & Komodakis: wide-residual-networks models/utils.lua MSRinit, since their
# "fix MSRA init" of September 2016, before the paper's mean/std results); BatchNorm scale 1 (He:
# BNInit) or uniform in [0, 1) (Zagoruyko: utils.testModel calls model:reset(), and Torch's
# BatchNormalization:reset draws weight:uniform(); their PyTorch port's bnparams is torch.rand);
# BatchNorm shift 0; the classifier's weight uniform in +-1/sqrt(C_in) (Torch's Linear:reset, and
# PyTorch's default) and its bias 0 (both: Linear bias:zero()).
INIT_SCHEMES = {"he": ("fan_out", "ones"), "zagoruyko": ("fan_in", "uniform")}
DEFAULT_INIT = {"normal": "he", "bottleneck": "he", "wide": "zagoruyko"}


def initialise(model: nn.Module, scheme: str) -> None:
    """Initialise the convs, BatchNorms and classifier bias of model as INIT_SCHEMES[scheme] says."""
    fan, bn_scale = INIT_SCHEMES[scheme]
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=fan, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            if bn_scale == "ones":
                nn.init.ones_(module.weight)
            else:
                nn.init.uniform_(module.weight, 0.0, 1.0)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


class PreActResNet(nn.Module):
    """Stem conv3x3(16) -> three stages of pre-activation units -> BN-ReLU-avgpool-linear."""

    def __init__(
        self,
        block: type[PreActBasicBlock] | type[PreActBottleneck],
        units_per_stage: int,
        width: int = 1,
        num_classes: int = 10,
        dropout: float = 0.0,
        name: str = "",
        fused: bool = False,
        activate_before_first_split: bool = True,
        init: str = "he",
    ):
        super().__init__()
        self.paper_name = name
        self.fused = fused
        self.conv1 = conv3x3(3, STEM_CHANNELS)
        channels = STEM_CHANNELS
        # dropout is an option of the basic (wide) unit only; check_model_args refuses it elsewhere
        options = {"dropout": dropout} if block is PreActBasicBlock else {}
        stages = []
        for index, planes in enumerate(STAGE_PLANES):
            stride = 1 if index == 0 else 2
            units = []
            for unit in range(units_per_stage):
                units.append(block(channels, planes * width, stride if unit == 0 else 1, fused=fused, **options))
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
        initialise(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            fused_conv = fused_layers()[1]
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


def fused_layers():
    """(batchnorm_moments, fused_conv, fused_conv_carrying) of preresnet/kernels/layers.py, imported
    on first use: Triton is an optional dependency (Linux only), and must find TRITON_INTERPRET set
    before it is imported."""
    from .kernels import layers

    return layers.batchnorm_moments, layers.fused_conv, layers.fused_conv_carrying


def build_model(
    model_type: str,
    depth: int | None = None,
    width: int = 1,
    num_classes: int | None = None,
    fused: bool = False,
    dropout: float = 0.0,
    weights=None,
    *,
    units: int | None = None,
    pretrained=None,
) -> PreActResNet:
    """Build a pre-activation network: `model_type` normal | bottleneck | wide, `depth` units per stage.

    A depth that is the total depth of one of the papers' networks of the type (110, 164, 16, ...)
    is refused, naming the call meant (build_model("normal", 110) would build PreResNet-662);
    units= gives the units per stage taken as given instead of depth (train.py's --units).
    num_classes: 10, or the classes of `weights`. fused=True runs every unit and the stem through
    the Triton kernels of `kernels` (same parameters, buffers and state_dict keys); on a machine
    without a GPU only under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported).
    weights: None, an entry name of `list_weights()`, a `WeightsEntry`, or "DEFAULT" (the entry
    with the lowest test error for this network): the network comes back in eval mode with them
    loaded (preresnet/pretrained.py). pretrained= (torchvision's old spelling) is refused with a
    pointer to weights=."""
    if pretrained is not None:
        raise UserError(PRETRAINED_REFUSED)
    if (depth is None) == (units is None):
        raise UserError("give the residual units per stage once: depth (a papers' total depth is refused) or units= "
                        "(taken as given)")
    check_model_args(model_type, depth if units is None else units, width,
                     10 if num_classes is None else num_classes, dropout)
    if units is None:
        check_depth_meant(model_type, depth, width)
        units = depth
    entry = None
    if weights is not None:
        entry = resolve_weights(weights, model_type, units, width, num_classes)
        num_classes = entry.meta["num_classes"]
    if fused:
        if dropout > 0:
            raise UserError("the fused kernels do not apply dropout: use fused=False (--no-fused) with --dropout")
        try:
            fused_layers()
        except ImportError as exc:
            raise UserError(f"fused=True needs Triton and the kernels package ({exc}); use fused=False") from None
    block = PreActBottleneck if model_type == "bottleneck" else PreActBasicBlock
    model = PreActResNet(block, units, width, 10 if num_classes is None else num_classes, dropout,
                         paper_name(model_type, units, width), fused, activate_before_first_split=model_type != "wide",
                         init=DEFAULT_INIT[model_type])
    if entry is not None:
        load_weights(model, entry)
        model.eval()
    return model


# --- the papers' networks by name (preresnet/registry.py) -------------------------------------------


def _builder(name: str, doc: str):
    """get_model's builder of a MODEL_ARCHS name, registered, with the docstring torch.hub shows."""
    model_type, depth, width = MODEL_ARCHS[name]

    def build(**kwargs) -> PreActResNet:
        return build_model(model_type, units=depth, width=width, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return register(name)(build)


preresnet20 = _builder("preresnet20", 'PreResNet-20: 3 basic units per stage (He et al. 2016, "Identity Mappings in '
                                      'Deep Residual Networks").')
preresnet56 = _builder("preresnet56", "PreResNet-56: 9 basic units per stage (He et al. 2016).")
preresnet110 = _builder("preresnet110", "PreResNet-110: 18 basic units per stage, 1.7M parameters, 6.37% CIFAR-10 "
                                        "error (He et al. 2016).")
preresnet164 = _builder("preresnet164", "PreResNet-164: 18 bottleneck units per stage, 1.7M parameters, 5.46% "
                                        "CIFAR-10 error (He et al. 2016).")
preresnet1001 = _builder("preresnet1001", "PreResNet-1001: 111 bottleneck units per stage, 10.2M parameters, 4.62% "
                                          "CIFAR-10 error (He et al. 2016).")
wrn16_4 = _builder("wrn16_4", "WRN-16-4: 2 units per stage, width 4, 2.7M parameters, 5.02% CIFAR-10 error "
                              "(Zagoruyko & Komodakis 2016).")
wrn28_10 = _builder("wrn28_10", "WRN-28-10: 4 units per stage, width 10, 36.5M parameters (Zagoruyko & Komodakis "
                                "2016).")


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> PreActResNet:
    """Rebuild the network a train.py checkpoint's config describes and load its weights into it."""
    config = checkpoint["config"]
    model = build_model(config["type"], units=config["depth"], width=config["width"],
                        num_classes=config["num_classes"], dropout=config["dropout"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"checkpoint {path} does not hold a {model.paper_name} as its config says: {detail[:300]}") from None
    return model
