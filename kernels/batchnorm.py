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

import functools
from typing import Optional, Tuple

import torch

from fastres.kernels import alloc as _alloc
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


# ---- argument checks, from metadata -------------------------------------------------------------
# Every host function checks its arguments and plans its launches from the tensors' metadata alone
# (shape, strides, dtype, device: never their values), so the plan is remembered per metadata key
# (functools.lru_cache: sound, as every input of the plan is in the key, the block sizes above too);
# a bad call raises and, raising, is not remembered.

_ORDER = {torch.contiguous_format: (3, 2, 1, 0), torch.channels_last: (1, 3, 2, 0)}   # innermost dim first


def _m(t):
    """The plan-key metadata of a tensor argument: (shape, strides, dtype, device); None for None."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        return ("not a tensor", type(t).__name__)
    return t.shape, t.stride(), t.dtype, t.device


def _key(*ts) -> tuple:
    """A plan's key: _m of each argument, then the block sizes (module attributes, read per call).
    One comprehension on the per-call path; an argument that is not a tensor takes _m's slow form."""
    try:
        metas = [None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in ts]
    except (AttributeError, TypeError):
        metas = [_m(t) for t in ts]
    return (*metas, (FLAT_BLOCK, TILE_ELEMS, MAX_BLOCK_C, BLOCK_T, MERGE_PROGRAMS))


def _dense_in(meta, fmt) -> bool:
    """Whether a 4-D tensor is dense in `fmt`, as torch's is_contiguous(memory_format=fmt) decides it
    (dimensions of size 1 have any stride)."""
    shape, strides = meta[0], meta[1]
    expected = 1
    for d in _ORDER[fmt]:
        if shape[d] != 1 and strides[d] != expected:
            return False
        expected *= shape[d]
    return True


def _fmt(meta) -> torch.memory_format:
    """The dense layout of a 4-D tensor (contiguous wins when both hold: then they coincide)."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        if _dense_in(meta, fmt):
            return fmt
    raise ValueError(f"fastres batchnorm: expected a dense NHWC (channels_last) or NCHW (contiguous) tensor, "
                     f"got shape {tuple(meta[0])} with strides {meta[1]}")


def _geometry(meta):
    """(M, C, HW, (s_n, s_hw, s_c), C_INNER, format) of a dense 4-D tensor."""
    n, c, h, w = meta[0]
    hw = h * w
    fmt = _fmt(meta)
    if fmt == torch.channels_last:
        return n * hw, c, hw, (hw * c, c, 1), 1, fmt
    return n * hw, c, hw, (c * hw, 1, hw), hw, fmt


def _check_data(name: str, meta) -> None:
    if meta is None or meta[0] == "not a tensor" or len(meta[0]) != 4:
        got = ("None" if meta is None else meta[1] if meta[0] == "not a tensor" else f"{len(meta[0])}-D tensor")
        raise ValueError(f"fastres batchnorm: expected {name} as a 4-D (N, C, H, W) tensor, got {got}")
    if meta[2] not in _DTYPES:
        raise TypeError(f"fastres batchnorm: expected {name} of dtype float32, float16 or bfloat16, got {meta[2]}")
    if meta[0].numel() == 0:
        raise ValueError(f"fastres batchnorm: expected a non-empty {name}, got shape {tuple(meta[0])}")
    _fmt(meta)


def _check_vec(name: str, meta, c: int, device, fp32: bool = False) -> None:
    if meta is None:
        return
    if meta[0] == "not a tensor":
        raise TypeError(f"fastres batchnorm: expected {name} as a tensor, got {meta[1]}")
    shape, strides, dtype, dev = meta
    if tuple(shape) != (c,) or (c > 1 and strides[0] != 1):
        raise ValueError(f"fastres batchnorm: expected {name} as a contiguous ({c},) tensor, got shape "
                         f"{tuple(shape)} strides {strides}")
    if dev != device:
        raise RuntimeError(f"fastres batchnorm: expected {name} on {device}, got {dev}")
    if fp32 and dtype != torch.float32:
        raise TypeError(f"fastres batchnorm: expected {name} of dtype float32, got {dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"fastres batchnorm: expected a floating-point {name}, got {dtype}")


def _check_like(name: str, meta, ref, fmt) -> bool:
    """Check that `meta` matches ref's shape, dtype and device; True when it must be copied into fmt."""
    if meta is None or meta[0] == "not a tensor" or tuple(meta[0]) != tuple(ref[0]):
        got = "None" if meta is None else meta[1] if meta[0] == "not a tensor" else tuple(meta[0])
        raise ValueError(f"fastres batchnorm: expected {name} of shape {tuple(ref[0])}, got {got}")
    if meta[2] != ref[2]:
        raise TypeError(f"fastres batchnorm: expected {name} of dtype {ref[2]} (z's), got {meta[2]}")
    if meta[3] != ref[3]:
        raise RuntimeError(f"fastres batchnorm: expected {name} on {ref[3]}, got {meta[3]}")
    return not _dense_in(meta, fmt)


