"""The "torch" backend of conv_bn_act: plain PyTorch on aten's own kernels.

This is what runs on a CPU, and on a GPU until a GPU run has verified the fused kernels. It is the
very sequence of aten ops a torchvision ResNet runs, so it is never slower than what it replaces, and
every tool that understands aten (autograd and double backward, torch.func, torch.compile's inductor,
torch.export / ONNX, FLOP counters, the meta device) understands it:

* training:  z = conv2d(x, W, b);  y = batch_norm(z, batch statistics) - aten updates running_mean /
  running_var in place with the effective momentum (the nn.BatchNorm2d rules);  y += residual and
  y = relu(y), both in place on the BatchNorm output (no copies). Backward is aten's: convolution
  backward, BatchNorm backward (it saves z and the batch statistics), ReLU backward (it saves y).
* eval:      y = act(batch_norm(conv2d(x, W, b), running statistics) (+ residual)): torchvision's own
  ops, read from the live parameters and buffers on every call, so nothing can be stale.
* frozen:    inside ``fastres.frozen(model)`` (an explicit, documented mode: fastres/frozen.py)
  BatchNorm is folded into the convolution once, y = act(conv2d(x, W * s, b_f) (+ residual)),
  s = gamma / sqrt(running_var + eps), b_f = beta + (b - running_mean) * s, and on a CPU in fp32 with
  channels_last data the folded weight is prepacked for oneDNN with the add and ReLU as post-ops
  (:func:`conv_bn_act_frozen`). Folding on every call instead measured slower than torchvision's
  eval on a CPU (it reads and writes every weight: more bytes than the BatchNorm pass it saves at
  ResNet batch sizes), so the default does not fold.

:func:`conv_bn_act_aten` and :func:`conv_bn_act_folded` are the production path (fastres.ops.conv_bn_act
calls them directly, without a custom-op round trip). The three contract functions of
fastres/backends/__init__.py (used when ``torch.ops.fastres.conv_bn_act`` itself runs on this backend:
opcheck, direct calls) are the oracle's, fastres/ops/reference.py.
"""
from __future__ import annotations

import logging
import threading
from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwd_ad
import torch.nn.functional as F

from fastres._native import cpu as _native  # (None without the built extension)
from fastres.backends.fold_cache import entry as _entry
from fastres.backends.fold_cache import fold, freeze, frozen_active, refresh, thaw
from fastres.errors import InputShapeError
from fastres.layout import conv_out_shape, int_pair, memory_format_of
from fastres.ops.reference import bn_act_backward, bn_act_forward, conv_bn_act_backward, conv_bn_act_forward

Tensor = torch.Tensor

# The backend's declaration (read by fastres.backends' registry).
NAME = "torch"
DEVICES = ("cpu", "cuda", "meta")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OPS = ("conv_bn_act", "bn_act")


def available() -> Tuple[bool, str]:
    return True, ""


def device_reason(device: torch.device) -> Optional[str]:
    """The torch backend runs on every device PyTorch does."""
    return None

__all__ = ["conv_bn_act_forward", "conv_bn_act_backward", "conv_bn_act_supports", "conv_bn_act_aten",
           "bn_act_forward", "bn_act_backward", "bn_act_supports", "bn_act_aten",
           "conv_bn_act_folded", "conv_bn_act_frozen", "conv_bn_act_vouched", "vouched", "fold", "freeze", "thaw",
           "refresh", "frozen_active"]


def conv_bn_act_supports(x, weight, residual, stride, padding, dilation, groups, training, relu):
    """The torch backend runs every call."""
    return None


def bn_act_supports(x, residual, training, relu):
    """The torch backend runs every call."""
    return None


def bn_act_aten(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], residual: Optional[Tensor], training: bool, momentum: float,
                eps: float, relu: bool) -> Tensor:
    """act(batch_norm(x) (+ residual)) as aten ops, differentiable (torchvision's ops)."""
    y = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return _epilogue(y, residual, relu)


