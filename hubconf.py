"""torch.hub entry points: one per network of preresnet.list_models(), each taking the weights=
argument of preresnet.get_model (None, "DEFAULT", or an entry name of preresnet.list_weights()),
and, as torchvision's hub has them, get_weight (a registry entry: its meta, transforms() and
state_dict) and list_weights.

    model = torch.hub.load("OWNER/preresnet", "preresnet110", weights="DEFAULT")
    model = torch.hub.load("path/to/preresnet", "preresnet20", source="local", weights="DEFAULT")
    weights = torch.hub.load("path/to/preresnet", "get_weight", "DEFAULT", model_name="preresnet20", source="local")
    logits = model(weights.transforms()(images))

Importing this file imports only torch, numpy (which preresnet/pretrained.py uses; torch does not
install it) and the package's model code (models.py, registry.py, pretrained.py).
"""

import preresnet as _preresnet
import preresnet.models as _models

dependencies = ["torch", "numpy"]


def _entry_point(name: str):
    """The hub's function for network `name` (torch.hub lists the public callables of this module)."""

    def entry_point(weights=None, **kwargs):
        return _preresnet.get_model(name, weights=weights, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (f"{getattr(_models, name).__doc__}\n\n"
                           f"weights: None (random initialisation), \"DEFAULT\" (the entry with the lowest test error "
                           f"for this network) or an entry name of preresnet.list_weights({name!r}); with weights the "
                           f"network is returned in eval mode. Other keyword arguments go to preresnet.get_model "
                           f"(num_classes, fused, dropout).")
    return entry_point


for _name in _preresnet.list_models():
    globals()[_name] = _entry_point(_name)


# model_name, not get_weights' model: torch.hub.load's own second argument is called model


def get_weight(name, model_name=None):
    """The registry entry (a preresnet.WeightsEntry: .meta, .transforms(), .get_state_dict()) called
    name, or with name "DEFAULT" and model_name (a list_models() name) the entry that
    weights="DEFAULT" loads for that network: preresnet.get_weights(name, model_name)."""
    return _preresnet.get_weights(name, model_name)


def list_weights(model_name=None):
    """Names of the registry's entries; with model_name (a list_models() name), that network's:
    preresnet.list_weights(model_name)."""
    return _preresnet.list_weights(model_name)
