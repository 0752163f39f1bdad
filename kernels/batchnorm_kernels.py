"""The Triton kernels of BatchNorm (host functions and the layouts they assume: kernels/batchnorm.py).

Reductions run in two steps, both deterministic (fixed merge order, no floating-point atomics):
* tile kernels (_tile_stats_kernel, _bwd_tile_kernel; the conv's statistics epilogue is one too) write
  one fp32 partial row per (row tile, channel block);
* merge kernels (_finalize_kernel, _bwd_reduce_kernel) run on a 2-D grid (group of tiles, channel
  block): each program merges a contiguous group of CHUNK tiles, in tile order, into a workspace row,
  then counts itself done on its channel block's int32 counter; the program that finds it was the last
  one merges the G group rows of that channel block, in group order, and writes the result. Which
  program comes last varies from run to run; the order of the merges does not, so the result is the
  same bit for bit. The counter's acq_rel atomic (after a CTA barrier) publishes the group rows; the
  last program reads them with .cg loads (L2, never a stale L1 line).
"""
import triton
import triton.language as tl

from .conv_kernel import loop_bound  # runtime range() bounds under Triton 3.6's interpreter


@triton.jit
def _tile_stats_kernel(
    z_ptr,        # in:  data (fp32/fp16/bf16), dense NHWC or NCHW
    part_ptr,     # out: fp32 (T, 3, C) per row tile: [count, mean, M2] of each channel
    M, C, HW,     # rows (N*H*W), channels, H*W
    s_n, s_hw, s_c,  # element strides of batch, spatial position, channel
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,  # rows per tile (T = cdiv(M, BLOCK_M)), channels per program
):
    """Program (tile t, channel block): two-pass mean and M2 over BLOCK_M rows of BLOCK_C channels."""
    t = tl.program_id(0)
    cb = tl.program_id(1)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    m = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    roff = (rows64 // HW) * s_n + (rows64 % HW) * s_hw
    off = roff[:, None] + cols[None, :].to(tl.int64) * s_c
    x = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    cnt = tl.sum(rmask.to(tl.float32), axis=0)       # the same for every channel
    mean = tl.sum(x, axis=0) / cnt
    d = tl.where(m, x - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    base = part_ptr + t.to(tl.int64) * 3 * C + cols
    tl.store(base, cnt + tl.zeros([BLOCK_C], tl.float32), mask=cmask)
    tl.store(base + C, mean, mask=cmask)
    tl.store(base + 2 * C, m2, mask=cmask)


@triton.jit
def _chan_rows(
    part_ptr,       # in:  fp32 (R, 3, C) rows [count, mean, M2]
    lo, hi,         # merge rows lo .. hi-1, in order
    C,              # channels
    cols, cmask,    # [BLOCK_C] channel indices of this program and their validity
    CACHE: tl.constexpr,    # load cache modifier ("" or ".cg": bypass L1 for rows other programs wrote)
    BLOCK_T: tl.constexpr,  # rows merged per step
):
    """Chan's parallel merge of rows lo..hi-1, BLOCK_T rows at a time, in row order -> (count, mean, M2).

    A block of rows is first combined exactly (count = sum n_i, mean = sum n_i mean_i / count,
    M2 = sum (M2_i + n_i (mean_i - mean)^2)), then merged into the running result:
    delta = mean_b - mean_a, mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n.
    Rows of count 0 (masked) add nothing."""
    acc_n = tl.zeros(cols.shape, tl.float32)
    acc_mean = tl.zeros(cols.shape, tl.float32)
    acc_m2 = tl.zeros(cols.shape, tl.float32)
    for t0 in range(loop_bound(lo), loop_bound(hi), BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        m = (ts < hi)[:, None] & cmask[None, :]
        off = ts.to(tl.int64)[:, None] * 3 * C + cols[None, :]
        n = tl.load(part_ptr + off, mask=m, other=0.0, cache_modifier=CACHE)
        mu = tl.load(part_ptr + off + C, mask=m, other=0.0, cache_modifier=CACHE)
        m2 = tl.load(part_ptr + off + 2 * C, mask=m, other=0.0, cache_modifier=CACHE)
        bn = tl.sum(n, axis=0)
        bmean = tl.sum(n * mu, axis=0) / tl.maximum(bn, 1.0)
        d = mu - bmean[None, :]
        bm2 = tl.sum(m2 + n * d * d, axis=0)
        tot = acc_n + bn
        safe = tl.maximum(tot, 1.0)
        delta = bmean - acc_mean
        acc_mean = acc_mean + delta * (bn / safe)
        acc_m2 = acc_m2 + bm2 + delta * delta * (acc_n * bn / safe)
        acc_n = tot
    return acc_n, acc_mean, acc_m2


@triton.jit
def _sum_rows(
    part_ptr,       # in:  fp32 (R, 2, C) rows [sum g, sum g * xhat]
    lo, hi,         # add rows lo .. hi-1, in order
    C,              # channels
    cols, cmask,    # [BLOCK_C] channel indices of this program and their validity
    CACHE: tl.constexpr,    # load cache modifier ("" or ".cg")
    BLOCK_T: tl.constexpr,  # rows added per step
):
    """Sums of rows lo..hi-1 of both halves, BLOCK_T rows at a time, in row order -> (sum g, sum g * xhat)."""
    sg = tl.zeros(cols.shape, tl.float32)
    sgx = tl.zeros(cols.shape, tl.float32)
    for t0 in range(loop_bound(lo), loop_bound(hi), BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        m = (ts < hi)[:, None] & cmask[None, :]
        off = ts.to(tl.int64)[:, None] * 2 * C + cols[None, :]
        sg += tl.sum(tl.load(part_ptr + off, mask=m, other=0.0, cache_modifier=CACHE), axis=0)
        sgx += tl.sum(tl.load(part_ptr + off + C, mask=m, other=0.0, cache_modifier=CACHE), axis=0)
    return sg, sgx


@triton.jit
def _finalize_kernel(
    part_ptr,              # in:  fp32 (T, 3, C) rows [count, mean, M2] per tile
    ws_ptr,                # tmp: fp32 (G, 3, C) one merged row per group of tiles
    count_ptr,             # tmp: int32 (cdiv(C, BLOCK_C),) zeros: programs done per channel block
    mean_ptr, invstd_ptr,  # out: fp32 (C,) batch mean, 1 / sqrt(biased var + eps)
    rmean_ptr, rvar_ptr,   # in/out: running_mean / running_var (C,), any float dtype (if HAS_RUNNING)
    T, C,                  # number of tiles, channels
    G, CHUNK,              # groups of tiles (grid axis 0), tiles per group (G = cdiv(T, CHUNK))
    momentum, eps,         # effective update factor, BatchNorm eps
    HAS_RUNNING: tl.constexpr,  # update the running statistics
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,  # rows merged per step, channels per program
):
    """Program (group g, channel block): merge tiles g*CHUNK .. of its channels; the last program of a
    channel block merges the G group rows, writes mean / invstd and updates the running statistics."""
    g = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    lo = g * CHUNK
    n, mu, m2 = _chan_rows(part_ptr, lo, tl.minimum(lo + CHUNK, T), C, cols, cmask, "", BLOCK_T)
    base = ws_ptr + g.to(tl.int64) * 3 * C + cols
    tl.store(base, n, mask=cmask)
    tl.store(base + C, mu, mask=cmask)
    tl.store(base + 2 * C, m2, mask=cmask)
    tl.debug_barrier()   # every thread's row stored before the release below
    done = tl.atomic_add(count_ptr + cb, 1, sem="acq_rel")
    if done == G - 1:
        acc_n, acc_mean, acc_m2 = _chan_rows(ws_ptr, 0, G, C, cols, cmask, ".cg", BLOCK_T)
        var = acc_m2 / tl.maximum(acc_n, 1.0)   # acc_n >= 1 for every real channel
        tl.store(mean_ptr + cols, acc_mean, mask=cmask)
        tl.store(invstd_ptr + cols, tl.rsqrt(var + eps), mask=cmask)
        if HAS_RUNNING:
            unbiased = var * (acc_n / tl.maximum(acc_n - 1.0, 1.0))
            rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0)
            rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0)
            new_rm = (1.0 - momentum) * rm.to(tl.float32) + momentum * acc_mean
            new_rv = (1.0 - momentum) * rv.to(tl.float32) + momentum * unbiased
            tl.store(rmean_ptr + cols, new_rm.to(rmean_ptr.dtype.element_ty), mask=cmask)
            tl.store(rvar_ptr + cols, new_rv.to(rvar_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _apply_kernel(
    z_ptr,                 # in:  data, dense NHWC or NCHW (flat view)
    mean_ptr, invstd_ptr,  # in:  fp32 (C,)
    w_ptr, b_ptr,          # in:  gamma, beta (C,), any float dtype (read only if HAS_W / HAS_B)
    res_ptr,               # in:  residual, same dtype and layout as z (read only if HAS_RES)
    y_ptr,                 # out: y, same dtype and layout as z
    mask_ptr,              # out: uint8 (ceil(numel / 8),) packed ReLU mask (written only if SAVE_MASK)
    numel, C, C_INNER,     # elements, channels, channel period of the flat view (1 NHWC, H*W NCHW)
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,  # affine weight / bias present
    HAS_RES: tl.constexpr, RELU: tl.constexpr,  # add the residual, apply the ReLU
    SAVE_MASK: tl.constexpr,                    # write the packed ReLU mask
    BLOCK: tl.constexpr,                        # elements per program, a multiple of 8
):
    """y = act(z * scale + shift (+ residual)), scale = gamma * invstd, shift = beta - mean * scale.
    BLOCK is a multiple of 8 so each program owns whole mask bytes."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    c = (offs // C_INNER) % C
    z = tl.load(z_ptr + offs, mask=inb, other=0.0)
    scale = tl.load(invstd_ptr + c, mask=inb, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=inb, other=0.0).to(tl.float32)
    shift = -tl.load(mean_ptr + c, mask=inb, other=0.0) * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=inb, other=0.0).to(tl.float32)
    y = z.to(tl.float32) * scale + shift
    if HAS_RES:
        y = y + tl.load(res_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # ReLU that keeps NaN, as torch.relu (maximum would drop it)
    y = y.to(z.dtype)
    tl.store(y_ptr + offs, y, mask=inb)
    if SAVE_MASK:
        _store_bits(mask_ptr, y, inb, pid, numel, BLOCK)


@triton.jit
def _store_bits(mask_ptr, y, inb, pid, numel, BLOCK: tl.constexpr):
    """Pack (y > 0) of this program's BLOCK elements into BLOCK // 8 bytes, bit j of byte k = element 8k + j."""
    pos = ((y > 0) & inb).to(tl.int32)
    bits = tl.reshape(pos, (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :]
    byte = tl.sum(bits, axis=1).to(tl.uint8)
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(mask_ptr + boffs, byte, mask=boffs < (numel + 7) // 8)


@triton.jit
def _pack_mask_kernel(
    y_ptr,        # in:  data, any float dtype, flat
    mask_ptr,     # out: uint8 (ceil(numel / 8),)
    numel,        # elements
    BLOCK: tl.constexpr,  # elements per program, a multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    y = tl.load(y_ptr + offs, mask=inb, other=0.0)
    _store_bits(mask_ptr, y, inb, pid, numel, BLOCK)


# Backward of y = act(gamma * xhat + beta + residual), xhat = (z - mean) * invstd, per channel over the
# n = N*H*W positions of z:
#   g      = dL/dy where y > 0 (bit mask) when act is ReLU, else dL/dy      -> dresidual = g
#   dbeta  = sum g,  dgamma = sum g * xhat
#   eval:      mean and invstd are constants:  dz = gamma * invstd * g
#   training:  mean and invstd depend on z.  With dxhat = gamma * g, d mean/dz_i = 1/n and
#              d invstd/dz_i = -invstd^3 (z_i - mean) / n, so
#              dz = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
#                 = gamma * invstd * (g - dbeta / n - xhat * dgamma / n).
# Pass 1 (_bwd_tile_kernel) writes per-tile partial sums of g and g * xhat; pass 2 (_bwd_reduce_kernel)
# adds them in a fixed order (deterministic) into dbeta and dgamma; pass 3 (_bwd_dz_kernel) writes dz
# (and dresidual) elementwise.
@triton.jit
def _bwd_tile_kernel(
    g_ptr, z_ptr,          # in:  dL/dy and z, same dtype and dense layout
    mask_ptr,              # in:  uint8 packed ReLU mask of y (read only if RELU)
    mean_ptr, invstd_ptr,  # in:  fp32 (C,)
    part_ptr,              # out: fp32 (T, 2, C) per row tile: [sum g, sum g * xhat]
    M, C, HW,              # rows (N*H*W), channels, H*W
    s_n, s_hw, s_c,        # element strides of batch, spatial position, channel (also the mask bit index)
    RELU: tl.constexpr,                               # mask g by the packed ReLU mask
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,     # rows per tile, channels per program
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < C
    m = (rows < M)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    off = ((rows64 // HW) * s_n + (rows64 % HW) * s_hw)[:, None] + cols[None, :].to(tl.int64) * s_c
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    if RELU:
        byte = tl.load(mask_ptr + (off >> 3), mask=m, other=0).to(tl.int32)
        g = tl.where(((byte >> (off & 7).to(tl.int32)) & 1) != 0, g, 0.0)
    z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    xhat = (z - mean[None, :]) * invstd[None, :]
    base = part_ptr + t.to(tl.int64) * 2 * C + cols
    tl.store(base, tl.sum(g, axis=0), mask=cmask)
    tl.store(base + C, tl.sum(g * xhat, axis=0), mask=cmask)


@triton.jit
def _bwd_reduce_kernel(
    part_ptr,              # in:  fp32 (T, 2, C) per-tile [sum g, sum g * xhat]
    ws_ptr,                # tmp: fp32 (G, 2, C) one summed row per group of tiles
    count_ptr,             # tmp: int32 (cdiv(C, BLOCK_C),) zeros: programs done per channel block
    dbeta_ptr, dgamma_ptr,  # out: fp32 (C,) sum g, sum g * xhat
    T, C,                  # number of tiles, channels
    G, CHUNK,              # groups of tiles (grid axis 0), tiles per group (G = cdiv(T, CHUNK))
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,  # rows added per step, channels per program
):
    """Program (group g, channel block): add tiles g*CHUNK ..; the last program of a channel block adds
    the G group rows in group order."""
    g = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    lo = g * CHUNK
    sg, sgx = _sum_rows(part_ptr, lo, tl.minimum(lo + CHUNK, T), C, cols, cmask, "", BLOCK_T)
    base = ws_ptr + g.to(tl.int64) * 2 * C + cols
    tl.store(base, sg, mask=cmask)
    tl.store(base + C, sgx, mask=cmask)
    tl.debug_barrier()   # every thread's row stored before the release below
    done = tl.atomic_add(count_ptr + cb, 1, sem="acq_rel")
    if done == G - 1:
        sg, sgx = _sum_rows(ws_ptr, 0, G, C, cols, cmask, ".cg", BLOCK_T)
        tl.store(dbeta_ptr + cols, sg, mask=cmask)
        tl.store(dgamma_ptr + cols, sgx, mask=cmask)


@triton.jit
def _bwd_dz_kernel(
    g_ptr, z_ptr,          # in:  dL/dy and z (z read only if TRAINING), same dtype and layout, flat
    mask_ptr,              # in:  uint8 packed ReLU mask (read only if RELU)
    mean_ptr, invstd_ptr,  # in:  fp32 (C,)
    w_ptr,                 # in:  gamma (C,), any float dtype (read only if HAS_W)
    sg_ptr, sgx_ptr,       # in:  fp32 (C,) sum g, sum g * xhat (read only if TRAINING)
    dz_ptr,                # out: dL/dz, z's dtype and layout
    dres_ptr,              # out: g, z's dtype and layout (written only if NEED_DRES)
    numel, C, C_INNER,     # elements, channels, channel period of the flat view
    inv_n,                 # 1 / (N*H*W)
    HAS_W: tl.constexpr,     # affine weight present
    TRAINING: tl.constexpr,  # batch statistics (full formula) or running statistics (dz = scale * g)
    RELU: tl.constexpr,      # mask g by the packed ReLU mask
    NEED_DRES: tl.constexpr,  # write dresidual = g
    BLOCK: tl.constexpr,     # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    c = (offs // C_INNER) % C
    graw = tl.load(g_ptr + offs, mask=inb, other=0.0)
    g = graw.to(tl.float32)
    if RELU:
        byte = tl.load(mask_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
        g = tl.where(((byte >> (offs & 7).to(tl.int32)) & 1) != 0, g, 0.0)
    scale = tl.load(invstd_ptr + c, mask=inb, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=inb, other=0.0).to(tl.float32)
    if TRAINING:
        z = tl.load(z_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        xhat = (z - tl.load(mean_ptr + c, mask=inb, other=0.0)) * tl.load(invstd_ptr + c, mask=inb, other=0.0)
        sg = tl.load(sg_ptr + c, mask=inb, other=0.0)
        sgx = tl.load(sgx_ptr + c, mask=inb, other=0.0)
        dz = scale * (g - sg * inv_n - xhat * (sgx * inv_n))
    else:
        dz = scale * g
    tl.store(dz_ptr + offs, dz.to(graw.dtype), mask=inb)
    if NEED_DRES:
        tl.store(dres_ptr + offs, g.to(graw.dtype), mask=inb)