def _epilogue(y: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    if residual is not None:
        y = y.add_(residual)
    return F.relu(y, inplace=True) if relu else y   # (F.relu, as nn.ReLU calls it: a wrapper there sees it)


def conv_bn_act_aten(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     residual: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                     groups: int, training: bool, momentum: float, eps: float, relu: bool) -> Tensor:
    """act(batch_norm(conv2d(x, weight, bias)) (+ residual)) as aten ops, differentiable.

    training=True normalises with the batch statistics and updates running_mean/running_var (when
    given) with `momentum`; training=False uses the running statistics (BatchNorm unfolded: the form
    tracers and exporters see)."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None and residual.shape != z.shape:   # (before BatchNorm updates any statistic)
        raise InputShapeError(f"conv_bn_act: expected residual of shape {tuple(z.shape)} (the conv output), "
                              f"got {tuple(residual.shape)}")
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return _epilogue(y, residual, relu)


def conv_bn_act_folded(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: List[int],
                       padding: List[int], dilation: List[int], groups: int, relu: bool) -> Tensor:
    """Eval-mode conv_bn_act with BatchNorm already folded into (weight, bias) by :func:`fold`."""
    return _epilogue(F.conv2d(x, weight, bias, stride, padding, dilation, groups), residual, relu)


def _onednn_available() -> bool:
    """oneDNN's fused conv + add + ReLU (what inductor's CPU freezing uses) and its weight prepacking,
    where the installed PyTorch exposes them."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


# Whether the oneDNN inference path may be tried (None: not yet asked). Set it to False to always take
# the aten path. A call oneDNN rejects runs on the aten path (logged at DEBUG on the "fastres" logger).
onednn_enabled = None


def geometry(conv: torch.nn.Module) -> Optional[tuple]:
    """`conv`'s (stride, padding, dilation, groups) as it holds them now, each 2-D one a tuple of two ints
    (a user may set ``conv.stride = 1``: F.conv2d takes it), or None when one is not a geometry F.conv2d
    takes as such (the frozen paths decline: the default path runs, or raises what torchvision raises)."""
    s, p, d, g = int_pair(conv.stride), int_pair(conv.padding), int_pair(conv.dilation), conv.groups
    return None if s is None or p is None or d is None or type(g) is not int else (s, p, d, g)


def _onednn_usable(conv: torch.nn.Conv2d, x: Tensor, residual: Optional[Tensor], geom: tuple) -> bool:
    global onednn_enabled
    if onednn_enabled is None:
        onednn_enabled = _onednn_available()
    # channels_last only: there it measured 1.2-1.5x aten's eval; on NCHW inputs it was slower for
    # ResNet-20 and ResNet-50 (0.85-0.9x) and is not used.
    if not (onednn_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and memory_format_of(x) == torch.channels_last and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and conv.weight.dtype == torch.float32
            and _fwd_ad._current_level < 0):   # (forward AD: oneDNN's op has no tangent formula: aten's path)
        return False
    if residual is None:
        return True
    out = conv_out_shape(x.shape, conv.weight.shape, *geom[:3])
    return (residual.dtype == x.dtype and list(residual.shape) == out
            and residual.is_contiguous(memory_format=memory_format_of(x)))


def conv_bn_act_onednn(x: Tensor, packed: Tensor, bias: Tensor, residual: Optional[Tensor], stride, padding,
                       dilation, groups: int, relu: bool) -> Tensor:
    """Eval-mode conv_bn_act on a CPU through oneDNN: the folded weight prepacked for this input shape,
    bias, residual add and ReLU as the convolution's post-ops (one pass over the output)."""
    args = (list(padding), list(stride), list(dilation), groups)
    if residual is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *args, "add", None,
                                                               "relu" if relu else None, [], "")
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "relu" if relu else "none", [], "")


def _run_packed(x: Tensor, geom: tuple, packed: Tensor, bias: Tensor, residual: Optional[Tensor],
                relu: bool) -> Tensor:
    """:func:`conv_bn_act_onednn` with a conv's :func:`geometry` on channels_last `x`, the output channels_last."""
    y = conv_bn_act_onednn(x, packed, bias, residual, *geom, relu)
    return y if y.is_contiguous(memory_format=torch.channels_last) else y.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Frozen inference (fastres.frozen): BatchNorm folded into the conv once, the folded weight prepacked. The
# cache and the rules by which a fold is remade: fastres/backends/fold_cache.py.


# Input shapes a fold keeps a prepacked weight for (newest first): dynamic batching and mixed resolutions
# alternate between a few, and each repack costs about as much as the convolution.
PACKS_KEPT = 4


def _packed_for(packs: Optional[tuple], shape) -> Optional[Tensor]:
    """The weight prepacked for (input shape, geometry) `shape` among an entry's packs, or None."""
    for s, packed in packs or ():
        if s == shape:
            return packed
    return None


