"""What the benchmarks time, shared by the pytest-benchmark suite and `bench.gpu_report`.

Speed variants, each a way to run the same network, by name: VARIANT_FLAGS says what each name
means (the execution settings of preresnet.runtime.Runtime, as train.py's flags set them), for the
suite's providers here and for the GPU report's training-step matrix (bench.gpu_report:
train_py_step, train.py's own step). The suite's providers:
  eager-fp32     the reference model, fp32, NCHW: the unfused baseline
  eager-fp32-cl  the reference model, fp32, channels-last (the CPU rows' baseline: bench/test_cpu_steps.py)
  eager-amp-cl   the reference model, bf16 autocast, channels-last
  compile        the reference model under torch.compile (default mode), bf16 autocast, channels-last
  fused          the Triton kernels, bf16 autocast, channels-last
  fused-compile  the Triton kernels under torch.compile
  cuda-graph     the reference model under torch.compile(mode="reduce-overhead") (CUDA graphs; GPU only)
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from preresnet import build_model, get_model
from preresnet.cuda_graphs import synchronize
from preresnet.kernels.dispatch import assign_paths, conv_signatures
from preresnet.models import PreActBasicBlock, PreActBottleneck
from preresnet.provenance import git_commit
from preresnet.recipes import resolve_recipe
from preresnet.registry import MODEL_ARCHS, paper_name
from preresnet.runtime import cpu_name, native_cpu_support, resolve_runtime
from preresnet.steps import build_step, make_optimizer

# graph_mode "reduce-overhead" (cuda-graph): torch.compile's own CUDA graphs of the suite's module step
# (bench only; train.py captures its step by hand). The names are those bench/results records: keep them.
VARIANT_FLAGS = {
    "eager-fp32": {"amp": "off", "channels_last": False, "compile": False, "fused": False, "cuda_graphs": False},
    "eager-fp32-cl": {"amp": "off", "channels_last": True, "compile": False, "fused": False, "cuda_graphs": False},
    "eager-amp-cl": {"amp": "bf16", "channels_last": True, "compile": False, "fused": False, "cuda_graphs": False},
    "eager-amp-cl-graphs": {"amp": "bf16", "channels_last": True, "compile": False, "fused": False, "cuda_graphs": True},
    "fused": {"amp": "bf16", "channels_last": True, "compile": False, "fused": True, "cuda_graphs": False},
    "fused-graphs": {"amp": "bf16", "channels_last": True, "compile": False, "fused": True, "cuda_graphs": True},
    "compile": {"amp": "bf16", "channels_last": True, "compile": True, "fused": False, "cuda_graphs": False},
    "compile-graphs": {"amp": "bf16", "channels_last": True, "compile": True, "fused": False, "cuda_graphs": True},
    "fused-compile": {"amp": "bf16", "channels_last": True, "compile": True, "fused": True, "cuda_graphs": False},
    "fused-compile-graphs": {"amp": "bf16", "channels_last": True, "compile": True, "fused": True, "cuda_graphs": True},
    "cuda-graph": {"amp": "bf16", "channels_last": True, "compile": True, "fused": False, "cuda_graphs": True,
                   "graph_mode": "reduce-overhead"},
}
PROVIDERS = ("eager-fp32", "eager-amp-cl", "compile", "fused", "fused-compile", "cuda-graph")
UNIT_PROVIDERS = ("eager-fp32", "eager-amp-cl", "fused")  # compiling each unit shape would not fit the time budget
MODELS = ("preresnet110", "preresnet164", "wrn16_4")
# the CPU section (bench/test_cpu_steps.py): a training step at batch 128 on the CPU, the ratios to
# fp32 channels-last (CPU_BASELINE) in docs/benchmarks.md (bench/cpu_table.py)
CPU_PROVIDERS = ("eager-fp32", "eager-fp32-cl", "eager-amp-cl", "compile")
CPU_MODELS = ("preresnet20", "preresnet110")
CPU_BATCH = 128
CPU_BASELINE = "eager-fp32-cl"
ROOT = Path(__file__).resolve().parents[1]


def flags_of(variant: str) -> dict:
    """The execution settings of a variant name (a copy: VARIANT_FLAGS stays as it is)."""
    if variant not in VARIANT_FLAGS:
        raise KeyError(f"unknown speed variant {variant!r}: one of {', '.join(VARIANT_FLAGS)}")
    return dict(VARIANT_FLAGS[variant])


def network_name(model: str) -> str:
    """A registry network by its paper name (PreResNet-110), another name as it is."""
    return paper_name(*MODEL_ARCHS[model]) if model in MODEL_ARCHS else model


def skip_reason(provider: str, device: str) -> str | None:
    """Why a provider is not meaningful on this device, or None."""
    flags = flags_of(provider)
    if flags["cuda_graphs"] and device != "cuda":
        return "CUDA graphs need a CUDA GPU"
    if device == "cpu":
        if flags["fused"]:
            return "the Triton kernels run on a CPU only under the interpreter: its timings mean nothing"
        if flags["compile"]:
            return ("compiling these networks takes minutes on a CPU, past the suite's 5-minute budget "
                    "(bench/test_cpu_steps.py times the compiled step of PreResNet-20 and PreResNet-110 there)")
    if flags["fused"] and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled"
    return None


@dataclass(frozen=True)
class UnitShape:
    """One distinct pre-activation unit of a paper network, by its input."""

    network: str
    bottleneck: bool
    in_channels: int
    planes: int
    stride: int
    size: int  # input height = width

    @property
    def out_channels(self) -> int:
        return self.planes * (4 if self.bottleneck else 1)

    @property
    def name(self) -> str:
        kind = "bottleneck" if self.bottleneck else "basic"
        return f"{self.network} {kind} {self.in_channels}->{self.out_channels} s{self.stride} {self.size}x{self.size}"


def unit_shapes(models=MODELS) -> list[UnitShape]:
    """The distinct units of each network, found by running it on the meta device."""
    found = {}  # a dict: distinct, in order of appearance
    for name in models:
        def record(module, inputs, _output, name=name):
            x = inputs[0]
            shape = UnitShape(name, isinstance(module, PreActBottleneck), x.shape[1], module.conv1.out_channels,
                              max(module.conv1.stride[0], module.conv2.stride[0]), x.shape[-1])
            found.setdefault(shape, None)

        with torch.device("meta"):  # the hooks stay: the model is dropped
            model = get_model(name)
            for unit in model.modules():
                if isinstance(unit, (PreActBasicBlock, PreActBottleneck)):
                    unit.register_forward_hook(record)
            model(torch.empty(1, 3, 32, 32))
    return list(found)


class FirstLayer(nn.Module):
    """A unit's first BN -> ReLU -> conv alone."""

    def __init__(self, unit: nn.Module, fused: bool):
        super().__init__()
        self.bn, self.conv, self.fused = unit.bn1, unit.conv1, fused

    def forward(self, x):
        if self.fused:
            from preresnet.kernels.layers import batchnorm_moments, fused_conv

            return fused_conv(x, batchnorm_moments(self.bn, x, None), self.conv, emit_stats=False)[0]
        return self.conv(torch.relu(self.bn(x)))


