"""Activation memory that autograd keeps for the backward pass of one training step, fused vs unfused.

    python -m bench.activation_memory --model preresnet110 --batch-size 128

It counts the distinct storages saved through torch.autograd.graph.saved_tensors_hooks during the
forward pass, leaving out parameters and buffers. The models run on the meta device: shapes and
dtypes are those of a real step, no arithmetic is done, so any machine measures any model in seconds.

It also gives the fused backward's largest transient buffer: the fp32 partials of the weight
gradient's split (`preresnet.kernels.preact_conv.wgrad_grid`), allocated per launch and sized by the
GPU's multiprocessors (--multiprocessors; default an H100's or H200's 132) and the weight
gradient's launch configuration.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from bench.compile_audit import EMULATED_MULTIPROCESSORS
from preresnet import get_model, list_models
from preresnet.kernels.launch_configs import CONV_WGRAD, DEFAULTS
from preresnet.kernels.dispatch import conv_signatures
from preresnet.kernels.preact_conv import conv_output_size, wgrad_grid


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    own = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(saved.values())


def measure(name: str, batch_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """Saved bytes for one training step of the registered model, unfused and fused."""
    result = {"model": name, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch.")}
    for fused in (False, True):
        with torch.device("meta"):
            model = get_model(name, fused=fused).to(dtype=dtype, memory_format=torch.channels_last).train()
            x = torch.empty(batch_size, 3, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
        result["fused_bytes" if fused else "unfused_bytes"] = saved_activation_bytes(model, x)
    result["fused_fraction"] = result["fused_bytes"] / result["unfused_bytes"]
    return result


def wgrad_scratch(name: str, batch_size: int, multiprocessors: int = EMULATED_MULTIPROCESSORS) -> dict:
    """The fused model's weight-gradient launch with the most fp32 scratch at batch_size on a GPU
    with that many multiprocessors: its layer, splits, programs and scratch bytes."""
    config = DEFAULTS[CONV_WGRAD]
    with torch.device("meta"):
        model = get_model(name, fused=True)
    launches = []
    for signature in sorted(set(conv_signatures(model).values()), key=lambda s: s.key):
        padding = signature.kernel // 2  # 3x3 convs pad 1, 1x1 convs 0
        pixels = batch_size * math.prod(conv_output_size(size, signature.kernel, signature.stride, padding)
                                        for size in (signature.height, signature.width))  # N x H_out x W_out
        grid = wgrad_grid(pixels, signature.kernel ** 2, signature.in_channels, signature.out_channels,
                          config.block("BLOCK_M", pixels), config.block("BLOCK_C", signature.in_channels),
                          config.block("BLOCK_CO", signature.out_channels), multiprocessors)
        launches.append({"layer": signature.key, "splits": grid.splits, "programs": grid.programs,
                         "scratch_bytes": 4 * grid.scratch_elements})
    return max(launches, key=lambda launch: launch["scratch_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=list_models(),
                        help="registered model (repeatable; default preresnet110, preresnet164, wrn16_4)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--multiprocessors", type=int, default=EMULATED_MULTIPROCESSORS,
                        help="the GPU's streaming multiprocessors, which size the weight gradient's split")
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    args = parser.parse_args()
    for name in args.model or ["preresnet110", "preresnet164", "wrn16_4"]:
        result = measure(name, args.batch_size, getattr(torch, args.dtype))
        result["wgrad_scratch"] = scratch = wgrad_scratch(name, args.batch_size, args.multiprocessors)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{name:14s} batch {args.batch_size} {result['dtype']}: unfused {result['unfused_bytes'] / 2**20:8.1f} MiB, "
                  f"fused {result['fused_bytes'] / 2**20:8.1f} MiB ({100 * result['fused_fraction']:.0f}%); "
                  f"weight-gradient scratch at most {scratch['scratch_bytes'] / 2**20:.1f} MiB a launch "
                  f"({scratch['layer']}: splits {scratch['splits']}, programs {scratch['programs']}, on "
                  f"{args.multiprocessors} multiprocessors)")


if __name__ == "__main__":
    main()
