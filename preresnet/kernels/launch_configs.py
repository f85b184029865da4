"""Launch configurations of the Triton kernels: one audited configuration per kernel kind.

A `Config` names its block sizes by the kernel's own constexpr names (BLOCK_M, BLOCK_N, ...) and
its launch options (num_warps, num_stages). Each kernel kind (`KINDS`: conv forward, data
gradient, weight gradient, and the elementwise BatchNorm input gradient) has one, in `DEFAULTS`,
for every layer, dtype and GPU. Its block sizes are upper bounds: `Config.block(name, size)`
clamps each to a power of two covering the dimension it tiles (at least 16, as tl.dot needs), so a
16-channel layer runs BLOCK_N=16 whatever the config says.

In a launcher:

    config = DEFAULTS[CONV_FWD]
    kernel[grid](..., BLOCK_M=config.block("BLOCK_M", m), BLOCK_N=config.block("BLOCK_N", c_out),
                 BLOCK_K=config.block("BLOCK_K", c_in), **config.options)

`python -m bench.compile_audit` compiles every launch of the registry networks with these for
sm_90 and sm_80, and `tests/test_compile_audit.py` fails if one spills registers in bf16/fp16 or
does not compile.
"""

from __future__ import annotations

from dataclasses import dataclass

CONV_FWD, CONV_DGRAD, CONV_WGRAD, ELEMENTWISE = "conv_fwd", "conv_dgrad", "conv_wgrad", "elementwise"
KINDS = (CONV_FWD, CONV_DGRAD, CONV_WGRAD, ELEMENTWISE)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


@dataclass(frozen=True)
class Config:
    """One launch configuration: upper bounds for the block sizes, by the kernel's constexpr names,
    and the launch options."""

    blocks: tuple[tuple[str, int], ...]  # sorted (name, size) pairs; a tuple, so a Config is hashable
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int = 2, **blocks: int) -> "Config":
        return cls(tuple(sorted(blocks.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def block(self, name: str, size: int) -> int:
        """The block for a dimension of `size`: a power of two covering it, within [16, the config's]."""
        high = self[name]
        return max(MIN_BLOCK, min(high, 1 << max(0, int(size) - 1).bit_length()))

    @property
    def options(self) -> dict[str, int]:
        """The launch keyword arguments: kernel[grid](..., **config.options)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# Chosen with `python -m bench.compile_audit` under Triton 3.6 and 3.9 (what a fresh CI install
# gets); bench/README.md, "Compile audit": every config below compiles without a register spill
# for sm_90 and sm_80 in bf16/fp16 at the hardest launch of every kernel and conv geometry of the
# registry networks (tests/test_compile_audit.py checks it). The launchers' fixed sizes that the
# defaults replaced: conv forward 64x64x32 with Triton's 4 warps / 3 stages reaches 255 registers
# and spills 88-96 B a thread on sm_80 for every 3x3 conv (with 8 warps still 28 B); 64x64x16 with
# 4 warps / 2 stages is clean under 3.6 but spills 24-32 B on sm_80 under 3.9. Data gradient
# 64 x 32 x 32 with 4 warps spills 8 B on sm_80. Registers of each default at the hardest launches
# (bf16, Triton 3.6, sm_80 / sm_90):
#   conv_fwd    64x32x16, 4 warps, 2 stages: 154 / 121
#   conv_dgrad  64x32x64, 8 warps, 2 stages:  99 /  86 (the same tiles with 4 warps / 3 stages: 168 / 146)
#   conv_wgrad  64x64x64, 4 warps, 2 stages: 127 / 127 (wgmma on sm_90 from 64 input channels; the
#               former 64x32x64 default, 80 / 94, used mma there: wgmma needs 64 rows a warpgroup)
#   elementwise 64x32,    4 warps:            71 /  71

DEFAULTS: dict[str, Config] = {
    CONV_FWD: Config.of(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2),
    CONV_DGRAD: Config.of(BLOCK_M=64, BLOCK_C=32, BLOCK_CO=64, num_warps=8, num_stages=2),
    # BLOCK_C 64: the result tile's 64 rows per warpgroup that wgmma needs on sm_90 (C_IN >= 64)
    CONV_WGRAD: Config.of(BLOCK_M=64, BLOCK_C=64, BLOCK_CO=64, num_warps=4, num_stages=2),
    ELEMENTWISE: Config.of(BLOCK_M=64, BLOCK_C=32, num_warps=4, num_stages=1),
}

