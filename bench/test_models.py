"""Model level: one training step (forward, loss, backward, SGD) of the paper networks per provider.

    pytest bench/test_models.py --benchmark-only
"""

import pytest
import torch

from bench.conftest import record
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
    record(benchmark, device, batch, env, provider=provider, model=name,
           dtype="float32" if provider == "eager-fp32" else "bfloat16")
