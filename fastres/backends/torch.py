"""The "torch" backend of conv_bn_act: plain PyTorch on aten's own kernels.

This is what runs on a CPU, and on a GPU until a GPU run has verified the fused kernels. It is the
very sequence of aten ops a torchvision ResNet runs, so it is never slower than what it replaces, and
every tool that understands aten (autograd and double backward, torch.func, torch.compile's inductor,
torch.export / ONNX, FLOP counters, the meta device) understands it:

* training:  z = conv2d(x, W, b);  y = batch_norm(z, batch statistics) - aten updates running_mean /
  running_var in place with the effective momentum (the nn.BatchNorm2d rules);  y += residual and
  y = relu(y), both in place on the BatchNorm output (no copies). Backward is aten's: convolution
  backward, BatchNorm backward (it saves z and the batch statistics), ReLU backward (it saves y).
* eval:      BatchNorm is an affine map per output channel, folded into the convolution:
  y = act(conv2d(x, W * s, b_f) (+ residual)),  s = gamma / sqrt(running_var + eps),
  b_f = beta + (b - running_mean) * s. The folded weights are cached per BatchNorm module while
  autograd is off and recomputed whenever a parameter or buffer changes (:func:`folded`). On a CPU,
  in fp32 with autograd off and channels_last data, the conv runs through oneDNN with the folded
  weight prepacked and the add and ReLU as post-ops (:func:`folded_onednn`), where the installed
  PyTorch exposes it (measured on a 2-core AMD EPYC: 1.2-1.5x torchvision's eval; see
  benchmarks/results/); elsewhere aten's conv2d.

:func:`conv_bn_act_aten` and :func:`conv_bn_act_folded` are the production path (fastres.ops.conv_bn_act
calls them directly, without a custom-op round trip). The three contract functions of
fastres/backends/__init__.py (used when ``torch.ops.fastres.conv_bn_act`` itself runs on this backend:
opcheck, direct calls) are the oracle's, fastres/ops/reference.py.
"""
from __future__ import annotations

import logging
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastres.layout import conv_out_shape, memory_format_of
from fastres.ops.reference import conv_bn_act_backward, conv_bn_act_forward

Tensor = torch.Tensor

__all__ = ["conv_bn_act_forward", "conv_bn_act_backward", "conv_bn_act_supports", "conv_bn_act_aten",
           "conv_bn_act_folded", "fold", "folded"]


def conv_bn_act_supports(x, weight, residual, stride, padding, dilation, groups, training, relu):
    """The torch backend runs every call."""
    return None


