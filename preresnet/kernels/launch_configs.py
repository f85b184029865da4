"""Launch configurations of the Triton kernels: block sizes, num_warps and num_stages per layer shape.

A `Config` names its block sizes by the kernel's own constexpr names (BLOCK_M, BLOCK_N, ...). Each
kernel kind (`KINDS`: conv forward, data gradient, weight gradient, and the small elementwise /
reduction kernels) has

- a heuristic default (`DEFAULTS`), used for every shape, GPU and dtype the table does not name;
- a small search space (`SEARCH_SPACE`), from which `python -m bench.config_search` (run by the GPU
  report, once per GPU, not at training start) picks the fastest config per layer signature.

Every config of a search space, the defaults included, is compiled for sm_90 and sm_80 in bf16,
fp16 and fp32 by `python -m bench.compile_audit --search-space`, and `tests/test_compile_audit.py`
fails if one spills registers in bf16/fp16 or does not compile: no GPU minute goes to a config that
spills. The block sizes of a config are upper bounds: `Config.block(name, size)` clamps each to a
power of two covering the dimension it tiles (at least 16, as tl.dot needs), so a 16-channel layer
runs BLOCK_N=16 whatever the config says.

The table, preresnet/kernels/launch_configs.json (or the file named by PRERESNET_LAUNCH_CONFIGS):

    {gpu name: {dtype name: {signature key (kernels.paths.ConvSignature.key): {kind: config}}}}
    config: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, ...}

In a launcher:

    cfg = launch_config(CONV_FWD, layer_key(c_in, h, w, c_out, kh, stride, prologue, residual), x.dtype, x.device)
    kernel[grid](..., BLOCK_M=cfg.block("BLOCK_M", m), BLOCK_N=cfg.block("BLOCK_N", c_out),
                 BLOCK_K=cfg.block("BLOCK_K", c_in), **cfg.options)

CPU tensors (the interpreter) get the defaults; a launcher may enlarge BLOCK_M for the
interpreter's speed only while `not auditing()` (the compile audit records CPU launches as a GPU's).

Validation happens once, at load (`load_table`): a file that is not JSON, has the wrong nesting,
names an unknown kind or field, or holds a config outside its kind's search space raises
`LaunchConfigError` naming the file and the entry. `launch_config` never raises for a bad table
mid-run: the first lookup that meets a bad file warns once (the same message) and uses the
defaults for the whole run, so a stale table can cost speed, never a crash or a spilling kernel.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import tables
from .paths import ConvSignature

TABLE = Path(__file__).with_name("launch_configs.json")
TABLE_ENV = "PRERESNET_LAUNCH_CONFIGS"  # another table file, for measuring runs

CONV_FWD, CONV_DGRAD, CONV_WGRAD, ELEMENTWISE = "conv_fwd", "conv_dgrad", "conv_wgrad", "elementwise"
KINDS = (CONV_FWD, CONV_DGRAD, CONV_WGRAD, ELEMENTWISE)
LAUNCH_OPTIONS = ("num_warps", "num_stages")
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16

# The block names each kind's config may set, and the kernel argument (dimension) each one tiles:
# the compile audit clamps a config to a recorded launch through these, as the launchers do.
BLOCK_DIMS = {
    CONV_FWD: {"BLOCK_M": "M", "BLOCK_N": "C_OUT", "BLOCK_K": "C_IN"},  # pixels x out-channels, reduce in-channels
    CONV_DGRAD: {"BLOCK_M": "M", "BLOCK_C": "C_IN", "BLOCK_CO": "C_OUT"},  # pixels x in-channels, reduce out-channels
    CONV_WGRAD: {"BLOCK_M": "M", "BLOCK_C": "C_IN", "BLOCK_CO": "C_OUT"},  # in x out-channels, reduce pixels
    ELEMENTWISE: {"BLOCK_M": "M", "BLOCK_C": "C"},
}


class LaunchConfigError(ValueError):
    """A launch-configuration table that cannot be used; the message names the file and the entry."""


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

    def fit(self, kind: str, sizes: dict[str, int]) -> dict[str, int]:
        """Every block of this config clamped to the dimensions in sizes ({"M": ..., "C_IN": ...})."""
        dims = BLOCK_DIMS[kind]
        return {name: self.block(name, sizes[dims[name]]) if dims.get(name) in sizes else value
                for name, value in self.blocks}

    @property
    def options(self) -> dict[str, int]:
        """The launch keyword arguments: kernel[grid](..., **config.options)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_json(self) -> dict:
        return {**dict(self.blocks), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_json(cls, kind: str, entry: dict, where: str = "") -> "Config":
        if not isinstance(entry, dict):
            raise LaunchConfigError(f"{where}: a config must be an object, got {entry!r}")
        allowed = set(BLOCK_DIMS[kind]) | set(LAUNCH_OPTIONS)
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise LaunchConfigError(f"{where}: unknown field(s) {unknown} for {kind} (allowed: {sorted(allowed)})")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in entry.values()):
            raise LaunchConfigError(f"{where}: every field must be an integer, got {entry!r}")
        blocks = {k: v for k, v in entry.items() if k not in LAUNCH_OPTIONS}
        options = {k: v for k, v in entry.items() if k in LAUNCH_OPTIONS}
        return cls.of(**options, **blocks)

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.blocks) + f" w{self.num_warps} s{self.num_stages}"


