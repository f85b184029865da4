"""Shared by tests/ and bench/: the `gpu` marker skips cleanly where PyTorch sees no CUDA GPU.

CUDA is queried when tests are collected, never when a test module is imported.
"""

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; PyTorch sees none on this machine")
    for item in gpu_items:
        item.add_marker(skip)
