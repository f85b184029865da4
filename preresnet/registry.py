"""The networks by name: what each name builds, the papers' names for them, and the checks on a
network's description. A leaf, as torchvision's models/_api.py and timm's _registry.py are: it
imports nothing of the package and names no model class, so anything (the weights registry, the
command lines, the benchmarks) can ask what a name means without importing the models.

The papers' networks are data here (MODEL_ARCHS); preresnet/models.py binds a builder to each name
with `register` when it is imported (preresnet.get_model imports it), and so can a user's code for
a network of its own.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import UserError

MODEL_TYPES = ("normal", "bottleneck", "wide")

# registry name -> (type, residual units per stage, width), in the order list_models() gives them
MODEL_ARCHS: dict[str, tuple[str, int, int]] = {
    "preresnet20": ("normal", 3, 1),
    "preresnet56": ("normal", 9, 1),
    "preresnet110": ("normal", 18, 1),
    "preresnet164": ("bottleneck", 18, 1),
    "preresnet1001": ("bottleneck", 111, 1),
    "wrn16_4": ("wide", 2, 4),
    "wrn28_10": ("wide", 4, 10),
}
# the papers' CIFAR-10 test errors of the networks this project reproduces: He et al. 2016 (Identity
# Mappings, PreResNet-110 and -164), Zagoruyko & Komodakis 2016 (WRN-16-4 without dropout, mean/std
# preprocessing, the final version's table of dropout)
PAPER_ERRORS = {"preresnet110": 0.0637, "preresnet164": 0.0546, "wrn16_4": 0.0502}
_BUILDERS: dict[str, Callable] = {}  # registry name -> the function get_model calls (models.py binds them)

# torchvision's old pretrained=True, answered with its current spelling
PRETRAINED_REFUSED = ('there is no pretrained= argument: use weights="DEFAULT" (the entry with the lowest test '
                      'error for the network) or an entry name of preresnet.list_weights(), as torchvision spells it '
                      '(weights=None for a random initialisation)')
# what get_model passes on to the builder: its name fixes the network itself
GET_MODEL_ARGUMENTS = ("num_classes", "fused", "dropout", "weights")

# Units per stage of the networks the papers name, by type (He et al. 2016 "Deep Residual Learning"
# and "Identity Mappings": ResNet-20 to -1202, PreResNet-110, -164, -1001; Zagoruyko & Komodakis
# 2016: WRN-16, -22, -28, -40 of any width): their total depths are what a reader may take --depth for.
PAPER_UNITS = {"normal": (3, 5, 7, 9, 18, 200), "bottleneck": (18, 111), "wide": (2, 3, 4, 6)}


def paper_name(model_type: str, depth: int, width: int = 1) -> str:
    """The name the papers give the network: PreResNet-110, PreResNet-164, WRN-16-4."""
    if model_type == "normal":
        return f"PreResNet-{6 * depth + 2}"
    if model_type == "bottleneck":
        return f"PreResNet-{9 * depth + 2}"
    return f"WRN-{6 * depth + 4}-{width}"


def register(name: str, arch: tuple[str, int, int] | None = None):
    """Decorator binding builder (called with get_model's keyword arguments) to name. A name of
    MODEL_ARCHS keeps its network; a new name needs arch, (type, units per stage, width)."""
    known = MODEL_ARCHS.get(name)
    if known is None and arch is None:
        raise UserError(f"register({name!r}) names a new network: give arch=(type, units per stage, width)")
    if known is not None and arch is not None and tuple(arch) != known:
        raise UserError(f"{name} is {paper_name(*known)} {known}, not {tuple(arch)}")
    if arch is not None:
        check_model_args(*arch)

    def bind(builder: Callable) -> Callable:
        MODEL_ARCHS[name] = known or tuple(arch)
        _BUILDERS[name] = builder
        return builder

    return bind


def list_models() -> list[str]:
    """Names accepted by `get_model`, in registration order."""
    return list(MODEL_ARCHS)


def model_arch(name: str) -> tuple[str, int, int]:
    """(type, units per stage, width) of a list_models() name."""
    if name not in MODEL_ARCHS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODEL_ARCHS)}")
    return MODEL_ARCHS[name]


def registry_name(model_type: str, depth: int, width: int) -> str | None:
    """The list_models() name of a network, None for one outside the registry."""
    return next((name for name, arch in MODEL_ARCHS.items() if arch == (model_type, depth, width)), None)


def get_model(name: str, **kwargs):
    """Build a registered network by name; kwargs go to its builder (num_classes, fused, dropout,
    weights: get_model("preresnet110", weights="DEFAULT") is in eval mode with the best weights loaded)."""
    model_arch(name)
    if "pretrained" in kwargs:
        raise UserError(PRETRAINED_REFUSED)
    unknown = [key for key in kwargs if key not in GET_MODEL_ARGUMENTS]
    if unknown:
        raise UserError(f"get_model({name!r}) takes {', '.join(GET_MODEL_ARGUMENTS)}, not {', '.join(unknown)} (its "
                        f"name fixes the network; build_model(model_type, depth, width) builds others)")
    if name not in _BUILDERS:
        raise UserError(f"{name} has no builder yet: call preresnet.get_model, which imports preresnet.models")
    return _BUILDERS[name](**kwargs)


def check_model_args(model_type: str, depth: int, width: int = 1, num_classes: int = 10, dropout: float = 0.0) -> None:
    """Raise UserError for combinations that do not describe a network of the papers."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown model type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise UserError(f"depth must be a positive number of residual units per stage, got {depth!r}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise UserError(f"width must be a positive integer, got {width!r}")
    if model_type != "wide" and width != 1:
        raise UserError(f"width {width} is only for --type wide; {model_type} networks have width 1")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout > 0 and model_type != "wide":
        raise UserError("dropout is defined for wide networks only (--type wide)")


def paper_depths(model_type: str) -> dict[int, int]:
    """Total depth -> units per stage, of the papers' networks of type: {20: 3, 32: 5, ...} for normal."""
    layers = {"normal": (6, 2), "bottleneck": (9, 2), "wide": (6, 4)}[model_type]  # per unit, outside the units
    return {layers[0] * units + layers[1]: units for units in PAPER_UNITS[model_type]}


def check_depth_meant(model_type: str, depth: int, width: int = 1, command_line: bool = False) -> None:
    """Refuse a depth (units per stage) that is the total depth of one of the papers' networks of
    this type: depth 110 would build PreResNet-662, not PreResNet-110. The one rule of the library
    (build_model's depth; its units= takes a count as given) and of train.py (--depth; --units),
    worded for the one or the other."""
    units = paper_depths(model_type).get(depth) if model_type in MODEL_TYPES else None
    if units is None:
        return
    meant, built, name = paper_name(model_type, units, width), paper_name(model_type, depth, width), registry_name(model_type, units, width)
    if command_line:
        flags = f"--type {model_type} --depth {units}" + (f" --width {width}" if model_type == "wide" else "")
        instead, on_purpose = (f"--model {name} (or {flags})" if name else flags), f"give --units {depth} instead of --depth"
        given = f"--depth {depth}"
    else:
        call = f"build_model({model_type!r}, {units}" + (f", {width}" if model_type == "wide" else "") + ")"
        instead, on_purpose = (f"get_model({name!r}) (or {call})" if name else call), f"pass units={depth} instead of depth"
        given = f"depth {depth}"
    raise UserError(f"{given} counts residual units per stage and would build {built}; for {meant} use {instead}; "
                    f"to build {built} on purpose {on_purpose}")
