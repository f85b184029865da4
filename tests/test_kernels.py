"""The fused kernels against the reference PyTorch ops (F.batch_norm, relu, F.conv2d, add).

On the CPU they run under the Triton interpreter in fp32, where tl.dot is exact IEEE arithmetic, so
tolerances are tight. The `gpu` tests run the compiled kernels in bf16/fp16 and bound their error
by a multiple of PyTorch's own error against an fp32 reference.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preresnet.kernels import INTERPRETED, BnState, bn_relu_conv, bn_relu_conv_ref
from preresnet.kernels.layers import batchnorm_moments
from preresnet.kernels.dispatch import assign_paths, conv_signatures, device_name, load_table
from preresnet import build_model, get_model

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5

# (C_IN, C_OUT, kernel, stride): every unit conv of the three networks, the stem, and awkward ones
CONV_SHAPES = [
    pytest.param(3, 16, 3, 1, id="stem"),
    pytest.param(16, 16, 3, 1, id="normal-16"),
    pytest.param(16, 32, 3, 2, id="normal-down-32"),
    pytest.param(32, 64, 3, 2, id="normal-down-64"),
    pytest.param(64, 64, 3, 1, id="normal-64"),
    pytest.param(16, 32, 1, 2, id="projection-32"),
    pytest.param(16, 64, 1, 1, id="bottleneck-projection-64"),
    pytest.param(64, 16, 1, 1, id="bottleneck-reduce"),
    pytest.param(64, 32, 1, 2, id="bottleneck-down-reduce-32"),
    pytest.param(32, 32, 3, 1, id="bottleneck-32"),
    pytest.param(128, 64, 1, 2, id="bottleneck-down-reduce-64"),
    pytest.param(32, 128, 1, 1, id="bottleneck-expand-128"),
    pytest.param(128, 256, 1, 2, id="bottleneck-projection-256"),
    pytest.param(256, 64, 1, 1, id="bottleneck-reduce-256"),
    pytest.param(16, 16, 1, 1, id="bottleneck-first-reduce"),
    pytest.param(64, 256, 1, 1, id="bottleneck-expand-256"),
    pytest.param(128, 32, 1, 1, id="bottleneck-reduce-128"),
    pytest.param(16, 64, 3, 1, id="wide-64"),
    pytest.param(32, 64, 1, 2, id="projection-64"),
    pytest.param(64, 128, 1, 2, id="wide-projection-128"),
    pytest.param(64, 128, 3, 2, id="wide-down-128"),
    pytest.param(128, 128, 3, 1, id="wide-128"),
    pytest.param(128, 256, 3, 2, id="wide-down-256"),
    pytest.param(256, 256, 3, 1, id="wide-256"),
    pytest.param(24, 40, 3, 1, id="non-power-of-two"),
    pytest.param(40, 24, 3, 2, id="non-power-of-two-down"),
]
def test_the_shapes_cover_every_conv_of_the_three_networks():
    """Every (C_IN, C_OUT, kernel, stride) of a conv of PreResNet-110, PreResNet-164 and WRN-16-4 is
    one of CONV_SHAPES, so each is compared with the reference on its own, not only inside a network."""
    networks = set()
    for name in ("preresnet110", "preresnet164", "wrn16_4"):
        with torch.device("meta"):
            model = get_model(name)
        networks |= {(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
                     for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert networks <= {tuple(param.values) for param in CONV_SHAPES}


SPATIAL = [pytest.param(2, 8, 8, id="2x8x8"), pytest.param(1, 7, 7, id="1x7x7"), pytest.param(3, 5, 9, id="3x5x9")]


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The GPU's 64-pixel tiles and channel blocks instead of the interpreter's large ones, so that
    small shapes span several tiles (and a partial last one), the statistics merge and split weight
    gradient run, and wide layers loop over channel blocks; the weight gradient sized for 8
    multiprocessors, so that a layer of up to 8 tiles splits over at least two pixel ranges."""
    from preresnet.kernels import preact_conv

    monkeypatch.setattr(preact_conv, "INTERPRETER_BLOCK_M", 64)
    monkeypatch.setattr(preact_conv, "INTERPRETER_BLOCK_C", None)
    monkeypatch.setattr(preact_conv, "INTERPRETER_MULTIPROCESSORS", 8)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def make_case(n, c_in, h, w, c_out, kernel, stride, residual, seed=0):
    generator = torch.Generator().manual_seed(seed)
    padding = kernel // 2
    x = channels_last(torch.randn(n, c_in, h, w, generator=generator) * 1.5 + 0.3).requires_grad_()
    gamma = (torch.rand(c_in, generator=generator) + 0.5).requires_grad_()
    beta = (torch.randn(c_in, generator=generator) * 0.5).requires_grad_()
    weight = (torch.randn(c_out, c_in, kernel, kernel, generator=generator) / (c_in * kernel * kernel) ** 0.5).requires_grad_()
    ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    res = channels_last(torch.randn(n, c_out, ho, wo, generator=generator)).requires_grad_() if residual else None
    running_mean = torch.randn(c_in, generator=generator) * 0.2
    running_var = torch.rand(c_in, generator=generator) + 0.5
    return x, gamma, beta, weight, res, running_mean, running_var, padding


