"""Implicit-GEMM conv2d over NHWC in Triton, with the fused epilogues of fastres: the host side.

The kernel and its config model live in kernels/conv_kernel.py (its docstring derives the GEMM
view and the tap-major mainloop). This module prepares the operands and picks the launch; what a
launch compiles to is described from its geometry and flags in report_variants.py (the report tool):

* input: made channels_last; when Cin is not a multiple of 16 it is copied once into a zero-padded
  (N, H, W, CIN_P) buffer, so a K-step is a run of whole 16-byte channel vectors; a stride-2 conv over
  <= 4 channels (the stem) is rewritten by space-to-depth instead (kernels/conv_s2d.py);
* weight: a channels_last weight (Cout, kh, kw, Cin) with Cin % 16 == 0 is consumed in place, viewed
  as (Cout, K); any other weight (NCHW-contiguous, Cin not a multiple of 16, the stem's space-to-depth
  form) is re-laid on every call, never cached: a cache keyed on the weight cannot see every change
  (fused optimizers and `.data` edits leave the version counter alone, a captured CUDA graph replays
  whatever it captured) and would hand one stream's tensor to another. The re-lay moves 2x the
  weight's bytes: for all of ResNet-50's weights in bf16 ~100 MB, ~25 us at 4 TB/s (a prediction);
* autotune (GPU): keyed on M rounded up to a power of two with the conv geometry and the epilogue,
  so a new batch size reuses the tuning; tuning cannot run inside CUDA-graph capture: run
  :func:`fastres.kernels.warmup.warmup` once before capturing.

Host functions: :func:`conv2d_nhwc` (allocate + launch) and :func:`conv2d_nhwc_supports` (which calls
the kernel covers).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from fastres.kernels import alloc as _alloc
from fastres.kernels import interpreter_active
from fastres.kernels.conv_kernel import (
    BLOCK_M_GPU,
    BLOCK_M_INTERPRETER,
    CHANNEL_ALIGN,
    GPU_CONFIGS,
    GROUP_M,
    _conv_kernel,
    _conv_kernel_tuned,
)
from fastres.kernels.conv_s2d import S2D_CIN_P, s2d_applies, s2d_input, s2d_shape, s2d_weight
from fastres.kernels.shapes import cdiv, conv_out_hw, next_pow2

Tensor = torch.Tensor
IntPair = Union[int, Sequence[int]]

__all__ = ["conv2d_nhwc", "conv2d_nhwc_supports", "GPU_CONFIGS",
           "BLOCK_M_GPU", "BLOCK_M_INTERPRETER"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2 ** 31 - 1


def _interp_meta(cin_p: int) -> dict:
    """The one config the interpreter runs (autotune with several fails there): large blocks, so
    few programs run through the slow interpreter; BLOCK_K the largest of 64/32/16 dividing CIN_P."""
    block_k = next(k for k in (64, 32, 16) if cin_p % k == 0)
    return dict(BLOCK_N=32, BLOCK_K=block_k, num_warps=4, num_stages=1)


def _cin_p(cin: int) -> int:
    return -(-cin // CHANNEL_ALIGN) * CHANNEL_ALIGN


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"conv2d_nhwc: {name} must be an int or a pair of ints, got {v!r}")
    return v


_HASHABLE = (int, tuple)
_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _hashable(v):
    """stride / padding / dilation as given (int or sequence), as a hashable cache-key part."""
    return v if isinstance(v, int) else tuple(v)


def conv2d_nhwc_supports(x: Tensor, weight: Tensor, stride: IntPair = 1, padding: IntPair = 0,
                         dilation: IntPair = 1, groups: int = 1) -> Optional[str]:
    """None when the Triton conv covers this call, else a short reason ("groups=2", "dtype float64", ...).
    The answer depends on the tensors' metadata only (shape, dtype, device), never on their values: it is
    remembered per metadata key (:func:`_supports`); under torch.compile's tracing (symbolic sizes) it is
    computed afresh."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        return "input and weight must be 4-D tensors"
    args = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device, _hashable(stride),
            _hashable(padding), _hashable(dilation), groups, x.device.type == "cpu" and interpreter_active())
    if torch.compiler.is_compiling():
        return _supports.__wrapped__(*args)
    return _supports(*args)


