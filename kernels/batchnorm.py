"""BatchNorm in Triton: statistics, finalize (+ running stats), apply (+ residual, ReLU, bit mask), backward.

Host functions here (allocate, check, launch); the @triton.jit kernels are in batchnorm_kernels.py.

Tensors are 4-D (N, C, H, W) and dense in one of two layouts: channels_last (NHWC, the layout the
Triton conv writes) or contiguous (NCHW, for callers whose input is NCHW). Two views of them are used:
* flat, for the elementwise kernels: element i of memory holds channel (i // C_INNER) % C, where
  C_INNER = 1 in NHWC and H*W in NCHW;
* rows x channels, for the per-channel reductions: row m = n*H*W + hw, channel c sits at element
  n*s_n + hw*s_hw + c*s_c (NHWC: s_n = H*W*C, s_hw = C, s_c = 1; NCHW: s_n = C*H*W, s_hw = 1, s_c = H*W).
Data is fp32, fp16 or bf16; every sum and statistic is fp32. Reductions are deterministic: per-tile
partials, merged in a fixed order (no floating-point atomics) on a 2-D grid of (group of tiles, channel
block) programs sized to fill the GPU (MERGE_PROGRAMS), the last program of each channel block
merging the group rows (see batchnorm_kernels.py).

Host functions (bn_stats, bn_apply and bn_backward have the names, argument order and meaning of the
CUDA C++ ops fastres::bn_stats / bn_apply / bn_backward):
  bn_finalize(partials, running_mean, running_var, momentum, eps) -> (mean, invstd)
  bn_partials(z)                                                  -> partials (T, 3, C)
  bn_stats(z, running_mean, running_var, momentum, eps)           -> (mean, invstd)
  bn_apply(z, mean, invstd, weight, bias, residual, relu, save_mask) -> (y, mask)
  bn_backward(grad_y, z, mask, mean, invstd, weight, training, relu, need_dres) -> (dz, dgamma, dbeta, dres)
  pack_mask(y) -> mask  (the bit mask of y > 0 alone, for eval-mode forwards whose y comes from the conv)
The bit mask layout is fastres.layout.pack_relu_mask: bit i % 8 of byte i // 8 is y_i > 0, i the
element's position in memory order. Every launch runs under the CUDA device of its tensors.
report_variants.py describes, for the report tool (report.py), every launch these host functions make
after a conv of a given shape, from the launch plans below.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from fastres.kernels.alloc import empty
from fastres.kernels.batchnorm_kernels import (
    _apply_kernel,
    _bwd_dz_kernel,
    _bwd_reduce_kernel,
    _bwd_tile_kernel,
    _finalize_kernel,
    _pack_mask_kernel,
    _tile_stats_kernel,
)
from fastres.kernels.shapes import cdiv, next_pow2

Tensor = torch.Tensor

# Block sizes (module-level so tests can shrink them to force several tiles, groups and ragged edges).
FLAT_BLOCK = 1024      # elements per program of the elementwise kernels (a multiple of 8)
TILE_ELEMS = 4096      # rows * channels per program of the tile reduction kernels
MAX_BLOCK_C = 64       # channels per program of the reduction and merge kernels
BLOCK_T = 32           # partial rows merged per step by the merge kernels
MERGE_PROGRAMS = 528   # programs a merge launch aims at: 4 per SM of a 132-SM H100 / H200
NUM_WARPS = 4          # every launch (Triton's default, written out so the report compiles the same)
NUM_STAGES = 3

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LAUNCH = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _on_device(t: Tensor):
    """Context running a launch on t's CUDA device (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---- launch plans: grid and meta-parameters of every launch (also read by report_variants.py) ---

