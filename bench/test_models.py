"""Model level: one training step (forward, loss, backward, SGD) of the paper networks per provider.

    pytest bench/test_models.py --benchmark-only

extra_info also holds `launches_per_step`, the device kernels the step launches (bench.launches:
counted by running the step once more under its counter), for the providers it counts.
"""

import pytest
import torch

from bench.conftest import record
from bench.launches import COUNTED_PROVIDERS, count_step
from bench.workloads import MODELS, PROVIDERS, training_step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", MODELS)
def test_training_step(benchmark, provider_for, device, batch, rounds, env, name, provider):
    provider_for(provider)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = training_step(name, provider, device, batch)
    benchmark.group = f"training step {name} batch {batch}"
    benchmark.pedantic(step, **rounds)
    launches = {"launches_per_step": count_step(step).total} if provider in COUNTED_PROVIDERS else {}
    record(benchmark, device, batch, env, provider=provider, model=name,
           dtype="float32" if provider == "eager-fp32" else "bfloat16", **launches)
