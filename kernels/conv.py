"""Implicit-GEMM conv2d over NHWC in Triton, with the fused epilogues of fastres.

The convolution is one GEMM, never materialised as im2col:

    M      = N * Ho * Wo     rows: output positions (n, ho, wo), in channels_last order
    N_gemm = Cout            columns: output channels
    K      = kh * kw * Cin   reduction, ordered (r, s, c): filter row, filter column, input channel

Row m and reduction index k = (r, s, c) read the input element
x[n, c, ho * stride_h - pad_h + r * dil_h, wo * stride_w - pad_w + s * dil_w] (zero outside the
image: padding is a load mask). The host re-lays the weight once per call as a (K, Cout) contiguous
matrix, so its tiles are plain 2-D loads. tl.dot accumulates in fp32.

Epilogue, on the fp32 accumulator of one (BLOCK_M, BLOCK_N) tile, v = conv + bias:
* training (want_stats): the tile's per-channel (count, mean, M2) of v over its valid rows, written
  to its own row of a (T, 3, Cout) fp32 buffer (T = number of M tiles). No atomics: the result does
  not depend on scheduling; :func:`merge_stats` (or the BN finalize kernel) merges the T partials.
* out = act(v * scale[c] + shift[c] + residual), stored in the input dtype, channels_last.
  Inference passes BatchNorm folded into scale/shift; training passes none of them and keeps v.

Host functions: :func:`conv2d_nhwc` (allocate + launch), :func:`conv2d_nhwc_supports` (which calls
the kernel covers) and :func:`merge_stats` (Chan's merge of the partials, plain torch).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from fastres.kernels import alloc as _alloc
from fastres.kernels import interpreter_active

Tensor = torch.Tensor
IntPair = Union[int, Sequence[int]]

__all__ = ["conv2d_nhwc", "conv2d_nhwc_supports", "merge_stats", "GPU_CONFIGS", "BLOCK_M_GPU",
           "BLOCK_M_INTERPRETER"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2 ** 31 - 1

# Rows per tile. Fixed per platform (not tuned) because the host sizes the statistics buffer,
# T = cdiv(M, BLOCK_M), before the launch.
BLOCK_M_GPU = 128
BLOCK_M_INTERPRETER = 64

# The interpreter runs exactly one config (autotune with several fails there): large blocks, so
# few programs run through the slow interpreter.
_INTERPRETER_META = dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)

# GPU autotune list, keyed on the GEMM shape. Chosen as plausible for an H100 (tensor-core tiles
# of 128 x 64/128 x 32/64, 4-8 warps, 3-4 pipeline stages); it has NOT been measured here (no GPU
# on the machine this was written on). Configs that exceed shared memory (fp32, large tiles, 4
# stages) are discarded by the autotuner as out of resources.
GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]


@triton.jit
def _conv_kernel(
    # pointers
    X,        # input, element (n, c, h, w) at n*sxn + c*sxc + h*sxh + w*sxw (channels_last in practice)
    Wt,       # weight re-laid as (K, Cout) contiguous, K ordered (r, s, c); same dtype as X
    BIAS,     # (Cout,) fp32 conv bias, read when HAS_BIAS
    SCALE,    # (Cout,) fp32 per-channel scale, read when HAS_SCALE
    SHIFT,    # (Cout,) fp32 per-channel shift, read when HAS_SHIFT
    RES,      # residual (N, Cout, Ho, Wo), dtype of X, strides srn/src/srh/srw, read when HAS_RES
    OUT,      # output (N, Cout, Ho, Wo) channels_last contiguous: element (m, c) at m*COUT + c
    PART,     # (T, 3, Cout) fp32 contiguous tile statistics [count, mean, M2], written when WANT_STATS
    # sizes
    M,        # N * Ho * Wo, GEMM rows
    COUT,     # output channels, GEMM columns
    CIN,      # input channels
    H, W,     # input height, width
    HO, WO,   # output height, width
    K,        # kh * kw * Cin, GEMM reduction length
    KW,       # filter width (the filter height is implied by K)
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,  # conv geometry, as in F.conv2d
    # strides (in elements)
    sxn, sxc, sxh, sxw,   # of X
    srn, src, srh, srw,   # of RES
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, WANT_STATS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" or "tf32" (matters for fp32 inputs only)
    BLOCK_M: tl.constexpr,    # rows per tile (fixed by the host: sizes the statistics buffer)
    BLOCK_N: tl.constexpr,    # output channels per tile
    BLOCK_K: tl.constexpr,    # reduction step
):
    # Program -> tile. Column tiles vary fastest, so programs running together share input rows.
    pid = tl.program_id(0)
    num_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BLOCK_M] output positions m
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # [BLOCK_N] output channels
    row_ok = rows < M
    col_ok = cols < COUT

    # m -> (n, ho, wo); the top-left input pixel each output row reads.
    n_img = rows // (HO * WO)
    rem = rows % (HO * WO)
    ho = rem // WO
    wo = rem % WO
    h0 = ho * STRIDE_H - PAD_H
    w0 = wo * STRIDE_W - PAD_W
    x_row = n_img * sxn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kcin = KW * CIN
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)               # [BLOCK_K] reduction indices (r, s, c)
        k_ok = ks < K
        r = ks // kcin
        s = (ks % kcin) // CIN
        c = ks % CIN
        hi = h0[:, None] + (r * DIL_H)[None, :]       # [BLOCK_M, BLOCK_K]
        wi = w0[:, None] + (s * DIL_W)[None, :]
        a_ok = (row_ok[:, None] & k_ok[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))
        a_off = x_row[:, None] + hi * sxh + wi * sxw + (c * sxc)[None, :]
        a = tl.load(X + a_off, mask=a_ok, other=0.0)
        b_off = ks[:, None] * COUT + cols[None, :]
        b = tl.load(Wt + b_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    v = acc
    if HAS_BIAS:
        v += tl.load(BIAS + cols, mask=col_ok, other=0.0)[None, :]

    if WANT_STATS:
        # Per-channel (count, mean, M2) of v over this tile's valid rows.
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        vm = tl.where(row_ok[:, None], v, 0.0)
        mean = tl.sum(vm, axis=0) / count
        d = tl.where(row_ok[:, None], v - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        p = PART + pid_m * 3 * COUT + cols
        tl.store(p, tl.zeros([BLOCK_N], dtype=tl.float32) + count, mask=col_ok)
        tl.store(p + COUT, mean, mask=col_ok)
        tl.store(p + 2 * COUT, m2, mask=col_ok)

    y = v
    if HAS_SCALE:
        y = y * tl.load(SCALE + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(SHIFT + cols, mask=col_ok, other=0.0)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        r_off = (n_img * srn + ho * srh + wo * srw)[:, None] + (cols * src)[None, :]
        y = y + tl.load(RES + r_off, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # ReLU that keeps NaN, as torch.relu (maximum would drop it)
    tl.store(OUT + rows[:, None] * COUT + cols[None, :], y.to(OUT.dtype.element_ty), mask=ok)


# GPU: autotuned over BLOCK_N, BLOCK_K, warps and stages, per GEMM shape and epilogue.
_conv_kernel_tuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["M", "COUT", "CIN", "K", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "HAS_RES", "RELU",
         "WANT_STATS", "PRECISION"],
)(_conv_kernel)


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"conv2d_nhwc: {name} must be an int or a pair of ints, got {v!r}")
    return v


def _out_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def conv2d_nhwc_supports(x: Tensor, weight: Tensor, stride: IntPair = 1, padding: IntPair = 0,
                         dilation: IntPair = 1, groups: int = 1) -> Optional[str]:
    """None when the Triton conv covers this call, else a short reason ("groups=2", "dtype float64", ...)."""
    if groups != 1:
        return f"groups={groups}"
    if not isinstance(x, Tensor) or x.dim() != 4 or not isinstance(weight, Tensor) or weight.dim() != 4:
        return "input and weight must be 4-D tensors"
    xdt, wdt = (str(t.dtype).replace("torch.", "") for t in (x, weight))
    if x.dtype not in _DTYPES:
        return f"dtype {xdt}"
    if weight.dtype != x.dtype:
        return f"weight dtype {wdt} != input dtype {xdt}"
    if x.device.type == "cpu":
        if not interpreter_active():
            return "cpu tensors without TRITON_INTERPRET=1"
        if x.dtype == torch.bfloat16:
            return "bfloat16 under the Triton interpreter"
    elif x.device.type != "cuda":
        return f"device {x.device.type}"
    if weight.device != x.device:
        return f"weight on {weight.device}, input on {x.device}"
    try:
        stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                     _pair(dilation, "dilation"))
    except ValueError as e:
        return str(e)
    if min(stride) < 1:
        return f"stride {stride} (each must be >= 1)"
    if min(dilation) < 1:
        return f"dilation {dilation} (each must be >= 1)"
    if min(padding) < 0:
        return f"padding {padding} (each must be >= 0)"
    if x.shape[1] != weight.shape[1]:
        return f"input channels {x.shape[1]} != weight channels {weight.shape[1]}"
    if x.shape[1] == 0 or weight.shape[0] == 0:
        return "zero channels"
    ho, wo = _out_hw(x, weight, stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        return f"empty output {ho}x{wo}"
    out_numel = x.shape[0] * weight.shape[0] * ho * wo
    if max(x.numel(), out_numel, weight.numel()) > _INT32_LIMIT:
        return "tensor too large for int32 indexing"
    return None


def _param(t: Optional[Tensor], name: str, cout: int, device: torch.device) -> Optional[Tensor]:
    """A per-channel vector as fp32 contiguous, checked."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"conv2d_nhwc: expected {name} to be a floating-point tensor, got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if tuple(t.shape) != (cout,):
        raise ValueError(f"conv2d_nhwc: expected {name} of shape ({cout},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"conv2d_nhwc: expected {name} on {device}, got {t.device}")
    return t.to(torch.float32).contiguous()


def conv2d_nhwc(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride: IntPair = (1, 1),
                padding: IntPair = (0, 0), dilation: IntPair = (1, 1), scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None, residual: Optional[Tensor] = None, relu: bool = False,
                want_stats: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """out = act((conv2d(x, weight) + bias) * scale[c] + shift[c] + residual), and, when want_stats,
    per-tile partial statistics of v = conv2d(x, weight) + bias (before scale/shift/residual/relu).

    x: (N, Cin, H, W) fp32/fp16/bf16, any memory format (made channels_last here if it is not);
    weight: (Cout, Cin, kh, kw), dtype of x; bias/scale/shift: (Cout,) any float dtype (used in fp32);
    residual: (N, Cout, Ho, Wo), dtype of x, any memory format. groups=1 only.
    fp32 inputs use TF32 tensor cores exactly when torch.backends.cudnn.allow_tf32 is True (the flag
    PyTorch's own convolutions follow); otherwise full fp32 products.

    Returns (out, partials): out (N, Cout, Ho, Wo) channels_last in x's dtype, allocated with
    fastres.kernels.alloc.empty; partials a (T, 3, Cout) fp32 tensor, T = cdiv(N*Ho*Wo, BLOCK_M), holding
    [count, mean, M2] of each M tile per channel (count = valid rows of the tile), or None.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"{x.dim()}-D tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"conv2d_nhwc: expected a 4-D input (N, Cin, H, W), got {got}")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        got = f"{weight.dim()}-D tensor" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"conv2d_nhwc: expected a 4-D weight (Cout, Cin, kh, kw), got {got}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"conv2d_nhwc: expected input dtype float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv2d_nhwc: expected weight of the input's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"conv2d_nhwc: expected weight on the input's device {x.device}, got {weight.device}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d_nhwc: expected input with {weight.shape[1]} channels (weight "
                         f"{tuple(weight.shape)}, groups=1), got input of shape {tuple(x.shape)}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    why = conv2d_nhwc_supports(x, weight, stride, padding, dilation, 1)
    if why is not None:
        raise ValueError(f"conv2d_nhwc: the Triton conv does not cover this call: {why}")

    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = _out_hw(x, weight, stride, padding, dilation)
    m, k = n * ho * wo, kh * kw * cin
    dev = x.device
    bias, scale, shift = (_param(t, nm, cout, dev) for t, nm in ((bias, "bias"), (scale, "scale"),
                                                                  (shift, "shift")))
    if residual is not None:
        if not isinstance(residual, Tensor) or tuple(residual.shape) != (n, cout, ho, wo):
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"conv2d_nhwc: expected residual of shape {(n, cout, ho, wo)} (the conv "
                             f"output), got {got}")
        if residual.dtype != x.dtype:
            raise TypeError(f"conv2d_nhwc: expected residual of the input's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != dev:
            raise ValueError(f"conv2d_nhwc: expected residual on {dev}, got {residual.device}")

    xc = x.contiguous(memory_format=torch.channels_last)
    wt = weight.permute(2, 3, 1, 0).reshape(k, cout).contiguous()   # (K, Cout), K ordered (r, s, c)
    out = _alloc.empty((n, cout, ho, wo), dtype=x.dtype, device=dev, memory_format=torch.channels_last)

    interp = dev.type == "cpu"
    block_m = BLOCK_M_INTERPRETER if interp else BLOCK_M_GPU
    tiles_m = triton.cdiv(m, block_m)
    part = (_alloc.empty((tiles_m, 3, cout), dtype=torch.float32, device=dev) if want_stats else None)
    if m == 0:
        return out, part

    # fp32: "ieee" (full fp32 products) unless PyTorch's conv flag allows TF32; fp16/bf16: the
    # default ("tf32"), which does not change 16-bit products.
    ieee = x.dtype == torch.float32 and (interp or not torch.backends.cudnn.allow_tf32)
    dummy = out  # stands in for absent optional pointers (never read: its flag is off)
    res = residual if residual is not None else out
    args = (xc, wt, bias if bias is not None else dummy, scale if scale is not None else dummy,
            shift if shift is not None else dummy, res, out, part if part is not None else dummy,
            m, cout, cin, h, w, ho, wo, k, kw, stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1],
            xc.stride(0), xc.stride(1), xc.stride(2), xc.stride(3),
            res.stride(0), res.stride(1), res.stride(2), res.stride(3))
    flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                 HAS_RES=residual is not None, RELU=bool(relu), WANT_STATS=bool(want_stats),
                 PRECISION="ieee" if ieee else "tf32", BLOCK_M=block_m)
    if interp:
        meta = _INTERPRETER_META
        grid = (tiles_m * triton.cdiv(cout, meta["BLOCK_N"]),)
        _conv_kernel[grid](*args, **flags, **meta)
    else:
        def grid(meta):
            return (tiles_m * triton.cdiv(cout, meta["BLOCK_N"]),)
        with torch.cuda.device(dev):
            _conv_kernel_tuned[grid](*args, **flags)
    return out, part


def merge_stats(partials: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Chan's parallel merge of per-tile (count, mean, M2) partials, in plain torch.

    partials: (T, 3, C) as returned by conv2d_nhwc(want_stats=True).
    Returns (mean, var_biased, count), each a (C,) fp32 tensor (count is the same for every channel:
    the number of rows merged). Computed in float64:
        n = sum n_t,  mean = sum n_t * mean_t / n,  M2 = sum M2_t + sum n_t * (mean_t - mean)^2,
        var_biased = M2 / n.
    """
    if not isinstance(partials, Tensor) or partials.dim() != 3 or partials.shape[1] != 3:
        got = tuple(partials.shape) if isinstance(partials, Tensor) else type(partials).__name__
        raise ValueError(f"merge_stats: expected partials of shape (T, 3, C), got {got}")
    p = partials.to(torch.float64)
    cnt, mu, m2 = p[:, 0], p[:, 1], p[:, 2]
    n = cnt.sum(0)
    mean = (cnt * mu).sum(0) / n
    var = (m2.sum(0) + (cnt * (mu - mean) ** 2).sum(0)) / n
    return mean.float(), var.float(), n.float()
