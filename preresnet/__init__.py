"""preresnet: pre-activation ResNets and Wide ResNets for CIFAR, with the papers' recipes."""

import importlib

from .errors import UserError

__version__ = "0.1.0"

# the public names, imported on first use: `import preresnet.faults` (train.py's first line, before
# torch) and `import preresnet.kernels` stay light. get_model comes through models, whose import
# binds the builders of the registry's names.
_LAZY = {"MODEL_TYPES": "registry", "list_models": "registry", "paper_name": "registry", "register": "registry",
         "build_model": "models", "get_model": "models", "WeightsEntry": "pretrained", "get_weights": "pretrained",
         "list_weights": "pretrained"}

__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
