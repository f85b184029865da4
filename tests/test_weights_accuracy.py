"""Every shipped weights entry classifies real images as its card says: a fixed sample of the JPEG
copy's test split (the first 50 images of each class, 500 in all), decoded with PIL and normalised
here, independently of the package's loaders, scores within sampling error of the error the card
records over all 10,000 test images.

The JPEG copy is looked for in the checkout's data/cifar10-jpeg (README: how to make it), then as
the archive cifar10-jpeg.tar.gz in ../shared/data beside the checkout; where neither is, the test
says so and skips.
"""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import preresnet
from preresnet.data import extract

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 50
ARCHIVES = [ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz", ROOT.parents[1] / "shared" / "data" /
            "cifar10-jpeg.tar.gz"]


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    folder = ROOT / "data" / "cifar10-jpeg" / "test"
    if folder.is_dir():
        return folder
    archive = next((path for path in ARCHIVES if path.is_file()), None)
    if archive is None:
        pytest.skip("no JPEG copy of CIFAR-10 here (data/cifar10-jpeg, or ../shared/data/cifar10-jpeg.tar.gz)")
    target = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.lstrip("./").startswith("test/")]
        extract(tar, target, members)
    return target / "test"


def sample(test_split: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The first PER_CLASS images of each class (by file name), uint8 N x 32 x 32 x 3, and labels."""
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((test_split / name).iterdir())[:PER_CLASS]:
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("name", preresnet.list_weights())
def test_each_entry_scores_its_cards_error_on_real_images(test_split, name):
    entry = preresnet.get_weights(name)
    model = preresnet.get_model(entry.model, weights=name)
    images, labels = sample(test_split, entry.meta["classes"])
    mean = torch.tensor(entry.meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(entry.meta["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    error = float((predicted != labels).mean())
    card = entry.test_error
    # four standard deviations of a 500-image sample's error around the card's 10,000-image figure
    assert abs(error - card) <= 4 * math.sqrt(card * (1 - card) / len(labels)), (name, error, card)
