"""The fused kernels' cross-program bookkeeping when launches run at once: each launch takes its
ticket counters from the workspace of what launches it (preresnet.kernels.workspace), never from
one it could share with a launch running at the same time, and the graph mode that would share a
capture stream between packed runs is refused.

`test_two_streams_at_once_on_gpu`, which `python -m bench.gpu_report` runs first: a WRN-28-10 layer
(BatchNorm -> ReLU -> 3x3 conv, batch 128), forward with its statistics merge and backward with its
split weight gradient and its dgamma/dbeta merge, on two streams at once, each with its own
counters, STRESS_ROUNDS times eagerly and STRESS_ROUNDS times replayed from CUDA graphs. Its
oracles: the first round's batch statistics against torch.var_mean and its gradients against
autograd, both through PyTorch's ops in float64, within a multiple of PyTorch's own error at the
kernels' precision; every later round bit-identical to the first (every merge sums in a fixed
order, so a difference can only be a race); every counter zero at the end. On the CPU the same
rounds run under the Triton interpreter at a small size, the two owners interleaved.
"""

import contextlib
import threading
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from preresnet import build_model
from preresnet.kernels import INTERPRETED, BnState, bn_relu_conv
from preresnet.kernels import preact_conv
from preresnet.kernels.launch_configs import CONV_WGRAD, DEFAULTS
from preresnet.kernels.workspace import counters_for_launch, launching_with, new_counters
from preresnet.recipes import resolve_recipe
from preresnet.runtime import Runtime
from preresnet import steps

EPS = 1e-5
STRESS_ROUNDS = 50  # of each kind, eager and replayed, on each of the two streams
ERROR_FACTOR = 3  # the kernels may be this many times less accurate than PyTorch at their precision
FLOOR = 2e-5  # of the reference's largest magnitude: fp32 rounding where PyTorch's own error is near zero
OUTPUTS = ("y", "mean of y", "variance of y", "dx", "dgamma", "dbeta", "dweight")
# (channels, image size): WRN-28-10's first stage (its weight gradient splits on an H100: 81 tiles)
# and its last (900 tiles, one split; the largest statistics merges per program)
WRN_LAYERS = [pytest.param(160, 32, id="wrn28_10-160x32x32"), pytest.param(640, 8, id="wrn28_10-640x8x8")]

needs_compiled_kernels = pytest.mark.skipif(INTERPRETED, reason="the interpreter mishandles bf16/fp16 dots: run "
                                                                "`TRITON_INTERPRET=0 pytest -m gpu` on a GPU")


class Layer(NamedTuple):
    """One owner's fused layer: the input, the BatchNorm's gamma and beta, the fp32 master weight
    (cast in the kernel, as in training) and the output gradient."""

    x: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    weight: torch.Tensor
    dy: torch.Tensor


def make_layer(batch: int, channels: int, size: int, dtype: torch.dtype, device: torch.device, seed: int) -> Layer:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator) * 1.5 + 0.3
    gamma = torch.rand(channels, generator=generator) + 0.5
    beta = torch.randn(channels, generator=generator) * 0.5
    weight = torch.randn(channels, channels, 3, 3, generator=generator) / (9 * channels) ** 0.5
    dy = torch.randn(batch, channels, size, size, generator=generator)

    def activation(t):
        return t.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    return Layer(activation(x).requires_grad_(), gamma.to(device).requires_grad_(), beta.to(device).requires_grad_(),
                 weight.to(device).requires_grad_(), activation(dy))


def fused_step(layer: Layer) -> tuple[torch.Tensor, ...]:
    """The fused layer's forward (statistics merge) and backward (weight-gradient split, dgamma and
    dbeta merge), with x's batch statistics: the OUTPUTS."""
    var, mean = torch.var_mean(layer.x.detach().float(), dim=(0, 2, 3), unbiased=False)
    bn = BnState(mean, var, layer.gamma, layer.beta, True, EPS)
    y, y_mean, y_var = bn_relu_conv(layer.x, bn, layer.weight, None, 1, 1, emit_stats=True)
    grads = torch.autograd.grad(y, (layer.x, layer.gamma, layer.beta, layer.weight), layer.dy)
    return (y, y_mean, y_var, *grads)