def assert_close(actual, expected, rtol=2e-5, name=""):
    """Max error relative to the reference's largest magnitude: robust to entries near zero."""
    scale = expected.abs().max().item() + 1e-12
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3e} vs max |ref| {scale:.3e}"


@pytest.mark.parametrize("n, h, w", SPATIAL)
@pytest.mark.parametrize("c_in, c_out, kernel, stride", CONV_SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.usefixtures("gpu_tiles")
def test_bn_relu_conv_matches_reference(n, h, w, c_in, c_out, kernel, stride, training):
    stem = c_in == 3
    residual = not stem and stride == 1 and kernel == 3
    x, gamma, beta, weight, res, running_mean, running_var, padding = make_case(n, c_in, h, w, c_out, kernel, stride, residual)
    if stem:
        y, y_mean, y_var = bn_relu_conv(x.detach(), None, weight, None, stride, padding, emit_stats=True)
        expected = F.conv2d(x.detach(), weight, stride=stride, padding=padding)
        inputs, ref_inputs = [weight], [weight]
    else:
        if training:
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False)
            normalised = F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)
        else:
            mean, var = running_mean, running_var
            normalised = F.batch_norm(x, running_mean, running_var, gamma, beta, training=False, eps=EPS)
        y, y_mean, y_var = bn_relu_conv(x, BnState(mean, var, gamma, beta, training, EPS), weight, res, stride,
                                        padding, emit_stats=True)
        expected = F.conv2d(torch.relu(normalised), weight, stride=stride, padding=padding)
        if res is not None:
            expected = expected + res
        inputs = [x, gamma, beta, weight] + ([res] if res is not None else [])
        ref_inputs = inputs
        # the reference next to the kernel says the same
        assert_close(bn_relu_conv_ref(x, mean, var, gamma, beta, weight, res, stride, padding, EPS),
                     expected, name="bn_relu_conv_ref")
    assert y.shape == expected.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, name="y")
    expected_var, expected_mean = torch.var_mean(expected.detach(), dim=(0, 2, 3), unbiased=False)
    assert_close(y_mean, expected_mean, name="mean of y")
    assert_close(y_var, expected_var, name="variance of y")

    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(y, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out)
    for name, got, want in zip(("x", "gamma", "beta", "weight", "residual")[-len(inputs):] if stem else
                               ("x", "gamma", "beta", "weight", "residual"), grads, expected_grads):
        assert_close(got, want, rtol=5e-5, name=f"grad {name}")


@pytest.mark.parametrize("c_in, c_out, kernel, stride", [pytest.param(16, 16, 3, 1, id="first-unit-16"),
                                                          pytest.param(24, 40, 3, 2, id="non-power-of-two-down"),
                                                          pytest.param(16, 32, 1, 2, id="projection-32")])
