"""The Triton implicit-GEMM conv kernel (mainloop v2: tap-major) and its config model.

GEMM view of a conv over NHWC (channels_last) data:

    M      = N * Ho * Wo          rows: output positions (n, ho, wo), in channels_last order
    N_gemm = Cout                 columns: output channels
    K      = kh * kw * CIN_P      reduction, ordered (r, s, c): filter row, filter column, channel

CIN_P is Cin rounded up to a multiple of 16 (the host zero-pads the input channels when needed), so
every K-step of BLOCK_K channels (BLOCK_K divides CIN_P) lies inside one filter tap (r, s): the
activation tile of a K-step is, for each output row m, BLOCK_K contiguous channels of one input pixel.
Its load is a 2-D tile of 16-byte vectors that Triton's software pipeline turns into cp.async; the
only mask is per row (the tap falls into the zero padding, or m >= M): each row's taps inside the image
are one bit mask computed once per tile, so a K-step tests one bit per row. 1x1/unpadded convs, whose
taps are always inside the image, have no mask. (The stem, stride 2 over 3 channels, reaches the kernel
rewritten by space-to-depth as an unpadded 4x4 conv over 16 channels: kernels/conv_s2d.py.)
The weight is the channels_last weight (Cout, kh, kw, CIN_P) viewed as a (Cout, K) matrix: K-step kk
reads columns kk*BLOCK_K.. of it.

The loop runs over KH * KW * (CIN_P // BLOCK_K) steps; the tap (r, s) and the channel offset c0 are
carried from step to step (no division in the loop), and the row decomposition m -> (n, ho, wo)
happens once per tile, before the loop.

Epilogue on the fp32 accumulator of a (BLOCK_M, BLOCK_N) tile, v = conv + bias:
* WANT_STATS: per-channel (count, mean, M2) of v over the tile's valid rows, written to row pid_m of a
  (T, 3, Cout) fp32 buffer (T = cdiv(M, BLOCK_M)): deterministic, no atomics.
* out = act(v * scale[c] + shift[c] + residual), stored channels_last in OUT's dtype.
"""
from __future__ import annotations

from typing import Dict, List

import triton
import triton.language as tl

from . import interpreter_active

__all__ = ["_conv_kernel", "loop_bound", "GPU_CONFIGS", "BLOCK_M_GPU", "BLOCK_M_INTERPRETER", "prune_configs",
           "shared_bytes", "config_fits", "CHANNEL_ALIGN", "MAX_SHARED_SM90"]

# Rows per tile, fixed per platform (not tuned): the host sizes the statistics buffer, T = cdiv(M, BLOCK_M),
# before the launch.
BLOCK_M_GPU = 128
BLOCK_M_INTERPRETER = 128
CHANNEL_ALIGN = 16          # CIN_P is a multiple of this: one bf16 wgmma k-step, 32 bytes of a pixel
MAX_SHARED_SM90 = 232448    # bytes of shared memory one block may use on an H100 / H200
ACC_REGS_MAX = 64           # fp32 accumulator registers per thread a config may hold (more spills)
GROUP_M = 8                 # tile swizzle: GROUP_M row tiles share their weight columns in L2

# Triton 3.6's interpreter turns a runtime loop bound into an int with int() of a one-element 1-D array,
# which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"; Triton 3.8
# squeezes the array first). loop_bound(x) hands the interpreter a Python int; compiled, INTERPRETED is
# False, the branch is dropped before code generation and the inlined call is x itself (same PTX).
INTERPRETED: tl.constexpr = tl.constexpr(interpreter_active())


@triton.jit
def loop_bound(x):
    """A runtime scalar used as a range() bound (see INTERPRETED)."""
    if INTERPRETED:
        if isinstance(x, tl.tensor):  # (returned, not assigned: the interpreter wraps assigned values again)
            return x.handle.data.item()
    return x


# GPU autotune list (BLOCK_M = 128 fixed). Plausible for Hopper, not measured here: prune_configs
# removes, per shape, those whose BLOCK_K does not divide CIN_P, whose BLOCK_N is wider than needed,
# and those the shared-memory / register model says cannot fit.
GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=4),    # CIN_P = 16 (stem)
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=4),   # CIN_P = 16 (stem)
]


