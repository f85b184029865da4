"""The CPU section's paths (bench.workloads.CPU_PROVIDERS, timed by bench/test_cpu_steps.py) compute
the same training step: loss and gradients against the fp32 NCHW reference (`eager-fp32`), on
PreResNet-8 at batch 8, with bench.workloads.training_step itself.

fp32 channels-last is the same arithmetic in another memory order: fp32 tolerances. For the bf16
paths the unit is PyTorch's own bf16 error on this step: the error of the fp32 step run on the
input and the parameters rounded to bf16 once (what bf16 storage alone costs; the conv weights'
gradients move by 10-15% of their largest entry at initialisation, where the loss's gradient is
mostly cancellation through BatchNorm). A bf16 step rounds again at every layer: measured 1.1x to
2.9x that unit here (torch 2.13, eager and compiled), bounded at 4x plus one bf16 rounding (2^-8)
of the reference's scale.
"""

import pytest
import torch
import torch.nn.functional as F

from bench.workloads import random_input, training_step
from preresnet import build_model

BATCH = 8
BF16_ROUNDING = 2.0 ** -8  # bf16's unit roundoff: 8 significand bits
MULTIPLE = 4
# the stem (every layer's gradient passes back to it), a conv in the middle, the classifier
PARAMETERS = ("conv1.weight", "layer2.0.conv1.weight", "fc.weight")


def run(provider: str) -> tuple[float, dict[str, torch.Tensor], torch.nn.Module]:
    step = training_step("tiny", provider, "cpu", BATCH)
    loss = step().item()
    params = dict(step.model.named_parameters())
    return loss, {name: params[name].grad.detach().float().clone() for name in PARAMETERS}, step.model


def rounded_once() -> tuple[float, dict[str, torch.Tensor]]:
    """The reference step in fp32 on the input and parameters rounded to bf16 (training_step's model
    and data: same seeds)."""
    torch.manual_seed(0)
    model = build_model("normal", 1, num_classes=10).train()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    x = random_input(BATCH, 3, 32, "cpu", torch.contiguous_format).bfloat16().float()
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(1))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = dict(model.named_parameters())
    return loss.item(), {name: params[name].grad.detach().clone() for name in PARAMETERS}


def error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max error relative to the reference's largest magnitude (as tests/test_kernels.py measures)."""
    return ((actual - expected).abs().max() / (expected.abs().max() + 1e-12)).item()


@pytest.fixture(scope="module")
def reference():
    return run("eager-fp32")


@pytest.fixture(scope="module")
def bf16_unit(reference):
    loss, grads = rounded_once()
    ref_loss, ref_grads, _ = reference
    return abs(loss - ref_loss) / abs(ref_loss), {name: error(grads[name], ref_grads[name]) for name in PARAMETERS}


def test_reference_is_fp32_nchw(reference):
    _, _, model = reference
    assert model.conv1.weight.dtype == torch.float32 and model.conv1.weight.is_contiguous()


def test_fp32_channels_last_matches_fp32_nchw(reference):
    ref_loss, ref_grads, _ = reference
    loss, grads, model = run("eager-fp32-cl")
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in PARAMETERS:
        assert error(grads[name], ref_grads[name]) <= 2e-4, name


@pytest.mark.parametrize("provider", ["eager-amp-cl", pytest.param("compile", marks=pytest.mark.slow)])
def test_bf16_paths_match_fp32_within_bf16_error(reference, bf16_unit, provider):
    """bf16 channels-last, eager and compiled (PreResNet-8: its compile takes about a minute on 2
    busy cores, 'slow')."""
    ref_loss, ref_grads, _ = reference
    unit_loss, unit_grads = bf16_unit
    loss, grads, model = run(provider)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert loss != ref_loss  # autocast did compute in bf16
    assert abs(loss - ref_loss) / abs(ref_loss) <= MULTIPLE * unit_loss + BF16_ROUNDING
    for name in PARAMETERS:
        got = error(grads[name], ref_grads[name])
        assert got <= MULTIPLE * unit_grads[name] + BF16_ROUNDING, (name, got, unit_grads[name])
