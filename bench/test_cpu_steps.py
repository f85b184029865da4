"""The CPU section: one training step (forward, loss, backward, SGD) of PreResNet-20 and
PreResNet-110 at batch 128 on the CPU per provider of bench.workloads.CPU_PROVIDERS -- fp32 NCHW
(`eager-fp32`), fp32 channels-last (`eager-fp32-cl`), bf16 autocast channels-last (`eager-amp-cl`)
and the same compiled (`compile`) -- side by side.

    pytest bench/test_cpu_steps.py --benchmark-only --benchmark-json bench/results/DATE-cpu-steps/benchmarks.json
    python -m bench.cpu_table bench/results/DATE-cpu-steps/benchmarks.json   # the table in docs/benchmarks.md

Skipped where PyTorch sees a CUDA GPU: the GPU rows are bench/test_models.py's. Each row runs its
first step alone and untimed (`first_step_seconds` in extra_info: for `compile` that is Inductor's
code generation, forward and backward), then BENCH_CPU_WARMUP more warm-up rounds (default 2) and
BENCH_CPU_ROUNDS timed rounds (default 5), one step each (pytest-benchmark's pedantic mode).
extra_info names the processor (`cpu_name`), the instruction sets it computes bf16 with natively
(`native_bf16`, empty where oneDNN emulates bf16), PyTorch's threads, and the versions and commit.
That the four paths compute the same loss and gradients is tests/test_cpu_paths.py's to check.
"""

import os
import time

import pytest

from bench.conftest import record
from bench.workloads import CPU_BATCH, CPU_MODELS, CPU_PROVIDERS, cpu_environment, provider_dtype, training_step


def pedantic_settings() -> dict:
    return dict(rounds=int(os.environ.get("BENCH_CPU_ROUNDS", "5")),
                warmup_rounds=int(os.environ.get("BENCH_CPU_WARMUP", "2")), iterations=1)


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("name", CPU_MODELS)
def test_cpu_training_step(benchmark, device, env, name, provider):
    if device != "cpu":
        pytest.skip("the CPU section runs where PyTorch sees no CUDA GPU; the GPU rows are bench/test_models.py's")
    step = training_step(name, provider, "cpu", CPU_BATCH)
    start = time.perf_counter()
    step()  # torch.compile's code generation, oneDNN's first primitives: outside the statistics
    first_step_seconds = time.perf_counter() - start
    benchmark.group = f"cpu training step {name} batch {CPU_BATCH}"
    benchmark.pedantic(step, **pedantic_settings())
    record(benchmark, "cpu", CPU_BATCH, env, provider=provider, model=name, dtype=provider_dtype(provider),
           channels_last=provider != "eager-fp32", compiled=provider == "compile",
           first_step_seconds=first_step_seconds, **cpu_environment())
