"""torch.hub entry points: one per network of preresnet.list_models(), each taking the weights=
argument of preresnet.get_model (None, "DEFAULT", or an entry name of preresnet.list_weights()).

    model = torch.hub.load("OWNER/preresnet", "preresnet110", weights="DEFAULT")
    model = torch.hub.load("path/to/preresnet", "preresnet20", source="local", weights="DEFAULT")

Importing this file imports only torch and the package's model code (models.py, pretrained.py).
"""

import preresnet as _preresnet

dependencies = ["torch"]


def _entry_point(name: str):
    """The hub's function for network `name` (torch.hub lists the public callables of this module)."""

    def entry_point(weights=None, **kwargs):
        return _preresnet.get_model(name, weights=weights, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (f"{getattr(_preresnet.models, name).__doc__}\n\n"
                           f"weights: None (random initialisation), \"DEFAULT\" (the entry with the lowest test error "
                           f"for this network) or an entry name of preresnet.list_weights({name!r}); with weights the "
                           f"network is returned in eval mode. Other keyword arguments go to preresnet.get_model "
                           f"(num_classes, fused, dropout).")
    return entry_point


for _name in _preresnet.list_models():
    globals()[_name] = _entry_point(_name)