@pytest.mark.usefixtures("gpu_tiles")
def test_plain_conv_input_gradient(c_in, c_out, kernel, stride):
    """Without a BatchNorm prologue (the stem, and the first unit of He et al.'s networks, whose
    input is the activation materialised before the split), the kernels compute conv(x) [+ residual]
    and, when x needs it, x's gradient."""
    x, _, _, weight, res, _, _, padding = make_case(3, c_in, 5, 9, c_out, kernel, stride, stride == 1)
    y, y_mean, y_var = bn_relu_conv(x, None, weight, res, stride, padding, emit_stats=True)
    expected = F.conv2d(x, weight, stride=stride, padding=padding) + (0 if res is None else res)
    assert_close(y, expected, name="y")
    expected_var, expected_mean = torch.var_mean(expected.detach(), dim=(0, 2, 3), unbiased=False)
    assert_close(y_mean, expected_mean, name="mean of y")
    assert_close(y_var, expected_var, name="variance of y")
    inputs = [x, weight] + ([res] if res is not None else [])
    grad_out = torch.randn_like(expected)
    for name, got, want in zip(("x", "weight", "residual"), torch.autograd.grad(y, inputs, grad_out),
                               torch.autograd.grad(expected, inputs, grad_out)):
        assert_close(got, want, rtol=5e-5, name=f"grad {name}")
        if name == "x":
            assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("gpu_tiles")
def test_padding_stays_zero_when_relu_of_the_shift_is_positive():
    """With beta > 0 everywhere, relu(bn(0)) > 0: padded positions must still contribute nothing."""
    x, gamma, beta, weight, _, _, _, padding = make_case(1, 16, 5, 5, 16, 3, 1, False, seed=3)
    with torch.no_grad():
        beta.fill_(2.0)
        mean, var = torch.zeros(16), torch.ones(16) - EPS  # the identity normalisation
        bn = BnState(mean, var, gamma, beta, False, EPS)
        y, _, _ = bn_relu_conv(x, bn, weight, None, 1, padding, emit_stats=False)
        expected = F.conv2d(torch.relu(x * gamma[:, None, None] + 2.0), weight, padding=1)
    assert_close(y, expected, name="y")


@pytest.mark.usefixtures("gpu_tiles")
def test_statistics_are_stable_for_a_large_offset():
    """Shifted data (mean 1000, std 1): per-tile mean/M2 keep the variance where a naive sum of
    squares in fp32 loses it."""
    generator = torch.Generator().manual_seed(0)
    x = channels_last(torch.randn(2, 16, 16, 16, generator=generator))
    weight = torch.zeros(16, 16, 1, 1)
    weight[:, :, 0, 0] = torch.eye(16)
    residual = channels_last(torch.full((2, 16, 16, 16), 1000.0))
    y, mean, var = bn_relu_conv(x, None, weight, residual, 1, 0, emit_stats=True)
    expected_var, expected_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    # a naive fp32 E[y^2] - E[y]^2 is off by ~0.1 here (y^2 ~ 1e6); Chan's merge keeps 1e-4
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-5)
    naive = (y.float() ** 2).mean(dim=(0, 2, 3)) - y.float().mean(dim=(0, 2, 3)) ** 2
    assert (naive.double() - expected_var).abs().max() > 10 * (var.double() - expected_var).abs().max()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_running_statistics_follow_batchnorm2d(momentum, path):
    """The first layer reading a BatchNorm updates its running statistics (in the forward kernel, or
    in PyTorch's ops on the torch path), exactly as nn.BatchNorm2d; a second reader (read_only)
    leaves them alone; eval mode normalises with them and changes nothing."""
    from preresnet.kernels.layers import fused_conv

    generator = torch.Generator().manual_seed(1)
    reference = nn.BatchNorm2d(24, momentum=momentum)
    fused = copy.deepcopy(reference)
    conv = nn.Conv2d(24, 16, 3, padding=1, bias=False)
    conv.fused_path = path
    for step in range(3):
        x = channels_last(torch.randn(3, 24, 5, 7, generator=generator) * (step + 1) + step)
        expected = F.conv2d(torch.relu(reference(x)), conv.weight, padding=1)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        applied = batchnorm_moments(fused, x, (mean, var))
        assert applied.batch_stats and applied.update is fused
        assert int(fused.num_batches_tracked) == step  # batchnorm_moments itself updates nothing
        y, _ = fused_conv(x, applied, conv, emit_stats=False)
        fused_conv(x, applied.read_only(), conv, emit_stats=False)  # a second reader: no second update
        assert_close(y, expected, name="y")
    torch.testing.assert_close(fused.running_mean, reference.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.running_var, reference.running_var, rtol=1e-6, atol=1e-7)
    assert int(fused.num_batches_tracked) == int(reference.num_batches_tracked) == 3
    fused.eval()
    reference.eval()
    before = copy.deepcopy(fused.state_dict())
    applied = batchnorm_moments(fused, x, None)
    assert not applied.batch_stats and applied.update is None and torch.equal(applied.mean, fused.running_mean)
    y, _ = fused_conv(x, applied, conv, emit_stats=False)
    assert_close(y, F.conv2d(torch.relu(reference(x)), conv.weight, padding=1), name="eval y")
    assert all(torch.equal(before[name], value) for name, value in fused.state_dict().items())


