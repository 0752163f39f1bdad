"""BatchNorm in Triton: statistics, finalize (+ running stats), apply (+ residual, ReLU, bit mask), backward.

Tensors are 4-D (N, C, H, W) and dense in one of two layouts: channels_last (NHWC, the layout the
Triton conv writes) or contiguous (NCHW, for callers whose input is NCHW). Two views of them are used:
* flat, for the elementwise kernels: element i of memory holds channel (i // C_INNER) % C, where
  C_INNER = 1 in NHWC and H*W in NCHW;
* rows x channels, for the per-channel reductions: row m = n*H*W + hw, channel c sits at element
  n*s_n + hw*s_hw + c*s_c (NHWC: s_n = H*W*C, s_hw = C, s_c = 1; NCHW: s_n = C*H*W, s_hw = 1, s_c = H*W).
Data is fp32, fp16 or bf16; every sum and statistic is fp32. Reductions are deterministic: per-tile
partials, merged in a fixed order (no atomics).

Host functions (same names, argument order and meaning as the CUDA C++ ops fastres::bn_*):
  bn_finalize(partials, running_mean, running_var, momentum, eps) -> (mean, invstd)
  bn_stats(z, running_mean, running_var, momentum, eps)           -> (mean, invstd)
  bn_apply(z, mean, invstd, weight, bias, residual, relu, save_mask) -> (y, mask)
  bn_backward(grad_y, z, mask, mean, invstd, weight, training, relu, need_dres) -> (dz, dgamma, dbeta, dres)
  pack_mask(y) -> mask  (the bit mask of y > 0 alone, for eval-mode forwards whose y comes from the conv)
The bit mask layout is fastres.layout.pack_relu_mask: bit i % 8 of byte i // 8 is y_i > 0, i the
element's position in memory order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastres.kernels.alloc import empty

Tensor = torch.Tensor

# Block sizes (module-level so tests can shrink them to force several tiles and ragged edges).
FLAT_BLOCK = 1024      # elements per program of the elementwise kernels (a multiple of 8)
TILE_ELEMS = 4096      # rows * channels per program of the reduction kernels
MAX_BLOCK_C = 64       # channels per program of the reduction kernels
BLOCK_T = 32           # partial rows merged per step by the finalize / reduce kernels

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

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
def _finalize_kernel(
    part_ptr,              # in:  fp32 (T, 3, C) rows [count, mean, M2] per tile
    mean_ptr, invstd_ptr,  # out: fp32 (C,) batch mean, 1 / sqrt(biased var + eps)
    rmean_ptr, rvar_ptr,   # in/out: running_mean / running_var (C,), any float dtype (if HAS_RUNNING)
    T, C,                  # number of tiles, channels
    momentum, eps,         # effective update factor, BatchNorm eps
    HAS_RUNNING: tl.constexpr,  # update the running statistics
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,  # tiles merged per step, channels per program
):
    """Chan's parallel merge of the tiles' (count, mean, M2), BLOCK_T tiles at a time, in tile order.

    A block of tiles is first combined exactly (count = sum n_i, mean = sum n_i mean_i / count,
    M2 = sum (M2_i + n_i (mean_i - mean)^2)), then merged into the running result:
    delta = mean_b - mean_a, mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_n = tl.zeros([BLOCK_C], tl.float32)
    acc_mean = tl.zeros([BLOCK_C], tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        m = (ts < T)[:, None] & cmask[None, :]
        off = ts.to(tl.int64)[:, None] * 3 * C + cols[None, :]
        n = tl.load(part_ptr + off, mask=m, other=0.0)
        mu = tl.load(part_ptr + off + C, mask=m, other=0.0)
        m2 = tl.load(part_ptr + off + 2 * C, mask=m, other=0.0)
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
# adds the tiles in order (deterministic) into dbeta and dgamma; pass 3 (_bwd_dz_kernel) writes dz
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
    dbeta_ptr, dgamma_ptr,  # out: fp32 (C,) sum g, sum g * xhat
    T, C,                  # number of tiles, channels
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,  # tiles added per step, channels per program
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sg = tl.zeros([BLOCK_C], tl.float32)
    sgx = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        m = (ts < T)[:, None] & cmask[None, :]
        off = ts.to(tl.int64)[:, None] * 2 * C + cols[None, :]
        sg += tl.sum(tl.load(part_ptr + off, mask=m, other=0.0), axis=0)
        sgx += tl.sum(tl.load(part_ptr + off + C, mask=m, other=0.0), axis=0)
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


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------

def _fmt(t: Tensor) -> torch.memory_format:
    """The dense layout of a 4-D tensor (contiguous wins when both hold: then they coincide)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    raise ValueError(f"fastres batchnorm: expected a dense NHWC (channels_last) or NCHW (contiguous) tensor, "
                     f"got shape {tuple(t.shape)} with strides {t.stride()}")


def _geometry(t: Tensor):
    """(M, C, HW, (s_n, s_hw, s_c), C_INNER) of a dense 4-D tensor."""
    n, c, h, w = t.shape
    hw = h * w
    if _fmt(t) == torch.channels_last:
        return n * hw, c, hw, (hw * c, c, 1), 1
    return n * hw, c, hw, (c * hw, 1, hw), hw


def _check_data(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 4:
        got = f"{t.dim()}-D tensor" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"fastres batchnorm: expected {name} as a 4-D (N, C, H, W) tensor, got {got}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"fastres batchnorm: expected {name} of dtype float32, float16 or bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"fastres batchnorm: expected a non-empty {name}, got shape {tuple(t.shape)}")


def _check_vec(name: str, t: Optional[Tensor], c: int, device, fp32: bool = False) -> None:
    if t is None:
        return
    if tuple(t.shape) != (c,) or not t.is_contiguous():
        raise ValueError(f"fastres batchnorm: expected {name} as a contiguous ({c},) tensor, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")
    if t.device != device:
        raise RuntimeError(f"fastres batchnorm: expected {name} on {device}, got {t.device}")
    if fp32 and t.dtype != torch.float32:
        raise TypeError(f"fastres batchnorm: expected {name} of dtype float32, got {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"fastres batchnorm: expected a floating-point {name}, got {t.dtype}")


def _like(t: Tensor, name: str, ref: Tensor) -> Tensor:
    """`t` in ref's shape, dtype, device and dense layout (a copy only when its layout differs)."""
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"fastres batchnorm: expected {name} of shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"fastres batchnorm: expected {name} of dtype {ref.dtype} (z's), got {t.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"fastres batchnorm: expected {name} on {ref.device}, got {t.device}")
    fmt = _fmt(ref)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _reduce_blocks(m: int, c: int) -> Tuple[int, int]:
    block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C)
    block_m = min(triton.next_power_of_2(m), max(1, TILE_ELEMS // block_c))
    return block_m, block_c


def bn_finalize(partials: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                momentum: float, eps: float) -> Tuple[Tensor, Tensor]:
    """Merge per-tile [count, mean, M2] partials (fp32 (T, 3, C)) into fp32 (mean, invstd), invstd =
    1/sqrt(biased var + eps); when running stats are given, update them in place as nn.BatchNorm2d does:
    r_mean = (1-m) r_mean + m mean, r_var = (1-m) r_var + m var n/(n-1), m = `momentum` (the effective factor)."""
    if partials.dim() != 3 or partials.shape[1] != 3 or partials.dtype != torch.float32 or partials.shape[0] == 0:
        raise ValueError(f"bn_finalize: expected fp32 partials of shape (T, 3, C) with T >= 1, got "
                         f"{partials.dtype} {tuple(partials.shape)}")
    partials = partials.contiguous()
    t, _, c = partials.shape
    dev = partials.device
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_finalize: running_mean and running_var must be given together")
    _check_vec("running_mean", running_mean, c, dev)
    _check_vec("running_var", running_var, c, dev)
    mean = empty((c,), dtype=torch.float32, device=dev)
    invstd = empty((c,), dtype=torch.float32, device=dev)
    has_running = running_mean is not None
    block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C)
    _finalize_kernel[(triton.cdiv(c, block_c),)](
        partials, mean, invstd, running_mean if has_running else mean, running_var if has_running else invstd,
        t, c, float(momentum), float(eps),
        HAS_RUNNING=has_running, BLOCK_T=BLOCK_T, BLOCK_C=block_c)
    return mean, invstd


def bn_partials(z: Tensor) -> Tensor:
    """fp32 (T, 3, C) per-row-tile [count, mean, M2] of a dense NHWC/NCHW tensor."""
    _check_data("z", z)
    m, c, hw, (s_n, s_hw, s_c), _ = _geometry(z)
    block_m, block_c = _reduce_blocks(m, c)
    t = triton.cdiv(m, block_m)
    part = empty((t, 3, c), dtype=torch.float32, device=z.device)
    _tile_stats_kernel[(t, triton.cdiv(c, block_c))](
        z, part, m, c, hw, s_n, s_hw, s_c, BLOCK_M=block_m, BLOCK_C=block_c)
    return part


def bn_stats(z: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
             eps: float) -> Tuple[Tensor, Tensor]:
    """Batch (mean, invstd) of z per channel (fp32), running stats updated as in bn_finalize."""
    return bn_finalize(bn_partials(z), running_mean, running_var, momentum, eps)


def bn_apply(z: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], relu: bool, save_mask: bool) -> Tuple[Tensor, Tensor]:
    """y = act(z * scale + shift (+ residual)) in z's dtype and layout, scale = weight * invstd,
    shift = bias - mean * scale (weight / bias None: 1 / 0). mask: packed y > 0 bits when relu and
    save_mask, else an empty uint8 tensor."""
    _check_data("z", z)
    _fmt(z)
    c, dev = z.shape[1], z.device
    for name, v in (("mean", mean), ("invstd", invstd)):
        if v is None:
            raise ValueError(f"bn_apply: expected {name} as a float32 ({c},) tensor, got None")
        _check_vec(name, v, c, dev, fp32=True)
    _check_vec("weight", weight, c, dev)
    _check_vec("bias", bias, c, dev)
    if residual is not None:
        residual = _like(residual, "residual", z)
    _, _, _, _, c_inner = _geometry(z)
    numel = z.numel()
    y = empty(z.shape, dtype=z.dtype, device=dev, memory_format=_fmt(z))
    save = bool(relu and save_mask)
    mask = empty(((numel + 7) // 8 if save else 0,), dtype=torch.uint8, device=dev)
    _apply_kernel[(triton.cdiv(numel, FLAT_BLOCK),)](
        z, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
        residual if residual is not None else z, y, mask if save else y,
        numel, c, c_inner,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
        SAVE_MASK=save, BLOCK=FLAT_BLOCK)
    return y, mask


def pack_mask(y: Tensor) -> Tensor:
    """The packed y > 0 bits of a dense tensor, in its memory order (pack_relu_mask's layout)."""
    _check_data("y", y)
    _fmt(y)
    numel = y.numel()
    mask = empty(((numel + 7) // 8,), dtype=torch.uint8, device=y.device)
    _pack_mask_kernel[(triton.cdiv(numel, FLAT_BLOCK),)](y, mask, numel, BLOCK=FLAT_BLOCK)
    return mask


def bn_backward(grad_y: Tensor, z: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                training: bool, relu: bool, need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dgamma, dbeta, dres) of y = act(weight * (z - mean) * invstd + bias (+ residual)); see the
    comment above _bwd_tile_kernel. dz and dres in z's dtype and layout (dres empty unless need_dres),
    dgamma and dbeta fp32. grad_y is brought to z's layout (a copy only if it differs)."""
    _check_data("z", z)
    _fmt(z)
    grad_y = _like(grad_y, "grad_y", z)
    c, dev = z.shape[1], z.device
    for name, v in (("mean", mean), ("invstd", invstd)):
        _check_vec(name, v, c, dev, fp32=True)
    _check_vec("weight", weight, c, dev)
    numel = z.numel()
    if relu:
        if mask is None or mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (numel + 7) // 8:
            got = "None" if mask is None else f"{mask.dtype} {tuple(mask.shape)}"
            raise ValueError(f"bn_backward: relu needs the packed mask, a uint8 ({(numel + 7) // 8},) tensor; "
                             f"got {got}")
        if mask.device != dev:
            raise RuntimeError(f"bn_backward: expected mask on {dev}, got {mask.device}")
    m, _, hw, (s_n, s_hw, s_c), c_inner = _geometry(z)
    block_m, block_c = _reduce_blocks(m, c)
    t = triton.cdiv(m, block_m)
    part = empty((t, 2, c), dtype=torch.float32, device=dev)
    mask_arg = mask if relu else z
    _bwd_tile_kernel[(t, triton.cdiv(c, block_c))](
        grad_y, z, mask_arg, mean, invstd, part, m, c, hw, s_n, s_hw, s_c,
        RELU=bool(relu), BLOCK_M=block_m, BLOCK_C=block_c)
    dbeta = empty((c,), dtype=torch.float32, device=dev)
    dgamma = empty((c,), dtype=torch.float32, device=dev)
    _bwd_reduce_kernel[(triton.cdiv(c, block_c),)](part, dbeta, dgamma, t, c, BLOCK_T=BLOCK_T, BLOCK_C=block_c)
    fmt = _fmt(z)
    dz = empty(z.shape, dtype=z.dtype, device=dev, memory_format=fmt)
    dres = empty(z.shape if need_dres else (0,), dtype=z.dtype, device=dev, memory_format=fmt if need_dres
                 else torch.contiguous_format)
    _bwd_dz_kernel[(triton.cdiv(numel, FLAT_BLOCK),)](
        grad_y, z, mask_arg, mean, invstd, weight if weight is not None else mean, dbeta, dgamma,
        dz, dres if need_dres else dz, numel, c, c_inner, 1.0 / m,
        HAS_W=weight is not None, TRAINING=bool(training), RELU=bool(relu), NEED_DRES=bool(need_dres),
        BLOCK=FLAT_BLOCK)
    return dz, dgamma, dbeta, dres
