"""Packed runs: one training step of each of K copies of a paper network (K = 1, 2, 4), as
train.py --seeds trains them on one device (bench.workloads.packed_training_steps); extra_info
holds the aggregate images/s of all K copies, so one group shows how packing scales.

    pytest bench/test_packing.py --benchmark-only
"""

import pytest
import torch

from bench.conftest import record
from bench.workloads import MODELS, PACKED_PROVIDERS, PACKED_RUNS, packed_training_steps, skip_reason
from preresnet.runtime import Runtime


@pytest.mark.parametrize("runs", PACKED_RUNS)
@pytest.mark.parametrize("provider", list(PACKED_PROVIDERS))
@pytest.mark.parametrize("name", MODELS)
def test_packed_training_steps(benchmark, device, batch, rounds, env, name, provider, runs):
    settings = PACKED_PROVIDERS[provider]
    if device == "cpu" and settings["amp"] != "off":
        pytest.skip("bf16 convolutions on a CPU are not what a GPU runs: only eager-fp32 is timed here")
    reason = skip_reason("fused" if settings["fused"] else "eager-fp32", device)
    if reason:
        pytest.skip(reason)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runtime = Runtime(device=torch.device(device), compile=False, loader="torch", **settings)
    step = packed_training_steps(name, runtime, runs, batch)
    benchmark.group = f"packed training steps {name} {provider} batch {batch}"
    benchmark.pedantic(step, **rounds)
    # record() divides the batch by the median seconds of one call: K copies' images in each
    record(benchmark, device, batch * runs, env, provider=provider, model=name, packed_runs=runs,
           dtype="float32" if settings["amp"] == "off" else "bfloat16")
