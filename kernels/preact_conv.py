"""Fused pre-activation convolution: y = conv(relu(batchnorm(x))) [+ residual], forward and backward.

Why this shape: in a pre-activation network nearly every layer is BN -> ReLU -> conv, and on CIFAR
shapes the memory traffic of the unfused ops, not arithmetic, sets the speed. So the convolution is
an implicit GEMM over channels-last tensors (rows = output pixels, columns = output channels,
reduction = kernel taps x input channels) whose *prologue* applies BatchNorm and ReLU to each input
tile as it is loaded (relu(x * scale + shift), forced back to 0 in the zero padding), and whose
*epilogue* adds the residual and writes per-tile mean and M2 of the output, so the next BatchNorm
needs no pass of its own. The activated tensor relu(bn(x)) is never written.

Backward keeps only x (the pre-BN input):
  - dgrad: the transposed convolution of dy, whose epilogue applies the ReLU mask recomputed from x
    and reduces dbeta = sum(gz) and dgamma = sum(gz * xhat) per tile (gz: gradient at the BN output);
    for a plain conv (no prologue) it is the input gradient itself;
  - apply: dx = scale * (gz - dbeta / M - xhat * dgamma / M) (batch statistics), or scale * gz;
  - wgrad: dW = sum over pixels of relu(bn(x)) (recomputed in the prologue) times dy, split over
    pixel ranges so that small layers still fill the GPU.

Layers: Triton kernels -> launchers (checks, block sizes) -> torch.library custom ops with autograd
(torch.compile sees one opaque op per layer) -> `kernels.layers` (modules and the statistics chain).
`bn_relu_conv_ref` is what the kernels compute, in plain PyTorch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# triton.jit reads this when a kernel is defined: CPU tensors work only if it was set before import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Most pixels per tile (fewer for a smaller tensor). The interpreter runs one program at a time in
# Python, so there few, large tiles make the CPU runs fast (a batch-4 32x32 unit conv: 6x faster at
# 4096 than at 128); the op-level tests set the GPU's 64 to cover the multi-tile statistics merge.
# Read at call time.
BLOCK_M = 4096 if INTERPRETED else 64
MAX_WGRAD_SPLITS = 2 if INTERPRETED else 64


# --- kernels ------------------------------------------------------------------------------------------


@triton.jit
def _pixel_coordinates(offs, height, width):
    """Row indices of an (N*height*width) x C channels-last matrix -> (image, row, column)."""
    pixel = offs % (height * width)
    return offs // (height * width), pixel // width, pixel % width


@triton.jit
def _bn_relu_conv_fwd_kernel(
    x_ptr,  # (N, H, W, C_IN) input before BatchNorm, channels-last
    scale_ptr,  # (C_IN,) fp32 gamma * invstd
    shift_ptr,  # (C_IN,) fp32 beta - mean * gamma * invstd
    w_ptr,  # (KH, KW, C_IN, C_OUT) weight, packed
    res_ptr,  # (N, HO, WO, C_OUT) residual, read when HAS_RESIDUAL
    y_ptr,  # (N, HO, WO, C_OUT) output
    tile_mean_ptr,  # (cdiv(M, BLOCK_M), C_OUT) fp32 mean of y over each row tile, when EMIT_STATS
    tile_m2_ptr,  # (cdiv(M, BLOCK_M), C_OUT) fp32 sum of squared deviations from that mean
    M, H, W, C_IN, HO, WO, C_OUT,  # M = N * HO * WO output pixels
    STRIDE: tl.constexpr, PADDING: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EMIT_STATS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    n, ho, wo = _pixel_coordinates(offs_m, HO, WO)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            hi = ho * STRIDE - PADDING + kh
            wi = wo * STRIDE - PADDING + kw
            inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            row = ((n * H + hi) * W + wi) * C_IN
            for k0 in range(0, C_IN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < C_IN
                valid = inside[:, None] & mask_k[None, :]
                a = tl.load(x_ptr + row[:, None] + offs_k[None, :], mask=valid, other=0.0).to(tl.float32)
                if PROLOGUE:
                    scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
                    shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
                    # relu(0 * scale + shift) need not be 0: the zero padding is applied after BN-ReLU
                    a = tl.where(valid, tl.maximum(a * scale[None, :] + shift[None, :], 0.0), 0.0)
                w = tl.load(w_ptr + ((kh * KW + kw) * C_IN + offs_k[:, None]) * C_OUT + offs_n[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc += tl.dot(a.to(w.dtype), w, input_precision=PRECISION)
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offsets = offs_m[:, None] * C_OUT + offs_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    if EMIT_STATS:
        count = tl.sum(mask_m.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(out_mask, acc, 0.0), axis=0) / count
        deviation = tl.where(out_mask, acc - tile_mean[None, :], 0.0)
        tl.store(tile_mean_ptr + pid_m * C_OUT + offs_n, tile_mean, mask=mask_n)
        tl.store(tile_m2_ptr + pid_m * C_OUT + offs_n, tl.sum(deviation * deviation, axis=0), mask=mask_n)


@triton.jit
def _bn_relu_conv_dgrad_kernel(
    dy_ptr,  # (N, HO, WO, C_OUT) gradient of the output
    w_ptr,  # (KH, KW, C_IN, C_OUT) weight, packed
    x_ptr,  # (N, H, W, C_IN) input before BatchNorm
    scale_ptr,  # (C_IN,) fp32 gamma * invstd
    shift_ptr,  # (C_IN,) fp32 beta - mean * gamma * invstd
    mean_ptr,  # (C_IN,) fp32 mean used by the BatchNorm
    invstd_ptr,  # (C_IN,) fp32 1 / sqrt(var + eps) used by the BatchNorm
    gz_ptr,  # (N, H, W, C_IN) out: with PROLOGUE fp32 gradient at the BatchNorm output, ReLU mask
    #          applied; without, the gradient of x itself, in x's dtype
    tile_dbeta_ptr,  # (cdiv(M, BLOCK_M), C_IN) fp32 out: per-tile sum of gz, with PROLOGUE
    tile_dgamma_ptr,  # (cdiv(M, BLOCK_M), C_IN) fp32 out: per-tile sum of gz * xhat, with PROLOGUE
    M, H, W, C_IN, HO, WO, C_OUT,  # M = N * H * W input pixels
    STRIDE: tl.constexpr, PADDING: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PROLOGUE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C_IN
    n, hi, wi = _pixel_coordinates(offs_m, H, W)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            # input pixel hi was read by output row ho when ho * STRIDE - PADDING + kh == hi
            h_num = hi + PADDING - kh
            w_num = wi + PADDING - kw
            ho = h_num // STRIDE
            wo = w_num // STRIDE
            hit = (mask_m & (h_num >= 0) & (w_num >= 0) & (h_num % STRIDE == 0) & (w_num % STRIDE == 0)
                   & (ho < HO) & (wo < WO))
            row = ((n * HO + ho) * WO + wo) * C_OUT
            for co0 in range(0, C_OUT, BLOCK_CO):
                offs_co = co0 + tl.arange(0, BLOCK_CO)
                mask_co = offs_co < C_OUT
                g = tl.load(dy_ptr + row[:, None] + offs_co[None, :], mask=hit[:, None] & mask_co[None, :], other=0.0)
                w = tl.load(w_ptr + ((kh * KW + kw) * C_IN + offs_c[None, :]) * C_OUT + offs_co[:, None],
                            mask=mask_co[:, None] & mask_c[None, :], other=0.0)
                acc += tl.dot(g.to(w.dtype), w, input_precision=PRECISION)
    tile = mask_m[:, None] & mask_c[None, :]
    offsets = offs_m[:, None] * C_IN + offs_c[None, :]
    if PROLOGUE:
        x = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        gz = tl.where(tile & (x * scale[None, :] + shift[None, :] > 0.0), acc, 0.0)
        tl.store(gz_ptr + offsets, gz, mask=tile)
        xhat = (x - mean[None, :]) * invstd[None, :]
        tl.store(tile_dbeta_ptr + pid_m * C_IN + offs_c, tl.sum(gz, axis=0), mask=mask_c)
        tl.store(tile_dgamma_ptr + pid_m * C_IN + offs_c, tl.sum(gz * xhat, axis=0), mask=mask_c)
    else:  # a plain conv: the transposed convolution is the input gradient
        tl.store(gz_ptr + offsets, acc.to(gz_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _bn_backward_apply_kernel(
    gz_ptr,  # (M, C) fp32 gradient at the BatchNorm output
    x_ptr,  # (M, C) input before BatchNorm
    scale_ptr,  # (C,) fp32 gamma * invstd
    mean_ptr,  # (C,) fp32
    invstd_ptr,  # (C,) fp32
    mean_dbeta_ptr,  # (C,) fp32 dbeta / M with batch statistics, else 0
    mean_dgamma_ptr,  # (C,) fp32 dgamma / M with batch statistics, else 0
    dx_ptr,  # (M, C) out: gradient of x
    M, C,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    tile = (offs_m < M)[:, None] & mask_c[None, :]
    offsets = offs_m[:, None] * C + offs_c[None, :]
    gz = tl.load(gz_ptr + offsets, mask=tile, other=0.0)
    x = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    mean_dbeta = tl.load(mean_dbeta_ptr + offs_c, mask=mask_c, other=0.0)
    mean_dgamma = tl.load(mean_dgamma_ptr + offs_c, mask=mask_c, other=0.0)
    xhat = (x - mean[None, :]) * invstd[None, :]
    dx = scale[None, :] * (gz - mean_dbeta[None, :] - xhat * mean_dgamma[None, :])
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _bn_relu_conv_wgrad_kernel(
    x_ptr,  # (N, H, W, C_IN) input before BatchNorm
    scale_ptr,  # (C_IN,) fp32 gamma * invstd, read when PROLOGUE
    shift_ptr,  # (C_IN,) fp32 beta - mean * gamma * invstd, read when PROLOGUE
    dy_ptr,  # (N, HO, WO, C_OUT) gradient of the output
    dw_ptr,  # (SPLITS, KH, KW, C_IN, C_OUT) fp32 out: per-split partial weight gradient
    M, H, W, C_IN, HO, WO, C_OUT, ROWS_PER_SPLIT,  # M = N * HO * WO output pixels
    STRIDE: tl.constexpr, PADDING: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PROLOGUE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    pid_k = tl.program_id(0)  # kernel tap and input-channel block
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)  # range of output pixels
    c_blocks = tl.cdiv(C_IN, BLOCK_C)
    tap = pid_k // c_blocks
    kh = tap // KW
    kw = tap % KW
    offs_c = (pid_k % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_c = offs_c < C_IN
    mask_co = offs_co < C_OUT
    if PROLOGUE:
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    acc = tl.zeros((BLOCK_C, BLOCK_CO), dtype=tl.float32)
    start = pid_s * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        n, ho, wo = _pixel_coordinates(offs_m, HO, WO)
        hi = ho * STRIDE - PADDING + kh
        wi = wo * STRIDE - PADDING + kw
        inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        valid = mask_c[:, None] & inside[None, :]
        a = tl.load(x_ptr + ((n * H + hi) * W + wi)[None, :] * C_IN + offs_c[:, None], mask=valid, other=0.0)
        a = a.to(tl.float32)
        if PROLOGUE:
            a = tl.where(valid, tl.maximum(a * scale[:, None] + shift[:, None], 0.0), 0.0)
        g = tl.load(dy_ptr + offs_m[:, None] * C_OUT + offs_co[None, :], mask=mask_m[:, None] & mask_co[None, :],
                    other=0.0)
        acc += tl.dot(a.to(g.dtype), g, input_precision=PRECISION)
    out = dw_ptr + (((pid_s * KH + kh) * KW + kw) * C_IN + offs_c[:, None]) * C_OUT + offs_co[None, :]
    tl.store(out, acc, mask=mask_c[:, None] & mask_co[None, :])


# --- launchers ----------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get full IEEE products, as an fp32 model asks for; on a GPU tl.dot would
    otherwise round them to TF32. bf16/fp16 products are exact in fp32 either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _block(size: int, low: int, high: int) -> int:
    """A power of two covering size, clamped to [low, high] (tl.dot needs at least 16)."""
    return max(low, min(high, triton.next_power_of_2(size)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """An N x C x H x W channels-last tensor seen as its (N*H*W) x C storage."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


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


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_OUT, C_IN, KH, KW) -> contiguous (KH, KW, C_IN, C_OUT): the GEMM's B operand."""
    return weight.permute(2, 3, 1, 0).contiguous()


