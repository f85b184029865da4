"""Device launches per training step, counted on the CPU (bench/launches.py: the method)."""

import math

import pytest
import torch

from bench.launches import LaunchCounter, count_step, step_launches


def test_counter_rules():
    """One launch per kernel-running ATen op; none for views, allocations and metadata; foreach ops
    by CUDA's multi_tensor_apply chunks; .item() reported as a host synchronisation."""
    x = torch.randn(8, 8)
    tensors = [torch.randn(3) for _ in range(200)]
    with LaunchCounter() as counter:
        y = x + 1  # 1
        y.view(64)  # a view: 0
        torch.empty(5)  # an allocation: 0
        y.mul_(2)  # in place: 1
        torch._foreach_add_(tensors, 1.0)  # one list: ceil(200 / 110) = 2
        torch._foreach_add_(tensors, tensors)  # two lists: ceil(200 / 64) = 4
        y.sum().item()  # sum 1, and a host synchronisation
    assert counter.aten["add"] == 1 and counter.aten["mul_"] == 1 and counter.aten["sum"] == 1
    assert counter.aten["_foreach_add_"] == math.ceil(200 / 110) + math.ceil(200 / 64)
    assert counter.host_syncs == 1
    assert counter.total == 1 + 1 + 6 + 1 + 1


@pytest.mark.parametrize("provider", ["eager-fp32", "fused"])
def test_launch_count_does_not_depend_on_the_batch(provider):
    assert step_launches("preresnet20", provider, batch=2).total == step_launches("preresnet20", provider, batch=3).total


def test_fused_preresnet110_step_launches_at_most_60_percent_of_eager():
    """The fused step: one kernel per conv forward (BatchNorm and its running statistics inside),
    three per conv backward (weight gradient, data gradient with the BatchNorm reductions, the
    BatchNorm's input gradient with the shortcut's gradient added), a few dozen ops around them."""
    eager = step_launches("preresnet110", "eager-fp32", batch=2)
    fused = step_launches("preresnet110", "fused", batch=2)
    assert eager.host_syncs == fused.host_syncs == 0
    convs = 110 + 1  # 54 units x 2, two projections, the stem
    assert fused.triton["bn_relu_conv_fwd"] == convs and fused.triton["bn_relu_conv_wgrad"] == convs
    assert fused.triton["bn_relu_conv_dgrad"] == convs - 1  # the stem's input is the data
    assert fused.triton["bn_backward_apply"] == convs - 2  # ... and the first unit's conv1 is plain
    assert sum(fused.aten.values()) < 70, fused.aten
    assert fused.total <= 0.6 * eager.total, (fused.total, eager.total)


def test_count_step_runs_the_step_twice_and_counts_the_second():
    calls = []

    def step():
        calls.append(1)
        torch.ones(3).add_(1)

    counter = count_step(step)
    assert len(calls) == 2 and counter.total == 2  # ones (a fill) and add_
