"""Multi-process training under torchrun: process group, BatchNorm synchronised across ranks.

`torchrun --nproc_per_node N train.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the
run is a single process and nothing here does anything. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .kernels.batchnorm import is_synchronising, merge_across_ranks, update_running_stats

from .errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torchrun keeps one store across the restarts of --max-restarts: under a prefix of their own, the
        # processes of a restarted group cannot read the addresses the previous group left there (and
        # fail, or hang, connecting to processes that are gone)
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size)
    return Dist(rank, world_size, local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity for one process)."""
    if is_synchronising():
        dist.all_reduce(tensor)
    return tensor


def broadcast_object(value):
    """Rank 0's value on every rank."""
    if not is_synchronising():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(value) -> list:
    """Every rank's value in rank order on rank 0 ([value] for one process; other ranks get [])."""
    if not is_synchronising():
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []


def barrier() -> None:
    """Wait until every rank got here (a no-op for one process)."""
    if is_synchronising():
        dist.barrier()


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm whose statistics, and the two sums of its backward, span all ranks."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn):
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        mean, var, total = merge_across_ranks(mean, var, count)
        update_running_stats(bn, mean, var, total)
        invstd = torch.rsqrt(var + bn.eps)
        xhat = (x.float() - mean[None, :, None, None]) * invstd[None, :, None, None]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total = total
        return (xhat * weight.float()[None, :, None, None] + bias.float()[None, :, None, None]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        grad = grad.float()
        xhat = (x.float() - mean[None, :, None, None]) * invstd[None, :, None, None]
        dbeta = grad.sum((0, 2, 3))
        dgamma = (grad * xhat).sum((0, 2, 3))
        sums = all_reduce_sum(torch.stack([dbeta, dgamma]))  # global sums for the normalisation terms
        scale = (weight.float() * invstd)[None, :, None, None]
        dx = scale * (grad - sums[0][None, :, None, None] / ctx.total - xhat * sums[1][None, :, None, None] / ctx.total)
        # the parameter gradients stay local: DistributedDataParallel averages them over ranks
        return dx.to(x.dtype), dgamma.to(weight.dtype), dbeta.to(weight.dtype), None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with statistics over the batch of all ranks in training (any device, any
    backend: torch's SyncBatchNorm refuses CPU tensors). Same parameters, buffers and state_dict keys;
    the fused kernels read `sync` and merge their statistics across ranks too."""

    sync = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_synchronising()):
            return super().forward(x)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every nn.BatchNorm2d of model a SyncBatchNorm2d, in place, keeping its state."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = SyncBatchNorm2d
    return model


def replicas_agree(model: nn.Module) -> bool:
    """Whether every rank holds the same parameters (one checksum per tensor, all-gathered)."""
    if not is_synchronising():
        return True
    checksums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = [torch.empty_like(checksums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksums)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
