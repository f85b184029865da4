"""Fused pre-activation convolution: y = conv(relu(batchnorm(x))) [+ residual], forward and backward.

Why this shape: in a pre-activation network nearly every layer is BN -> ReLU -> conv, and on CIFAR
shapes launches and memory traffic, not arithmetic, set the speed: a big GPU runs each kernel of a
batch-128 step in microseconds, about the cost of launching it. So each layer is one kernel
forward and three backward, with no PyTorch ops around them:

  - forward: the convolution is an implicit GEMM over channels-last tensors (rows = output pixels,
    columns = output channels, reduction = kernel taps x input channels). Its prologue applies
    BatchNorm and ReLU to each input tile as it is loaded (scale and shift computed from the batch
    mean, variance, gamma and beta; relu(x * scale + shift), forced back to 0 in the zero padding),
    and its first program updates the BatchNorm's running statistics exactly as nn.BatchNorm2d
    does. The epilogue adds the residual and writes per-tile mean and M2 of the output; the last
    program to finish merges them (Chan et al.'s parallel formula, fp32) into the batch mean and
    variance the next BatchNorm uses, so no BatchNorm reads its input to measure it. The weight is
    read in its own layout and dtype (fp32 master weights cast in the kernel): nothing is packed.
  - dgrad: the transposed convolution of dy, whose epilogue applies the ReLU mask recomputed from x
    and writes per-tile sums of gz and gz * xhat (gz: gradient at the BatchNorm output); the last
    program reduces them into dbeta and dgamma. For a plain conv (no prologue) it is dx itself;
  - apply: dx = scale * (gz - dbeta / M - xhat * dgamma / M) (batch statistics), or scale * gz;
  - wgrad: dW = sum over pixels of relu(bn(x)) (recomputed in the prologue) times dy, split over
    pixel ranges so that small layers still fill the GPU; the last split to finish for a tile sums
    the splits in order (deterministic) and writes dW in the weight's layout and dtype.

"The last program" is the classic single-pass reduction: each program stores its partials, waits
at a barrier, and takes a ticket from an atomic counter (acquire-release); the program holding the
last ticket reads every partial and resets the counter. The counters come from the workspace of
what launches the kernel (kernels.workspace: a run's step, a captured graph), so two launches that
may run at once (two packed runs, on their own streams) never share one. The weight gradient's
split is sized to the GPU (`wgrad_splits`): enough programs for a couple per multiprocessor, not
more, since every split costs a tile of fp32 scratch written and read again.

The kernels index tensors with int32 offsets: a launch whose tensors reach 2^31 elements is
refused (`check_int32_offsets`) rather than wrapped.

A launcher sizes its launch from its shapes, its kernel kind's configuration
(kernels.launch_configs.DEFAULTS) and what `launch_target` says of the tensors' device (its
multiprocessors, whether the interpreter runs it), nothing else.

Layers: Triton kernels (preact_conv_jit.py) -> launchers (checks, block sizes) -> torch.library custom ops with autograd
(torch.compile sees one opaque op per layer) -> `kernels.layers` (modules and the statistics chain).
`bn_relu_conv_ref` is what the kernels compute, in plain PyTorch.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
from torch import nn

from .launch_configs import CONV_DGRAD, CONV_FWD, CONV_WGRAD, DEFAULTS, ELEMENTWISE, MIN_BLOCK, Config
from .workspace import counters_for_launch
# called through this module's names, which bench/launches.py and the compile audit replace
from .preact_conv_jit import (_bn_backward_apply_kernel, _bn_relu_conv_dgrad_kernel, _bn_relu_conv_fwd_kernel,
                              _bn_relu_conv_wgrad_kernel)

# triton.jit reads this when a kernel is defined: CPU tensors work only if it was set before import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Block sizes, warps and stages come from kernels.launch_configs.DEFAULTS. Under the interpreter,
# which runs one program at a time in Python, the pixel tiles are enlarged to up to
# INTERPRETER_BLOCK_M (a batch-4 32x32 unit conv: 6x faster at 4096 than at 128) and the channel
# blocks to up to INTERPRETER_BLOCK_C (fewer channel loops and programs); the op-level tests set 64
# and None (the config's channel blocks) to cover the multi-tile statistics merge and the channel
# loops. Read at call time.
INTERPRETER_BLOCK_M = 4096
INTERPRETER_BLOCK_C: int | None = 256
# The multiprocessors the weight gradient's split is sized for on the CPU: one program at a time
# runs there, so few splits (the op-level tests raise it to split small layers). Read at call time.
INTERPRETER_MULTIPROCESSORS = 1
WGRAD_PROGRAMS_PER_MULTIPROCESSOR = 2  # about two waves of weight-gradient programs, then no more splits
INT32_OFFSET_LIMIT = 2**31  # elements a tensor the kernels index must stay under (int32 offsets)


# --- launchers ----------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get full IEEE products, as an fp32 model asks for; on a GPU tl.dot would
    otherwise round them to TF32. bf16/fp16 products are exact in fp32 either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of device (INTERPRETER_MULTIPROCESSORS on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_MULTIPROCESSORS


class LaunchTarget(NamedTuple):
    """What a launch's sizes depend on besides its shapes and kernel kind: the device it runs on."""

    multiprocessors: int  # the weight gradient's split fills them
    interpreter: bool  # Triton's interpreter runs one program at a time in Python: larger tiles pay