def _reduce_plan(m: int, c: int):
    """((tiles, channel blocks), meta) of the tile kernels over an (m rows, c channels) tensor."""
    block_c = min(next_pow2(c), MAX_BLOCK_C)
    block_m = min(next_pow2(m), max(1, TILE_ELEMS // block_c))
    return (cdiv(m, block_m), cdiv(c, block_c)), dict(BLOCK_M=block_m, BLOCK_C=block_c)


def _merge_plan(t: int, c: int):
    """((groups, channel blocks), meta, chunk) of the merge kernels over t partial rows of c channels:
    groups of `chunk` consecutive rows, enough of them for about MERGE_PROGRAMS programs (fewer only
    when t * channel blocks is smaller)."""
    block_c = min(next_pow2(c), MAX_BLOCK_C)
    cblocks = cdiv(c, block_c)
    chunk = cdiv(t, min(t, cdiv(MERGE_PROGRAMS, cblocks)))
    return (cdiv(t, chunk), cblocks), dict(BLOCK_T=BLOCK_T, BLOCK_C=block_c), chunk


def _flat_plan(numel: int):
    """((programs,), meta) of the elementwise kernels."""
    return (cdiv(numel, FLAT_BLOCK),), dict(BLOCK=FLAT_BLOCK)


def _merge_workspace(t: int, c: int, width: int, dev):
    """(grid, meta, chunk, ws, counter) of a merge launch: ws fp32 (G, width, C), counter int32 zeros."""
    grid, meta, chunk = _merge_plan(t, c)
    ws = empty((grid[0], width, c), dtype=torch.float32, device=dev)
    return grid, meta, chunk, ws, torch.zeros(grid[1], dtype=torch.int32, device=dev)


# ---- argument checks ----------------------------------------------------------------------------

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




# ---- host functions -----------------------------------------------------------------------------

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
    has_running = running_mean is not None
    with _on_device(partials):
        mean = empty((c,), dtype=torch.float32, device=dev)
        invstd = empty((c,), dtype=torch.float32, device=dev)
        grid, meta, chunk, ws, counter = _merge_workspace(t, c, 3, dev)
        _finalize_kernel[grid](
            partials, ws, counter, mean, invstd,
            running_mean if has_running else mean, running_var if has_running else invstd,
            t, c, grid[0], chunk, float(momentum), float(eps),
            HAS_RUNNING=has_running, **meta, **_LAUNCH)
    return mean, invstd


def bn_partials(z: Tensor) -> Tensor:
    """fp32 (T, 3, C) per-row-tile [count, mean, M2] of a dense NHWC/NCHW tensor."""
    _check_data("z", z)
    m, c, hw, (s_n, s_hw, s_c), _ = _geometry(z)
    grid, meta = _reduce_plan(m, c)
    with _on_device(z):
        part = empty((grid[0], 3, c), dtype=torch.float32, device=z.device)
        _tile_stats_kernel[grid](z, part, m, c, hw, s_n, s_hw, s_c, **meta, **_LAUNCH)
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
    save = bool(relu and save_mask)
    grid, meta = _flat_plan(numel)
    with _on_device(z):
        y = empty(z.shape, dtype=z.dtype, device=dev, memory_format=_fmt(z))
        mask = empty(((numel + 7) // 8 if save else 0,), dtype=torch.uint8, device=dev)
        _apply_kernel[grid](
            z, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
            residual if residual is not None else z, y, mask if save else y,
            numel, c, c_inner,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
            SAVE_MASK=save, **meta, **_LAUNCH)
    return y, mask


def pack_mask(y: Tensor) -> Tensor:
    """The packed y > 0 bits of a dense tensor, in its memory order (pack_relu_mask's layout)."""
    _check_data("y", y)
    _fmt(y)
    numel = y.numel()
    grid, meta = _flat_plan(numel)
    with _on_device(y):
        mask = empty(((numel + 7) // 8,), dtype=torch.uint8, device=y.device)
        _pack_mask_kernel[grid](y, mask, numel, **meta, **_LAUNCH)
    return mask


def bn_backward(grad_y: Tensor, z: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                training: bool, relu: bool, need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dgamma, dbeta, dres) of y = act(weight * (z - mean) * invstd + bias (+ residual)); see the
    comment above _bwd_tile_kernel (batchnorm_kernels.py). dz and dres in z's dtype and layout (dres
    empty unless need_dres), dgamma and dbeta fp32. grad_y is brought to z's layout (a copy only if it differs)."""
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
    tile_grid, tile_meta = _reduce_plan(m, c)
    t = tile_grid[0]
    mask_arg = mask if relu else z
    fmt = _fmt(z)
    with _on_device(z):
        part = empty((t, 2, c), dtype=torch.float32, device=dev)
        _bwd_tile_kernel[tile_grid](
            grad_y, z, mask_arg, mean, invstd, part, m, c, hw, s_n, s_hw, s_c,
            RELU=bool(relu), **tile_meta, **_LAUNCH)
        dbeta = empty((c,), dtype=torch.float32, device=dev)
        dgamma = empty((c,), dtype=torch.float32, device=dev)
        grid, meta, chunk, ws, counter = _merge_workspace(t, c, 2, dev)
        _bwd_reduce_kernel[grid](part, ws, counter, dbeta, dgamma, t, c, grid[0], chunk, **meta, **_LAUNCH)
        dz = empty(z.shape, dtype=z.dtype, device=dev, memory_format=fmt)
        dres = empty(z.shape if need_dres else (0,), dtype=z.dtype, device=dev,
                     memory_format=fmt if need_dres else torch.contiguous_format)
        flat_grid, flat_meta = _flat_plan(numel)
        _bwd_dz_kernel[flat_grid](
            grad_y, z, mask_arg, mean, invstd, weight if weight is not None else mean, dbeta, dgamma,
            dz, dres if need_dres else dz, numel, c, c_inner, 1.0 / m,
            HAS_W=weight is not None, TRAINING=bool(training), RELU=bool(relu), NEED_DRES=bool(need_dres),
            **flat_meta, **_LAUNCH)
    return dz, dgamma, dbeta, dres

