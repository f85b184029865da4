"""Benchmark settings: full batch 128 on a GPU, reduced sizes on a CPU (the suite must stay short there)."""

import pytest
import torch

from bench.workloads import environment, skip_reason


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def batch(device) -> int:
    return 128 if device == "cuda" else 8


@pytest.fixture(scope="session")
def rounds(device) -> dict:
    """pedantic() settings: warm-up rounds compile and autotune outside the statistics."""
    return dict(rounds=20, warmup_rounds=3, iterations=1) if device == "cuda" else dict(rounds=3, warmup_rounds=1, iterations=1)


@pytest.fixture(scope="session")
def env(device) -> dict:
    return environment(device)


@pytest.fixture
def provider_for(device):
    """Skip with the reason when a provider means nothing on this device."""

    def check(provider: str) -> str:
        reason = skip_reason(provider, device)
        if reason:
            pytest.skip(reason)
        return provider

    return check


def record(benchmark, device: str, batch: int, env: dict, **info) -> None:
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(images_per_second=batch / seconds, batch=batch, device=device, **env, **info)
    if device == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