def make_unit(shape: UnitShape, fused: bool, layer_only: bool = False) -> nn.Module:
    block = PreActBottleneck if shape.bottleneck else PreActBasicBlock
    unit = block(shape.in_channels, shape.planes, shape.stride, fused=fused)
    return FirstLayer(unit, fused) if layer_only else unit


def is_fused(provider: str) -> bool:
    return flags_of(provider)["fused"]


def provider_dtype(provider: str) -> str:
    """The autocast type a provider computes in."""
    return "float32" if flags_of(provider)["amp"] == "off" else "bfloat16"


def prepare(module: nn.Module, provider: str, device: str):
    """Module placed and wrapped for the provider, the input memory format, and the autocast context."""
    flags = flags_of(provider)
    reduce_overhead = flags.get("graph_mode") == "reduce-overhead"
    if flags["cuda_graphs"] and not reduce_overhead:
        raise ValueError(f"{provider}: the suite's module steps capture no CUDA graph of their own (train.py's "
                         f"step does: packed_training_steps)")
    memory_format = torch.channels_last if flags["channels_last"] else torch.contiguous_format
    module = module.to(device, memory_format=memory_format).train()
    if flags["compile"]:
        module = torch.compile(module, mode="reduce-overhead" if reduce_overhead else None)
    bf16 = provider_dtype(provider) == "bfloat16"
    amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return module, memory_format, amp


