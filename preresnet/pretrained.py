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
several machines never conflict. preresnet/export.py makes entries from finished train.py runs;
this module reads them, and imports only torch, numpy and the
registry of names (preresnet/registry.py). `python -m preresnet.pretrained` lists them.

transforms() is what torchvision's weights' transforms() are for their networks: images of any size
resized (shorter side) and centre-cropped to the networks' 32x32 input, then normalised; the image
folder loader (preresnet/data.py) resizes with the same function.

    model = preresnet.get_model("preresnet20", weights="DEFAULT")   # eval mode, weights loaded
    preresnet.list_weights("preresnet20"), preresnet.get_weights(NAME).transforms()
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cli import run_main
from .errors import UserError
from .registry import MODEL_ARCHS, paper_name
from .wording import first_line

ENV_VAR = "PRERESNET_WEIGHTS_DIR"
INPUT_SIZE = 32  # the networks' input: CIFAR's 32x32 images
PACKAGE_REGISTRY = Path(__file__).resolve().with_name("weights")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]*")
# every fact export writes (the card and eval.py read them)
REQUIRED = ("name", "model", "network", "type", "depth", "width", "num_classes", "classes", "data", "recipe",
            "recipe_settings", "seed", "epochs", "commands", "source", "device", "runtime", "commit", "torch", "triton",
            "mean", "std", "file", "sha256", "bytes", "storage", "test_error", "test_loss", "per_class_accuracy",
            "test_images", "measured", "training_test_error", "trained_by", "curves", "date")


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