def conv_bn_act_frozen(x: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.Module, eps: float,
                       residual: Optional[Tensor], relu: bool) -> Optional[Tensor]:
    """Eval-mode conv_bn_act from the cached fold of (conv, bn) (and, on a CPU in fp32 with channels_last
    data, the folded weight prepacked for oneDNN with the add as post-op, and the ReLU too in a vouched
    call, whose input was found finite: oneDNN's ReLU turns a NaN into 0, so elsewhere the ReLU is aten's,
    which keeps it), or None when the call must take the default path: autograd would need the fold's
    gradient, the fold is not finite (fold_cache._finite), or the residual is not a 4-D tensor (the
    default path explains a bad call)."""
    if residual is not None and residual.dim() != 4:
        return None
    small = (conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.is_grad_enabled() and (conv.weight.requires_grad or any(t is not None and t.requires_grad for t in small)):
        return None
    entry = _entry(conv, bn, eps)
    if entry is None:
        return None
    if not entry[6]:   # a fold with a NaN or an infinity: the default path, and the rest of a vouched call
        vouched.on = False   # unvouched, so that the NaN this layer makes meets aten's ReLUs, which keep it
        return None
    w, b, packs = entry[1], entry[2], entry[3]
    geom = geometry(conv)   # (new tuples, or the module's own: tuples are immutable)
    if geom is None:
        return None
    stride, padding, dilation, groups = geom
    if _onednn_usable(conv, x, residual, geom):
        shape = (tuple(x.shape), geom)
        try:
            packed = _packed_for(packs, shape)
            if packed is None:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), list(padding), list(stride),
                                                                   list(dilation), groups, list(x.shape))
                # one assignment of a new tuple: a reader never sees a pack beside another's shape
                entry[3] = ((shape, packed),) + (packs or ())[:PACKS_KEPT - 1]
            if relu and not vouched.on:   # (oneDNN's ReLU post-op makes a NaN 0: torch.relu keeps it)
                return torch.relu_(_run_packed(x, geom, packed, b, residual, False))
            return _run_packed(x, geom, packed, b, residual, relu)
        except RuntimeError as e:  # a case this oneDNN build rejects: aten's conv
            logging.getLogger("fastres").debug("fastres: oneDNN inference path declined (%s); using aten's conv", e)
    out = conv_out_shape(x.shape, conv.weight.shape, stride, padding, dilation)
    if residual is not None and list(residual.shape) != out:
        return None   # broadcast by the add: a bad call, which the default path explains
    try:
        return conv_bn_act_folded(x, w, b, residual, list(stride), list(padding), list(dilation), groups, relu)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None   # a bad call: the default path raises the error that explains it


# A model call that has vouched for all of its layers (fastres.models.input_layout.inference_call: the model
# and every submodule of a known class in eval mode, no hooks, gradients off, not traced, a CPU fp32
# channels_last input, the torch backend, its BatchNorms frozen) runs its (conv, BN) pairs through
# :func:`conv_bn_act_vouched`: what that check established for the whole call is not checked again per
# layer (fastres.nn.conv_bn_act_modules's checks cost about as much Python as the oneDNN call's own
# overhead). Per thread: another thread's calls are not covered by this one's check.
class _Vouched(threading.local):
    on = False
    kept = ()   # data pointers of the tensors the call was given (fastres.models.input_layout.vouch)


vouched = _Vouched()
_CL = torch.channels_last


def conv_bn_act_vouched(x: Tensor, conv: torch.nn.Module, bn: torch.nn.Module, residual: Optional[Tensor],
                        relu: bool) -> Optional[Tensor]:
    """:func:`conv_bn_act_frozen`'s oneDNN path inside a vouched model call (above), checking what may
    differ from layer to layer: exact nn.Conv2d / nn.BatchNorm2d with zero padding mode and running
    statistics (without them eval normalises with batch statistics), oneDNN enabled, the fold still
    valid (every rule of the cache, as on the full path), a weight already prepacked for this input
    shape and geometry, channels_last fp32 data, a residual of the output's shape (the output written into
    it when it is the call's own: :func:`_writable`). None: the caller takes the full path (which packs,
    or explains)."""
    if type(conv) is not torch.nn.Conv2d or type(bn) is not torch.nn.BatchNorm2d or conv.padding_mode != "zeros" \
            or x.dtype is not torch.float32 or not x.is_contiguous(memory_format=_CL) or not onednn_enabled \
            or bn.running_mean is None or bn.running_var is None:   # (no running statistics: batch statistics)
        return None
    entry = _entry(conv, bn, bn.eps)
    geom = geometry(conv)
    packed = None if entry is None or not entry[6] or geom is None else _packed_for(entry[3], (x.shape, geom))
    if packed is None:
        return None
    if residual is not None and (residual.dtype is not torch.float32 or not residual.is_contiguous(memory_format=_CL)):
        return None
    try:
        if residual is not None and _writable(residual, x, conv, geom):
            # the add written into the residual itself: one buffer fewer, and the stage's trunk stays in cache
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, packed, entry[2], geom[1], geom[0], geom[2], geom[3], "add", None,
                "relu" if relu else None, [], "")
        y = _run_packed(x, geom, packed, entry[2], residual, relu)
    except RuntimeError:
        return None
    if residual is not None and y.shape != residual.shape:
        return None   # oneDNN broadcast the residual: the full path explains the bad call
    return y