def pytorch_step(layer: Layer, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The same layer in PyTorch's ops with dtype operands (fp32 without TF32): the OUTPUTS, y's
    statistics by torch.var_mean in float64."""
    params = torch.float64 if dtype == torch.float64 else torch.float32
    x = layer.x.detach().to(dtype).requires_grad_()
    gamma, beta, weight = (t.detach().to(params).requires_grad_() for t in (layer.gamma, layer.beta, layer.weight))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = F.conv2d(torch.relu(F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)), weight.to(dtype),
                     padding=1)
        grads = torch.autograd.grad(y, (x, gamma, beta, weight), layer.dy.to(dtype))
    var, mean = torch.var_mean(y.detach().double(), dim=(0, 2, 3), unbiased=False)
    return (y.detach(), mean, var, *grads)


class Owner:
    """One of the two launchers: its layer, its own ticket counters and stream, its captured graph,
    its first round's outputs, and whether a later round differed from them (a device flag, so
    that checking never waits for the GPU)."""

    def __init__(self, layer: Layer, device: torch.device):
        self.layer = layer
        self.counters = new_counters(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.graph = self.static_outputs = self.first = None
        self.differs = torch.zeros((), dtype=torch.bool, device=device)

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def record(self, outputs) -> None:
        if self.first is None:
            self.first = [t.detach().clone() for t in outputs]
            return
        for got, first in zip(outputs, self.first):
            self.differs |= (got != first).any()


def eager_rounds(owners: list[Owner], rounds: int) -> None:
    """Each round queues one fused step of every owner, each on its stream, without waiting."""
    for _ in range(rounds):
        for owner in owners:
            with owner.on_stream(), launching_with(owner.counters):
                owner.record(fused_step(owner.layer))


def captured_rounds(owners: list[Owner], rounds: int) -> None:
    """Each owner's step captured on its stream with its counters, then the graphs replayed at once."""
    for owner in owners:
        owner.graph = torch.cuda.CUDAGraph()
        with launching_with(owner.counters), torch.cuda.graph(owner.graph, stream=owner.stream):
            owner.static_outputs = fused_step(owner.layer)
    for _ in range(rounds):
        for owner in owners:
            with owner.on_stream():
                owner.graph.replay()
                owner.record(owner.static_outputs)


def assert_bookkeeping_held(owners: list[Owner], dtype: torch.dtype) -> None:
    """The first rounds against PyTorch, every later round bit-identical, every counter back at zero."""
    for index, owner in enumerate(owners):
        exact, theirs = pytorch_step(owner.layer, torch.float64), pytorch_step(owner.layer, dtype)
        for name, got, want, their in zip(OUTPUTS, owner.first, exact, theirs):
            scale = want.abs().max().item()
            error = (got.double() - want).abs().max().item()
            their_error = (their.double() - want).abs().max().item()
            assert error <= ERROR_FACTOR * their_error + FLOOR * scale, \
                f"owner {index}, {name}: error {error:.3e}, PyTorch's {their_error:.3e}, max |reference| {scale:.3e}"
        assert not owner.differs.item(), f"owner {index}: a later round differs from the first (a race)"
        assert not owner.counters.any(), f"owner {index}: ticket counters left non-zero"


# --- on the CPU: the same rounds under the interpreter, and who owns the counters ---------------------------


@pytest.fixture
def small_tiles(monkeypatch):
    """64-pixel tiles, the launch config's channel blocks and 16 multiprocessors: at 3 x 8 x 8 every
    reduction has three programs (three statistics tiles, three weight-gradient splits), so that a
    merge run by any but the last program is seen: in a sequential run, one by the first of two
    would merge again after the second."""
    monkeypatch.setattr(preact_conv, "INTERPRETER_BLOCK_M", 64)
    monkeypatch.setattr(preact_conv, "INTERPRETER_BLOCK_C", None)
    monkeypatch.setattr(preact_conv, "INTERPRETER_MULTIPROCESSORS", 16)


@pytest.fixture
def recorded_counters(monkeypatch):
    """The counters every fused launch takes its tickets from, in launch order."""
    taken = []

    def record(device, slots):
        taken.append(counters_for_launch(device, slots))
        return taken[-1]

    monkeypatch.setattr(preact_conv, "counters_for_launch", record)
    return taken


@pytest.mark.usefixtures("small_tiles")
def test_two_owners_interleaved_on_cpu():
    device = torch.device("cpu")
    owners = [Owner(make_layer(3, 16, 8, torch.float32, device, seed), device) for seed in (0, 1)]
    assert wgrad_splits(device, 16, 8, batch=3) == 3
    eager_rounds(owners, 2)
    assert_bookkeeping_held(owners, torch.float32)


@pytest.mark.usefixtures("small_tiles")
def test_each_launch_takes_its_owners_counters(recorded_counters):
    """Forward and backward (autograd's engine, on a GPU from its own threads) of a layer launched
    inside an owner take that owner's counters; outside every owner, the device's default ones."""
    device = torch.device("cpu")
    layer = make_layer(2, 16, 8, torch.float32, device, 0)
    counters = new_counters(device)
    with launching_with(counters):
        fused_step(layer)
    assert len(recorded_counters) == 3 and all(taken is counters for taken in recorded_counters)  # fwd, wgrad, dgrad
    recorded_counters.clear()
    fused_step(layer)
    assert len(recorded_counters) == 3 and all(taken is counters_for_launch(device, 1) for taken in recorded_counters)
    assert counters_for_launch(device, 1) is not counters


