"""Loader throughput: one training epoch of 50,000 CIFAR-sized images, batch 128, each backend.

    pytest bench/test_loader.py --benchmark-only

Compare the images/s in extra_info with the training step's images/s on the same device: the
loader must be far faster, or it sets the pace of training.
"""

import itertools
import platform

import numpy as np
import pytest
import torch

from preresnet import loaders
from preresnet.runtime import cpu_name

EPOCH_IMAGES = 50_000
BATCH_SIZE = 128

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not loaders.dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)"))]


@pytest.fixture(scope="module")
def cifar_sized():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (EPOCH_IMAGES, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, EPOCH_IMAGES)


def versions(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if loaders.dali_available():
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    return info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_epoch(benchmark, cifar_sized, backend, device):
    images, labels = cifar_sized
    loader = loaders.build_loader(images, labels, batch_size=BATCH_SIZE, train=True, backend=backend,
                                  device=device, channels_last=True)
    epochs = itertools.count()
    checksum = []

    def one_epoch():
        loader.set_epoch(next(epochs))
        total = 0.0
        for x, y in loader:
            total += float(x[0, 0, 0, 0])  # touch every batch so nothing is skipped
        if device == "cuda":
            torch.cuda.synchronize()
        checksum.append(total)

    benchmark.group = f"loader: one epoch of {EPOCH_IMAGES} images, batch {BATCH_SIZE}, {device}"
    benchmark.pedantic(one_epoch, rounds=3, warmup_rounds=1, iterations=1)
    assert len(checksum) == 4
    benchmark.extra_info.update(
        images_per_second=loader.num_samples / benchmark.stats.stats.median,
        images=loader.num_samples, backend=backend, device=device, **versions(device),
    )
