"""Fused layers on top of the `bn_relu_conv` op: nn.BatchNorm2d semantics and the statistics chain.

Each fused conv also returns the batch mean and variance of what it wrote, and the next BatchNorm
uses them instead of reading the tensor again. The modules keep their nn.BatchNorm2d / nn.Conv2d
parameters and buffers, so fused and unfused networks share state_dict keys; the functions here
only change how those parameters are applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import is_synchronising, merge_across_ranks, update_running_stats
from .dispatch import record
from .preact_conv import BnState, bn_relu_conv

Stats = tuple[torch.Tensor, torch.Tensor] | None  # batch mean and biased variance, fp32, per channel


def batchnorm_moments(bn: nn.BatchNorm2d, x: torch.Tensor, stats: Stats) -> BnState:
    """How bn normalises x in this forward pass. In training, the first fused_conv that reads the
    result updates bn's running statistics exactly as nn.BatchNorm2d does (momentum or cumulative
    average, unbiased running variance); a second reader takes `.read_only()`. Call it once per
    BatchNorm and forward. No kernel runs here when stats come from the layer before."""
    if not (bn.training or not bn.track_running_stats):
        return BnState(bn.running_mean, bn.running_var, bn.weight, bn.bias, False, bn.eps)
    count = x.numel() // x.shape[1]
    if count < 2 and bn.training:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if stats is None:  # nothing upstream measured x: one reduction pass
        var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = stats[0].detach(), stats[1].detach()
    sync_count = 0
    if getattr(bn, "sync", False) and is_synchronising():  # SyncBatchNorm2d: statistics over all ranks
        mean, var, sync_count = merge_across_ranks(mean, var, count)
    update = bn if bn.training and bn.track_running_stats else None
    return BnState(mean, var, bn.weight, bn.bias, True, bn.eps, sync_count, update)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The operand dtype: the autocast dtype when autocast is on (custom ops bypass autocast)."""
    device = weight.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):  # also runs on meta, to measure memory
        return torch.get_autocast_dtype(device)
    return weight.dtype


def fused_conv(x: torch.Tensor, bn: BnState | None, conv: nn.Conv2d, residual: torch.Tensor | None = None,
               emit_stats: bool = True) -> tuple[torch.Tensor, Stats]:
    """conv(relu(bn(x))) [+ residual] in one kernel (bn None: conv(x)); with emit_stats, also the
    batch mean and variance of the result for the BatchNorm that reads it next. A conv whose
    `fused_path` is "torch" (see kernels.dispatch) runs PyTorch's ops instead, with the same results."""
    y, stats, _ = _fused_conv(x, bn, conv, residual, emit_stats, carry=False)
    return y, stats


def fused_conv_carrying(x: torch.Tensor, bn: BnState | None, conv: nn.Conv2d,
                        emit_stats: bool = True) -> tuple[torch.Tensor, Stats, torch.Tensor]:
    """fused_conv, also returning x (in the operand dtype) for an identity shortcut to add: the
    shortcut's gradient then joins x's gradient inside this layer's backward kernels."""
    return _fused_conv(x, bn, conv, None, emit_stats, carry=True)


def _fused_conv(x, bn, conv, residual, emit_stats, carry):
    record(x, conv, bn is not None, residual is not None)
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" \
            or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        raise ValueError(f"the fused kernels take square, ungrouped, undilated convs without bias, got {conv}")
    dtype = compute_dtype(conv.weight)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    # the Triton kernel alone spans ranks inside its backward; synchronised layers stay on it
    if getattr(conv, "fused_path", "triton") == "torch" and not (bn is not None and bn.sync_count):
        return (*torch_conv(x, bn, conv, residual, emit_stats, dtype), x)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=torch.channels_last)
    # the conv's fp32 weight as it is: the kernel casts it to the operand dtype
    outputs = bn_relu_conv(x, bn, conv.weight, residual, conv.stride[0], conv.padding[0], emit_stats=emit_stats,
                           carry=carry)
    y, y_mean, y_var = outputs[:3]
    return y, (y_mean, y_var) if emit_stats else None, outputs[3] if carry else None


def torch_conv(x: torch.Tensor, bn: BnState | None, conv: nn.Conv2d, residual: torch.Tensor | None,
               emit_stats: bool, dtype: torch.dtype) -> tuple[torch.Tensor, Stats]:
    """fused_conv's layer in PyTorch ops (cuDNN on a GPU), for shapes where that is faster: what the
    unfused model runs, in the operand dtype. In training the BatchNorm recomputes the batch
    statistics it is given, so that autograd sees their dependence on x; the running statistics
    are updated from the given ones, as the kernel does."""
    a = x.to(dtype).contiguous(memory_format=torch.channels_last)
    if bn is not None:
        if bn.update is not None:
            update_running_stats(bn.update, bn.mean, bn.var, bn.sync_count or x.numel() // x.shape[1])
        if bn.batch_stats:
            a = F.batch_norm(a, None, None, bn.gamma, bn.beta, training=True, eps=bn.eps)
        else:
            a = F.batch_norm(a, bn.mean, bn.var, bn.gamma, bn.beta, training=False, eps=bn.eps)
        a = torch.relu(a)
    y = F.conv2d(a, conv.weight.to(dtype), stride=conv.stride, padding=conv.padding)
    if residual is not None:
        y = y + residual.to(dtype)
    if not emit_stats:
        return y, None
    # fp32 statistics, as the kernel's epilogue gives: the next BatchNorm normalises with them
    var, mean = torch.var_mean(y.detach().float(), dim=(0, 2, 3), unbiased=False)
    return y, (mean, var)
