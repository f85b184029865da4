"""BatchNorm statistics shared by the fused layers and the unfused synchronised BatchNorm: running
statistics as nn.BatchNorm2d keeps them, and batch statistics merged across ranks.

Plain PyTorch (no Triton), so that `preresnet.distributed` can use it without the kernels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_synchronising() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def merge_across_ranks(mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Batch mean and biased variance over all ranks from each rank's (count, mean, var): the same
    parallel merge as the kernels' tiles, M2 = sum M2_r + sum n_r (mean_r - mean)^2, in float64."""
    local = torch.cat([torch.tensor([float(count)], device=mean.device, dtype=torch.float64),
                       mean.double(), var.double()])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    parts = torch.stack(gathered)  # ranks x (1 + 2C)
    channels = mean.numel()
    counts, means, variances = parts[:, :1], parts[:, 1 : 1 + channels], parts[:, 1 + channels :]
    total = counts.sum()
    merged_mean = (counts * means).sum(0) / total
    m2 = (counts * variances).sum(0) + (counts * (means - merged_mean) ** 2).sum(0)
    return merged_mean.float(), (m2 / total).float(), int(total.item())


def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """nn.BatchNorm2d's running-statistics update: momentum (or cumulative average) and unbiased variance."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - factor).add_(mean * factor)
        bn.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1) * factor))
