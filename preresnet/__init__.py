"""preresnet: pre-activation ResNets and Wide ResNets for CIFAR, with the papers' recipes."""

from .errors import UserError
from .models import MODEL_TYPES, build_model, get_model, list_models, paper_name

__version__ = "0.1.0"

__all__ = ["MODEL_TYPES", "UserError", "build_model", "get_model", "list_models", "paper_name", "__version__"]