def shared_bytes(block_m: int, block_n: int, block_k: int, stages: int, elem_bytes: int) -> int:
    """Shared memory of a config: the pipeline's A and B buffers, or the epilogue's fp32 tile
    (layout conversion / reductions), whichever is larger (they are not live together)."""
    pipeline = stages * (block_m * block_k + block_k * block_n) * elem_bytes
    return max(pipeline, block_m * block_n * 4) + 1024


def config_fits(block_m: int, block_n: int, block_k: int, warps: int, stages: int, elem_bytes: int,
                max_shared: int) -> bool:
    acc_regs = block_m * block_n // (32 * warps)
    return acc_regs <= ACC_REGS_MAX and shared_bytes(block_m, block_n, block_k, stages, elem_bytes) <= max_shared


def prune_configs(configs, cin_p: int, cout: int, elem_bytes: int, max_shared: int,
                  block_m: int = BLOCK_M_GPU) -> List[triton.Config]:
    """The configs the launcher may pick for a conv with CIN_P channels and Cout outputs."""
    ks = {c.kwargs["BLOCK_K"] for c in configs if cin_p % c.kwargs["BLOCK_K"] == 0}
    best_k = [k for k in ks if k >= 32] or sorted(ks)[:1]   # BLOCK_K 16 only where nothing larger divides
    widest = max(64, triton.next_power_of_2(cout))
    out = [c for c in configs
           if c.kwargs["BLOCK_K"] in best_k and c.kwargs["BLOCK_N"] <= widest
           and config_fits(block_m, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages,
                           elem_bytes, max_shared)]
    return out