def test_the_owner_is_seen_from_other_threads_and_entered_from_one():
    """Autograd launches a GPU backward from its device threads while the caller waits: they must
    see the caller's owner. Two threads inside owners at once cannot both be right: refused."""
    counters, seen, refused = new_counters("cpu"), [], []

    def launch_from_another_thread():
        seen.append(counters_for_launch(torch.device("cpu"), 1))

    def enter_from_another_thread():
        try:
            with launching_with(new_counters("cpu")):
                pass
        except RuntimeError as error:
            refused.append(str(error))

    with launching_with(counters):
        for target in (launch_from_another_thread, enter_from_another_thread):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
    assert seen == [counters] and seen[0] is counters
    assert len(refused) == 1 and "two threads" in refused[0]
    with launching_with(new_counters("cpu")):  # once the first thread has left, another may enter
        pass


def test_a_launch_needing_more_counters_than_a_workspace_is_refused():
    from preresnet.kernels.workspace import COUNTER_SLOTS

    with pytest.raises(ValueError, match="ticket counters"):
        counters_for_launch(torch.device("cpu"), COUNTER_SLOTS + 1)


def fused_cpu_runtime(**fields) -> Runtime:
    return Runtime(device=torch.device("cpu"), amp="off", channels_last=True, compile=False, loader="torch",
                   fused=True, **fields)


def test_a_training_step_owns_the_counters_of_its_launches(recorded_counters):
    """preresnet.steps: every fused launch of a step (here the capturable one, run directly on the
    CPU) takes that step's counters, allocated when the step was built."""
    torch.manual_seed(0)
    model = build_model("normal", 1, num_classes=4, fused=True).to(memory_format=torch.channels_last)
    runtime = fused_cpu_runtime(cuda_graphs=True)
    step, _ = steps.build_step(model, steps.make_optimizer(model, resolve_recipe("paper"), runtime.device),
                               torch.amp.GradScaler("cpu", enabled=False), runtime)
    assert step.counters is not None and not step.counters.any()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    step(x, torch.tensor([0, 1]))
    assert recorded_counters and all(taken is step.counters for taken in recorded_counters)
    assert not step.counters.any()


# --- on a GPU ---------------------------------------------------------------------------------------------


def wgrad_splits(device: torch.device, channels: int, size: int, batch: int = 128) -> int:
    """The splits of the layer's weight gradient as the launcher sizes them on device."""
    config = DEFAULTS[CONV_WGRAD]
    pixels = batch * size * size
    return preact_conv.wgrad_grid(pixels, 9, channels, channels, config.block("BLOCK_M", pixels),
                                  config.block("BLOCK_C", channels), config.block("BLOCK_CO", channels),
                                  preact_conv.multiprocessors(device)).splits


@pytest.mark.gpu
@needs_compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels, size", WRN_LAYERS)
def test_two_streams_at_once_on_gpu(channels, size, dtype):
    device = torch.device("cuda")
    owners = [Owner(make_layer(128, channels, size, dtype, device, seed), device) for seed in (0, 1)]
    assert channels != 160 or wgrad_splits(device, channels, size) > 1, \
        "the first stage's weight gradient should split on this GPU, so that its tickets are exercised"
    torch.cuda.synchronize()  # the inputs, made on the default stream, before the owners' streams read them
    eager_rounds(owners, STRESS_ROUNDS)
    captured_rounds(owners, STRESS_ROUNDS)
    torch.cuda.synchronize()
    assert_bookkeeping_held(owners, dtype)


@pytest.mark.gpu
@needs_compiled_kernels
def test_a_launch_outside_the_default_stream_needs_an_owner():
    """Without an owner, a launch that takes tickets on a side stream is refused, never given counters
    another stream may be using; one that takes none (an evaluation forward) runs."""
    layer = make_layer(2, 16, 8, torch.float32, torch.device("cuda"), 0)
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        with pytest.raises(RuntimeError, match="needs ticket counters of its own"):
            fused_step(layer)
        var, mean = torch.var_mean(layer.x.detach(), dim=(0, 2, 3), unbiased=False)
        bn = BnState(mean, var, layer.gamma, layer.beta, False, EPS)
        with torch.no_grad():
            bn_relu_conv(layer.x, bn, layer.weight, None, 1, 1, emit_stats=False)
    torch.cuda.synchronize()
