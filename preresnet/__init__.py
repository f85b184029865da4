"""preresnet: pre-activation ResNets and Wide ResNets for CIFAR, with the papers' recipes."""

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """The Triton kernels are the subpackage `preresnet.kernels`. An installed copy holds them in
    preresnet/kernels/ (setup.py maps the repository's kernels/ folder there); a source checkout run
    without installing keeps them in kernels/ beside this package, which this finder serves under
    the same name, so the project never owns the generic top-level name `kernels`."""

    def __init__(self, folder: Path):
        self.root = str(folder.parent)

    def find_spec(self, name, path=None, target=None):
        if name != f"{__name__}.kernels":
            return None
        # the folder's own spec, named preresnet.kernels; its modules are then found through its __path__
        return importlib.machinery.PathFinder.find_spec(name, [self.root])


_checkout = Path(__file__).resolve().parents[1] / "kernels"
if not Path(__file__).with_name("kernels").is_dir() and (_checkout / "__init__.py").is_file():
    sys.meta_path.append(_CheckoutKernels(_checkout))

from .errors import UserError  # noqa: E402

__version__ = "0.1.0"

# the public names, imported on first use: `import preresnet.faults` (train.py's first line, before
# torch) and `import preresnet.kernels` stay light
_LAZY = {"MODEL_TYPES": "models", "build_model": "models", "get_model": "models", "list_models": "models",
         "paper_name": "models", "WeightsEntry": "pretrained", "get_weights": "pretrained",
         "list_weights": "pretrained"}

__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
