"""Dispatch of each fused layer: the Triton kernel, or PyTorch's ops (cuDNN), by a per-GPU table.

The Triton conv need not beat cuDNN at every shape. Where it loses, the fused model keeps the
faster correct path for that shape: the same BN -> ReLU -> conv [+ residual] with the same
statistics chain, in PyTorch ops (more activation memory, as the unfused model keeps). The choice
comes from measurements (`python -m bench.gpu_report` times both paths for every conv of the paper
networks and writes a table; `python -m bench.render_results` installs it here as
conv_paths.json), one table per GPU name and operand dtype. Shapes, GPUs and dtypes the table does
not name run the Triton kernel.

`assign_paths(model, ...)` stores the choice on each conv as the attribute `fused_path`, read by
`kernels.layers.fused_conv`; plain module attributes keep torch.compile's graph free of lookups.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PATHS = ("triton", "torch")
TABLE = Path(__file__).with_name("conv_paths.json")
TABLE_ENV = "PRERESNET_CONV_PATHS"  # another table file, for measuring runs


@dataclass(frozen=True)
class ConvSignature:
    """What the speed of one fused layer depends on (the batch is the table's, 128 unless it says)."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    height: int
    width: int
    prologue: bool  # BatchNorm-ReLU of the input in the kernel (not in the stem, nor after an activation
    # materialised before a split)
    residual: bool

    @property
    def key(self) -> str:
        roles = ("" if self.prologue else " plain") + (" +residual" if self.residual else "")
        return (f"{self.in_channels}x{self.height}x{self.width}->{self.out_channels} "
                f"k{self.kernel} s{self.stride}{roles}")


_recorder: dict[nn.Conv2d, ConvSignature] | None = None


def record(x: torch.Tensor, conv: nn.Conv2d, prologue: bool, residual: bool) -> None:
    """Called by fused_conv for every layer; notes its signature while `conv_signatures` runs."""
    if _recorder is not None:
        _recorder[conv] = ConvSignature(x.shape[1], conv.out_channels, conv.kernel_size[0], conv.stride[0],
                                        x.shape[2], x.shape[3], prologue, residual)


@contextmanager
def _recording():
    global _recorder
    _recorder = {}
    try:
        yield _recorder
    finally:
        _recorder = None


def conv_signatures(model: nn.Module, image_shape=(3, 32, 32)) -> dict[str, ConvSignature]:
    """The signature of every fused conv of model by module name, from one forward pass of a copy
    on the meta device (no arithmetic; in eval mode, so that no statistics cross ranks)."""
    meta = copy.deepcopy(model).to("meta").eval()
    names = {module: name for name, module in meta.named_modules()}
    with _recording() as found, torch.no_grad():
        meta(torch.empty(2, *image_shape, device="meta").contiguous(memory_format=torch.channels_last))
    return {names[conv]: signature for conv, signature in found.items()}


def device_name(device) -> str:
    """The table's name of a device (a torch.device, "cuda:0", or a GPU name, returned as it is):
    the GPU's name, or the device type, "cpu" for the interpreter (tests)."""
    if isinstance(device, str) and not device.startswith(("cuda", "cpu")):
        return device
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def load_table(path: str | os.PathLike | None = None) -> dict:
    """{gpu name: {dtype name: {signature key: {"path": ..., "triton_ms": ..., "torch_ms": ...}}}}
    from path, else the file named by $PRERESNET_CONV_PATHS, else conv_paths.json here; {} when
    the file does not exist."""
    path = Path(path or os.environ.get(TABLE_ENV) or TABLE)
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())
    for gpu, dtypes in table.items():
        for dtype, entries in dtypes.items():
            for key, entry in entries.items():
                if entry.get("path") not in PATHS:
                    raise ValueError(f"{path}: {gpu} {dtype} {key}: path must be one of {PATHS}, got {entry.get('path')!r}")
    return table


def assign_paths(model: nn.Module, device: torch.device, dtype: torch.dtype, table: dict | None = None) -> dict[str, str]:
    """Set `fused_path` on every fused conv of model for this device and operand dtype; returns
    {module name: path} for the convs that leave the Triton kernel."""
    table = load_table() if table is None else table
    entries = table.get(device_name(device), {}).get(str(dtype).removeprefix("torch."), {})
    modules = dict(model.named_modules())
    moved = {}
    for name, signature in conv_signatures(model).items():
        path = entries.get(signature.key, {}).get("path", "triton")
        modules[name].fused_path = path
        if path != "triton":
            moved[name] = path
    return moved