@functools.lru_cache(maxsize=4096)
def _supports(xshape, xdtype, xdevice, wshape, wdtype, wdevice, stride, padding, dilation, groups: int,
              interp: bool) -> Optional[str]:
    """conv2d_nhwc_supports from metadata alone (so it can be remembered: every argument is the key)."""
    if groups != 1:
        return f"groups={groups}"
    if len(xshape) != 4 or len(wshape) != 4:
        return "input and weight must be 4-D tensors"
    xdt, wdt = (str(dt).replace("torch.", "") for dt in (xdtype, wdtype))
    if xdtype not in _DTYPES:
        return f"dtype {xdt}"
    if wdtype != xdtype:
        return f"weight dtype {wdt} != input dtype {xdt}"
    if xdevice.type == "cpu":
        if not interp:
            return "cpu tensors without TRITON_INTERPRET=1"
        if xdtype == torch.bfloat16:
            return "bfloat16 under the Triton interpreter"
    elif xdevice.type != "cuda":
        return f"device {xdevice.type}"
    if wdevice != xdevice:
        return f"weight on {wdevice}, input on {xdevice}"
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
    if xshape[1] != wshape[1]:
        return f"input channels {xshape[1]} != weight channels {wshape[1]}"
    if xshape[1] == 0 or wshape[0] == 0:
        return "zero channels"
    ho, wo = conv_out_hw(xshape[2], xshape[3], wshape[2], wshape[3], stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        return f"empty output {ho}x{wo}"
    out_numel = xshape[0] * wshape[0] * ho * wo
    grow = _cin_p(xshape[1]) / xshape[1]           # the kernel reads input and weight padded to CIN_P channels
    if max(xshape.numel() * grow, out_numel, wshape.numel() * grow) > _INT32_LIMIT:
        return "tensor too large for int32 indexing"
    return None


def _param(t: Tensor, name: str, cout: int, device: torch.device) -> Tensor:
    """A per-channel vector as fp32 contiguous, checked."""
    if not (type(t) in _TENSOR_TYPES or isinstance(t, Tensor)) or not t.dtype.is_floating_point:
        raise TypeError(f"conv2d_nhwc: expected {name} to be a floating-point tensor, got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if tuple(t.shape) != (cout,):
        raise ValueError(f"conv2d_nhwc: expected {name} of shape ({cout},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"conv2d_nhwc: expected {name} on {device}, got {t.device}")
    return (t if t.dtype is torch.float32 else t.to(torch.float32)).contiguous()


# ---------------------------------------------------------------------------------------------
# operands

def _weight_matrix(weight: Tensor, cin_p: int) -> Tensor:
    """weight (Cout, Cin, kh, kw) as a (Cout, kh, kw, CIN_P) contiguous tensor, channels zero-padded.
    A channels_last weight with Cin == CIN_P is that tensor already (a view, no copy); any other is
    re-laid here, on every call (see the module docstring: why nothing is cached)."""
    whkc = weight.permute(0, 2, 3, 1)
    if weight.shape[1] == cin_p and whkc.is_contiguous():
        return whkc

    cout, cin, kh, kw = weight.shape
    out = torch.zeros((cout, kh, kw, cin_p), dtype=weight.dtype, device=weight.device)
    out[..., :cin] = whkc
    return out


def _input_nhwc(x: Tensor, cin_p: int) -> Tensor:
    """x as an (N, CIN_P, H, W) channels_last tensor (channel stride 1), zero-padded channels."""
    if x.shape[1] == cin_p:
        return x.contiguous(memory_format=torch.channels_last)
    n, cin, h, w = x.shape
    xp = torch.zeros((n, h, w, cin_p), dtype=x.dtype, device=x.device)
    xp[..., :cin] = x.permute(0, 2, 3, 1)
    return xp.permute(0, 3, 1, 2)


def _geometry(n, cin, h, w, cout, kh, kw, stride, padding, dilation, res_strides=None) -> dict:
    """The kernel's integer arguments (by name) for a conv of this shape, plus KH/KW/MASK_HW and S2D
    (whether the host rewrites it by space-to-depth, kernels/conv_s2d.py: then the kernel sees the
    rewritten stride-1 conv, with the real output size). The input is channels_last contiguous with
    CIN_P channels; res_strides (n, c, h, w) default to a channels_last residual."""
    ho, wo = conv_out_hw(h, w, kh, kw, stride, padding, dilation)
    s2d = s2d_applies(cin, stride, dilation)
    if s2d:
        h, w, kh, kw = s2d_shape(h, w, kh, kw, padding)
        cin, stride, padding = S2D_CIN_P, (1, 1), (0, 0)
        assert h - kh + 1 >= ho and w - kw + 1 >= wo
    cin_p = _cin_p(cin)
    m = n * ho * wo
    if res_strides is None:
        res_strides = (ho * wo * cout, 1, wo * cout, cout)
    return dict(M=m, COUT=cout, H=h, W=w, HO=ho, WO=wo, CIN_P=cin_p, K_P=kh * kw * cin_p,
                STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
                DIL_H=dilation[0], DIL_W=dilation[1],
                sxn=h * w * cin_p, sxh=w * cin_p, sxw=cin_p,
                srn=res_strides[0], src=res_strides[1], srh=res_strides[2], srw=res_strides[3],
                M_KEY=next_pow2(m),
                KH=kh, KW=kw, MASK_HW=padding[0] > 0 or padding[1] > 0, S2D=s2d)


def _grid_size(m: int, cout: int, block_m: int, block_n: int) -> int:
    return cdiv(m, block_m) * cdiv(cout, block_n)


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
    t_ = _TENSOR_TYPES   # (a type() test is cheaper than isinstance: the two usual types go first)
    if not ((type(x) in t_ or isinstance(x, Tensor)) and (type(weight) in t_ or isinstance(weight, Tensor))
            and (residual is None or type(residual) in t_ or isinstance(residual, Tensor))):
        for name, t, what in (("input", x, "a 4-D input (N, Cin, H, W)"), ("weight", weight, "a 4-D weight "
                              "(Cout, Cin, kh, kw)"), ("residual", residual, "residual as a tensor")):
            if not isinstance(t, Tensor) and (t is not None or name != "residual"):
                raise ValueError(f"conv2d_nhwc: expected {what}, got {type(t).__name__}")
    h = _HASHABLE   # stride / padding / dilation as they come (ints or tuples) are a key already
    plan = _launch_plan(
        x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
        stride if type(stride) in h else _hashable(stride), padding if type(padding) in h else _hashable(padding),
        dilation if type(dilation) in h else _hashable(dilation),
        None if residual is None else (residual.shape, residual.dtype, residual.device, residual.stride()),
        bias is not None, scale is not None, shift is not None, bool(relu), bool(want_stats),
        # TF32 decides the precision of fp32 on a GPU only: elsewhere the plan does not read it (False)
        x.dtype is torch.float32 and x.is_cuda and bool(torch.backends.cudnn.allow_tf32),
        x.device.type == "cpu" and interpreter_active())
    dev = x.device
    cout = plan.out_shape[1]
    if bias is not None:
        bias = _param(bias, "bias", cout, dev)
    if scale is not None:
        scale = _param(scale, "scale", cout, dev)
    if shift is not None:
        shift = _param(shift, "shift", cout, dev)
    if plan.s2d:
        xc, wmat = s2d_input(x, plan.padding), s2d_weight(weight)
    else:
        xc, wmat = _input_nhwc(x, plan.cin_p), _weight_matrix(weight, plan.cin_p)
    out = _alloc.empty(plan.out_shape, dtype=x.dtype, device=dev, memory_format=torch.channels_last)
    part = _alloc.empty(plan.part_shape, dtype=torch.float32, device=dev) if want_stats else None
    if plan.m == 0:
        return out, part
    dummy = out  # stands in for absent optional pointers (never read: its flag is off)
    args = (xc, wmat, bias if bias is not None else dummy, scale if scale is not None else dummy,
            shift if shift is not None else dummy, residual if residual is not None else out, out,
            part if part is not None else dummy, *plan.ints)
    if dev.type == "cpu":
        _conv_kernel[plan.grid](*args, **plan.flags)
    else:
        with torch.cuda.device(dev):
            _conv_kernel_tuned[plan.grid](*args, **plan.flags)
    return out, part


class _Plan(NamedTuple):
    """What a launch of this metadata needs, computed once per metadata key (:func:`_launch_plan`)."""
    out_shape: Tuple[int, int, int, int]
    part_shape: Tuple[int, int, int]
    m: int
    cin_p: int
    s2d: bool
    padding: Tuple[int, int]
    ints: Tuple[int, ...]       # the kernel's integer arguments, in _INT_ARGS order
    flags: dict                 # constexpr switches (+ the interpreter's config); read-only
    grid: object                # a grid tuple (interpreter) or a function of the autotuned config (GPU)


@functools.lru_cache(maxsize=4096)
def _launch_plan(xshape, xdtype, xdevice, wshape, wdtype, wdevice, stride, padding, dilation, res,
                 has_bias: bool, has_scale: bool, has_shift: bool, relu: bool, want_stats: bool,
                 allow_tf32: bool, interp: bool) -> _Plan:
    """Check a call from its metadata and plan its launch: geometry, grid, flags. A pure function of
    its arguments (shapes, strides, dtypes, devices, flags; never a tensor's values), so remembering it
    per key is sound; a bad call raises (and, raising, is not remembered). res: the residual's (shape,
    dtype, device, strides) or None."""
    if len(xshape) != 4:
        raise ValueError(f"conv2d_nhwc: expected a 4-D input (N, Cin, H, W), got {len(xshape)}-D tensor")
    if len(wshape) != 4:
        raise ValueError(f"conv2d_nhwc: expected a 4-D weight (Cout, Cin, kh, kw), got {len(wshape)}-D tensor")
    if xdtype not in _DTYPES:
        raise TypeError(f"conv2d_nhwc: expected input dtype float32, float16 or bfloat16, got {xdtype}")
    if wdtype != xdtype:
        raise TypeError(f"conv2d_nhwc: expected weight of the input's dtype {xdtype}, got {wdtype}")
    if wdevice != xdevice:
        raise ValueError(f"conv2d_nhwc: expected weight on the input's device {xdevice}, got {wdevice}")
    if xshape[1] != wshape[1]:
        raise ValueError(f"conv2d_nhwc: expected input with {wshape[1]} channels (weight "
                         f"{tuple(wshape)}, groups=1), got input of shape {tuple(xshape)}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    why = _supports(xshape, xdtype, xdevice, wshape, wdtype, wdevice, stride, padding, dilation, 1, interp)
    if why is not None:
        raise ValueError(f"conv2d_nhwc: the Triton conv does not cover this call: {why}")
    n, cin, h, w = xshape
    cout, _, kh, kw = wshape
    ho, wo = conv_out_hw(h, w, kh, kw, stride, padding, dilation)
    if res is not None:
        rshape, rdtype, rdevice, rstrides = res
        if tuple(rshape) != (n, cout, ho, wo):
            raise ValueError(f"conv2d_nhwc: expected residual of shape {(n, cout, ho, wo)} (the conv "
                             f"output), got {tuple(rshape)}")
        if rdtype != xdtype:
            raise TypeError(f"conv2d_nhwc: expected residual of the input's dtype {xdtype}, got {rdtype}")
        if rdevice != xdevice:
            raise ValueError(f"conv2d_nhwc: expected residual on {xdevice}, got {rdevice}")
    geo = _geometry(n, cin, h, w, cout, kh, kw, stride, padding, dilation, None if res is None else res[3])
    cpu = xdevice.type == "cpu"
    block_m = BLOCK_M_INTERPRETER if cpu else BLOCK_M_GPU
    m = geo["M"]
    # fp32: "ieee" (full fp32 products) unless PyTorch's conv flag allows TF32; fp16/bf16: the
    # default ("tf32"), which does not change 16-bit products.
    ieee = xdtype == torch.float32 and (cpu or not allow_tf32)
    flags = _flags(geo, has_bias, has_scale, has_shift, res is not None, relu, want_stats,
                   "ieee" if ieee else "tf32", block_m)
    if cpu:
        meta = _interp_meta(geo["CIN_P"])
        flags.update(meta)
        grid = (_grid_size(m, cout, block_m, meta["BLOCK_N"]),)
    else:
        def grid(meta):
            return (_grid_size(m, cout, block_m, meta["BLOCK_N"]),)
    return _Plan((n, cout, ho, wo), (cdiv(m, block_m), 3, cout), m, geo["CIN_P"], bool(geo["S2D"]), padding,
                 tuple(geo[k] for k in _INT_ARGS), flags, grid)


_INT_ARGS = ("M", "COUT", "H", "W", "HO", "WO", "CIN_P", "K_P", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W",
             "DIL_H", "DIL_W", "sxn", "sxh", "sxw", "srn", "src", "srh", "srw", "M_KEY")


def _flags(geo: dict, has_bias: bool, has_scale: bool, has_shift: bool, has_res: bool, relu: bool,
           want_stats: bool, precision: str, block_m: int) -> dict:
    """The kernel's constexpr switches for a launch of this geometry and epilogue."""
    return dict(KH=geo["KH"], KW=geo["KW"], MASK_HW=bool(geo["MASK_HW"]), HAS_BIAS=has_bias,
                HAS_SCALE=has_scale, HAS_SHIFT=has_shift, HAS_RES=has_res, RELU=bool(relu),
                WANT_STATS=bool(want_stats), PRECISION=precision, BLOCK_M=block_m, GROUP_M=GROUP_M)