def bn_relu_conv_forward(x, scale, shift, weight, residual, stride: int, padding: int, prologue: bool,
                         emit_stats: bool):
    """y = conv(relu(x * scale + shift)) [+ residual], and y's batch mean and biased variance per
    channel (fp32) when emit_stats, merged from the kernel's per-tile partials."""
    check_inputs(x, weight, residual)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}x{kw} conv with stride {stride} and padding {padding} has no output for {h}x{w}")
    if residual is not None and tuple(residual.shape) != (n, c_out, ho, wo):
        raise ValueError(f"residual of shape {tuple(residual.shape)} does not match the output {(n, c_out, ho, wo)}")
    out_dtype = weight.dtype
    y = torch.empty((n, c_out, ho, wo), device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    m = n * ho * wo
    block_m = _block(m, 16, BLOCK_M)
    block_n = _block(c_out, 16, 64)
    block_k = _block(c_in, 16, 32)
    tiles = triton.cdiv(m, block_m)
    tile_mean = torch.empty((tiles, c_out) if emit_stats else (1,), device=x.device, dtype=torch.float32)
    tile_m2 = torch.empty_like(tile_mean)
    dummy = y  # never read when its flag is off
    _bn_relu_conv_fwd_kernel[(tiles, triton.cdiv(c_out, block_n))](
        x, scale if prologue else dummy, shift if prologue else dummy, pack_weight(weight),
        residual if residual is not None else dummy, y, tile_mean, tile_m2,
        m, h, w, c_in, ho, wo, c_out,
        STRIDE=stride, PADDING=padding, KH=kh, KW=kw, PROLOGUE=prologue, HAS_RESIDUAL=residual is not None,
        EMIT_STATS=emit_stats, PRECISION=dot_precision(weight.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    if not emit_stats:
        return y, None, None
    return (y, *merge_tile_stats(tile_mean, tile_m2, m, block_m))


def merge_tile_stats(tile_mean: torch.Tensor, tile_m2: torch.Tensor, rows: int, block_m: int):
    """Per-tile (count, mean, M2) -> batch mean and biased variance: the parallel form of Chan et
    al.'s update, M2 = sum M2_t + sum n_t (mean_t - mean)^2, in float64 (tiles x channels is small).
    Every tile holds block_m rows but the last."""
    counts = torch.full((tile_mean.shape[0], 1), float(block_m), dtype=torch.float64, device=tile_mean.device)
    counts[-1] = rows - block_m * (tile_mean.shape[0] - 1)
    mean = (counts * tile_mean.double()).sum(0) / rows
    m2 = tile_m2.double().sum(0) + (counts * (tile_mean.double() - mean) ** 2).sum(0)
    return mean.float(), (m2 / rows).float()


def bn_relu_conv_backward(dy, x, scale, shift, mean, invstd, weight, stride: int, padding: int, prologue: bool,
                          batch_stats: bool, need_dx: bool, sync_count: int = 0):
    """Gradients of conv(relu(bn(x))) [+ residual]: (dx, dgamma, dbeta, dweight); BN terms are None
    without a prologue, dx is None when not needed. sync_count > 0: the statistics spanned all
    ranks (that many values per channel), so the normalisation terms of dx use sums over all ranks;
    dgamma and dbeta stay local, as DistributedDataParallel averages parameter gradients."""
    dy = dy.contiguous(memory_format=torch.channels_last)
    check_inputs(x, weight, dy)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    _, _, ho, wo = dy.shape
    packed = pack_weight(weight)
    dummy = dy

    # weight gradient, split over output-pixel ranges
    m_out = n * ho * wo
    block_out = _block(m_out, 16, BLOCK_M)
    block_c = _block(c_in, 16, 32)
    block_co = _block(c_out, 16, 64)
    splits = max(1, min(triton.cdiv(m_out, block_out), MAX_WGRAD_SPLITS))
    rows_per_split = triton.cdiv(triton.cdiv(m_out, splits), block_out) * block_out
    splits = triton.cdiv(m_out, rows_per_split)
    dw_parts = torch.empty((splits, kh, kw, c_in, c_out), device=x.device, dtype=torch.float32)
    grid = (kh * kw * triton.cdiv(c_in, block_c), triton.cdiv(c_out, block_co), splits)
    _bn_relu_conv_wgrad_kernel[grid](
        x, scale if prologue else dummy, shift if prologue else dummy, dy, dw_parts,
        m_out, h, w, c_in, ho, wo, c_out, rows_per_split,
        STRIDE=stride, PADDING=padding, KH=kh, KW=kw, PROLOGUE=prologue, PRECISION=dot_precision(weight.dtype),
        BLOCK_M=block_out, BLOCK_C=block_c, BLOCK_CO=block_co,
    )
    # in the weight's own memory layout: the fake implementation promises empty_like(weight)
    dweight = torch.empty_like(weight).copy_(dw_parts.sum(0).permute(3, 2, 0, 1))
    if not prologue and not need_dx:  # the stem: its input is the data
        return None, None, None, dweight

    # gradient at the BatchNorm output with its per-channel reductions, or, for a plain conv, dx
    m_in = n * h * w
    block_in = _block(m_in, 16, BLOCK_M)
    tiles = triton.cdiv(m_in, block_in)
    if prologue:
        gz = torch.empty((m_in, c_in), device=x.device, dtype=torch.float32)
        tile_dbeta = torch.empty((tiles, c_in), device=x.device, dtype=torch.float32)
        tile_dgamma = torch.empty_like(tile_dbeta)
    else:
        gz = torch.empty_like(x, memory_format=torch.channels_last)  # dx itself
        tile_dbeta = tile_dgamma = dummy
    _bn_relu_conv_dgrad_kernel[(tiles, triton.cdiv(c_in, block_c))](
        dy, packed, x, scale if prologue else dummy, shift if prologue else dummy, mean if prologue else dummy,
        invstd if prologue else dummy, gz, tile_dbeta, tile_dgamma,
        m_in, h, w, c_in, ho, wo, c_out,
        STRIDE=stride, PADDING=padding, KH=kh, KW=kw, PROLOGUE=prologue, PRECISION=dot_precision(weight.dtype),
        BLOCK_M=block_in, BLOCK_C=block_c, BLOCK_CO=block_co,
    )
    if not prologue:
        return gz, None, None, dweight
    dbeta = tile_dbeta.sum(0)
    dgamma = tile_dgamma.sum(0)
    dx = None
    if need_dx:
        sums = torch.stack([dbeta, dgamma])
        count = m_in
        if batch_stats and sync_count:
            torch.distributed.all_reduce(sums)
            count = sync_count
        means = sums / count if batch_stats else torch.zeros_like(sums)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        _bn_backward_apply_kernel[(tiles, triton.cdiv(c_in, block_c))](
            gz, x, scale, mean, invstd, means[0], means[1], dx, m_in, c_in, BLOCK_M=block_in, BLOCK_C=block_c,
        )
    # dgamma/dbeta of the BN parameters: d(scale * x + shift)/dgamma = xhat, /dbeta = 1
    return dx, dgamma, dbeta, dweight


# --- custom ops with autograd --------------------------------------------------------------------------


def bn_scale_shift(mean, invstd, gamma, beta):
    scale = gamma.float() * invstd
    return scale, beta.float() - mean * scale


@torch.library.custom_op("preresnet::bn_relu_conv", mutates_args=())
def bn_relu_conv(
    x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None, gamma: torch.Tensor | None,
    beta: torch.Tensor | None, weight: torch.Tensor, residual: torch.Tensor | None, stride: int, padding: int,
    batch_stats: bool, emit_stats: bool, sync_count: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv(relu(bn(x))) [+ residual] with BN given by mean/invstd/gamma/beta (None: plain conv).

    Returns y and, when emit_stats, y's batch mean and biased variance (fp32, per channel).
    batch_stats says mean/invstd are x's own batch statistics, so the backward includes their
    dependence on x (training mode); they are never differentiated directly. sync_count > 0 says
    they are statistics over all ranks' batches (that many values per channel).
    """
    prologue = mean is not None
    scale, shift = bn_scale_shift(mean, invstd, gamma, beta) if prologue else (None, None)
    y, mean_y, var_y = bn_relu_conv_forward(x, scale, shift, weight, residual, stride, padding, prologue, emit_stats)
    if not emit_stats:
        return y, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return y, mean_y, var_y


@bn_relu_conv.register_fake
def _(x, mean, invstd, gamma, beta, weight, residual, stride, padding, batch_stats, emit_stats, sync_count=0):
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    y = x.new_empty((n, c_out, conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)),
                    dtype=weight.dtype).contiguous(memory_format=torch.channels_last)
    stats = x.new_empty((c_out,) if emit_stats else (0,), dtype=torch.float32)
    return y, stats, stats.clone()


@torch.library.custom_op("preresnet::bn_relu_conv_backward", mutates_args=())
def bn_relu_conv_backward_op(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None, invstd: torch.Tensor | None,
    gamma: torch.Tensor | None, beta: torch.Tensor | None, weight: torch.Tensor, stride: int, padding: int,
    batch_stats: bool, need_dx: bool, sync_count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prologue = mean is not None
    scale, shift = bn_scale_shift(mean, invstd, gamma, beta) if prologue else (None, None)
    dx, dgamma, dbeta, dweight = bn_relu_conv_backward(dy, x, scale, shift, mean, invstd, weight, stride, padding,
                                                       prologue, batch_stats, need_dx, sync_count)
    return (dx if dx is not None else x.new_empty(0), dgamma.to(gamma.dtype) if prologue else x.new_empty(0),
            dbeta.to(beta.dtype) if prologue else x.new_empty(0), dweight)


@bn_relu_conv_backward_op.register_fake
def _(dy, x, mean, invstd, gamma, beta, weight, stride, padding, batch_stats, need_dx, sync_count):
    prologue = mean is not None
    return (torch.empty_like(x, memory_format=torch.channels_last) if need_dx else x.new_empty(0),
            torch.empty_like(gamma) if prologue else x.new_empty(0),
            torch.empty_like(beta) if prologue else x.new_empty(0), torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, mean, invstd, gamma, beta, weight, residual, stride, padding, batch_stats, emit_stats, sync_count = inputs
    ctx.save_for_backward(x, mean, invstd, gamma, beta, weight)
    ctx.conf = (stride, padding, batch_stats, residual is not None, sync_count)


def _backward(ctx, dy, _dmean, _dvar):
    x, mean, invstd, gamma, beta, weight = ctx.saved_tensors
    stride, padding, batch_stats, has_residual, sync_count = ctx.conf
    prologue = mean is not None
    dx, dgamma, dbeta, dweight = bn_relu_conv_backward_op(
        dy, x, mean, invstd, gamma, beta, weight, stride, padding, batch_stats, ctx.needs_input_grad[0], sync_count)
    return (dx if ctx.needs_input_grad[0] else None, None, None, dgamma if prologue else None,
            dbeta if prologue else None, dweight, dy if has_residual else None, None, None, None, None, None)


bn_relu_conv.register_autograd(_backward, setup_context=_setup_context)


# --- reference ------------------------------------------------------------------------------------------


def bn_relu_conv_ref(x, mean, invstd, gamma, beta, weight, residual, stride: int, padding: int):
    """What `bn_relu_conv` computes, in plain PyTorch ops (mean/invstd None: a plain conv)."""
    a = x.float()
    if mean is not None:
        a = torch.relu((a - mean[None, :, None, None]) * invstd[None, :, None, None] * gamma.float()[None, :, None, None]
                       + beta.float()[None, :, None, None])
    y = F.conv2d(a, weight.float(), stride=stride, padding=padding)
    return y if residual is None else y + residual.float()