@pytest.mark.usefixtures("gpu_tiles")
def test_ticket_counters_are_left_zero():
    """Every last program resets its counter: the workspace is zero after forward and backward
    (two tiles, two weight-gradient splits), so the next launch (or a CUDA graph replay) starts
    from zero."""
    from preresnet.kernels.workspace import COUNTER_SLOTS, launching_with, new_counters

    x, gamma, beta, weight, res, _, _, padding = make_case(2, 16, 9, 9, 24, 3, 1, False)
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False)
    counters = new_counters(x.device)
    with launching_with(counters):
        y, _, _ = bn_relu_conv(x, BnState(mean, var, gamma, beta, True, EPS), weight, None, 1, padding,
                               emit_stats=True)
        y.square().sum().backward()
    assert counters.numel() == COUNTER_SLOTS and not counters.any()


# --- launch arithmetic: the weight gradient's split, int32 offsets ------------------------------------------


@pytest.mark.parametrize("multiprocessors, tiles, row_blocks, splits", [
    # WRN-28-10's 640 -> 640 3x3 at batch 128 (8x8) on an H100: 9 taps x 10 x 10 channel blocks of 64
    # are 900 tiles, already more than 2 x 132 programs: no split (it was 64 splits, 115,200 programs)
    pytest.param(132, 900, 128, 1, id="wrn28_10-stage3"),
    # PreResNet-110's 64 -> 64 3x3 at 8x8: 9 tiles, 264 programs wanted: ceil(264 / 9) = 30
    pytest.param(132, 9, 128, 30, id="preresnet110-stage3"),
    pytest.param(108, 81, 2048, 3, id="a100-81-tiles"),  # ceil(216 / 81) = 3
    pytest.param(132, 264, 10, 1, id="exactly-two-waves"),
    pytest.param(132, 9, 3, 3, id="fewer-row-blocks-than-wanted"),
    pytest.param(1, 1, 1, 1, id="one-of-everything"),
])
def test_weight_gradient_splits_fill_two_programs_per_multiprocessor(multiprocessors, tiles, row_blocks, splits):
    from preresnet.kernels.preact_conv import wgrad_splits

    assert wgrad_splits(multiprocessors, tiles, row_blocks) == splits


@pytest.mark.parametrize("pixels, block_m, multiprocessors", [(8192, 64, 132), (100, 16, 8), (131072, 64, 7)])
def test_weight_gradient_grid_covers_every_pixel_once(pixels, block_m, multiprocessors):
    """The splits' pixel ranges, whole blocks each, tile the pixels: none left out, none empty."""
    from preresnet.kernels.preact_conv import wgrad_grid

    grid = wgrad_grid(pixels, 9, 64, 64, block_m, 64, 64, multiprocessors)
    assert grid.rows_per_split % block_m == 0
    assert (grid.splits - 1) * grid.rows_per_split < pixels <= grid.splits * grid.rows_per_split
    assert grid.grid[:2] == (9, 1) and grid.scratch_elements == grid.splits * 9 * 64 * 64