def launch_target(device: torch.device) -> LaunchTarget:
    """What the launchers size a launch on device for."""
    return LaunchTarget(multiprocessors(device), INTERPRETED)


def block_size(config: Config, name: str, size: int, target: LaunchTarget) -> int:
    """The config's block for a dimension of `size`; under the interpreter enlarged, BLOCK_M up to
    INTERPRETER_BLOCK_M and the channel blocks up to INTERPRETER_BLOCK_C."""
    if target.interpreter:
        limit = INTERPRETER_BLOCK_M if name == "BLOCK_M" else INTERPRETER_BLOCK_C
        if limit is not None:
            return max(MIN_BLOCK, min(limit, triton.next_power_of_2(size)))
    return config.block(name, size)


def no_tickets(device: torch.device) -> torch.Tensor:
    """The counter argument of a launch that takes no ticket (no statistics to merge): never read."""
    return torch.empty(1, dtype=torch.int32, device=device)


def wgrad_splits(multiprocessors: int, tiles: int, row_blocks: int) -> int:
    """How many pixel ranges the weight gradient splits its reduction into, over a grid of `tiles`
    output tiles (taps x input-channel blocks x output-channel blocks) and `row_blocks` blocks of
    pixels: enough programs (tiles x splits) for WGRAD_PROGRAMS_PER_MULTIPROCESSOR on every
    multiprocessor and no more, each split costing a tile of fp32 scratch written and read back,
    as CUTLASS sizes split-K to the GPU; at least one split, at most one per row block."""
    wanted = -(-WGRAD_PROGRAMS_PER_MULTIPROCESSOR * multiprocessors // tiles)
    return max(1, min(row_blocks, wanted))


class WgradGrid(NamedTuple):
    """The weight-gradient launch of one layer: its grid (tap and input-channel block, output-channel
    block, split), the pixels each split reduces, and the fp32 scratch elements of the partials."""

    grid: tuple[int, int, int]
    rows_per_split: int
    scratch_elements: int

    @property
    def splits(self) -> int:
        return self.grid[2]

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def wgrad_grid(pixels: int, kernel_taps: int, c_in: int, c_out: int, block_m: int, block_c: int, block_co: int,
               multiprocessors: int) -> WgradGrid:
    """The weight-gradient launch over `pixels` output pixels of a conv with kernel_taps (KH x KW) taps."""
    taps_and_channels, out_channels = kernel_taps * triton.cdiv(c_in, block_c), triton.cdiv(c_out, block_co)
    splits = wgrad_splits(multiprocessors, taps_and_channels * out_channels, triton.cdiv(pixels, block_m))
    rows_per_split = triton.cdiv(triton.cdiv(pixels, splits), block_m) * block_m
    splits = triton.cdiv(pixels, rows_per_split)  # rounding the rows to whole blocks may need fewer
    return WgradGrid((taps_and_channels, out_channels, splits), rows_per_split, splits * kernel_taps * c_in * c_out)


def check_int32_offsets(**elements: int) -> None:
    """Refuse a launch in which a tensor the kernels index (keyword: its name, value: its elements)
    reaches INT32_OFFSET_LIMIT elements: their int32 offsets would wrap."""
    name, count = max(elements.items(), key=lambda item: item[1])
    if count >= INT32_OFFSET_LIMIT:
        raise ValueError(f"the fused kernels index with int32 offsets and this launch's {name.replace('_', ' ')} "
                         f"has {count:,} elements, {INT32_OFFSET_LIMIT:,} or more: use a smaller batch")


def check_inputs(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> None:
    """Fail loudly for what the kernels do not handle, instead of computing something wrong."""
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the fused kernels need a CUDA GPU, or the Triton interpreter on the CPU: set "
                           "TRITON_INTERPRET=1 in the environment before triton is imported")
    if x.device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"the fused kernels run on CUDA GPUs (or the CPU interpreter), not on {x.device.type}")
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x N x C x H x W and weight C_OUT x C x KH x KW, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernels take float32, bfloat16 or float16, got {x.dtype} and {weight.dtype}")
    for t in (x, *others):
        if t is not None and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("the fused kernels need channels-last tensors: use .contiguous(memory_format=torch.channels_last)")
        if t is not None and t.device != x.device:
            raise ValueError(f"all inputs must be on {x.device}, got one on {t.device}")