def _epilogue(y: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    if residual is not None:
        y = y.add_(residual)
    return torch.relu_(y) if relu else y


def conv_bn_act_aten(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     residual: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                     groups: int, training: bool, momentum: float, eps: float, relu: bool) -> Tensor:
    """act(batch_norm(conv2d(x, weight, bias)) (+ residual)) as aten ops, differentiable.

    training=True normalises with the batch statistics and updates running_mean/running_var (when
    given) with `momentum`; training=False uses the running statistics (BatchNorm unfolded: the form
    tracers and exporters see)."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return _epilogue(y, residual, relu)


def conv_bn_act_folded(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: List[int],
                       padding: List[int], dilation: List[int], groups: int, relu: bool) -> Tensor:
    """Eval-mode conv_bn_act with BatchNorm already folded into (weight, bias) by :func:`fold`."""
    return _epilogue(F.conv2d(x, weight, bias, stride, padding, dilation, groups), residual, relu)


def fold(weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
         running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(W * s, beta + (b - running_mean) * s), s = gamma / sqrt(running_var + eps), per output channel.

    Computed in the BatchNorm statistics' precision (fp32, fp64 for fp64) and returned in the conv
    weight's dtype: one rounding of the exact product, as the weight itself had one. Differentiable."""
    ct = torch.promote_types(running_var.dtype, weight.dtype)
    s = torch.rsqrt(running_var.to(ct) + eps)
    if bn_weight is not None:
        s = s * bn_weight.to(ct)
    shift = -running_mean.to(ct) * s if bias is None else (bias.to(ct) - running_mean.to(ct)) * s
    if bn_bias is not None:
        shift = shift + bn_bias.to(ct)
    w = (weight.to(ct) * s.reshape(-1, 1, 1, 1)).to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        w = w.contiguous(memory_format=torch.channels_last)
    return w, shift.to(weight.dtype)


def _onednn_available() -> bool:
    """oneDNN's fused conv + add + ReLU (what inductor's CPU freezing uses) and its weight prepacking,
    where the installed PyTorch exposes them."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


# Whether the oneDNN inference path may be tried (None: not yet asked). Set it to False to always take
# the aten path. A call oneDNN rejects runs on the aten path (logged at DEBUG on the "fastres" logger).
onednn_enabled = None


def _onednn_usable(conv: torch.nn.Conv2d, x: Tensor, residual: Optional[Tensor]) -> bool:
    global onednn_enabled
    if onednn_enabled is None:
        onednn_enabled = _onednn_available()
    # channels_last only: there it measured 1.2-1.5x aten's eval; on NCHW inputs it was slower for
    # ResNet-20 and ResNet-50 (0.85-0.9x) and is not used.
    if not (onednn_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and memory_format_of(x) == torch.channels_last and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and conv.weight.dtype == torch.float32):
        return False
    if residual is None:
        return True
    out = conv_out_shape(x.shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
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


def folded_onednn(conv: torch.nn.Conv2d, bn: torch.nn.Module, eps: float, x: Tensor,
                  residual: Optional[Tensor], relu: bool) -> Optional[Tensor]:
    """y through :func:`conv_bn_act_onednn` when usable (CPU, fp32, autograd off), else None. The
    prepacked weight is cached beside the folded one (same invalidation) for the last input shape."""
    if not _onednn_usable(conv, x, residual):
        return None
    w, b = folded(conv, bn, eps)
    hit = _FOLDS.get(bn)
    shape = tuple(x.shape)
    try:
        packed = hit[3] if hit is not None and len(hit) > 3 and hit[4] == shape else None
        if packed is None:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), list(conv.padding), list(conv.stride),
                                                               list(conv.dilation), conv.groups, list(shape))
            if hit is not None and hit[1] is w:
                _FOLDS[bn] = hit[:3] + (packed, shape)
        y = conv_bn_act_onednn(x, packed, b, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu)
    except RuntimeError as e:  # a case this oneDNN build rejects: the aten path (which explains bad input)
        logging.getLogger("fastres").debug("fastres: oneDNN inference path declined (%s); using aten's conv", e)
        return None
    return y if y.is_contiguous(memory_format=memory_format_of(x)) else y.contiguous(memory_format=memory_format_of(x))


# BatchNorm module -> (key, folded weight, folded bias[, prepacked weight, input shape]).
# Weak keys: a deleted module drops its entry.
_FOLDS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _state(t: Optional[Tensor]):
    return None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device)


def folded(conv: torch.nn.Conv2d, bn: torch.nn.Module, eps: float) -> Tuple[Tensor, Tensor]:
    """:func:`fold` of (conv, bn)'s current parameters and running statistics.

    With autograd off (inference) the result is cached on the BatchNorm module and reused until any of
    the tensors it was made from changes: another tensor object or storage (``.to()``, ``.half()``,
    ``p.data = ...``) or an in-place write (an optimizer step, ``load_state_dict``, a training-mode
    forward updating the running statistics: each bumps the tensor's version counter). With autograd
    on (fine-tuning with frozen BatchNorm) it is recomputed on every call, so gradients flow."""
    args = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return fold(*args, eps)
    key = (tuple(_state(t) for t in args), eps, torch.is_inference_mode_enabled())
    hit = _FOLDS.get(bn)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    w, b = fold(*args, eps)
    _FOLDS[bn] = (key, w, b)
    return w, b
