"""Pretrained weights: a registry in the style of torchvision's, one entry per finished training run.

An entry NAME is four files in the registry folder, preresnet/weights/ (installed with the package;
the environment variable PRERESNET_WEIGHTS_DIR names another folder instead):

    NAME.json              the facts: network, data, recipe, seed, the commands that train and that
                           evaluate it, commit, device, versions, the last epoch's test error and
                           per-class accuracy of this very file, the normalisation, the file's sha256
    NAME-<sha256[:8]>.pt   a plain state_dict with the model's own keys (read with weights_only=True,
                           its sha256 checked on every load)
    NAME.md                the model card, generated from NAME.json
    NAME-curves.png        the training curves

The registry is the set of NAME.json files, with no hand-edited list: entries copied in from
several machines never conflict. preresnet/export.py makes entries (bench/gpu_plan.py's reproduce
stage exports every finished seed); this module reads them, and imports only torch and the models.

    model = preresnet.get_model("preresnet20", weights="DEFAULT")   # eval mode, weights loaded
    preresnet.list_weights("preresnet20"), preresnet.get_weights(NAME).transforms()
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .models import MODEL_ARCHS, paper_name

ENV_VAR = "PRERESNET_WEIGHTS_DIR"
PACKAGE_REGISTRY = Path(__file__).resolve().with_name("weights")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]*")
# every fact export writes (the card and eval.py read them)
REQUIRED = ("name", "model", "network", "type", "depth", "width", "num_classes", "classes", "data", "recipe",
            "recipe_settings", "seed", "epochs", "commands", "source", "device", "runtime", "commit", "torch", "triton",
            "mean", "std", "file", "sha256", "bytes", "storage", "test_error", "test_loss", "per_class_accuracy",
            "test_images", "measured", "training_test_error", "curves", "date")


def registry_dir() -> Path:
    """The folder whose NAME.json files are the registry: $PRERESNET_WEIGHTS_DIR, else preresnet/weights/."""
    folder = os.environ.get(ENV_VAR)
    return Path(folder) if folder else PACKAGE_REGISTRY


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file_name(name: str, sha256: str) -> str:
    return f"{name}-{sha256[:8]}.pt"


def registry_name(type: str, depth: int, width: int) -> str | None:
    """The list_models() name of a network, None for one outside the registry."""
    return next((name for name, arch in MODEL_ARCHS.items() if arch == (type, depth, width)), None)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Normalize(torch.nn.Module):
    """The normalisation the weights were trained with, as the data loaders apply it. uint8 images,
    HWC or NHWC (as decoded from files and as the datasets hold them), become float32 CHW or NCHW;
    float images in [0, 1], CHW or NCHW (as torchvision's ToTensor gives them), keep their layout."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        # the loaders' float32 constants on the 0-255 scale: uint8 images give their batches bit for bit
        self.register_buffer("mean255", self.mean * 255.0, persistent=False)
        self.register_buffer("std255", self.std * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if images.dim() not in (3, 4) or images.shape[-1] != 3:
                raise UserError(f"uint8 images must be HWC or NHWC with 3 channels, got shape {tuple(images.shape)}")
            return ((images.float() - self.mean255) / self.std255).movedim(-1, -3).contiguous()
        if not images.is_floating_point() or images.dim() not in (3, 4) or images.shape[-3] != 3:
            raise UserError(f"images must be uint8 HWC/NHWC or float CHW/NCHW in [0, 1], got {images.dtype} "
                            f"of shape {tuple(images.shape)}")
        return (images - self.mean[:, None, None]) / self.std[:, None, None]

    def extra_repr(self) -> str:
        return f"mean={[round(m, 4) for m in self.mean.tolist()]}, std={[round(s, 4) for s in self.std.tolist()]}"


@dataclass(frozen=True)
class WeightsEntry:
    """One entry of the registry: its name, the facts of NAME.json and the folder holding its files."""

    name: str
    meta: dict = field(repr=False, compare=False)
    folder: Path = field(repr=False)

    @property
    def file(self) -> Path:
        return self.folder / self.meta["file"]

    @property
    def model(self) -> str | None:
        """The list_models() name of the network (None for one outside the registry: build_model loads it)."""
        return self.meta["model"]

    @property
    def test_error(self) -> float:
        """The last epoch's test error, measured on this file."""
        return self.meta["test_error"]

    @property
    def architecture(self) -> tuple[str, int, int]:
        return self.meta["type"], self.meta["depth"], self.meta["width"]

    def get_state_dict(self) -> dict[str, torch.Tensor]:
        """The file's state_dict as stored (export.STORAGE; load_state_dict casts to the model's dtype),
        after checking it against the sha256 the entry records."""
        path = self.file
        if not path.is_file():
            raise UserError(f"weights file {path} of entry {self.name} is missing")
        digest = file_sha256(path)
        if digest != self.meta["sha256"]:
            raise UserError(f"weights file {path} is damaged: its sha256 is {digest[:16]}..., the entry records "
                            f"{self.meta['sha256'][:16]}... (copy or export it again)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for files it cannot read
            raise UserError(f"cannot read weights file {path}: {first_line(exc)}") from None
        if not isinstance(state, dict) or not state or not all(
                isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
            raise UserError(f"weights file {path} does not hold a state_dict (a dict of tensors)")
        return state

    def transforms(self) -> Normalize:
        """The normalisation (mean and std of the training data) the network expects of its input."""
        return Normalize(self.meta["mean"], self.meta["std"])


def read_entry(path: Path) -> WeightsEntry:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"weights entry {path} is unreadable: {first_line(exc)}") from None
    missing = [key for key in REQUIRED if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(f"weights entry {path} is not a registry entry: it lacks {', '.join(missing)}")
    expected = weights_file_name(path.stem, str(meta["sha256"]))
    if meta["name"] != path.stem or meta["file"] != expected:
        raise UserError(f"weights entry {path} is inconsistent: it names {meta['name']!r} and file {meta['file']!r}, "
                        f"not {path.stem!r} and {expected!r}")
    return WeightsEntry(path.stem, meta, path.parent)


def registry_entries() -> list[WeightsEntry]:
    folder = registry_dir()
    return [read_entry(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def describe_registry(entries: list[WeightsEntry]) -> str:
    listed = ", ".join(f"{entry.name} ({entry.meta['network']})" for entry in entries)
    return f"the registry {registry_dir()} holds {listed or 'no weights yet'}"


def list_weights(model: str | None = None) -> list[str]:
    """Names of the registry's entries, sorted; with model (a list_models() name), its entries only."""
    if model is not None and model not in MODEL_ARCHS:
        raise UserError(f"unknown model {model!r}: choose one of {', '.join(MODEL_ARCHS)}")
    return [entry.name for entry in registry_entries() if model is None or entry.model == model]


def get_weights(name: str) -> WeightsEntry:
    """The registry entry called name (list_weights() names them)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or not (registry_dir() / f"{name}.json").is_file():
        raise UserError(f"unknown weights {name!r}: {describe_registry(registry_entries())}")
    return read_entry(registry_dir() / f"{name}.json")


def resolve_weights(weights, type: str, depth: int, width: int, num_classes: int | None) -> WeightsEntry:
    """The entry build_model(type, depth, width, num_classes, weights=weights) loads. weights: a
    WeightsEntry, an entry name, or "DEFAULT": the entry with the lowest test error for this network
    (each entry's error is its own last epoch's; the choice among entries is by that error)."""
    network = paper_name(type, depth, width)
    if isinstance(weights, WeightsEntry):
        entry = weights
    elif weights == "DEFAULT":
        entries = registry_entries()
        fitting = [entry for entry in entries if entry.architecture == (type, depth, width)
                   and num_classes in (None, entry.meta["num_classes"])]
        if not fitting:
            classes = "" if num_classes is None else f" with {num_classes} classes"
            raise UserError(f"no weights for {network}{classes}: {describe_registry(entries)}")
        entry = min(fitting, key=lambda entry: (entry.test_error, entry.name))
    elif isinstance(weights, str):
        entry = get_weights(weights)
    else:
        raise UserError(f"weights must be None, 'DEFAULT', an entry name or a WeightsEntry, got {weights!r}")
    if entry.architecture != (type, depth, width):
        raise UserError(f"weights {entry.name} are for {entry.meta['network']}, not {network}")
    if num_classes is not None and num_classes != entry.meta["num_classes"]:
        raise UserError(f"weights {entry.name} classify {entry.meta['num_classes']} classes, not num_classes="
                        f"{num_classes} (leave num_classes out)")
    return entry


def load_weights(model: torch.nn.Module, entry: WeightsEntry) -> None:
    try:
        model.load_state_dict(entry.get_state_dict())
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"weights file {entry.file} does not fit {model.paper_name}: {detail[:300]}") from None


def evaluate_test_split(model: torch.nn.Module, dataset_name: str, data_dir: str | os.PathLike, mean, std, runtime,
                        batch_size: int = 500) -> tuple[dict, object]:
    """model's test loss, error and per-class accuracy over the test split of dataset_name in
    data_dir, normalised with mean and std (eval.py and export share it); returns them and the dataset."""
    from .data import load_dataset
    from .loaders import build_loader
    from .training import evaluate

    dataset = load_dataset(dataset_name, data_dir)
    num_classes = model.fc.out_features
    if dataset.num_classes != num_classes:
        raise UserError(f"{dataset_name} in {data_dir} has {dataset.num_classes} classes; this {model.paper_name} "
                        f"classifies {num_classes}")
    loader = build_loader(dataset.test.images, dataset.test.labels, batch_size=batch_size, train=False,
                          backend=runtime.loader, mean=mean, std=std, device=runtime.device)
    return evaluate(model.to(runtime.device), loader, runtime, num_classes), dataset