def test_wide_network_weight_gradient_scratch_is_one_weight_per_split():
    """WRN-28-10 at batch 128 on 132 multiprocessors, with the default launch configuration (64 x 64
    channel blocks): the largest scratch is its 640 -> 640 3x3 weight in fp32 (one split of 900
    tiles: 9 x 640 x 640 x 4 B), not 64 splits' 944 MB."""
    from bench.activation_memory import wgrad_scratch

    largest = wgrad_scratch("wrn28_10", 128, 132)
    assert largest["layer"].startswith("640x8x8->640 k3 s1")
    assert (largest["splits"], largest["programs"], largest["scratch_bytes"]) == (1, 900, 9 * 640 * 640 * 4)


def test_int32_offsets_refuse_a_tensor_of_2_to_the_31_elements():
    """WRN-28-10's first stage, 160 channels of 32 x 32 = 163,840 values an image: 2^31 / 163,840 =
    13,107.2, so evaluation at batch 13,107 fits the kernels' int32 offsets and 13,108 does not."""
    from preresnet.kernels.preact_conv import check_int32_offsets

    per_image = 160 * 32 * 32
    check_int32_offsets(input=13_107 * per_image, output=13_107 * per_image)
    with pytest.raises(ValueError, match=r"int32 offsets and this launch's input has 2,147,614,720 elements"):
        check_int32_offsets(input=13_108 * per_image, output=1)


@pytest.mark.usefixtures("gpu_tiles")
def test_launchers_check_every_tensor_they_index(monkeypatch):
    """The forward refuses by its output, the backward by the weight gradient's scratch: the
    launchers count each tensor they index (with the limit lowered to these small tensors)."""
    from preresnet.kernels import preact_conv

    x, gamma, beta, weight, _, _, _, padding = make_case(2, 16, 6, 6, 32, 3, 1, False)  # 1,152 in, 2,304 out
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False)
    bn = BnState(mean, var, gamma, beta, True, EPS)
    monkeypatch.setattr(preact_conv, "INT32_OFFSET_LIMIT", 2_000)
    with pytest.raises(ValueError, match="output has 2,304 elements"):
        bn_relu_conv(x, bn, weight, None, 1, padding)
    monkeypatch.setattr(preact_conv, "INT32_OFFSET_LIMIT", 4_000)
    y, _, _ = bn_relu_conv(x, bn, weight, None, 1, padding)
    # two splits of 9 x 16 x 32 partial weights: 9,216 fp32 elements
    with pytest.raises(ValueError, match="weight gradient scratch has 9,216 elements"):
        y.sum().backward()


def test_batch_of_one_value_per_channel_is_refused_like_batchnorm2d():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batchnorm_moments(nn.BatchNorm2d(4), torch.randn(1, 4, 1, 1), None)


# --- model level ---------------------------------------------------------------------------------------


MODELS = [pytest.param("normal", 1, 1, id="normal"), pytest.param("bottleneck", 1, 1, id="bottleneck"),
          pytest.param("wide", 1, 2, id="wide")]


def twin_models(type, depth, width, seed=0):
    torch.manual_seed(seed)
    reference = build_model(type, depth, width, num_classes=5)
    fused = build_model(type, depth, width, num_classes=5, fused=True)
    assert list(fused.state_dict()) == list(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    return reference.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)


def half_on_torch(model, device: torch.device) -> dict:
    """A conv-path table for device that moves the stem, the 1x1 convs and every other remaining
    layer signature of model to PyTorch's ops."""
    keys = sorted({signature.key for signature in conv_signatures(model).values()})
    moved = [key for i, key in enumerate(keys) if i % 2 == 0 or "plain" in key or " k1 " in key]
    assert any("plain" in key for key in moved) and any(" k1 " in key for key in moved) and len(moved) < len(keys)
    return {device_name(device): {"float32": {key: {"path": "torch"} for key in moved}}}