class BnState(NamedTuple):
    """The BatchNorm a fused layer applies to its input, as `bn_relu_conv` takes it (see
    `kernels.layers.batchnorm_moments`, which makes one per BatchNorm and forward)."""

    mean: torch.Tensor  # the statistics the BatchNorm normalises with (fp32)
    var: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    batch_stats: bool  # mean/var are the input's own batch statistics (training mode)
    eps: float = 1e-5
    sync_count: int = 0  # > 0: statistics over all ranks' batches, this many values per channel
    # the module whose running statistics the next layer that reads this BatchNorm updates from
    # mean/var (in its kernel); None once done, or in eval mode
    update: nn.BatchNorm2d | None = None

    def read_only(self) -> BnState:
        """The same normalisation for a second layer reading it: the running statistics are updated once."""
        return self._replace(update=None)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def bn_relu_conv_forward(x, bn: BnState | None, weight, residual, stride: int, padding: int, emit_stats: bool,
                         running=None, momentum: float | None = 0.1, count: int = 0):
    """y = conv(relu(bn(x))) [+ residual] in x's dtype (bn None: a plain conv), with y's batch mean
    and biased variance per channel (fp32) when emit_stats. running: the BatchNorm's
    (running_mean, running_var, num_batches_tracked) to update from bn's mean/var over count values."""
    check_inputs(x, weight, residual)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}x{kw} conv with stride {stride} and padding {padding} has no output for {h}x{w}")
    if residual is not None and tuple(residual.shape) != (n, c_out, ho, wo):
        raise ValueError(f"residual of shape {tuple(residual.shape)} does not match the output {(n, c_out, ho, wo)}")
    check_int32_offsets(input=x.numel(), output=n * c_out * ho * wo)
    prologue = bn is not None
    eps = bn.eps if prologue else 0.0
    y = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    m = n * ho * wo
    config, target = DEFAULTS[CONV_FWD], launch_target(x.device)
    block_m = block_size(config, "BLOCK_M", m, target)
    block_n = block_size(config, "BLOCK_N", c_out, target)
    block_k = block_size(config, "BLOCK_K", c_in, target)
    tiles, columns = triton.cdiv(m, block_m), triton.cdiv(c_out, block_n)
    scratch = torch.empty((2, tiles, c_out) if emit_stats else (1,), device=x.device, dtype=torch.float32)
    y_mean = torch.empty((c_out,) if emit_stats else (0,), device=x.device, dtype=torch.float32)
    y_var = torch.empty_like(y_mean)
    dummy = scratch  # never read when its flag is off
    running_mean, running_var, tracked = running if running is not None else (dummy, dummy, dummy)
    tickets = counters_for_launch(x.device, columns) if emit_stats else no_tickets(x.device)
    _bn_relu_conv_fwd_kernel[(tiles, columns)](
        x, *(bn[:4] if prologue else (dummy,) * 4), running_mean, running_var, tracked,
        weight, residual if residual is not None else dummy, y, scratch, y_mean if emit_stats else dummy,
        y_var if emit_stats else dummy, tickets,
        m, h, w, c_in, ho, wo, c_out, *weight.stride(), eps, 0.0 if momentum is None else momentum, float(count),
        STRIDE=stride, PADDING=padding, KH=kh, KW=kw, PROLOGUE=prologue, UPDATE_RUNNING=running is not None,
        CUMULATIVE=momentum is None, HAS_RESIDUAL=residual is not None, EMIT_STATS=emit_stats,
        PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **config.options,
    )
    return y, y_mean, y_var


