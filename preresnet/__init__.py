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
from .models import MODEL_TYPES, build_model, get_model, list_models, paper_name  # noqa: E402

__version__ = "0.1.0"

__all__ = ["MODEL_TYPES", "UserError", "build_model", "get_model", "list_models", "paper_name", "__version__"]
