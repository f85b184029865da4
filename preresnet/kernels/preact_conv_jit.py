"""The Triton kernels of the fused pre-activation convolution (preact_conv.py explains their shape
and launches them): forward (implicit GEMM with the BatchNorm-ReLU prologue and the statistics
epilogue), dgrad, the BatchNorm backward apply, and wgrad. Each pointer argument's comment gives
its shape; M is the number of output pixels (N x H_out x W_out), C the channels.

The launchers call them through preact_conv's names, which bench/launches.py and the compile audit
replace by counting and recording stand-ins.
"""

import triton
import triton.language as tl

MERGE_BLOCK = tl.constexpr(64)  # partials the last program reads at a time (a constexpr: read inside kernels)


@triton.jit
def _pixel_coordinates(offs, height, width):
    """Row indices of an (N*height*width) x C channels-last matrix -> (image, row, column)."""
    pixel = offs % (height * width)
    return offs // (height * width), pixel // width, pixel % width


@triton.jit
def _is_last_to_arrive(counter_ptr, programs):
    """Whether this program is the last of `programs` to reach this point; that one also resets the
    counter for the next launch. The barrier makes every thread's stores precede the ticket; the
    acquire-release ticket makes them visible to the last program."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = ticket == programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
    return last


@triton.jit
def _tile_means(partial_ptr, t0, tiles, M, C, offs_n, mask_n, BLOCK_M: tl.constexpr):
    """MERGE_BLOCK tiles' rows of the per-tile statistics from t0 on: tile indices, rows per tile
    (BLOCK_M but the last), the valid mask and the tile means (read past L1: other programs wrote them)."""
    t = t0 + tl.arange(0, MERGE_BLOCK)
    rows = tl.minimum(M - t * BLOCK_M, BLOCK_M).to(tl.float32)
    tile = (t < tiles)[:, None] & mask_n[None, :]
    means = tl.load(partial_ptr + t[:, None] * C + offs_n[None, :], mask=tile, other=0.0, cache_modifier=".cg")
    return t, rows, tile, means


@triton.jit
def _bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs, mask, eps):
    """Per-channel BatchNorm as an affine map: scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs, mask=mask, other=1.0) + eps)
    scale = tl.load(gamma_ptr + offs, mask=mask, other=0.0).to(tl.float32) * invstd
    shift = tl.load(beta_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean * scale
    return scale, shift, mean, invstd


@triton.jit
def _update_running_stats(mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, tracked_ptr, C, count, momentum,
                          CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr):
    """nn.BatchNorm2d's update: num_batches_tracked += 1; running = (1 - f) running + f batch, with
    the unbiased batch variance; f = momentum, or 1 / num_batches_tracked for a cumulative average."""
    tracked = tl.load(tracked_ptr) + 1
    tl.store(tracked_ptr, tracked)
    factor = 1.0 / tracked.to(tl.float32) if CUMULATIVE else momentum
    unbiased = count / tl.maximum(count - 1.0, 1.0)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < C
        mean = tl.load(mean_ptr + offs, mask=mask)
        var = tl.load(var_ptr + offs, mask=mask)
        running_mean = tl.load(running_mean_ptr + offs, mask=mask)
        running_var = tl.load(running_var_ptr + offs, mask=mask)
        tl.store(running_mean_ptr + offs, running_mean * (1 - factor) + mean * factor, mask=mask)
        tl.store(running_var_ptr + offs, running_var * (1 - factor) + var * (unbiased * factor), mask=mask)


@triton.jit
def _bn_relu_conv_fwd_kernel(
    x_ptr,  # (N, H, W, C_IN) input before BatchNorm, channels-last
    mean_ptr, var_ptr,  # (C_IN,) fp32 statistics the BatchNorm normalises with, read when PROLOGUE
    gamma_ptr, beta_ptr,  # (C_IN,) BatchNorm weight and bias, read when PROLOGUE
    running_mean_ptr, running_var_ptr,  # (C_IN,) fp32, updated when UPDATE_RUNNING
    tracked_ptr,  # (1,) int64 num_batches_tracked, incremented when UPDATE_RUNNING
    w_ptr,  # (C_OUT, C_IN, KH, KW) weight, any layout (strides below), any float dtype
    res_ptr,  # (N, HO, WO, C_OUT) residual, read when HAS_RESIDUAL
    y_ptr,  # (N, HO, WO, C_OUT) output; its dtype is the operand dtype
    partial_ptr,  # (2, cdiv(M, BLOCK_M), C_OUT) fp32 scratch: per-tile mean and M2 of y, when EMIT_STATS
    y_mean_ptr, y_var_ptr,  # (C_OUT,) fp32 out: batch mean and biased variance of y, when EMIT_STATS
    counter_ptr,  # (cdiv(C_OUT, BLOCK_N),) int32 zeros: tickets per column of tiles
    M, H, W, C_IN, HO, WO, C_OUT,  # M = N * HO * WO output pixels
    stride_wo, stride_wi, stride_wh, stride_ww,
    eps, momentum, count,  # count: values per channel behind the batch statistics (unbiased variance)
    STRIDE: tl.constexpr, PADDING: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    PROLOGUE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    EMIT_STATS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if UPDATE_RUNNING:
        if (pid_m == 0) & (pid_n == 0):
            _update_running_stats(mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, tracked_ptr, C_IN, count,
                                  momentum, CUMULATIVE, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    n, ho, wo = _pixel_coordinates(offs_m, HO, WO)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # channel blocks outer, taps inner: the BatchNorm's scale and shift once per channel block (with
    # the default launch configs this order compiles without spills; the compile audit checks it)
    for k0 in range(0, C_IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C_IN
        if PROLOGUE:
            scale, shift, _, _ = _bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_k, mask_k, eps)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                hi = ho * STRIDE - PADDING + kh
                wi = wo * STRIDE - PADDING + kw
                inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                valid = inside[:, None] & mask_k[None, :]
                a = tl.load(x_ptr + (((n * H + hi) * W + wi) * C_IN)[:, None] + offs_k[None, :], mask=valid,
                            other=0.0).to(tl.float32)
                if PROLOGUE:
                    # relu(0 * scale + shift) need not be 0: the zero padding is applied after BN-ReLU
                    a = tl.where(valid, tl.maximum(a * scale[None, :] + shift[None, :], 0.0), 0.0)
                w = tl.load(w_ptr + offs_n[None, :] * stride_wo + offs_k[:, None] * stride_wi + kh * stride_wh
                            + kw * stride_ww, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc += tl.dot(a.to(y_ptr.dtype.element_ty), w.to(y_ptr.dtype.element_ty), input_precision=PRECISION)
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offsets = offs_m[:, None] * C_OUT + offs_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    if EMIT_STATS:
        tiles = tl.num_programs(0)
        count_m = tl.sum(mask_m.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(out_mask, acc, 0.0), axis=0) / count_m
        deviation = tl.where(out_mask, acc - tile_mean[None, :], 0.0)
        tl.store(partial_ptr + pid_m * C_OUT + offs_n, tile_mean, mask=mask_n)
        tl.store(partial_ptr + (tiles + pid_m) * C_OUT + offs_n, tl.sum(deviation * deviation, axis=0), mask=mask_n)
        if _is_last_to_arrive(counter_ptr + pid_n, tiles):
            # M2 = sum M2_t + sum n_t (mean_t - mean)^2 over tiles of n_t rows (BLOCK_M but the last)
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for t0 in range(0, tiles, MERGE_BLOCK):
                t, rows, tile, means = _tile_means(partial_ptr, t0, tiles, M, C_OUT, offs_n, mask_n, BLOCK_M)
                total += tl.sum(tl.where(tile, means * rows[:, None], 0.0), axis=0)
            mean = total / M
            m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for t0 in range(0, tiles, MERGE_BLOCK):
                t, rows, tile, means = _tile_means(partial_ptr, t0, tiles, M, C_OUT, offs_n, mask_n, BLOCK_M)
                m2s = tl.load(partial_ptr + (tiles + t[:, None]) * C_OUT + offs_n[None, :], mask=tile, other=0.0,
                              cache_modifier=".cg")
                offset = means - mean[None, :]
                m2 += tl.sum(tl.where(tile, m2s + rows[:, None] * offset * offset, 0.0), axis=0)
            tl.store(y_mean_ptr + offs_n, mean, mask=mask_n)
            tl.store(y_var_ptr + offs_n, m2 / M, mask=mask_n)


@triton.jit
def _bn_relu_conv_dgrad_kernel(
    dy_ptr,  # (N, HO, WO, C_OUT) gradient of the output
    w_ptr,  # (C_OUT, C_IN, KH, KW) weight, any layout (strides below)
    x_ptr,  # (N, H, W, C_IN) input before BatchNorm
    mean_ptr, var_ptr, gamma_ptr, beta_ptr,  # (C_IN,) the BatchNorm as in the forward, read when PROLOGUE
    gz_ptr,  # (N, H, W, C_IN) out: with PROLOGUE fp32 gradient at the BatchNorm output, ReLU mask
    #          applied; without, the gradient of x itself, in x's dtype
    partial_ptr,  # (2, cdiv(M, BLOCK_M), C_IN) fp32 scratch: per-tile sums of gz and gz * xhat, with PROLOGUE
    dbeta_ptr, dgamma_ptr,  # (C_IN,) out, with PROLOGUE: sum of gz and of gz * xhat over this batch
    counter_ptr,  # (cdiv(C_IN, BLOCK_C),) int32 zeros: tickets per column of tiles
    add_ptr,  # (N, H, W, C_IN) gradient of x along another path, added when HAS_ADD (plain conv only)
    M, H, W, C_IN, HO, WO, C_OUT,  # M = N * H * W input pixels
    stride_wo, stride_wi, stride_wh, stride_ww, eps,
    STRIDE: tl.constexpr, PADDING: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PROLOGUE: tl.constexpr,
    HAS_ADD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
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
                w = tl.load(w_ptr + offs_co[:, None] * stride_wo + offs_c[None, :] * stride_wi + kh * stride_wh
                            + kw * stride_ww, mask=mask_co[:, None] & mask_c[None, :], other=0.0)
                acc += tl.dot(g, w.to(g.dtype), input_precision=PRECISION)
    tile = mask_m[:, None] & mask_c[None, :]
    offsets = offs_m[:, None] * C_IN + offs_c[None, :]
    if PROLOGUE:
        x = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        scale, shift, mean, invstd = _bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_c, mask_c, eps)
        gz = tl.where(tile & (x * scale[None, :] + shift[None, :] > 0.0), acc, 0.0)
        tl.store(gz_ptr + offsets, gz, mask=tile)
        xhat = (x - mean[None, :]) * invstd[None, :]
        tiles = tl.num_programs(0)
        tl.store(partial_ptr + pid_m * C_IN + offs_c, tl.sum(gz, axis=0), mask=mask_c)
        tl.store(partial_ptr + (tiles + pid_m) * C_IN + offs_c, tl.sum(gz * xhat, axis=0), mask=mask_c)
        if _is_last_to_arrive(counter_ptr + pid_c, tiles):
            dbeta = tl.zeros((BLOCK_C,), dtype=tl.float32)
            dgamma = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for t0 in range(0, tiles, MERGE_BLOCK):
                t = t0 + tl.arange(0, MERGE_BLOCK)
                part = (t < tiles)[:, None] & mask_c[None, :]
                dbeta += tl.sum(tl.load(partial_ptr + t[:, None] * C_IN + offs_c[None, :], mask=part, other=0.0,
                                        cache_modifier=".cg"), axis=0)
                dgamma += tl.sum(tl.load(partial_ptr + (tiles + t[:, None]) * C_IN + offs_c[None, :], mask=part,
                                         other=0.0, cache_modifier=".cg"), axis=0)
            tl.store(dbeta_ptr + offs_c, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mask_c)
            tl.store(dgamma_ptr + offs_c, dgamma.to(dgamma_ptr.dtype.element_ty), mask=mask_c)
    else:  # a plain conv: the transposed convolution is the input gradient
        if HAS_ADD:
            acc += tl.load(add_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        tl.store(gz_ptr + offsets, acc.to(gz_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _bn_backward_apply_kernel(
    gz_ptr,  # (M, C) fp32 gradient at the BatchNorm output
    x_ptr,  # (M, C) input before BatchNorm
    mean_ptr, var_ptr, gamma_ptr,  # (C,) the BatchNorm as in the forward
    dbeta_ptr, dgamma_ptr,  # (C,) fp32 sums of gz and gz * xhat over the batch (all ranks when synchronised)
    add_ptr,  # (M, C) gradient of x along another path (an identity shortcut), added when HAS_ADD
    dx_ptr,  # (M, C) out: gradient of x
    M, C, count, eps,  # count: values per channel behind the batch statistics
    BATCH_STATS: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    tile = (offs_m < M)[:, None] & mask_c[None, :]
    offsets = offs_m[:, None] * C + offs_c[None, :]
    gz = tl.load(gz_ptr + offsets, mask=tile, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=mask_c, other=1.0) + eps)
    scale = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32) * invstd
    if BATCH_STATS:  # the batch statistics depend on x too
        x = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * invstd[None, :]
        mean_dbeta = tl.load(dbeta_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32) / count
        mean_dgamma = tl.load(dgamma_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32) / count
        gz = gz - mean_dbeta[None, :] - xhat * mean_dgamma[None, :]
    dx = scale[None, :] * gz
    if HAS_ADD:
        dx += tl.load(add_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _bn_relu_conv_wgrad_kernel(
    x_ptr,  # (N, H, W, C_IN) input before BatchNorm
    mean_ptr, var_ptr, gamma_ptr, beta_ptr,  # (C_IN,) the BatchNorm as in the forward, read when PROLOGUE
    dy_ptr,  # (N, HO, WO, C_OUT) gradient of the output
    partial_ptr,  # (SPLITS, KH, KW, C_IN, C_OUT) fp32 scratch: per-split partial weight gradient
    dw_ptr,  # (C_OUT, C_IN, KH, KW) out: weight gradient, in the weight's layout (strides below) and dtype
    counter_ptr,  # (KH * KW * cdiv(C_IN, BLOCK_C) * cdiv(C_OUT, BLOCK_CO),) int32 zeros: tickets per tile
    M, H, W, C_IN, HO, WO, C_OUT, ROWS_PER_SPLIT,  # M = N * HO * WO output pixels
    stride_wo, stride_wi, stride_wh, stride_ww, eps,
    STRIDE: tl.constexpr, PADDING: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PROLOGUE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    pid_k = tl.program_id(0)  # kernel tap and input-channel block
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)  # range of output pixels
    splits = tl.num_programs(2)
    c_blocks = tl.cdiv(C_IN, BLOCK_C)
    tap = pid_k // c_blocks
    kh = tap // KW
    kw = tap % KW
    offs_c = (pid_k % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_c = offs_c < C_IN
    mask_co = offs_co < C_OUT
    if PROLOGUE:
        scale, shift, _, _ = _bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_c, mask_c, eps)
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
    mask = mask_c[:, None] & mask_co[None, :]
    part = ((kh * KW + kw) * C_IN + offs_c[:, None]) * C_OUT + offs_co[None, :]
    tl.store(partial_ptr + pid_s * KH * KW * C_IN * C_OUT + part, acc, mask=mask)
    if _is_last_to_arrive(counter_ptr + pid_k * tl.num_programs(1) + pid_co, splits):
        total = tl.zeros((BLOCK_C, BLOCK_CO), dtype=tl.float32)
        for s in range(0, splits):  # in order: the sum does not depend on which split finished last
            total += tl.load(partial_ptr + s * KH * KW * C_IN * C_OUT + part, mask=mask, other=0.0,
                             cache_modifier=".cg")
        out = dw_ptr + offs_co[None, :] * stride_wo + offs_c[:, None] * stride_wi + kh * stride_wh + kw * stride_ww
        tl.store(out, total.to(dw_ptr.dtype.element_ty), mask=mask)