WITH_PATHS = [*(pytest.param(*m.values, "triton", id=m.id) for m in MODELS),
              pytest.param("bottleneck", 1, 1, "mixed", id="bottleneck-mixed-paths")]


@pytest.mark.parametrize("type, depth, width, paths", WITH_PATHS)
def test_fused_model_matches_reference_model(type, depth, width, paths):
    """paths "mixed": half the layer shapes on PyTorch's ops (kernels.dispatch), statistics passing
    between the two implementations."""
    reference, fused = twin_models(type, depth, width)
    if paths == "mixed":
        moved = assign_paths(fused, torch.device("cpu"), torch.float32, half_on_torch(fused, torch.device("cpu")))
        assert 0 < len(moved) < len(conv_signatures(fused))
    generator = torch.Generator().manual_seed(2)
    x = channels_last(torch.randn(3, 3, 8, 8, generator=generator))
    y = torch.randint(0, 5, (3,), generator=generator)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in (reference, fused)]
    for step in range(3):  # a few optimizer steps stay together
        losses = []
        for model, optimizer in zip((reference, fused), optimizers):
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            losses.append((logits.detach(), loss.detach()))
        assert_close(losses[1][0], losses[0][0], rtol=1e-4, name=f"logits, step {step}")
        assert abs(losses[1][1].item() - losses[0][1].item()) < 1e-4 * max(1.0, losses[0][1].item())
        for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
            assert_close(p_fused.grad, p_ref.grad, rtol=2e-4, name=f"grad {name}, step {step}")
        for (name, b_ref), b_fused in zip(reference.named_buffers(), fused.buffers()):
            assert_close(b_fused.float(), b_ref.float(), rtol=1e-5, name=f"{name}, step {step}")
        for optimizer in optimizers:
            optimizer.step()
    reference.eval()
    fused.eval()
    with torch.no_grad():
        assert_close(fused(x), reference(x), rtol=1e-4, name="eval logits")