def bn_relu_conv_backward(dy, x, bn: BnState | None, weight, stride: int, padding: int, need_dx: bool, dx_add=None):
    """Gradients of conv(relu(bn(x))) [+ residual]: (dx, dgamma, dbeta, dweight); BN terms are None
    for a plain conv (bn None), dx is None when not needed. dx_add: x's gradient along another
    path (the identity shortcut that carried x), added into dx in the same pass. bn.sync_count > 0:
    the statistics spanned all ranks (that many values per channel), so the normalisation terms of
    dx use sums over all ranks; dgamma and dbeta stay local, as DistributedDataParallel averages
    parameter gradients."""
    dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
    if dx_add is not None:
        dx_add = dx_add.contiguous(memory_format=torch.channels_last)
    check_inputs(x, weight, dy, dx_add)
    target = launch_target(x.device)
    dweight = weight_gradient(dy, x, bn, weight, stride, padding, target)
    if bn is None and not need_dx:  # the stem: its input is the data
        return None, None, None, dweight
    gz, dbeta, dgamma = conv_input_gradient(dy, x, bn, weight, stride, padding, dx_add, target)
    if bn is None:  # a plain conv: gz is dx
        return gz, None, None, dweight
    dx = bn_input_gradient(gz, x, bn, dbeta, dgamma, dx_add, target) if need_dx else None
    return dx, dgamma, dbeta, dweight


def weight_gradient(dy, x, bn: BnState | None, weight, stride: int, padding: int, target: LaunchTarget):
    """dW = sum over output pixels of relu(bn(x)) (recomputed) times dy, split over pixel ranges; the
    last split of each tile sums them. In the weight's layout and dtype, as the fake implementation says."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    m_out = n * ho * wo
    config = DEFAULTS[CONV_WGRAD]
    block_out = block_size(config, "BLOCK_M", m_out, target)
    block_c = block_size(config, "BLOCK_C", c_in, target)
    block_co = block_size(config, "BLOCK_CO", c_out, target)
    wgrad = wgrad_grid(m_out, kh * kw, c_in, c_out, block_out, block_c, block_co, target.multiprocessors)
    check_int32_offsets(input=x.numel(), output_gradient=dy.numel(), weight_gradient_scratch=wgrad.scratch_elements)
    dweight = torch.empty_like(weight)
    scratch = torch.empty((wgrad.splits, kh, kw, c_in, c_out), device=x.device, dtype=torch.float32)
    grid = wgrad.grid
    _bn_relu_conv_wgrad_kernel[grid](
        x, *(bn[:4] if bn is not None else (dy,) * 4), dy, scratch, dweight,
        counters_for_launch(x.device, grid[0] * grid[1]),
        m_out, h, w, c_in, ho, wo, c_out, wgrad.rows_per_split, *weight.stride(), bn.eps if bn is not None else 0.0,
        STRIDE=stride, PADDING=padding, KH=kh, KW=kw, PROLOGUE=bn is not None, PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_out, BLOCK_C=block_c, BLOCK_CO=block_co, **config.options,
    )
    return dweight


def conv_input_gradient(dy, x, bn: BnState | None, weight, stride: int, padding: int, dx_add, target: LaunchTarget):
    """The transposed convolution of dy: with a BatchNorm, (gz, dbeta, dgamma), gz the gradient at the
    BatchNorm's output (fp32, pixels x channels, the ReLU mask applied); for a plain conv (dx, None,
    None), dx_add added in."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    m_in = n * h * w
    config = DEFAULTS[CONV_DGRAD]
    block_in = block_size(config, "BLOCK_M", m_in, target)
    block_c = block_size(config, "BLOCK_C", c_in, target)
    block_co = block_size(config, "BLOCK_CO", c_out, target)
    tiles, columns = triton.cdiv(m_in, block_in), triton.cdiv(c_in, block_c)
    prologue = bn is not None
    if prologue:
        gz = torch.empty((m_in, c_in), device=x.device, dtype=torch.float32)
        scratch = torch.empty((2, tiles, c_in), device=x.device, dtype=torch.float32)
        dbeta, dgamma = torch.empty_like(bn.beta), torch.empty_like(bn.gamma)
    else:
        gz = torch.empty_like(x, memory_format=torch.channels_last)  # dx itself
        scratch = dbeta = dgamma = dy
    tickets = counters_for_launch(x.device, columns) if prologue else no_tickets(x.device)
    _bn_relu_conv_dgrad_kernel[(tiles, columns)](
        dy, weight, x, *(bn[:4] if prologue else (dy,) * 4), gz, scratch, dbeta, dgamma, tickets,
        dy if dx_add is None else dx_add, m_in, h, w, c_in, ho, wo, c_out, *weight.stride(),
        bn.eps if prologue else 0.0,
        STRIDE=stride, PADDING=padding, KH=kh, KW=kw, PROLOGUE=prologue, HAS_ADD=dx_add is not None,
        PRECISION=dot_precision(x.dtype), BLOCK_M=block_in, BLOCK_C=block_c, BLOCK_CO=block_co, **config.options,
    )
    return (gz, dbeta, dgamma) if prologue else (gz, None, None)