# --- defaults and search spaces ----------------------------------------------------------------------
# Chosen with `python -m bench.compile_audit` under Triton 3.6 and 3.9 (what
# a fresh CI install gets); bench/README.md, "Compile audit": every config below compiles without a
# register spill for sm_90 and sm_80 in bf16/fp16 at the hardest launch of every kernel and conv
# geometry of the registry networks (tests/test_compile_audit.py checks it). The launchers' fixed
# sizes that the defaults replace: conv forward 64x64x32 with Triton's 4 warps / 3 stages reaches
# 255 registers and spills 88-96 B a thread on sm_80 for every 3x3 conv (with 8 warps still 28 B);
# 64x64x16 with 4 warps / 2 stages is clean under 3.6 but spills 24-32 B on sm_80 under 3.9. Data
# gradient 64 x 32 x 32 with 4 warps spills 8 B on sm_80. Registers of each default at the hardest
# launches (bf16, Triton 3.6, sm_80 / sm_90):
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

SEARCH_SPACE: dict[str, tuple[Config, ...]] = {
    CONV_FWD: (
        DEFAULTS[CONV_FWD],
        Config.of(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=1),
        Config.of(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
        Config.of(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
        Config.of(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=2, num_stages=2),
    ),
    CONV_DGRAD: (
        DEFAULTS[CONV_DGRAD],
        Config.of(BLOCK_M=64, BLOCK_C=32, BLOCK_CO=32, num_warps=8, num_stages=2),
        Config.of(BLOCK_M=64, BLOCK_C=32, BLOCK_CO=16, num_warps=4, num_stages=2),
        Config.of(BLOCK_M=128, BLOCK_C=32, BLOCK_CO=32, num_warps=8, num_stages=3),
        Config.of(BLOCK_M=64, BLOCK_C=64, BLOCK_CO=32, num_warps=8, num_stages=2),
        Config.of(BLOCK_M=64, BLOCK_C=16, BLOCK_CO=64, num_warps=4, num_stages=2),
        Config.of(BLOCK_M=32, BLOCK_C=32, BLOCK_CO=32, num_warps=2, num_stages=2),
    ),
    CONV_WGRAD: (
        DEFAULTS[CONV_WGRAD],
        Config.of(BLOCK_M=64, BLOCK_C=128, BLOCK_CO=64, num_warps=8, num_stages=2),
        Config.of(BLOCK_M=64, BLOCK_C=32, BLOCK_CO=64, num_warps=4, num_stages=2),  # the default until wgmma
        Config.of(BLOCK_M=128, BLOCK_C=32, BLOCK_CO=64, num_warps=4, num_stages=2),
        Config.of(BLOCK_M=64, BLOCK_C=32, BLOCK_CO=32, num_warps=4, num_stages=2),
        Config.of(BLOCK_M=128, BLOCK_C=32, BLOCK_CO=64, num_warps=8, num_stages=3),
        Config.of(BLOCK_M=32, BLOCK_C=16, BLOCK_CO=64, num_warps=2, num_stages=2),
    ),
    ELEMENTWISE: (
        DEFAULTS[ELEMENTWISE],
        Config.of(BLOCK_M=128, BLOCK_C=32, num_warps=4, num_stages=1),
        Config.of(BLOCK_M=64, BLOCK_C=64, num_warps=4, num_stages=1),
        Config.of(BLOCK_M=256, BLOCK_C=32, num_warps=8, num_stages=1),
    ),
}

# Which kind a kernel is, by its function name; kernels not named here are classified by
# `kernel_kind`'s rules (so that new kernels get a kind without an edit here).
KERNEL_KINDS = {
    "_bn_relu_conv_fwd_kernel": CONV_FWD,
    "_bn_relu_conv_dgrad_kernel": CONV_DGRAD,
    "_bn_relu_conv_wgrad_kernel": CONV_WGRAD,
    "_bn_backward_apply_kernel": ELEMENTWISE,
}


def kernel_kind(name: str) -> str:
    """The kind of a kernel by its name: the table above, else "dgrad"/"wgrad"/"conv" in the name."""
    if name in KERNEL_KINDS:
        return KERNEL_KINDS[name]
    if "dgrad" in name:
        return CONV_DGRAD
    if "wgrad" in name:
        return CONV_WGRAD
    if "conv" in name:
        return CONV_FWD
    return ELEMENTWISE


def dtype_name(dtype) -> str:
    """torch.bfloat16 / "bf16" / "bfloat16" -> "bfloat16", the table's (and conv_paths.json's) spelling."""
    name = str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)


DTYPES = ("float32", "bfloat16", "float16")


# --- the table -----------------------------------------------------------------------------------------


def table_path(path: str | os.PathLike | None = None) -> Path:
    return tables.table_path(path, TABLE_ENV, TABLE)


def validate_table(table, where: str = "launch_configs.json") -> dict:
    """The table with every config parsed: {gpu: {dtype: {key: {kind: Config}}}}; LaunchConfigError
    naming the first bad entry otherwise."""
    if not isinstance(table, dict):
        raise LaunchConfigError(f"{where}: the top level must be an object {{gpu name: ...}}, got {type(table).__name__}")
    parsed: dict = {}
    for gpu, dtypes in table.items():
        if not isinstance(dtypes, dict):
            raise LaunchConfigError(f"{where}: {gpu!r} must map dtype names to tables")
        for dtype, entries in dtypes.items():
            if dtype not in DTYPES:
                raise LaunchConfigError(f"{where}: {gpu!r}: unknown dtype {dtype!r} (one of {DTYPES})")
            if not isinstance(entries, dict):
                raise LaunchConfigError(f"{where}: {gpu!r} {dtype}: must map layer keys to configs")
            for key, kinds in entries.items():
                if not isinstance(kinds, dict):
                    raise LaunchConfigError(f"{where}: {gpu!r} {dtype} {key!r}: must map kernel kinds to configs")
                for kind, entry in kinds.items():
                    here = f"{where}: {gpu!r} {dtype} {key!r} {kind}"
                    if kind not in KINDS:
                        raise LaunchConfigError(f"{here}: unknown kernel kind (one of {KINDS})")
                    config = Config.from_json(kind, entry, here)
                    if config not in SEARCH_SPACE[kind]:
                        raise LaunchConfigError(f"{here}: {config} is not in the search space of {kind} "
                                                "(stale table? rerun bench.config_search, or delete the entry)")
                    parsed.setdefault(gpu, {}).setdefault(dtype, {}).setdefault(key, {})[kind] = config
    return parsed


def load_table(path: str | os.PathLike | None = None) -> dict:
    """The parsed table of `path` (default: $PRERESNET_LAUNCH_CONFIGS, else launch_configs.json here);
    {} when the file does not exist. Raises LaunchConfigError for a bad file."""
    path = table_path(path)
    raw = tables.read_json(path, LaunchConfigError)
    return {} if raw is None else validate_table(raw, str(path))


_lock = threading.Lock()
_cache: dict = {}  # {"path": Path, "table": parsed table}
_override: dict | None = None  # set by `override` (the config search)
_emulated_device: str | None = None  # set by `emulate_device` (the compile audit)


def _active_table() -> dict:
    if _override is not None:
        return _override
    path = table_path()
    with _lock:
        if _cache.get("path") != path:
            try:
                table = load_table(path)
            except LaunchConfigError as exc:
                warnings.warn(f"{exc}; using the default launch configurations", RuntimeWarning, stacklevel=3)
                table = {}
            _cache.update(path=path, table=table)
        return _cache["table"]


def clear_cache() -> None:
    """Forget the loaded table (it is read once per process, at the first lookup)."""
    with _lock:
        _cache.clear()


@contextmanager
def override(table: dict):
    """Use this table (raw JSON form or parsed) instead of the file, e.g. to time candidate configs."""
    global _override
    parsed = validate_table(table, "override") if table and not _is_parsed(table) else table
    previous, _override = _override, parsed
    try:
        yield
    finally:
        _override = previous


def _is_parsed(table: dict) -> bool:
    for dtypes in table.values():
        for entries in dtypes.values():
            for kinds in entries.values():
                return any(isinstance(c, Config) for c in kinds.values())
    return True  # empty: either


@contextmanager
def emulate_device(name: str):
    """Look configs up as if CPU tensors were on the GPU `name` (the compile audit records the
    launches of CPU tensors under the interpreter). While it is active, `auditing()` is True: a
    launcher must then launch with the config as returned, not enlarge blocks for the interpreter."""
    global _emulated_device
    previous, _emulated_device = _emulated_device, name
    try:
        yield
    finally:
        _emulated_device = previous


def auditing() -> bool:
    return _emulated_device is not None


def device_name(device) -> str:
    """The table's name of a device (a torch.device, "cuda:0" or a GPU name): the GPU's name, or
    "cpu"; the emulated GPU's name while `emulate_device` is active."""
    return _emulated_device if _emulated_device is not None else tables.device_name(device)


def layer_key(in_channels: int, height: int, width: int, out_channels: int, kernel: int, stride: int,
              prologue: bool, residual: bool) -> str:
    """The table's layer key for a fused conv (kernels.paths.ConvSignature.key) from the launch's
    shapes: x is N x in_channels x height x width, the weight out_channels x in_channels x kernel x kernel."""
    return ConvSignature(in_channels, out_channels, kernel, stride, height, width, prologue, residual).key


_names: dict = {}


def launch_config(kind: str, signature_key: str | None, dtype, device) -> Config:
    """The config for one kernel launch: the table's entry for (GPU name, dtype, layer signature
    key, kernel kind), else DEFAULTS[kind]. Never raises for a bad table (see the module doc);
    raises KeyError only for an unknown kind, a programming error."""
    if kind not in DEFAULTS:
        raise KeyError(f"unknown kernel kind {kind!r} (one of {KINDS})")
    if signature_key is None:
        return DEFAULTS[kind]
    cache_key = device if isinstance(device, str) else str(device)
    gpu = _names.get(cache_key) if _emulated_device is None else _emulated_device
    if gpu is None:
        gpu = _names[cache_key] = device_name(device)
    entry = _active_table().get(gpu, {}).get(dtype_name(dtype), {}).get(signature_key, {})
    return entry.get(kind, DEFAULTS[kind])


def configs_for_audit(kind: str) -> tuple[Config, ...]:
    """Every config the launchers may use for a kind: the search space (the default is in it)."""
    return SEARCH_SPACE[kind]


def table_json(table: dict) -> str:
    """A parsed (or raw) table as the file's text, sorted, one config per line-ish."""
    def raw(value):
        if isinstance(value, Config):
            return value.to_json()
        if isinstance(value, dict):
            return {k: raw(v) for k, v in value.items()}
        return value

    return json.dumps(raw(table), indent=1, sort_keys=True) + "\n"


assert all(DEFAULTS[k] in SEARCH_SPACE[k] for k in KINDS)
assert all(set(dict(c.blocks)) <= set(BLOCK_DIMS[k]) for k in KINDS for c in SEARCH_SPACE[k])
