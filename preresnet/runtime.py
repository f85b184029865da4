"""Where and how a run computes: device, autocast precision, memory layout, torch.compile, data
loader, fused kernels, CUDA graphs. `auto` (None) is filled in by a rule, and each rule's reason is
kept with its choice (config.json records both).

The rules, with the measurements behind them (docs/training.md, "Precision, layout and compilation"):

- **Precision.** On a GPU bf16 autocast where the GPU has it, else fp16 with loss scaling. On a CPU
  bf16 autocast only where the processor computes bf16 natively (AVX512-BF16 or AMX-BF16 on x86,
  the BF16 extension on Arm), read from the processor's own feature flags, never guessed from its
  vendor: there a bf16 channels-last step is 1.98x to 1.99x fp32 channels-last (PreResNet-110 and
  -20, bench/results/2026-12-03-cpu-steps/). Without them oneDNN emulates bf16 with fp32
  instructions and the step takes 2.56x as long as fp32 (bench/results/2026-12-03-cpu-steps-emulated-bf16/),
  so there `auto` is fp32, and an explicit `--amp bf16` or `--amp fp16` works but warns in one line.
  bf16 became a native CPU's auto once the accuracy comparison held (CPU_BF16_AUTO: PreResNet-20,
  15 epochs, 3 seeds each: bf16 mean 17.24% against fp32 17.24%, bench/results/2026-12-03-cpu-precision/).
- **Layout.** channels-last everywhere: on a GPU for the tensor cores, on a CPU because oneDNN's
  convolutions are faster in NHWC (fp32 1.12x to 1.16x; bench/results/2026-12-03-cpu-steps/).
- **torch.compile.** On a GPU always. On a CPU it pays over a run long enough to repay its warm-up:
  Inductor's code generation took 20 to 115 s for the first step (PreResNet-20 and -110, warm and
  cold caches), evaluation mode compiles once more, and the compiled step was 1.10x (fp32) to
  1.32x (bf16) faster than eager (bench/results/2026-12-03-cpu-steps/). `auto` compiles on a CPU when
  the run's whole schedule has at least CPU_COMPILE_MIN_STEPS optimizer steps; the schedule, not
  what is left of it, decides, so every command of a run makes the same choice.
- **Fused kernels and CUDA graphs.** Off on a CPU. On a GPU only where a committed GPU report
  (`python -m bench.gpu_report`) measured them correct and faster on that GPU: `bench.render_results`
  writes its choice per GPU name into gpu_defaults.json beside this module. A GPU without one
  takes the well-trodden path: bf16 autocast (fp16 with loss scaling without bf16), channels-last,
  torch.compile, the unfused model, no manual CUDA-graph capture. `--fused` and `--cuda-graphs`
  turn them on anywhere.
- **A resumed run** keeps the precision, layout, compilation, kernels and graphs it was started with
  (config.json), with the reasons recorded then, unless a flag asks otherwise: where a run was cut
  never changes what it computes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import distributed
from .errors import UserError
from .loaders import auto_backend, dali_available, dali_missing_message

AMP_CHOICES = ("off", "bf16", "fp16")
# feature flags (Linux /proc/cpuinfo: x86 'flags', Arm 'Features') of instructions that compute each
# type natively; oneDNN, which runs PyTorch's CPU convolutions and matrix products, uses them
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "asimdhp")}
# 10,000 steps (26 CIFAR epochs at batch 128): at the smallest gain measured (fp32 PreResNet-20,
# 18 ms of a 188 ms step) compiling saves 180 s, more than a cold first step (65 s) and evaluation's
# compilation; the short 15-epoch schedule (5,850 steps) stays eager, the papers' 164 epochs compile
CPU_COMPILE_MIN_STEPS = 10_000
# bf16 autocast is a native-bf16 CPU's auto since the accuracy comparison of docs/training.md held
# (fp32 and bf16, three seeds each, bench/results/2026-12-03-cpu-precision/comparison.json); False
# would make auto fp32 on every CPU again, with the reason saying so
CPU_BF16_AUTO = True
FLAGS_ENV = "PRERESNET_CPU_FLAGS"  # feature flags to use instead of the processor's (tests; another CPU's rules)
# per GPU name, whether auto turns on the fused kernels and CUDA graphs, and why (bench.render_results
# writes it from the GPU reports under bench/results/)
GPU_DEFAULTS = Path(__file__).with_name("gpu_defaults.json")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: str  # "off" | "bf16" | "fp16"
    channels_last: bool
    compile: bool | None  # None only until settle_compile has seen the run's schedule (a CPU's auto)
    loader: str  # "torch" | "dali"
    fused: bool = False  # the Triton kernels of preresnet/kernels/
    sync_bn: bool = False  # BatchNorm statistics over all ranks (multi-process runs)
    dist: distributed.Dist = distributed.Dist()
    cuda_graphs: bool = False  # the whole step (and evaluation) captured in CUDA graphs: preresnet/steps.py
    loader_reason: str = ""  # why this loader: the --loader asked for, or what auto found (config.json)
    amp_reason: str = ""
    channels_last_reason: str = ""
    compile_reason: str = ""
    fused_reason: str = ""
    cuda_graphs_reason: str = ""

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]

    def autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        return (f"device {self.device}, amp {self.amp}, channels-last {'on' if self.channels_last else 'off'}, "
                f"compile {'on' if self.compile else 'off'}, {'fused' if self.fused else 'unfused'}, {self.loader} loader, "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'}")

    def reasons(self) -> dict:
        """Why each setting is what it is (config.json's runtime section)."""
        return {"amp_reason": self.amp_reason, "channels_last_reason": self.channels_last_reason,
                "compile_reason": self.compile_reason, "loader_reason": self.loader_reason,
                "fused_reason": self.fused_reason, "cuda_graphs_reason": self.cuda_graphs_reason}


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags as Linux reports them ($PRERESNET_CPU_FLAGS instead where set);
    empty where /proc/cpuinfo is not."""
    if FLAGS_ENV in os.environ:
        return frozenset(os.environ[FLAGS_ENV].replace(",", " ").split())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_cpu_support(amp: str, flags: frozenset[str] | None = None) -> list[str]:
    """The instruction sets of this CPU that compute amp's type natively (empty: emulated)."""
    flags = cpu_flags() if flags is None else flags
    found = [flag for flag in NATIVE_CPU_FLAGS[amp] if flag in flags]
    if not flags and amp == "bf16" and FLAGS_ENV not in os.environ:  # no /proc/cpuinfo (macOS, Windows): ask PyTorch's own CPU probe
        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        found = [flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]
    return found


def emulation_warning(amp: str) -> str:
    wanted = {"bf16": "AVX512-BF16, AMX-BF16 or Arm BF16", "fp16": "AVX512-FP16, AMX-FP16 or Arm FP16"}[amp]
    return (f"warning: --amp {amp} on a CPU without native {amp} ({wanted}): the arithmetic is emulated and "
            f"slower than fp32 (--amp off); the results are the same")


def kept_reason(saved: dict, setting: str) -> str:
    """Why a resumed run's auto keeps its setting: the reason its config.json gives (so a resumed run
    writes the same config.json), or, for a run started before reasons were recorded, that it was kept."""
    return saved.get(f"{setting}_reason") or "as the run was started (its config.json)"


def resolve_amp(amp: str, device: str, saved: dict | None, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The autocast precision `amp` means on device, and why."""
    if amp == "auto" and saved and saved.get("amp") in AMP_CHOICES:
        return saved["amp"], kept_reason(saved, "amp")
    if amp == "auto" and device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU computes bf16"
        return "fp16", "auto: the GPU has no bf16, fp16 with loss scaling"
    if amp == "auto":
        native = native_cpu_support("bf16", flags)
        if native and CPU_BF16_AUTO:
            return "bf16", (f"auto: this CPU computes bf16 natively ({', '.join(native)}); bf16 autocast matched fp32's "
                            f"accuracy (docs/training.md)")
        if native:
            return "off", (f"auto: fp32; this CPU computes bf16 natively ({', '.join(native)}), but bf16 autocast "
                           f"waits on the accuracy comparison against fp32")
        return "off", "auto: this CPU has no native bf16 (AVX512-BF16, AMX-BF16), so fp32"
    if amp not in AMP_CHOICES:
        raise UserError(f"unknown --amp {amp!r}: choose auto, bf16, fp16 or off")
    return amp, f"--amp {amp}"


def gpu_defaults(gpu: str, path: Path | None = None) -> dict:
    """What a GPU report measured for this GPU name: {"fused": {"on": bool, "reason": str},
    "cuda_graphs": {...}}; empty where no report has. path: GPU_DEFAULTS by default."""
    path = GPU_DEFAULTS if path is None else path
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the GPU defaults table {path}: {exc}") from None
    entry = table.get(gpu, {}) if isinstance(table, dict) else None
    choices = [entry.get(key) for key in ("fused", "cuda_graphs") if key in entry] if isinstance(entry, dict) else None
    if choices is None or not all(isinstance(c, dict) and isinstance(c.get("on"), bool) and isinstance(c.get("reason"), str)
                                  for c in choices):
        raise UserError(f"{path} is not a GPU defaults table ({{GPU name: {{fused: {{on, reason}}, cuda_graphs: ...}}}})")
    return entry


def resolve_switch(name: str, value: bool | None, saved: dict, measured: dict | None) -> tuple[bool, str]:
    """The fused kernels or CUDA graphs (name), and why: the flag, else a resumed run's own, else on a
    GPU what its report measured (measured: gpu_defaults' entry; None on a CPU), else off."""
    flag = name.replace("_", "-")
    if value is not None:
        return value, f"--{'' if value else 'no-'}{flag}"
    if isinstance(saved.get(name), bool):
        return saved[name], kept_reason(saved, name)
    if measured is None:
        return False, "auto: off on a CPU"
    if name in measured:
        return measured[name]["on"], f"auto: {measured[name]['reason']}"
    return False, f"auto: off: no GPU report has measured it on this GPU (--{flag} turns it on)"


def resolve_runtime(device: str = "auto", amp: str = "auto", channels_last: bool | None = None,
                    compile: bool | None = None, loader: str = "auto", fused: bool | None = None,
                    sync_bn: bool | None = None, dist: distributed.Dist = distributed.Dist(),
                    cuda_graphs: bool | None = None, saved: dict | None = None) -> Runtime:
    """Fill in 'auto' (None) by the rules above. saved: the runtime section of a resumed run's
    config.json, whose settings an auto keeps. On a CPU an auto compile stays None until
    settle_compile sees the run's schedule."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if device not in ("cuda", "cpu"):
        raise UserError(f"unknown device {device!r}: choose auto, cuda or cpu")
    on_gpu = device == "cuda"
    amp, amp_reason = resolve_amp(amp, device, saved)
    if fused and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--fused on the CPU runs the Triton kernels under the interpreter (slow; meant for tests): "
                        "set TRITON_INTERPRET=1, or train on a GPU")
    loader_reason = f"--loader {loader}"
    if loader == "auto":
        loader, loader_reason = auto_backend(device)
    if loader == "dali" and not dali_available():
        raise UserError(dali_missing_message("--loader dali"))
    saved = saved or {}
    if channels_last is not None:
        channels_last_reason = f"--{'' if channels_last else 'no-'}channels-last"
    elif isinstance(saved.get("channels_last"), bool):
        channels_last, channels_last_reason = saved["channels_last"], kept_reason(saved, "channels_last")
    else:
        channels_last = True
        channels_last_reason = ("auto: on a GPU, for the tensor cores" if on_gpu else
                                "auto: oneDNN's CPU convolutions are faster in NHWC")
    if compile is not None:
        compile_reason = f"--{'' if compile else 'no-'}compile"
    elif isinstance(saved.get("compile"), bool):
        compile, compile_reason = saved["compile"], kept_reason(saved, "compile")
    elif on_gpu:
        compile, compile_reason = True, "auto: on a GPU"
    else:
        compile_reason = ""  # settle_compile decides from the run's schedule
    measured = gpu_defaults(torch.cuda.get_device_name(torch.device(device, dist.local_rank))) if on_gpu else None
    fused, fused_reason = resolve_switch("fused", fused, saved, measured)
    cuda_graphs, cuda_graphs_reason = resolve_switch("cuda_graphs", cuda_graphs, saved, measured)
    return Runtime(
        device=torch.device(device, dist.local_rank) if on_gpu and dist.enabled else torch.device(device),
        amp=amp,
        amp_reason=amp_reason,
        channels_last=channels_last,
        channels_last_reason=channels_last_reason,
        compile=compile,
        compile_reason=compile_reason,
        loader=loader,
        loader_reason=loader_reason,
        fused=fused,
        fused_reason=fused_reason,
        sync_bn=bool(sync_bn),
        dist=dist,
        cuda_graphs=cuda_graphs,
        cuda_graphs_reason=cuda_graphs_reason,
    )


def settle_compile(runtime: Runtime, schedule_steps: int) -> Runtime:
    """A CPU's auto compile, decided by the optimizer steps of the run's whole schedule (of the
    longest run, for packed runs): on from CPU_COMPILE_MIN_STEPS."""
    if runtime.compile is not None:
        return runtime
    compile = schedule_steps >= CPU_COMPILE_MIN_STEPS
    relation = "at least" if compile else "under"
    return replace(runtime, compile=compile, compile_reason=(
        f"auto: on a CPU compiling pays from {CPU_COMPILE_MIN_STEPS:,} steps; this run's schedule has "
        f"{schedule_steps:,} ({relation})"))


def warn_if_emulated(runtime: Runtime, say=print) -> None:
    """One line when the CPU emulates the autocast type asked for."""
    if runtime.device.type == "cpu" and runtime.amp != "off" and not native_cpu_support(runtime.amp):
        say(emulation_warning(runtime.amp))


def saved_runtime(path: str | os.PathLike) -> dict | None:
    """The runtime section of the config.json of the run that path continues (a run folder, a
    checkpoint file in one, or a packed command's folder, whose seed-N runs share one runtime);
    None where there is none yet (a new run under --resume auto)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    candidates = [folder / "config.json"] + sorted(folder.glob("*/config.json"))
    for config in candidates:
        try:
            runtime = json.loads(config.read_text()).get("runtime")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(runtime, dict):
            return runtime
    return None