def _writable(residual: Tensor, x: Tensor, conv: torch.nn.Module, geom: tuple) -> bool:
    """Whether a vouched call may write a block's output into its residual: a tensor of the output's very
    shape made inside this call (not a view, not one of the tensors the call was given, not the conv's
    input). Inside a vouched call every module is one whose code fastres knows and nothing is hooked, so
    such a tensor is the shortcut's own (a downsample's output, or the block input, which its block alone
    reads and which is dead after this op): nobody can see it change."""
    if residual._base is not None:
        return False
    p = residual.data_ptr()
    return (p != x.data_ptr() and p not in vouched.kept
            and list(residual.shape) == conv_out_shape(x.shape, conv.weight.shape, *geom[:3]))


# Heads with fewer weights run aten's F.linear: oneDNN's op costs ~12 us per call before any work, and
# measured (2 CPU cores, batch 1 / 8 / 64) 0.16-0.31x F.linear on a 64 -> 10 CIFAR head, 0.41-0.94x on
# 512 -> 100, 0.85x on 256 -> 1000 at batch 1; 1.17-2.2x on 512 -> 1000 and 1.5-2.3x on 2048 -> 1000
# (ResNet-18/34 and ResNet-50/101/152 ImageNet heads) at batch 1-256.
_ONEDNN_HEAD_MIN = 500_000


def linear_vouched(x: Tensor, fc: torch.nn.Module) -> Optional[Tensor]:
    """A vouched call's head, nn.Linear's math through oneDNN's matmul on the live weight (nothing cached),
    for heads of at least _ONEDNN_HEAD_MIN weights (above), or None: the caller runs the module. fp32 2-D
    input on the CPU, an exact nn.Linear with fp32 weights, all three contiguous (oneDNN's op ignores a
    bias's strides: a strided view gave wrong logits, an expanded one NaN, in review)."""
    if type(fc) is not torch.nn.Linear or x.dim() != 2 or x.dtype is not torch.float32 \
            or fc.weight.dtype is not torch.float32 or not onednn_enabled or not x.is_contiguous() \
            or not fc.weight.is_contiguous() or not (fc.bias is None or fc.bias.is_contiguous()) \
            or fc.weight.numel() < _ONEDNN_HEAD_MIN:
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise(x, fc.weight, fc.bias, "none", [], "")
    except (RuntimeError, AttributeError):
        return None


# The ISA of csrc/cpu/pooled_linear.cpp's kernel, from torch's own CPU capability (so that
# ATEN_CPU_CAPABILITY=avx2 runs its AVX2 kernel); 0: none (the pooling and the head run as torch's ops)
_HEAD_ISA = {"AVX512": 2, "AVX2": 1}.get(torch.backends.cpu.get_cpu_capability(), 0)
_HEAD_ROWS = 16
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def pooled_linear_vouched(x: Tensor, fc: torch.nn.Module) -> Optional[Tensor]:
    """A vouched call's pooled head, ``fc(torch.flatten(mean of x over its plane, 1))`` for an exact
    nn.Linear, in one C++ call on the live weight (csrc/cpu/pooled_linear.cpp: measured 0.15-0.22 ms less
    than torch's pooling op and oneDNN's matmul right after the body of ResNet-18/50, batch 1-16, 2 CPU
    cores), or None: the caller pools and runs the head as before (more than 16 rows, a tensor it does not
    take, no fastres._cpu). Not under a torch function or dispatch mode (a FLOP counter would not see it)."""
    if _native is None or not _HEAD_ISA or type(fc) is not torch.nn.Linear or x.dim() != 4 \
            or not 0 < x.shape[0] <= _HEAD_ROWS or torch._C._is_torch_function_mode_enabled() \
            or torch._C._len_torch_dispatch_stack():
        return None
    w, b = fc.weight, fc.bias   # (as nn.Linear.forward reads them: a parameter, buffer or attribute)
    if type(w) not in _PLAIN_TENSORS or (b is not None and type(b) not in _PLAIN_TENSORS) or w.dim() != 2:
        return None   # (a tensor subclass sees its own ops: torch's)
    out = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32, device="cpu")
    return out if _native.pooled_linear(x, w, b, out, _HEAD_ISA) else None