def random_input(batch: int, channels: int, size: int, device: str, memory_format) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device, generator=generator)
    return x.contiguous(memory_format=memory_format)


def unit_step(shape: UnitShape, provider: str, device: str, batch: int, backward: bool, layer_only: bool):
    """A function running one forward (and backward) of a unit or its first layer, synchronised."""
    module, memory_format, amp = prepare(make_unit(shape, is_fused(provider), layer_only), provider, device)
    x = random_input(batch, shape.in_channels, shape.size, device, memory_format).requires_grad_(backward)

    def step():
        with amp(), (contextlib.nullcontext() if backward else torch.no_grad()):
            out = module(x)
        if backward:
            out.float().square().mean().backward()
        synchronize(torch.device(device))

    return step


def conv_path_step(signature, path: str, device: str, batch: int, dtype: torch.dtype):
    """Forward and backward of one fused layer (kernels.dispatch.ConvSignature) on the given path, as
    the fused model runs it: input statistics known from the layer before, output statistics emitted."""
    from preresnet.kernels.layers import batchnorm_moments, fused_conv

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(signature.in_channels).to(device).train()
    conv = nn.Conv2d(signature.in_channels, signature.out_channels, signature.kernel, signature.stride,
                     signature.kernel // 2, bias=False).to(device, memory_format=torch.channels_last)
    conv.fused_path = path
    # inputs in the operand dtype, as the layer before hands them over in a fused model
    x = random_input(batch, signature.in_channels, signature.height, device, torch.channels_last).to(dtype)
    x = x[..., :signature.width].contiguous(memory_format=torch.channels_last).requires_grad_(signature.prologue)
    var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), unbiased=False)
    ho = (signature.height - 1) // signature.stride + 1
    wo = (signature.width - 1) // signature.stride + 1
    residual = (random_input(batch, signature.out_channels, ho, device, torch.channels_last)[..., :wo].to(dtype)
                .contiguous(memory_format=torch.channels_last) if signature.residual else None)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            applied = batchnorm_moments(bn, x, (mean, var)) if signature.prologue else None
            y, _ = fused_conv(x, applied, conv, residual, emit_stats=True)
        y.float().square().mean().backward()
        synchronize(torch.device(device))
        return y, x.grad, conv.weight.grad

    return step


def layer_signatures(models=MODELS) -> list:
    """The distinct fused layers (kernels.dispatch.ConvSignature) of the networks, in order of appearance."""
    found = {}
    for name in models:
        for signature in conv_signatures(get_model(name, fused=True)).values():
            found.setdefault(signature.key, signature)
    return list(found.values())


def torch_path_layers(name: str, device: str) -> dict[str, str]:
    """The layers of a paper network that preresnet/kernels/conv_paths.json moves to PyTorch's ops (bf16)."""
    return assign_paths(get_model(name, fused=True), torch.device(device), torch.bfloat16)


def build_network(name: str, fused: bool, device, dtype: torch.dtype):
    """A registry network ("tiny": PreResNet-8, for tests); fused, each layer on its path in conv_paths.json."""
    model = build_model("normal", 1, num_classes=10, fused=fused) if name == "tiny" else get_model(name, fused=fused)
    if fused:
        assign_paths(model, torch.device(device), dtype)
    return model