def image_tensor(images) -> torch.Tensor:
    """images as a tensor: a tensor as it is, a numpy array or a PIL image (through its array
    interface, HWC uint8; a PIL image of another mode first converted to RGB, as torchvision's
    ImageFolder loads images) as a CPU tensor of its values."""
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(getattr(images, "mode", None), str) and hasattr(images, "convert") and images.mode != "RGB":
        images = images.convert("RGB")  # a PIL image: grayscale, RGBA, palette, CMYK
    if not isinstance(images, np.ndarray) and not hasattr(images, "__array_interface__"):
        raise UserError(f"images must be a PIL image, a numpy array or a tensor, got {type(images).__name__}")
    array = np.asarray(images)
    if array.dtype.kind not in "biuf":
        raise UserError(f"images must be uint8 or float in [0, 1], got a numpy array of {array.dtype}")
    # np.asarray of a PIL image is read-only, which torch.from_numpy warns of: copy such an array
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def resize_center_crop(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """CHW or NCHW images (uint8, or float in [0, 1]) of size x size, as torchvision's Resize(size)
    then CenterCrop(size) make them: the shorter side scaled to size (the longer to int(size * long /
    short)) with bilinear, antialiased interpolation, then the centre size x size. uint8 stays uint8
    (rounded); images already size x size are returned as they are, bit for bit."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    if min(height, width) < 1:
        raise UserError(f"images must have pixels, got shape {tuple(images.shape)}")
    short, long = sorted((height, width))
    scaled = int(size * long / short)
    target = (size, scaled) if height <= width else (scaled, size)
    batch = images.unsqueeze(0) if images.dim() == 3 else images
    work = batch if batch.dtype == torch.float64 else batch.float()  # half precision has no antialiased resize on CPUs
    resized = F.interpolate(work, size=target, mode="bilinear", antialias=True, align_corners=False)
    resized = resized.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else resized.to(images.dtype)
    top, left = int(round((target[0] - size) / 2.0)), int(round((target[1] - size) / 2.0))
    cropped = resized[..., top:top + size, left:left + size]
    return cropped[0] if images.dim() == 3 else cropped


class ImageClassification(torch.nn.Module):
    """What the weights expect of their input, as torchvision's weights' transforms() give it: images
    of any size resized and centre-cropped to 32x32 (resize_center_crop), then normalised with the
    mean and std of the training data as the data loaders normalise, giving float CHW (one image) or
    NCHW (a batch). It takes what torchvision's transforms take: a PIL image (converted to RGB), a
    numpy array or a tensor, uint8 (0-255) or float in [0, 1] (as ToTensor gives them), one image
    (3-D) or a batch (4-D). The channel axis is the one of size 3: the last (HWC, NHWC: PIL, numpy,
    the datasets' arrays) or the third from last (CHW, NCHW: torchvision.io.decode_image, ToTensor);
    a shape with 3 at both places (3 x H x 3) is ambiguous and refused."""

    def __init__(self, mean, std, size: int = INPUT_SIZE):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        # the loaders' float32 constants on the 0-255 scale: uint8 images give their batches bit for bit
        self.register_buffer("mean255", self.mean * 255.0, persistent=False)
        self.register_buffer("std255", self.std * 255.0, persistent=False)

    def forward(self, images) -> torch.Tensor:
        images = image_tensor(images)
        shape = tuple(images.shape)
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise UserError(f"images must be uint8 (0-255) or float in [0, 1], got {images.dtype} of shape {shape}")
        channels_last = images.dim() in (3, 4) and shape[-1] == 3
        channels_first = images.dim() in (3, 4) and shape[-3] == 3
        if channels_last == channels_first:
            which = ("both the last and the third-from-last axis have size 3" if channels_last
                     else "no channel axis of 3")
            raise UserError(f"images must be one image or a batch, HWC/NHWC or CHW/NCHW with 3 channels; shape {shape} "
                            f"has {which} (permute them to CHW or NCHW)")
        if channels_last:
            images = images.movedim(-1, -3)
        if images.is_floating_point() and images.numel():
            low, high = float(images.min()), float(images.max())
            if not (low >= 0.0 and high <= 1.0):  # written so that NaN fails too
                raise UserError(f"float images must be in [0, 1] (as ToTensor gives them), got values from {low:g} to "
                                f"{high:g}: divide 0-255 images by 255, or pass them as uint8")
        images = resize_center_crop(images, self.size)
        if images.dtype == torch.uint8:
            return ((images.float() - self.mean255[:, None, None]) / self.std255[:, None, None]).contiguous()
        return ((images - self.mean[:, None, None]) / self.std[:, None, None]).contiguous()

    def extra_repr(self) -> str:
        return (f"resize and centre-crop to {self.size}x{self.size}, mean={[round(m, 4) for m in self.mean.tolist()]}, "
                f"std={[round(s, 4) for s in self.std.tolist()]}")


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

    def transforms(self) -> ImageClassification:
        """What the network expects of its input: images resized and centre-cropped to 32x32, then
        normalised with the mean and std of its training data (ImageClassification)."""
        return ImageClassification(self.meta["mean"], self.meta["std"])


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


def get_weights(name: str, model: str | None = None) -> WeightsEntry:
    """The registry entry called name (list_weights() names them), or with name "DEFAULT" and model
    (a list_models() name) the entry get_model(model, weights="DEFAULT") loads. With model and an
    entry name, the entry must be one of that network's."""
    if model is not None and model not in MODEL_ARCHS:
        raise UserError(f"unknown model {model!r}: choose one of {', '.join(MODEL_ARCHS)}")
    if name == "DEFAULT":
        if model is None:
            raise UserError('"DEFAULT" is the best entry of a network: name the network too, get_weights("DEFAULT", '
                            f"model=NAME) with NAME one of {', '.join(MODEL_ARCHS)}")
        return resolve_weights(name, *MODEL_ARCHS[model], None)
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or not (registry_dir() / f"{name}.json").is_file():
        raise UserError(f"unknown weights {name!r}: {describe_registry(registry_entries())}")
    entry = read_entry(registry_dir() / f"{name}.json")
    if model is not None and entry.model != model:
        raise UserError(f"weights {name} are for {entry.meta['network']}, not {model} ({paper_name(*MODEL_ARCHS[model])})")
    return entry


def resolve_weights(weights, model_type: str, depth: int, width: int, num_classes: int | None) -> WeightsEntry:
    """The entry build_model(model_type, depth, width, num_classes, weights=weights) loads. weights: a
    WeightsEntry, an entry name, or "DEFAULT": the entry with the lowest test error for this network
    (each entry's error is its own last epoch's; the choice among entries is by that error)."""
    network = paper_name(model_type, depth, width)
    if isinstance(weights, WeightsEntry):
        entry = weights
    elif weights == "DEFAULT":
        entries = registry_entries()
        fitting = [entry for entry in entries if entry.architecture == (model_type, depth, width)
                   and num_classes in (None, entry.meta["num_classes"])]
        if not fitting:
            classes = "" if num_classes is None else f" with {num_classes} classes"
            raise UserError(f"no weights for {network}{classes}: {describe_registry(entries)}")
        entry = min(fitting, key=lambda entry: (entry.test_error, entry.name))
    elif isinstance(weights, str):
        entry = get_weights(weights)
    else:
        raise UserError(f"weights must be None, 'DEFAULT', an entry name or a WeightsEntry, got {weights!r}")
    if entry.architecture != (model_type, depth, width):
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


def entry_table(entries: list[WeightsEntry]) -> str:
    """The registry as python -m preresnet.pretrained prints it: one line per entry."""
    header = ("entry", "network", "data", "test error", "file", "size")
    rows = [(entry.name, entry.meta["network"], entry.meta["data"]["description"], f"{100 * entry.test_error:.2f}%",
             entry.meta["file"], f"{entry.meta['bytes'] / 2**20:.1f} MiB") for entry in entries]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in (header, *rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preresnet.pretrained",
                                     description="List the entries of the pretrained-weights registry: name, network, "
                                                 "data, test error (the last epoch's, measured on the file), file and "
                                                 "size.")
    parser.add_argument("--model", metavar="NAME", help="only the entries of this network (a list_models() name)")
    return parser


def print_registry(args: argparse.Namespace) -> None:
    names = list_weights(args.model)  # checks the model's name
    entries = [entry for entry in registry_entries() if entry.name in names]
    if not entries:
        print(describe_registry(entries) if args.model is None else
              f"the registry {registry_dir()} holds no weights for {args.model}")
        return
    print(f"the registry {registry_dir()}:")
    print(entry_table(entries))


def main(argv: list[str] | None = None) -> int:
    return run_main(print_registry, build_parser().parse_args(argv), "python -m preresnet.pretrained")


if __name__ == "__main__":
    sys.exit(main())
