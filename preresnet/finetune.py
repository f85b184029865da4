"""Fine-tuning: a new train.py run (its own optimizer and schedule, from epoch 0) that starts from
weights instead of a random initialisation: train.py --init NAME|DEFAULT|PATH.

resolve_init reads the weights once before the run is set up, checks that they fit the network,
and gives the record config.json keeps as config["init"]; TrainingRun calls load_init_weights with
that record when it starts the run (a resumed run's checkpoint holds the model: nothing is loaded
again). Weights for another number of classes load all but the classifier head (fc.weight,
fc.bias), which keeps the initialisation of the run's seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .models import build_model, paper_name
from .pretrained import NAME_PATTERN, describe_registry, file_sha256, registry_dir, registry_entries, resolve_weights
from .runfiles import CHECKPOINT_FORMAT, checkpoint_path, strip_wrappers
from .wording import first_line

HEAD = ("fc.weight", "fc.bias")


def is_entry(source: str) -> bool:
    """Whether --init names a registry entry (or DEFAULT) rather than a file or folder."""
    return source == "DEFAULT" or bool(NAME_PATTERN.fullmatch(source)) and (registry_dir() / f"{source}.json").is_file()


def read_weights_file(source: str) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    """The state_dict in a weights file, a train.py checkpoint or a run folder (its checkpoint's
    model), the checkpoint's config (None for a bare state_dict), and the file read."""
    path = checkpoint_path(source)
    if not path.is_file():
        raise UserError(f"--init {source}: {path} does not exist (give a registry entry, a weights file, or a run "
                        f"folder or checkpoint; {describe_registry(registry_entries())})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for truncated or foreign files
        raise UserError(f"cannot read --init {path} (truncated or not a weights file?): {first_line(exc)}") from None
    config = None
    if isinstance(loaded, dict) and loaded.get("format") == CHECKPOINT_FORMAT:
        config, loaded = loaded["config"], loaded["model"]
    if not isinstance(loaded, dict) or not loaded or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()):
        raise UserError(f"--init {path} holds neither a state_dict (a dict of tensors) nor a train.py checkpoint")
    return {strip_wrappers(key): value for key, value in loaded.items()}, config, path


def init_state(init: dict) -> dict[str, torch.Tensor]:
    """The weights an init record names, checked against the sha256 it records."""
    if init["kind"] == "registry":
        entry = resolve_weights(init["entry"], *init["architecture"], None)
        state, sha256, where = entry.get_state_dict(), entry.meta["sha256"], f"entry {entry.name}"
    else:
        state, _, path = read_weights_file(init["path"])
        sha256, where = file_sha256(path), str(path)
    if sha256 != init["sha256"]:
        raise UserError(f"--init {where} changed since the run was set up (its sha256 differs): start the run again")
    return state


def fit(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, on_meta: bool = False) -> str:
    """Load state into model: all of it ("loaded"), or, when its head classifies another number of
    classes, all but the head ("re-initialised"). A state of another network is refused. on_meta: the
    model is on the meta device, to check the keys and shapes only (its tensors are swapped for the
    state's instead of copied into, which on the meta device would do nothing and warn)."""
    same_classes = "fc.weight" in state and state["fc.weight"].shape[0] == model.fc.out_features
    head = "loaded" if same_classes else "re-initialised"
    if not same_classes:
        state = {key: value for key, value in state.items() if key not in HEAD}
    try:
        missing, unexpected = model.load_state_dict(state, strict=same_classes, assign=on_meta)
        if unexpected or set(missing) - set(HEAD):
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"--init {source} does not fit {model.paper_name}: {detail[:300]}") from None
    return head


def resolve_init(source: str, type: str, depth: int, width: int, num_classes: int) -> dict:
    """config["init"] of a new run of (type, depth, width) on data of num_classes classes, starting
    from source: a registry entry, DEFAULT (the best entry of the network), a state_dict file, or a
    train.py checkpoint or run folder (its model). Weights of another network are refused."""
    network = paper_name(type, depth, width)
    if is_entry(source):
        entry = resolve_weights(source, type, depth, width, None)  # refuses another network's
        state = entry.get_state_dict()
        record = {"source": source, "kind": "registry", "entry": entry.name, "sha256": entry.meta["sha256"],
                  "network": entry.meta["network"]}
    else:
        state, config, path = read_weights_file(source)
        if config is not None and (config["type"], config["depth"], config["width"]) != (type, depth, width):
            raise UserError(f"--init {source} holds a {config['model']} (its checkpoint's config), not the {network} "
                            f"this run builds: choose that network, or other weights")
        record = {"source": source, "kind": "checkpoint" if config else "state_dict", "path": str(path.resolve()),
                  "sha256": file_sha256(path), "network": network}
    with torch.device("meta"):  # the shapes only: nothing is allocated
        model = build_model(type, units=depth, width=width, num_classes=num_classes)
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    return {**record, "architecture": [type, depth, width], "num_classes": classes,
            "head": fit(model, state, source, on_meta=True)}


def load_init_weights(model: torch.nn.Module, init: dict) -> None:
    """Load the weights config["init"] records into a freshly built model (see resolve_init)."""
    head = fit(model, init_state(init), init["source"])
    if head != init["head"]:
        raise UserError(f"--init {init['source']}: the head was {init['head']} when the run was set up, now {head}")


def describe_init(init: dict, num_classes: int) -> str:
    """One line: where the weights come from and what became of the head."""
    where = f"entry {init['entry']}" if init["kind"] == "registry" else init["path"]
    head = ("classifier head (fc) loaded" if init["head"] == "loaded" else
            f"classifier head (fc) re-initialised for the data's {num_classes} classes (the weights classify "
            f"{init['num_classes'] or 'no'})")
    return f"init: {init['network']} weights of {where}; {head}; new optimizer and lr schedule from epoch 0"