# ---- plans (remembered per metadata key) ---------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _finalize_plan(part, rmean, rvar, blocks):
    shape = part[0] if part is not None and part[0] != "not a tensor" else ()
    if len(shape) != 3 or shape[1] != 3 or part[2] != torch.float32 or shape[0] == 0:
        got = f"{part[2]} {tuple(shape)}" if shape else "no tensor"
        raise ValueError(f"bn_finalize: expected fp32 partials of shape (T, 3, C) with T >= 1, got {got}")
    t, _, c = shape
    dev = part[3]
    if (rmean is None) != (rvar is None):
        raise ValueError("bn_finalize: running_mean and running_var must be given together")
    _check_vec("running_mean", rmean, c, dev)
    _check_vec("running_var", rvar, c, dev)
    dense = part[1] == (3 * c, c, 1) or t * c == 0
    return t, c, dense, _merge_plan(t, c)


@functools.lru_cache(maxsize=4096)
def _partials_plan(z, blocks):
    _check_data("z", z)
    m, c, hw, strides, _, _ = _geometry(z)
    return m, c, hw, strides, _reduce_plan(m, c)


@functools.lru_cache(maxsize=4096)
def _apply_plan(z, mean, invstd, weight, bias, residual, blocks):
    _check_data("z", z)
    c, dev = z[0][1], z[3]
    for name, v in (("mean", mean), ("invstd", invstd)):
        if v is None:
            raise ValueError(f"bn_apply: expected {name} as a float32 ({c},) tensor, got None")
        _check_vec(name, v, c, dev, fp32=True)
    _check_vec("weight", weight, c, dev)
    _check_vec("bias", bias, c, dev)
    _, _, _, _, c_inner, fmt = _geometry(z)
    copy_res = residual is not None and _check_like("residual", residual, z, fmt)
    numel = z[0].numel()
    return fmt, c, c_inner, numel, copy_res, _flat_plan(numel)


@functools.lru_cache(maxsize=4096)
def _backward_plan(relu: bool, grad_y, z, mask, mean, invstd, weight, blocks):
    _check_data("z", z)
    m, c, hw, strides, c_inner, fmt = _geometry(z)
    copy_g = _check_like("grad_y", grad_y, z, fmt)
    dev = z[3]
    for name, v in (("mean", mean), ("invstd", invstd)):
        _check_vec(name, v, c, dev, fp32=True)
    _check_vec("weight", weight, c, dev)
    numel = z[0].numel()
    if relu:
        nbytes = (numel + 7) // 8
        if mask is None or mask[0] == "not a tensor" or mask[2] != torch.uint8 or len(mask[0]) != 1 \
                or mask[0][0] != nbytes:
            got = "None" if mask is None else f"{mask[2]} {tuple(mask[0])}"
            raise ValueError(f"bn_backward: relu needs the packed mask, a uint8 ({nbytes},) tensor; got {got}")
        if mask[3] != dev:
            raise RuntimeError(f"bn_backward: expected mask on {dev}, got {mask[3]}")
    tile = _reduce_plan(m, c)
    return (m, c, hw, strides, c_inner, fmt, numel, copy_g, tile, _merge_plan(tile[0][0], c), _flat_plan(numel))


# ---- host functions -----------------------------------------------------------------------------
# Each looks its plan up (one key: _key), then launches under the CUDA device of its tensors (Triton
# launches on the current device); on CPU tensors (the interpreter) there is no device to enter.

def bn_finalize(partials: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                momentum: float, eps: float) -> Tuple[Tensor, Tensor]:
    """Merge per-tile [count, mean, M2] partials (fp32 (T, 3, C)) into fp32 (mean, invstd), invstd =
    1/sqrt(biased var + eps); when running stats are given, update them in place as nn.BatchNorm2d does:
    r_mean = (1-m) r_mean + m mean, r_var = (1-m) r_var + m var n/(n-1), m = `momentum` (the effective factor)."""
    plan = _finalize_plan(*_key(partials, running_mean, running_var))
    if partials.is_cuda:
        with torch.cuda.device(partials.device):
            return _finalize(plan, partials, running_mean, running_var, momentum, eps)
    return _finalize(plan, partials, running_mean, running_var, momentum, eps)


def _finalize(plan, partials, running_mean, running_var, momentum, eps):
    t, c, dense, (grid, meta, chunk) = plan
    partials = partials if dense else partials.contiguous()
    dev = partials.device
    has_running = running_mean is not None
    empty = _alloc.empty
    mean = empty((c,), dtype=torch.float32, device=dev)
    invstd = empty((c,), dtype=torch.float32, device=dev)
    ws = empty((grid[0], 3, c), dtype=torch.float32, device=dev)
    _finalize_kernel[grid](
        partials, ws, torch.zeros(grid[1], dtype=torch.int32, device=dev), mean, invstd,
        running_mean if has_running else mean, running_var if has_running else invstd,
        t, c, grid[0], chunk, float(momentum), float(eps),
        HAS_RUNNING=has_running, **meta, **_LAUNCH)
    return mean, invstd