def test_conv_signatures_name_every_fused_layer():
    model = build_model("normal", 1, fused=True)
    signatures = conv_signatures(model)
    assert set(signatures) == {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert signatures["conv1"].key == "3x32x32->16 k3 s1 plain"
    assert signatures["layer1.0.conv1"].key == "16x32x32->16 k3 s1 plain"  # activated before the split
    assert signatures["layer1.0.conv2"].key == "16x32x32->16 k3 s1 +residual"
    assert signatures["layer2.0.shortcut"].key == "16x32x32->32 k1 s2"
    assert signatures["layer3.0.conv1"].key == "32x16x16->64 k3 s2"
    assert signatures["layer3.0.conv2"].key == "64x8x8->64 k3 s1 +residual"


def test_conv_path_table_applies_to_its_device_and_dtype_only(tmp_path):
    model = build_model("normal", 1, fused=True)
    table = {"cpu": {"float32": {"64x8x8->64 k3 s1 +residual": {"path": "torch", "triton_ms": 2.0, "torch_ms": 1.0}}}}
    assert assign_paths(model, torch.device("cpu"), torch.bfloat16, table) == {}
    assert assign_paths(model, torch.device("cpu"), torch.float32, table) == {"layer3.0.conv2": "torch"}
    assert model.layer3[0].conv2.fused_path == "torch" and model.layer3[0].conv1.fused_path == "triton"
    path = tmp_path / "paths.json"
    path.write_text('{"cpu": {"float32": {"16x32x32->16 k3 s1": {"path": "cudnn"}}}}')
    with pytest.raises(ValueError, match="path must be one of"):
        load_table(path)
    assert load_table(tmp_path / "missing.json") == {}


def test_checkpoints_move_between_fused_and_unfused():
    reference, fused = twin_models("normal", 1, 1, seed=4)
    x = channels_last(torch.randn(2, 3, 8, 8))
    fused(x)  # changes the running statistics of the fused copy
    unfused = build_model("normal", 1, num_classes=5).to(memory_format=torch.channels_last)
    unfused.load_state_dict(fused.state_dict())
    for (name, a), b in zip(fused.state_dict().items(), unfused.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_model_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break: each fused layer is one opaque op with autograd."""
    reference, fused = twin_models("normal", 1, 1, seed=5)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = channels_last(torch.randn(2, 3, 8, 8))
    loss = compiled(x).square().mean()
    loss.backward()
    ref_loss = reference(x).square().mean()
    ref_loss.backward()
    assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, name="loss")
    for (name, p_ref), p in zip(reference.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, rtol=2e-4, name=f"grad {name}")


@pytest.mark.parametrize("name", ["preresnet20", "preresnet110", "preresnet164", "wrn16_4"])
def test_fused_model_keeps_at_most_60_percent_of_the_activations(name):
    """Bytes autograd saves for backward in one training step at batch 128 (meta device: exact shapes)."""
    from bench.activation_memory import measure

    result = measure(name, 128)
    assert result["unfused_bytes"] > 0
    assert result["fused_fraction"] <= 0.6, result


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, strides and autograd registration agree with the real ops."""
    x, gamma, beta, weight, res, _, _, padding = make_case(2, 16, 6, 6, 16, 3, 1, True)
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False)
    from preresnet.kernels.preact_conv import bn_relu_conv_backward_op, bn_relu_conv_op

    running = (torch.zeros(16), torch.ones(16), torch.zeros((), dtype=torch.long))
    weight = channels_last(weight.detach())
    args = (x.detach(), mean, var, gamma.detach(), beta.detach(), weight, res.detach(), 1, padding, True, EPS, 0)
    torch.library.opcheck(bn_relu_conv_op, (*args, *running, 0.1))  # updates the running statistics
    torch.library.opcheck(bn_relu_conv_op, (*args, None, None, None, None))
    torch.library.opcheck(bn_relu_conv_op, (x.detach(), None, None, None, None, *args[5:], None, None, None, None))
    dy = channels_last(torch.randn(2, 16, 6, 6))
    backward = (dy, x.detach(), mean, var, gamma.detach(), beta.detach(), weight, 1, padding, EPS, True, True, 0)
    torch.library.opcheck(bn_relu_conv_backward_op, (*backward, None))
    torch.library.opcheck(bn_relu_conv_backward_op, (*backward, channels_last(torch.randn(2, 16, 6, 6))))
    plain = (dy, x.detach(), None, None, None, None, weight, 1, padding, EPS, False, True, 0)
    torch.library.opcheck(bn_relu_conv_backward_op, (*plain, channels_last(torch.randn(2, 16, 6, 6))))


def test_fused_model_trains_under_inductor():
    """torch.compile's default backend checks each op's output strides against its fake."""
    reference, fused = twin_models("normal", 1, 1, seed=6)
    x = channels_last(torch.randn(2, 3, 8, 8))
    loss = torch.compile(fused)(x).square().mean()
    loss.backward()
    reference(x).square().mean().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, rtol=2e-4, name=f"grad {name}")


def test_fused_model_refuses_dropout():
    from preresnet import UserError

    with pytest.raises(UserError, match="dropout"):
        build_model("wide", 1, 2, dropout=0.3, fused=True)


# --- errors -----------------------------------------------------------------------------------------------


def test_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch; from preresnet.kernels import bn_relu_conv\n"
            "x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)\n"
            "bn_relu_conv(x, None, torch.randn(16, 16, 3, 3), None, 1, 1, emit_stats=False)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stderr and "CUDA GPU" in result.stderr


@pytest.mark.parametrize("case", ["nchw", "float64", "residual-shape", "channel-mismatch"])
def test_unsupported_inputs_fail_loudly(case):
    x = channels_last(torch.randn(2, 16, 6, 6))
    weight = torch.randn(16, 16, 3, 3)
    residual = None
    error = ValueError
    if case == "nchw":
        x = torch.randn(2, 16, 6, 6)
    elif case == "float64":
        x, weight, error = x.double(), weight.double(), TypeError
    elif case == "residual-shape":
        residual = channels_last(torch.randn(2, 16, 5, 5))
    else:
        weight = torch.randn(16, 8, 3, 3)
    with pytest.raises(error):
        bn_relu_conv(x, None, weight, residual, 1, 1, emit_stats=False)


