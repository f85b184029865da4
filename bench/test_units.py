"""Unit level: each distinct pre-activation unit of PreResNet-110, PreResNet-164 and WRN-16-4, and
its first BN -> ReLU -> conv alone, forward and forward + backward, side by side per provider.

    pytest bench/test_units.py --benchmark-only
"""

import pytest
import torch

from bench.conftest import record
from bench.workloads import UNIT_PROVIDERS, unit_shapes, unit_step

SHAPES = unit_shapes()


@pytest.mark.parametrize("provider", UNIT_PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("part", ["layer", "unit"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name.replace(" ", "-") for s in SHAPES])
def test_unit(benchmark, provider_for, device, batch, rounds, env, shape, part, backward, provider):
    provider_for(provider)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = unit_step(shape, provider, device, batch, backward, layer_only=part == "layer")
    benchmark.group = f"{part} {shape.name} {'fwd+bwd' if backward else 'fwd'} batch {batch}"
    benchmark.pedantic(step, **rounds)
    record(benchmark, device, batch, env, provider=provider, shape=shape.name, part=part,
           dtype="float32" if provider == "eager-fp32" else "bfloat16")
