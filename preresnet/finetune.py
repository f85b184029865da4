"""Fine-tuning: a new train.py run (its own optimizer and schedule, from epoch 0) that starts from
weights instead of a random initialisation: train.py --init NAME|DEFAULT|PATH.

resolve_init reads the weights once before the run is set up, checks that they fit the network,
and gives the record config.json keeps as config["init"]; TrainingRun calls load_init_weights with
that record when it starts the run (a resumed run's checkpoint holds the model: nothing is loaded
again). The classifier head (fc.weight, fc.bias) is matched by class name: weights that classify
every class of the data give their rows for them, in the data's order; otherwise the head keeps the
initialisation of the run's seed. The run normalises with the weights' mean and std, as a model
expects its input (timm's pretrained data config, torchvision's weights' transforms()).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .evaluation import shown_names
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


def head_rows(state: dict[str, torch.Tensor], weights_classes: list[str] | None, classes: list[str]) -> list[int] | None:
    """The rows of the weights' classifier head that classify the data's classes, in the data's
    order, or None: the head is re-initialised. Weights that name their classes are matched by name
    (another order, or a subset of their classes, takes their rows; any class they do not know
    re-initialises the head); weights that name none (a bare state_dict) keep a head of as many
    classes as the data's, taken to be the data's classes in its order."""
    if "fc.weight" not in state:
        return None
    if weights_classes is None:
        return list(range(len(classes))) if state["fc.weight"].shape[0] == len(classes) else None
    if not set(classes) <= set(weights_classes) or len(weights_classes) != state["fc.weight"].shape[0]:
        return None
    return [weights_classes.index(name) for name in classes]


def fit(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, rows: list[int] | None,
        on_meta: bool = False) -> None:
    """Load state into model: its head's rows `rows` (head_rows) and everything else, or, with rows
    None, everything but the head, which keeps the model's initialisation. A state of another
    network is refused. on_meta: the model is on the meta device, to check the keys and shapes only
    (its tensors are swapped for the state's instead of copied into, which on the meta device would
    do nothing and warn)."""
    if rows is None:
        state = {key: value for key, value in state.items() if key not in HEAD}
    else:
        state = {**state, **{key: state[key][rows] for key in HEAD if key in state}}
    try:
        missing, unexpected = model.load_state_dict(state, strict=rows is not None, assign=on_meta)
        if unexpected or set(missing) - set(HEAD):
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"--init {source} does not fit {model.paper_name}: {detail[:300]}") from None


def resolve_init(source: str, model_type: str, depth: int, width: int, classes: list[str]) -> dict:
    """config["init"] of a new run of (type, depth, width) on data of these classes, starting from
    source: a registry entry, DEFAULT (the best entry of the network), a state_dict file, or a
    train.py checkpoint or run folder (its model). Weights of another network are refused. The
    record keeps the weights' class names and normalisation where they have them (a registry entry,
    a checkpoint): the run normalises its data with the weights' mean and std, and its head takes
    the weights' rows of the data's classes (head_rows)."""
    network = paper_name(model_type, depth, width)
    if is_entry(source):
        entry = resolve_weights(source, model_type, depth, width, None)  # refuses another network's
        state, facts = entry.get_state_dict(), entry.meta
        record = {"source": source, "kind": "registry", "entry": entry.name, "sha256": entry.meta["sha256"],
                  "network": entry.meta["network"]}
    else:
        state, facts, path = read_weights_file(source)
        if facts is not None and (facts["type"], facts["depth"], facts["width"]) != (model_type, depth, width):
            raise UserError(f"--init {source} holds a {facts['model']} (its checkpoint's config), not the {network} "
                            f"this run builds: choose that network, or other weights")
        record = {"source": source, "kind": "checkpoint" if facts else "state_dict", "path": str(path.resolve()),
                  "sha256": file_sha256(path), "network": network}
    facts = facts or {}
    weights_classes = facts.get("classes")
    rows = head_rows(state, weights_classes, classes)
    with torch.device("meta"):  # the shapes only: nothing is allocated
        model = build_model(model_type, units=depth, width=width, num_classes=len(classes))
    fit(model, state, source, rows, on_meta=True)
    return {**record, "architecture": [model_type, depth, width],
            "num_classes": state["fc.weight"].shape[0] if "fc.weight" in state else None,
            "classes": weights_classes, "mean": facts.get("mean"), "std": facts.get("std"),
            "head": "re-initialised" if rows is None else "loaded", "head_rows": rows}


def load_init_weights(model: torch.nn.Module, init: dict) -> None:
    """Load the weights config["init"] records into a freshly built model (see resolve_init)."""
    rows = init.get("head_rows")
    if "head_rows" not in init and init["head"] == "loaded":  # recorded before head_rows: the head as it is
        rows = list(range(model.fc.out_features))
    fit(model, init_state(init), init["source"], rows)


def describe_init(init: dict, classes: list[str]) -> str:
    """One line: where the weights come from, what became of the head, and whose normalisation the
    run uses."""
    where = f"entry {init['entry']}" if init["kind"] == "registry" else init["path"]
    weights_classes, rows = init.get("classes"), init.get("head_rows")
    count = len(classes)
    if rows is not None and weights_classes is None:
        head = (f"classifier head (fc) loaded as it is: the weights name no classes, so their {count} outputs are "
                f"taken for the data's classes in its order")
    elif rows is not None and weights_classes == classes:
        head = "classifier head (fc) loaded: the weights classify the data's classes"
    elif rows is not None:
        head = (f"classifier head (fc) loaded, its rows matched by name to the data's {count} classes (the weights "
                f"classify {len(weights_classes)})")
    elif weights_classes is not None and init["num_classes"] == count:
        unknown = [name for name in classes if name not in weights_classes]
        head = (f"classifier head (fc) re-initialised: the weights do not classify the data's {shown_names(unknown)} "
                f"(theirs: {shown_names(weights_classes)})")
    else:
        head = (f"classifier head (fc) re-initialised for the data's {count} classes (the weights classify "
                f"{init['num_classes'] or 'no'})")
    normalised = ("inputs normalised with the weights' mean and std" if init.get("mean") else
                  "inputs normalised with the data's mean and std (the weights record none)")
    return (f"init: {init['network']} weights of {where}; {head}; {normalised}; new optimizer and lr schedule from "
            f"epoch 0")
