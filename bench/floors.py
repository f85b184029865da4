"""Estimates on paper: the lowest possible time per training image of each network on a device.

    python -m bench.floors            # markdown table, H100 SXM constants
    python -m bench.floors --json     # one JSON object per model

These are estimates, not measurements. Per training image (one 3x32x32 CIFAR image, batch-size
independent) the model counts:

- compute: the forward's FLOPs from torch.utils.flop_counter.FlopCounterMode (convolutions and the
  final linear layer, 2 FLOPs per multiply-add; BatchNorm, ReLU and additions are not counted), and
  training = 3 x forward (the backward's data and weight gradients are each about one forward);
- memory: every conv output (stem, unit convs, projection shortcuts) in bf16, moved 5 times: written
  and read once in the forward; in the backward its saved value read once and its gradient read once
  and written once. Weights, optimizer state, BatchNorm/ReLU intermediates and the input are left out
  (they are either tiny per image or avoidable by fusion);
- time = max(FLOPs / peak FLOP/s, bytes / bandwidth): perfect overlap, full peak, no launch or
  synchronisation cost. Real training is slower; measured speeds are reported as a fraction of this
  floor (`fraction_of_floor`).

The models are built on the meta device: shapes only, no arithmetic, seconds on any machine.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from preresnet import get_model, list_models
from preresnet.models import MODEL_ARCHS
from preresnet.recipes import DEFAULT_RECIPE, RECIPES

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 Tensor Core 1,979 teraFLOPS "with
# sparsity", i.e. 989 TFLOP/s dense; GPU memory bandwidth 3.35 TB/s (HBM3, 80 GB).
DEVICES: dict[str, dict[str, float]] = {"H100 SXM": {"peak_flops": 989e12, "bandwidth": 3.35e12}}
DEFAULT_DEVICE = "H100 SXM"
H100 = DEVICES[DEFAULT_DEVICE]

IMAGES_PER_EPOCH = 50_000  # CIFAR-10/100 training set
INPUT_SHAPE = (1, 3, 32, 32)
BACKWARD_TO_FORWARD = 2  # backward ~ data gradient + weight gradient, each about one forward
PASSES_PER_CONV_OUTPUT = 5  # forward write + read; backward saved-value read, gradient read + write
BF16_BYTES = 2


def count_forward(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """One no-grad pass of model(x): (FLOPs by FlopCounterMode, 2 per multiply-add; nn.Conv2d output elements)."""
    conv_elements = []

    def hook(module, inputs, output):
        conv_elements.append(output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops(), sum(conv_elements)


@functools.lru_cache(maxsize=None)
def per_image_counts(name: str) -> tuple[int, int]:
    """(forward FLOPs, conv output elements) of one 32x32 image through the registered model (meta device)."""
    with torch.device("meta"):
        model = get_model(name).train()
        x = torch.empty(*INPUT_SHAPE)
    return count_forward(model, x)


def training_flops(name: str) -> int:
    """FLOPs of one training step per image: forward + backward = 3 x forward."""
    return (1 + BACKWARD_TO_FORWARD) * per_image_counts(name)[0]


def minimal_activation_bytes(name: str, bytes_per_element: int = BF16_BYTES) -> int:
    """Activation bytes one training image must move: 5 passes over every conv output."""
    return PASSES_PER_CONV_OUTPUT * bytes_per_element * per_image_counts(name)[1]


def default_recipe(name: str) -> str:
    """The recipe train.py uses for the registered model: "paper" or "wrn"."""
    return DEFAULT_RECIPE[MODEL_ARCHS[name][0]]


def default_epochs(name: str) -> int:
    return RECIPES[default_recipe(name)].epochs


def _device(device: str) -> dict[str, float]:
    if device not in DEVICES:
        raise KeyError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    return DEVICES[device]


def seconds_per_image(name: str, peak_flops: float = H100["peak_flops"], bandwidth: float = H100["bandwidth"]) -> float:
    """max(compute time, memory time) of one training image."""
    return max(training_flops(name) / peak_flops, minimal_activation_bytes(name) / bandwidth)


def floor_seconds(name: str, epochs: int | None = None, peak_flops: float = H100["peak_flops"],
                  bandwidth: float = H100["bandwidth"]) -> float:
    """Lowest possible time of `epochs` epochs (default: the model's default recipe's epochs)."""
    epochs = default_epochs(name) if epochs is None else epochs
    return epochs * IMAGES_PER_EPOCH * seconds_per_image(name, peak_flops, bandwidth)


def floor_images_per_second(name: str, device: str = DEFAULT_DEVICE) -> float:
    return 1.0 / seconds_per_image(name, **_device(device))


def fraction_of_floor(measured_images_per_second: float, name: str, device: str = DEFAULT_DEVICE) -> float:
    """A measured training speed as a fraction of the floor's speed (1.0 = at the floor)."""
    return measured_images_per_second / floor_images_per_second(name, device)


def estimate(name: str, device: str = DEFAULT_DEVICE) -> dict:
    constants = _device(device)
    flops, nbytes = training_flops(name), minimal_activation_bytes(name)
    compute_s, memory_s = flops / constants["peak_flops"], nbytes / constants["bandwidth"]
    recipe = default_recipe(name)
    return {"model": name, "device": device, **constants, "training_flops_per_image": flops,
            "activation_bytes_per_image": nbytes, "compute_seconds_per_image": compute_s,
            "memory_seconds_per_image": memory_s, "bound": "compute" if compute_s >= memory_s else "memory",
            "floor_images_per_second": 1.0 / max(compute_s, memory_s), "recipe": recipe,
            "epochs": RECIPES[recipe].epochs, "images_per_epoch": IMAGES_PER_EPOCH,
            "floor_seconds": floor_seconds(name, **constants)}


def markdown_table(rows: list[dict]) -> str:
    lines = [f"| model | GFLOP / image | MB / image | bound on {rows[0]['device']} | floor images/s | schedule | "
             "floor for schedule |", "| --- | ---: | ---: | --- | ---: | --- | ---: |"]
    lines += [f"| {row['model']} | {row['training_flops_per_image'] / 1e9:.2f} | "
              f"{row['activation_bytes_per_image'] / 1e6:.1f} | {row['bound']} | "
              f"{row['floor_images_per_second']:,.0f} | {row['recipe']}, {row['epochs']} epochs | "
              f"{row['floor_seconds']:,.0f} s |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=list_models(),
                        help="registered model (repeatable; default: all)")
    parser.add_argument("--device", choices=list(DEVICES), default=DEFAULT_DEVICE)
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    args = parser.parse_args()
    rows = [estimate(name, args.device) for name in args.model or list_models()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