def training_step(name: str, provider: str, device: str, batch: int):
    """One SGD step of a paper network (forward, loss, backward, optimizer), synchronised; it
    returns the step's loss, and leaves the gradients of its parameters (step.model) in place until
    the next call. The fused providers run what train.py --fused runs (build_network)."""
    torch.manual_seed(0)
    model = build_network(name, is_fused(provider), device, torch.bfloat16)
    # fused SGD, as train.py runs it (preresnet.steps.make_optimizer), on every device: bench.launches
    # counts this step's ops on the CPU
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)
    module, memory_format, amp = prepare(model, provider, device)
    x = random_input(batch, 3, 32, device, memory_format)
    y = torch.randint(0, 10, (batch,), device=device, generator=torch.Generator(device=device).manual_seed(1))

    def step():
        with amp():
            loss = F.cross_entropy(module(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(torch.device(device))
        return loss

    step.model = model
    return step


def train_py_step(name: str, provider: str, device: str, batch: int):
    """One training step of a paper network as train.py runs it with the variant's settings (build_step)."""
    flags = flags_of(provider)
    runtime = resolve_runtime(device, flags["amp"], flags["channels_last"], flags["compile"], "torch", flags["fused"],
                              cuda_graphs=flags["cuda_graphs"])
    return packed_training_steps(name, runtime, 1, batch)


# the packed-step workload's providers: train.py's own step, eager, with these variants' settings
# (the table's less `compile`, which bench/test_packing.py sets off itself)
PACKED_PROVIDERS = {name: {key: value for key, value in VARIANT_FLAGS[name].items() if key != "compile"}
                    for name in ("eager-fp32", "eager-amp-cl-graphs", "fused-graphs")}
PACKED_RUNS = (1, 2, 4)


def packed_training_steps(name: str, runtime, runs: int, batch: int, size: int = 32):
    """A function running one training step of each of `runs` packed copies of a network, as
    train.py --seeds trains them: each copy with its own model, optimizer and step
    (preresnet.steps.build_step: captured in a CUDA graph where the runtime says so) and, on a
    GPU, its own CUDA stream; a call queues one step of every copy in turn, then waits for all."""
    device = runtime.device
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    copies = []
    for k in range(runs):
        torch.manual_seed(k)
        model = build_network(name, runtime.fused, device, runtime.amp_dtype or torch.float32)
        model.to(device, memory_format=memory_format).train()
        recipe = resolve_recipe("wrn" if name.startswith("wrn") else "paper")
        step, _ = build_step(model, make_optimizer(model, recipe, device),
                             torch.amp.GradScaler(device.type, enabled=False), runtime)
        step.set_lr(recipe.lr)
        generator = torch.Generator(device=device).manual_seed(k)
        x = torch.randn(batch, 3, size, size, device=device, generator=generator).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (batch,), device=device, generator=generator)
        stream = torch.cuda.Stream(device) if device.type == "cuda" and runs > 1 else None
        copies.append((step, stream, x, y))
    synchronize(device)  # the inputs, made on the default stream, before the copies' streams read them

    def step_all():
        losses = []
        for step, stream, x, y in copies:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                losses.append(step(x, y)[0])
        synchronize(device)
        return losses

    return step_all


def time_step(step, warmup: int = 3, iterations: int = 20) -> float:
    """Median milliseconds of step() by CUDA events, after warm-up (compilation, autotuning)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_environment() -> dict:
    """What a CPU row names besides environment(): the processor's model name, the instruction sets
    it computes bf16 with natively (empty: oneDNN emulates bf16), and the threads PyTorch uses."""
    return {"cpu_name": cpu_name(), "native_bf16": native_cpu_support("bf16"), "threads": torch.get_num_threads()}


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
            "commit": git_commit()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info

