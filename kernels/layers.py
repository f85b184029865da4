"""Fused layers on top of the `bn_relu_conv` op: nn.BatchNorm2d semantics and the statistics chain.

Each fused conv also returns the batch mean and variance of what it wrote, and the next BatchNorm
uses them instead of reading the tensor again. The modules keep their nn.BatchNorm2d / nn.Conv2d
parameters and buffers, so fused and unfused networks share state_dict keys; the functions here
only change how those parameters are applied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from preresnet.distributed import is_synchronising, merge_across_ranks, update_running_stats

from .paths import record
from .preact_conv import bn_relu_conv

Stats = tuple[torch.Tensor, torch.Tensor] | None  # batch mean and biased variance, fp32, per channel


class BatchNormApplied(NamedTuple):
    mean: torch.Tensor
    invstd: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    batch_stats: bool  # mean/invstd are the input's own batch statistics (training mode)
    eps: float
    sync_count: int = 0  # > 0: statistics over all ranks' batches, this many values per channel


def batchnorm_moments(bn: nn.BatchNorm2d, x: torch.Tensor, stats: Stats) -> BatchNormApplied:
    """How bn normalises x in this forward pass, updating its running statistics exactly as
    nn.BatchNorm2d does (momentum or cumulative average, unbiased running variance). Call it once
    per BatchNorm and forward: the result serves every conv that reads bn(x)."""
    if not (bn.training or not bn.track_running_stats):
        return BatchNormApplied(bn.running_mean, torch.rsqrt(bn.running_var + bn.eps), bn.weight, bn.bias, False, bn.eps)
    count = x.numel() // x.shape[1]
    if count < 2 and bn.training:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if stats is None:  # nothing upstream measured x: one reduction pass
        var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = stats[0].detach(), stats[1].detach()
    sync_count = 0
    if getattr(bn, "sync", False) and is_synchronising():  # SyncBatchNorm2d: statistics over all ranks
        mean, var, count = merge_across_ranks(mean, var, count)
        sync_count = count
    update_running_stats(bn, mean, var, count)
    return BatchNormApplied(mean, torch.rsqrt(var + bn.eps), bn.weight, bn.bias, True, bn.eps, sync_count)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The operand dtype: the autocast dtype when autocast is on (custom ops bypass autocast)."""
    device = weight.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):  # also runs on meta, to measure memory
        return torch.get_autocast_dtype(device)
    return weight.dtype


def fused_conv(x: torch.Tensor, bn: BatchNormApplied | None, conv: nn.Conv2d, residual: torch.Tensor | None = None,
               emit_stats: bool = True) -> tuple[torch.Tensor, Stats]:
    """conv(relu(bn(x))) [+ residual] in one kernel (bn None: conv(x)); with emit_stats, also the
    batch mean and variance of the result for the BatchNorm that reads it next. A conv whose
    `fused_path` is "torch" (see kernels.paths) runs PyTorch's ops instead, with the same results."""
    record(x, conv, bn is not None, residual is not None)
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" \
            or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        raise ValueError(f"the fused kernels take square, ungrouped, undilated convs without bias, got {conv}")
    dtype = compute_dtype(conv.weight)
    # the Triton kernel alone spans ranks inside its backward; synchronised layers stay on it
    if getattr(conv, "fused_path", "triton") == "torch" and not (bn is not None and bn.sync_count):
        return torch_conv(x, bn, conv, residual, emit_stats, dtype)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=torch.channels_last)
    weight = conv.weight.to(dtype)
    mean, invstd, gamma, beta, batch_stats, _, sync_count = (None, None, None, None, False, 0.0, 0) if bn is None else bn
    y, y_mean, y_var = bn_relu_conv(x, mean, invstd, gamma, beta, weight, residual, conv.stride[0], conv.padding[0],
                                    batch_stats, emit_stats, sync_count)
    return y, (y_mean, y_var) if emit_stats else None


def torch_conv(x: torch.Tensor, bn: BatchNormApplied | None, conv: nn.Conv2d, residual: torch.Tensor | None,
               emit_stats: bool, dtype: torch.dtype) -> tuple[torch.Tensor, Stats]:
    """fused_conv's layer in PyTorch ops (cuDNN on a GPU), for shapes where that is faster: what the
    unfused model runs, in the operand dtype. In training the BatchNorm recomputes the batch
    statistics it is given, so that autograd sees their dependence on x; the running statistics
    were already updated by batchnorm_moments, so none are passed here."""
    a = x.to(dtype).contiguous(memory_format=torch.channels_last)
    if bn is not None:
        if bn.batch_stats:
            a = F.batch_norm(a, None, None, bn.gamma, bn.beta, training=True, eps=bn.eps)
        else:  # the variance behind invstd, to hand the fixed statistics to the same op
            a = F.batch_norm(a, bn.mean, bn.invstd.pow(-2) - bn.eps, bn.gamma, bn.beta, training=False, eps=bn.eps)
        a = torch.relu(a)
    y = F.conv2d(a, conv.weight.to(dtype), stride=conv.stride, padding=conv.padding)
    if residual is not None:
        y = y + residual.to(dtype)
    if not emit_stats:
        return y, None
    # fp32 statistics, as the kernel's epilogue gives: the next BatchNorm normalises with them
    var, mean = torch.var_mean(y.detach().float(), dim=(0, 2, 3), unbiased=False)
    return y, (mean, var)