def bn_input_gradient(gz, x, bn: BnState, dbeta, dgamma, dx_add, target: LaunchTarget):
    """dx = scale * (gz - dbeta / M - xhat * dgamma / M) with batch statistics (sums over all ranks
    under sync-BN), else scale * gz; dx_add added in. (dgamma and dbeta of the BN parameters:
    d(scale * x + shift)/dgamma = xhat, /dbeta = 1.)"""
    m_in, c_in = gz.shape[0], x.shape[1]
    sums, count = (dbeta, dgamma), m_in
    if bn.batch_stats and bn.sync_count:
        sums = torch.stack([dbeta, dgamma]).float()
        torch.distributed.all_reduce(sums)
        count = bn.sync_count
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    config = DEFAULTS[ELEMENTWISE]
    block_m, block_c = block_size(config, "BLOCK_M", m_in, target), block_size(config, "BLOCK_C", c_in, target)
    _bn_backward_apply_kernel[(triton.cdiv(m_in, block_m), triton.cdiv(c_in, block_c))](
        gz, x, *bn[:3], *sums, gz if dx_add is None else dx_add, dx, m_in, c_in, float(count), bn.eps,
        BATCH_STATS=bn.batch_stats, HAS_ADD=dx_add is not None, BLOCK_M=block_m, BLOCK_C=block_c, **config.options,
    )
    return dx


# --- custom ops with autograd --------------------------------------------------------------------------