def _max_shared(device) -> int:
    try:
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(device.index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - no driver query: assume Hopper
        return MAX_SHARED_SM90


def early_config_prune(configs, named_args: Dict, **kwargs) -> List[triton.Config]:
    """Autotuner hook (prune_configs_by): the same model as prune_configs, on the launch's arguments."""
    x = named_args["X"]
    return prune_configs(configs, named_args["CIN_P"], named_args["COUT"], x.element_size(), _max_shared(x.device),
                         kwargs.get("BLOCK_M", BLOCK_M_GPU))


@triton.jit
def _conv_kernel(
    # pointers
    X,        # input (N, H, W, CIN_P) channels_last; element (n, h, w, c) at n*sxn + h*sxh + w*sxw + c
    Wt,       # weight (Cout, KH, KW, CIN_P) contiguous = (Cout, K_P) matrix, dtype of X
    BIAS,     # (Cout,) fp32 conv bias, read when HAS_BIAS
    SCALE,    # (Cout,) fp32 per-channel scale, read when HAS_SCALE
    SHIFT,    # (Cout,) fp32 per-channel shift, read when HAS_SHIFT
    RES,      # residual (N, Cout, Ho, Wo), dtype of X, strides srn/src/srh/srw, read when HAS_RES
    OUT,      # output (N, Cout, Ho, Wo) channels_last contiguous: element (m, c) at m*COUT + c
    PART,     # (T, 3, Cout) fp32 contiguous tile statistics [count, mean, M2], written when WANT_STATS
    # sizes
    M,        # N * Ho * Wo, GEMM rows
    COUT,     # output channels, GEMM columns
    H, W,     # input height, width
    HO, WO,   # output height, width
    CIN_P,    # channels of X as stored (multiple of 16 and of BLOCK_K)
    K_P,      # KH * KW * CIN_P: length of a weight row
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,  # conv geometry, as in F.conv2d
    # strides (in elements)
    sxn, sxh, sxw,        # of X (channel stride 1)
    srn, src, srh, srw,   # of RES
    M_KEY,    # M rounded up to a power of two: autotune key only (a new batch size reuses the tuning)
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr,   # filter height, width
    MASK_HW: tl.constexpr,   # padding > 0: a tap can fall outside the image (masked to zero)
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, WANT_STATS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" or "tf32" (matters for fp32 inputs only)
    BLOCK_M: tl.constexpr,    # rows per tile (fixed by the host: sizes the statistics buffer)
    BLOCK_N: tl.constexpr,    # output channels per tile
    BLOCK_K: tl.constexpr,    # channels per K-step (divides CIN_P)
    GROUP_M: tl.constexpr,    # row tiles per swizzle group (L2 reuse of the weight columns)
):
    # Program -> tile, grouped: GROUP_M consecutive row tiles walk the column tiles together.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(COUT, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # [BLOCK_M] output positions m
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # [BLOCK_N] output channels
    row_ok = rows < M
    col_ok = cols < COUT
    rows_c = tl.where(row_ok, rows, 0)               # tail rows read row 0 (in bounds; never stored)
    cols_c = tl.where(col_ok, cols, 0)

    # m -> (n, ho, wo), once per tile; the offset of tap (0, 0), channel 0 of each row.
    n_img = rows_c // (HO * WO)
    rem = rows_c % (HO * WO)
    ho = rem // WO
    wo = rem % WO
    h0 = ho * STRIDE_H - PAD_H
    w0 = wo * STRIDE_W - PAD_W
    x_ptr = X + (n_img * sxn + h0 * sxh + w0 * sxw)[:, None] + tl.arange(0, BLOCK_K)[None, :]
    w_ptr = Wt + (cols_c * K_P)[None, :] + tl.arange(0, BLOCK_K)[:, None]
    if MASK_HW:
        # Which taps of each row lie inside the image: bit r * KW + s, computed once per tile (0 for
        # rows >= M), so the K-step's mask is one shift-and-test per row.
        if KH * KW > 31:
            taps = tl.zeros([BLOCK_M], dtype=tl.int64)
            TOP = 63
        else:
            taps = tl.zeros([BLOCK_M], dtype=tl.int32)
            TOP = 31
        for rr in tl.static_range(KH):
            h_in = (h0 + rr * DIL_H >= 0) & (h0 + rr * DIL_H < H) & row_ok
            for ss in tl.static_range(KW):
                inside = h_in & (w0 + ss * DIL_W >= 0) & (w0 + ss * DIL_W < W)
                taps = taps | (inside.to(taps.dtype) << (rr * KW + ss))

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    r = 0        # filter row of this K-step
    s = 0        # filter column
    c0 = 0       # first channel
    for kk in range(0, loop_bound(KH * KW * (CIN_P // BLOCK_K))):
        a_ptr = x_ptr + (r * DIL_H * sxh + s * DIL_W * sxw + c0)
        if MASK_HW:
            ok = (taps << (TOP - (r * KW + s))) < 0   # bit r * KW + s moved to the sign bit
            a = tl.load(a_ptr, mask=ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptr)
        b = tl.load(w_ptr + kk * BLOCK_K)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # next K-step: the next BLOCK_K channels, or the first channels of the next tap
        c0 += BLOCK_K
        wrap = c0 >= CIN_P
        c0 = tl.where(wrap, 0, c0)
        s += wrap.to(tl.int32)
        wrap_s = s >= KW
        s = tl.where(wrap_s, 0, s)
        r += wrap_s.to(tl.int32)

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
    ok2 = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        r_off = (n_img * srn + ho * srh + wo * srw)[:, None] + (cols * src)[None, :]
        y = y + tl.load(RES + r_off, mask=ok2, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # ReLU that keeps NaN, as torch.relu (maximum would drop it)
    tl.store(OUT + rows[:, None] * COUT + cols[None, :], y.to(OUT.dtype.element_ty), mask=ok2)


# GPU: autotuned per bucketed shape (M_KEY, not M) and epilogue; configs pruned per shape.
_conv_kernel_tuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["M_KEY", "COUT", "CIN_P", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "KH", "KW",
         "MASK_HW", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "HAS_RES", "RELU", "WANT_STATS", "PRECISION"],
    prune_configs_by={"early_config_prune": early_config_prune},
)(_conv_kernel)
