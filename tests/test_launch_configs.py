"""The kernels' launch configurations (kernels.launch_configs) and how the launchers size each
launch from them and from the device (kernels.preact_conv.launch_target), on the CPU with the
kernels replaced by stand-ins that record their launches."""

import json
from pathlib import Path

import pytest
import torch

from preresnet.kernels import preact_conv
from preresnet.kernels.launch_configs import CONV_WGRAD, DEFAULTS, KINDS, Config

FWD, DGRAD, WGRAD, APPLY = ("_bn_relu_conv_fwd_kernel", "_bn_relu_conv_dgrad_kernel", "_bn_relu_conv_wgrad_kernel",
                            "_bn_backward_apply_kernel")
AUDIT = Path(__file__).resolve().parents[1] / "bench" / "results" / "2026-12-07-cpu-audit-wgrad" / "audit.json"


def test_the_defaults_are_the_audited_configurations():
    """Every kind has one default, of power-of-two blocks from tl.dot's 16 to the 64 the GPU launches
    are recorded with; the weight gradient's is the configuration its committed compile audit
    (bench/results/2026-12-07-cpu-audit-wgrad, Triton 3.6, sm_90 and sm_80) compiled with no spill,
    its largest launch the 64 x 64 channel blocks that lower to wgmma on sm_90. (The other kinds'
    defaults are compiled by tests/test_compile_audit.py in CI.)"""
    assert set(DEFAULTS) == set(KINDS)
    for kind, config in DEFAULTS.items():
        assert all(16 <= size <= 64 and size & (size - 1) == 0 for _, size in config.blocks), (kind, config)
    rows = [row for row in json.loads(AUDIT.read_text()) if row["spec"]["kernel"] == WGRAD]
    assert {row["arch"] for row in rows} == {"sm_90", "sm_80"} and not any(row["spill_stores"] for row in rows)
    default = DEFAULTS[CONV_WGRAD]
    assert {name: max(row["spec"]["constexprs"][name] for row in rows) for name in dict(default.blocks)} == \
        dict(default.blocks)
    assert all(row["spec"]["options"] == default.options for row in rows)
    assert any(row["arch"] == "sm_90" and row["tensor_core"] == "wgmma" and row["spec"]["dtype"] == "bf16" and
               row["spec"]["constexprs"]["BLOCK_C"] == row["spec"]["constexprs"]["BLOCK_CO"] == 64 for row in rows)


def test_block_clamps_to_the_dimension():
    config = Config.of(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    assert config.block("BLOCK_N", 16) == 16 and config.block("BLOCK_N", 3) == 16  # tl.dot needs 16
    assert config.block("BLOCK_N", 48) == 64 and config.block("BLOCK_N", 1000) == 64
    assert config.block("BLOCK_K", 24) == 32 and config.block("BLOCK_M", 128 * 8 * 8) == 64
    assert config.options == {"num_warps": 4, "num_stages": 2}


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch of the launchers as (kernel name, grid, keyword arguments), none run."""
    recorded = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append((self.name, grid, kwargs))

    for name in (FWD, DGRAD, WGRAD, APPLY):
        monkeypatch.setattr(preact_conv, name, Recorder(name))
    return recorded


def run_layer(residual: bool):
    """Forward and backward of a 64 -> 64 3x3 layer with its BatchNorm, batch 2, 8 x 8 (128 pixels)."""
    x = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    mean, var, gamma, beta = torch.zeros(64), torch.ones(64), torch.ones(64), torch.zeros(64)
    weight = torch.randn(64, 64, 3, 3)
    bn = preact_conv.BnState(mean, var, gamma, beta, batch_stats=True)
    preact_conv.bn_relu_conv_forward(x, bn, weight, x if residual else None, 1, 1, True)
    preact_conv.bn_relu_conv_backward(x, x, bn, weight, 1, 1, True)


def launched(records) -> dict:
    return {name: (grid, {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k.startswith("num_")})
            for name, grid, kwargs in records}


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain-output"])
def test_on_a_gpu_the_launchers_launch_the_defaults_clamped(launches, monkeypatch, residual):
    """Sized for a GPU of 132 multiprocessors (an H100's, as the compile audit records): 128 pixels
    are two 64-pixel tiles; the weight gradient's 9 tiles split the pixels in two (its 2 row blocks
    are fewer than the ceil(2 x 132 / 9) = 30 splits that would fill the GPU)."""
    monkeypatch.setattr(preact_conv, "launch_target", lambda device: preact_conv.LaunchTarget(132, interpreter=False))
    run_layer(residual)
    assert launched(launches) == {
        FWD: ((2, 2), {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}),
        WGRAD: ((9, 1, 2), {"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_CO": 64, "num_warps": 4, "num_stages": 2}),
        DGRAD: ((2, 2), {"BLOCK_M": 64, "BLOCK_C": 32, "BLOCK_CO": 64, "num_warps": 8, "num_stages": 2}),
        APPLY: ((2, 2), {"BLOCK_M": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}),
    }


def test_under_the_interpreter_the_launchers_enlarge_the_tiles(launches, monkeypatch):
    """The interpreter's tiles: every pixel and channel of the layer in one tile (up to 4096 pixels
    and 256 channels), one weight-gradient split for its one multiprocessor; warps and stages as
    configured."""
    monkeypatch.setattr(preact_conv, "INTERPRETER_BLOCK_M", 4096)
    monkeypatch.setattr(preact_conv, "INTERPRETER_BLOCK_C", 256)
    monkeypatch.setattr(preact_conv, "launch_target", lambda device: preact_conv.LaunchTarget(1, interpreter=True))
    run_layer(residual=True)
    assert launched(launches) == {
        FWD: ((1, 1), {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}),
        WGRAD: ((9, 1, 1), {"BLOCK_M": 128, "BLOCK_C": 64, "BLOCK_CO": 64, "num_warps": 4, "num_stages": 2}),
        DGRAD: ((1, 1), {"BLOCK_M": 128, "BLOCK_C": 64, "BLOCK_CO": 64, "num_warps": 8, "num_stages": 2}),
        APPLY: ((1, 1), {"BLOCK_M": 128, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1}),
    }


def test_the_cpus_launch_target_reads_the_interpreter_settings_at_call_time(monkeypatch):
    monkeypatch.setattr(preact_conv, "INTERPRETER_MULTIPROCESSORS", 7)
    assert preact_conv.launch_target(torch.device("cpu")) == (7, preact_conv.INTERPRETED)