def bn_partials(z: Tensor) -> Tensor:
    """fp32 (T, 3, C) per-row-tile [count, mean, M2] of a dense NHWC/NCHW tensor."""
    m, c, hw, (s_n, s_hw, s_c), (grid, meta) = _partials_plan(*_key(z))
    part = _alloc.empty((grid[0], 3, c), dtype=torch.float32, device=z.device)
    if z.is_cuda:
        with torch.cuda.device(z.device):
            _tile_stats_kernel[grid](z, part, m, c, hw, s_n, s_hw, s_c, **meta, **_LAUNCH)
    else:
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
    plan = _apply_plan(*_key(z, mean, invstd, weight, bias, residual))
    if z.is_cuda:
        with torch.cuda.device(z.device):
            return _apply(plan, z, mean, invstd, weight, bias, residual, relu, save_mask)
    return _apply(plan, z, mean, invstd, weight, bias, residual, relu, save_mask)


def _apply(plan, z, mean, invstd, weight, bias, residual, relu, save_mask):
    fmt, c, c_inner, numel, copy_res, (grid, meta) = plan
    if copy_res:
        residual = residual.contiguous(memory_format=fmt)
    save = bool(relu and save_mask)
    dev = z.device
    y = _alloc.empty(z.shape, dtype=z.dtype, device=dev, memory_format=fmt)
    mask = _alloc.empty(((numel + 7) // 8 if save else 0,), dtype=torch.uint8, device=dev)
    _apply_kernel[grid](
        z, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
        residual if residual is not None else z, y, mask if save else y,
        numel, c, c_inner,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
        SAVE_MASK=save, **meta, **_LAUNCH)
    return y, mask


def pack_mask(y: Tensor) -> Tensor:
    """The packed y > 0 bits of a dense tensor, in its memory order (pack_relu_mask's layout)."""
    m = _m(y)
    _check_data("y", m)
    numel = y.numel()
    grid, meta = _flat_plan(numel)
    mask = _alloc.empty(((numel + 7) // 8,), dtype=torch.uint8, device=y.device)
    if y.is_cuda:
        with torch.cuda.device(y.device):
            _pack_mask_kernel[grid](y, mask, numel, **meta, **_LAUNCH)
    else:
        _pack_mask_kernel[grid](y, mask, numel, **meta, **_LAUNCH)
    return mask


def bn_backward(grad_y: Tensor, z: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                training: bool, relu: bool, need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dgamma, dbeta, dres) of y = act(weight * (z - mean) * invstd + bias (+ residual)); see the
    comment above _bwd_tile_kernel (batchnorm_kernels.py). dz and dres in z's dtype and layout (dres
    empty unless need_dres), dgamma and dbeta fp32. grad_y is brought to z's layout (a copy only if it differs)."""
    plan = _backward_plan(bool(relu), *_key(grad_y, z, mask, mean, invstd, weight))
    if z.is_cuda:
        with torch.cuda.device(z.device):
            return _backward(plan, grad_y, z, mask, mean, invstd, weight, training, relu, need_dres)
    return _backward(plan, grad_y, z, mask, mean, invstd, weight, training, relu, need_dres)


def _backward(plan, grad_y, z, mask, mean, invstd, weight, training, relu, need_dres):
    (m, c, hw, (s_n, s_hw, s_c), c_inner, fmt, numel, copy_g, (tile_grid, tile_meta), (grid, meta, chunk),
     (flat_grid, flat_meta)) = plan
    if copy_g:
        grad_y = grad_y.contiguous(memory_format=fmt)
    t = tile_grid[0]
    mask_arg = mask if relu else z
    dev = z.device
    empty = _alloc.empty
    part = empty((t, 2, c), dtype=torch.float32, device=dev)
    _bwd_tile_kernel[tile_grid](
        grad_y, z, mask_arg, mean, invstd, part, m, c, hw, s_n, s_hw, s_c,
        RELU=bool(relu), **tile_meta, **_LAUNCH)
    dbeta = empty((c,), dtype=torch.float32, device=dev)
    dgamma = empty((c,), dtype=torch.float32, device=dev)
    ws = empty((grid[0], 2, c), dtype=torch.float32, device=dev)
    _bwd_reduce_kernel[grid](part, ws, torch.zeros(grid[1], dtype=torch.int32, device=dev), dbeta, dgamma,
                             t, c, grid[0], chunk, **meta, **_LAUNCH)
    dz = empty(z.shape, dtype=z.dtype, device=dev, memory_format=fmt)
    dres = empty(z.shape if need_dres else (0,), dtype=z.dtype, device=dev,
                 memory_format=fmt if need_dres else torch.contiguous_format)
    _bwd_dz_kernel[flat_grid](
        grad_y, z, mask_arg, mean, invstd, weight if weight is not None else mean, dbeta, dgamma,
        dz, dres if need_dres else dz, numel, c, c_inner, 1.0 / m,
        HAS_W=weight is not None, TRAINING=bool(training), RELU=bool(relu), NEED_DRES=bool(need_dres),
        **flat_meta, **_LAUNCH)
    return dz, dgamma, dbeta, dres