@torch.library.custom_op("preresnet::bn_relu_conv", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_relu_conv_op(
    x: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None, gamma: torch.Tensor | None,
    beta: torch.Tensor | None, weight: torch.Tensor, residual: torch.Tensor | None, stride: int, padding: int,
    emit_stats: bool, eps: float, sync_count: int, running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None, num_batches_tracked: torch.Tensor | None, momentum: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of `bn_relu_conv` (which see), without autograd: an op that mutates its inputs
    (the running statistics) cannot carry an autograd formula, so `BnReluConv` supplies it. Its
    arguments are `bn_relu_conv`'s BnState spread into tensors and scalars, as custom ops take them."""
    running = (running_mean, running_var, num_batches_tracked) if running_mean is not None else None
    count = sync_count or x.numel() // x.shape[1]
    bn = BnState(mean, var, gamma, beta, True, eps, sync_count) if mean is not None else None  # batch_stats unread
    return bn_relu_conv_forward(x, bn, weight, residual, stride, padding, emit_stats, running, momentum, count)


@bn_relu_conv_op.register_fake
def _(x, mean, var, gamma, beta, weight, residual, stride, padding, emit_stats, eps, sync_count, running_mean,
      running_var, num_batches_tracked, momentum):
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    y = x.new_empty((n, c_out, conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)),
                    ).contiguous(memory_format=torch.channels_last)
    stats = x.new_empty((c_out,) if emit_stats else (0,), dtype=torch.float32)
    return y, stats, stats.clone()


@torch.library.custom_op("preresnet::bn_relu_conv_backward", mutates_args=())
def bn_relu_conv_backward_op(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
    gamma: torch.Tensor | None, beta: torch.Tensor | None, weight: torch.Tensor, stride: int, padding: int,
    eps: float, batch_stats: bool, need_dx: bool, sync_count: int, dx_add: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bn = BnState(mean, var, gamma, beta, batch_stats, eps, sync_count) if mean is not None else None
    dx, dgamma, dbeta, dweight = bn_relu_conv_backward(dy, x, bn, weight, stride, padding, need_dx, dx_add)
    empty = x.new_empty(0)
    return (dx if dx is not None else empty, dgamma if dgamma is not None else empty.clone(),
            dbeta if dbeta is not None else empty.clone(), dweight)


@bn_relu_conv_backward_op.register_fake
def _(dy, x, mean, var, gamma, beta, weight, stride, padding, eps, batch_stats, need_dx, sync_count, dx_add):
    prologue = mean is not None
    return (torch.empty_like(x, memory_format=torch.channels_last) if need_dx else x.new_empty(0),
            torch.empty_like(gamma) if prologue else x.new_empty(0),
            torch.empty_like(beta) if prologue else x.new_empty(0), torch.empty_like(weight))


class BnReluConv(torch.autograd.Function):
    """Autograd of the fused layer: one forward op (which also updates the running statistics) and
    one backward op; torch.compile traces through it and sees the two opaque ops.

    With carry, x itself is a fourth output, for the identity shortcut to read: its gradient then
    comes back to this backward, which adds it into dx in its last pass, instead of autograd adding
    the two paths' gradients in a kernel of its own."""

    @staticmethod
    def forward(ctx, x, mean, var, gamma, beta, weight, residual, stride, padding, batch_stats, emit_stats, eps,
                sync_count, running_mean, running_var, num_batches_tracked, momentum, carry):
        y, y_mean, y_var = bn_relu_conv_op(x, mean, var, gamma, beta, weight, residual, stride, padding, emit_stats,
                                           eps, sync_count, running_mean, running_var, num_batches_tracked, momentum)
        ctx.save_for_backward(x, mean, var, gamma, beta, weight)
        ctx.conf = (stride, padding, eps, batch_stats, residual is not None, sync_count)
        ctx.mark_non_differentiable(y_mean, y_var)
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero tensors for them
        return (y, y_mean, y_var, x) if carry else (y, y_mean, y_var)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, dx_carried=None):
        x, mean, var, gamma, beta, weight = ctx.saved_tensors
        stride, padding, eps, batch_stats, has_residual, sync_count = ctx.conf
        prologue = mean is not None
        dx, dgamma, dbeta, dweight = bn_relu_conv_backward_op(
            dy, x, mean, var, gamma, beta, weight, stride, padding, eps, batch_stats, ctx.needs_input_grad[0],
            sync_count, dx_carried)
        return (dx if ctx.needs_input_grad[0] else None, None, None, dgamma if prologue else None,
                dbeta if prologue else None, dweight, dy if has_residual else None, *(None,) * 11)


def bn_relu_conv(x: torch.Tensor, bn: BnState | None, weight: torch.Tensor, residual: torch.Tensor | None = None,
                 stride: int = 1, padding: int = 0, *, emit_stats: bool = True, carry: bool = False):
    """conv(relu(bn(x))) [+ residual] in x's dtype, with the BatchNorm bn (None: a plain conv).
    The weight may be in any layout and float dtype.

    Returns y and, when emit_stats, y's batch mean and biased variance (fp32, per channel; else
    empty); with carry, also x itself, to be read by an identity shortcut (see BnReluConv).
    bn.batch_stats says bn.mean/var are x's own batch statistics, so the backward includes their
    dependence on x (training mode); they are never differentiated directly. bn.sync_count > 0 says
    they are statistics over all ranks' batches (that many values per channel). Given bn.update,
    the kernel updates that module's running_mean, running_var and num_batches_tracked from
    mean/var as nn.BatchNorm2d does (its momentum None: cumulative average).

    The one place where bn is spread into the custom op's flat tensor and scalar arguments.
    """
    if bn is None:
        mean = var = gamma = beta = module = None
        batch_stats, eps, sync_count = False, 1e-5, 0
    else:
        mean, var, gamma, beta, batch_stats, eps, sync_count, module = bn
    running = (None, None, None, 0.1) if module is None else (module.running_mean, module.running_var,
                                                             module.num_batches_tracked, module.momentum)
    return BnReluConv.apply(x, mean, var, gamma, beta, weight, residual, stride, padding, batch_stats, emit_stats,
                            eps, sync_count, *running, carry)


# --- reference ------------------------------------------------------------------------------------------


def bn_relu_conv_ref(x, mean, var, gamma, beta, weight, residual, stride: int, padding: int, eps: float = 1e-5):
    """What `bn_relu_conv` computes, in plain PyTorch ops (mean/var None: a plain conv)."""
    a = x.float()
    if mean is not None:
        invstd = torch.rsqrt(var.float() + eps)
        a = torch.relu((a - mean[None, :, None, None]) * invstd[None, :, None, None] * gamma.float()[None, :, None, None]
                       + beta.float()[None, :, None, None])
    y = F.conv2d(a, weight.float(), stride=stride, padding=padding)
    return y if residual is None else y + residual.float()