# --- on a CUDA GPU, compiled -------------------------------------------------------------------------------

needs_compiled_kernels = pytest.mark.skipif(INTERPRETED, reason="the interpreter mishandles bf16/fp16 dots: run "
                                                                "`TRITON_INTERPRET=0 pytest -m gpu` on a GPU")


@pytest.mark.gpu
@needs_compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c_in, c_out, kernel, stride", CONV_SHAPES)
def test_bn_relu_conv_on_gpu(c_in, c_out, kernel, stride, dtype):
    """The kernel's error against an fp64 reference is bounded by a multiple of PyTorch's own error
    at that precision. In fp32 both sides are IEEE fp32 (cuDNN's TF32 off), so the bound is
    fp32-sized: a kernel dot rounded to TF32 (10 mantissa bits) would exceed it many times over."""
    if c_in == 3:
        pytest.skip("the stem has no BatchNorm prologue; covered by the model test")
    n, h, w = 16, 16, 16
    x, gamma, beta, weight, res, _, _, padding = make_case(n, c_in, h, w, c_out, kernel, stride, stride == 1)
    to = dict(device="cuda")
    x64 = x.detach().double()
    var, mean = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    exact = bn_relu_conv_ref(x64, mean, var, gamma.detach().double(), beta.detach().double(),
                             weight.detach().double(), None if res is None else res.detach().double(), stride, padding)
    xd = x.detach().to(dtype=dtype, **to).contiguous(memory_format=torch.channels_last)
    wd = weight.detach().to(dtype=dtype, **to)
    rd = None if res is None else res.detach().to(dtype=dtype, **to).contiguous(memory_format=torch.channels_last)
    var32, mean32 = torch.var_mean(xd.float(), dim=(0, 2, 3), unbiased=False)
    bn = BnState(mean32, var32, gamma.detach().to(**to), beta.detach().to(**to), True, EPS)
    y, _, _ = bn_relu_conv(xd, bn, wd, rd, stride, padding, emit_stats=True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 in full fp32, as the kernel's
        torch_y = F.conv2d(torch.relu(F.batch_norm(xd, None, None, gamma.detach().to(dtype=dtype, **to),
                                                   beta.detach().to(dtype=dtype, **to), training=True, eps=EPS)),
                           wd, stride=stride, padding=padding)
    if rd is not None:
        torch_y = torch_y + rd
    kernel_error = (y.double().cpu() - exact).abs().max().item()
    torch_error = (torch_y.double().cpu() - exact).abs().max().item()
    scale = exact.abs().max().item()
    if dtype == torch.float32:  # the bound below is only fp32-sized if cuDNN really computed in fp32
        assert torch_error <= 1e-5 * scale, f"cuDNN's fp32 error {torch_error:.3e} is TF32-sized"
    assert kernel_error <= 3 * torch_error + 1e-6 * scale, (kernel_error, torch_error)


@pytest.mark.gpu
@needs_compiled_kernels
@pytest.mark.parametrize("type, depth, width, paths", WITH_PATHS)
def test_fused_model_on_gpu(type, depth, width, paths):
    reference, fused = twin_models(type, depth, width)
    reference, fused = reference.cuda(), fused.cuda()
    if paths == "mixed":
        assign_paths(fused, torch.device("cuda"), torch.float32, half_on_torch(fused, torch.device("cuda")))
    x = channels_last(torch.randn(32, 3, 32, 32, device="cuda"))
    y = torch.randint(0, 5, (32,), device="cuda")
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides: the kernels' fp32 dots are IEEE
    try:
        for model in (reference, fused):
            F.cross_entropy(model(x), y).backward()
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    for (name, p_ref), p in zip(reference.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, rtol=1e-3, name=f"grad {name}")
    # the running statistics come from the statistics the last program of each forward kernel merges
    for (name, b_ref), b in zip(reference.named_buffers(), fused.buffers()):
        assert_close(b.float(), b_ref.float(), rtol=1e-4, name=name)
