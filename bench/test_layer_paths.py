"""Layer paths: every distinct fused layer of PreResNet-110, PreResNet-164 and WRN-16-4 on the Triton
kernel and on PyTorch's ops (cuDNN on a GPU), forward + backward in bf16 as in training: the
measurement behind preresnet/kernels/conv_paths.json (`bench.gpu_report` writes the table from the same
workload).

    pytest bench/test_layer_paths.py --benchmark-only
"""

import pytest
import torch

from bench.conftest import record
from bench.workloads import conv_path_step, layer_signatures

SIGNATURES = layer_signatures()


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("signature", SIGNATURES, ids=[s.key.replace(" ", "-") for s in SIGNATURES])
def test_layer_path(benchmark, provider_for, device, batch, rounds, env, signature, path):
    if path == "triton":
        provider_for("fused")  # the Triton kernel: compiled on a GPU, meaningless under the interpreter
    step = conv_path_step(signature, path, device, batch, torch.bfloat16)
    benchmark.group = f"layer path {signature.key} fwd+bwd batch {batch}"
    benchmark.pedantic(step, **rounds)
    record(benchmark, device, batch, env, provider=path, layer=signature.key, dtype="bfloat16")
