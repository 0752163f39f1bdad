"""The "cuda" backend of conv_bn_act: cuDNN convolutions + the CUDA C++ BatchNorm kernels of fastres._C.

Importing this module loads fastres._C (built from csrc/; ImportError with the reason when it is not
built), which registers three ops over NHWC (channels_last) CUDA tensors:

* ``fastres::bn_stats(z, running_mean?, running_var?, momentum, eps) -> (mean, invstd)``
* ``fastres::bn_apply(z, mean, invstd, weight?, bias?, residual?, relu, save_mask) -> (y, mask)``
* ``fastres::bn_backward(grad_y, z, mask, mean, invstd, weight?, training, relu, need_dres)
  -> (dz, dgamma, dbeta, dres)``

(semantics in csrc/batchnorm_kernels.h, kernels in csrc/batchnorm_{stats,apply,backward}.cu, the
backward math in fastres/ops/reference.py), and registers their fake implementations here, so
torch.compile and opcheck see through them.

The backend functions have the signatures and output conventions of fastres/ops/reference.py. The
forward runs the convolution with aten.convolution in channels_last, then bn_stats + bn_apply
(training) or bn_apply with the running statistics (eval); the backward runs bn_backward, then
aten.convolution_backward. NCHW inputs are converted to channels_last for the kernels and their
outputs converted back; the ReLU mask is then re-packed, since its bit order is the memory order
of y (NCHW for NCHW inputs).

Poisoning: the ops allocate their outputs in C++; the wrappers :func:`bn_stats`, :func:`bn_apply`
and :func:`bn_backward` tell fastres._C to fill them with NaN / 0xA5 first whenever
fastres.kernels.alloc.poisoned() is active (tests call the ops through these wrappers).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastres import _ext
from fastres.backends.common import conv_bn_act_grads, eval_stats
from fastres.kernels import alloc as _alloc
from fastres.layout import memory_format_of, pack_relu_mask, unpack_relu_mask

_C = _ext.module()  # ImportError (with the reason) when fastres._C is not built

Tensor = torch.Tensor

# The backend's declaration (read by fastres.backends' registry). Importing this module loaded fastres._C
# (an ImportError with the reason otherwise).
NAME = "cuda"
DEVICES = ("cuda",)
DTYPES = _DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("conv_bn_act", "bn_act")


def available() -> Tuple[bool, str]:
    return _ext.status()


def device_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    return f"the cuda backend needs CUDA tensors; got tensors on {device}"


_CL = torch.channels_last

__all__ = ["bn_stats", "bn_apply", "bn_backward", "conv_bn_act_forward", "conv_bn_act_backward",
           "conv_bn_act_supports", "bn_act_forward", "bn_act_backward", "bn_act_supports"]


# ------------------------------------------------------------------------------------------------
# fake implementations of the C++ ops (shapes, dtypes, layouts of the outputs)
# ------------------------------------------------------------------------------------------------

def _mask_bytes(z: Tensor) -> int:
    return (z.numel() + 7) // 8


@torch.library.register_fake("fastres::bn_stats")
def _bn_stats_fake(z, running_mean, running_var, momentum, eps):
    c = z.shape[1]
    return z.new_empty(c, dtype=torch.float32), z.new_empty(c, dtype=torch.float32)


@torch.library.register_fake("fastres::bn_apply")
def _bn_apply_fake(z, mean, invstd, weight, bias, residual, relu, save_mask):
    y = torch.empty_like(z, memory_format=_CL)
    mask = z.new_empty(_mask_bytes(z) if relu and save_mask else 0, dtype=torch.uint8)
    return y, mask


@torch.library.register_fake("fastres::bn_backward")
def _bn_backward_fake(grad_y, z, mask, mean, invstd, weight, training, relu, need_dres):
    c = z.shape[1]
    dz = torch.empty_like(z, memory_format=_CL)
    dres = torch.empty_like(z, memory_format=_CL) if need_dres else z.new_empty(0)
    return dz, z.new_empty(c, dtype=torch.float32), z.new_empty(c, dtype=torch.float32), dres


# ------------------------------------------------------------------------------------------------
# the ops, honouring fastres.kernels.alloc.poisoned()
# ------------------------------------------------------------------------------------------------

def _sync_poison() -> None:
    _C._set_poison(_alloc.is_poisoned())


def bn_stats(z: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
             eps: float) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and 1/sqrt(biased var + eps) of z (fp32); updates running stats in place."""
    _sync_poison()
    return torch.ops.fastres.bn_stats(z, running_mean, running_var, momentum, eps)


def bn_apply(z: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], relu: bool, save_mask: bool) -> Tuple[Tensor, Tensor]:
    """(act((z - mean) * weight * invstd + bias (+ residual)), packed ReLU mask or empty)."""
    _sync_poison()
    return torch.ops.fastres.bn_apply(z, mean, invstd, weight, bias, residual, relu, save_mask)


def bn_backward(grad_y: Tensor, z: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                weight: Optional[Tensor], training: bool, relu: bool, need_dres: bool
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dgamma, dbeta, dres or empty) of bn_apply; mask is bn_apply's (ignored without relu)."""
    _sync_poison()
    return torch.ops.fastres.bn_backward(grad_y, z, mask, mean, invstd, weight, training, relu, need_dres)


# ------------------------------------------------------------------------------------------------
# the backend of fastres::conv_bn_act
# ------------------------------------------------------------------------------------------------

def _cl(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=_CL)


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups) -> Tensor:
    z = torch.ops.aten.convolution(_cl(x), _cl(weight), bias, stride, padding, dilation, False, [0, 0],
                                   groups)
    return _cl(z)


def mask_nchw_to_nhwc(mask: Tensor, shape) -> Tensor:
    """A packed ReLU mask of an NCHW tensor of `shape`, re-packed in NHWC memory order."""
    bits = unpack_relu_mask(mask, torch.empty(shape, device="meta"))  # NCHW bool tensor
    return pack_relu_mask(bits.contiguous(memory_format=_CL))


def conv_bn_act_supports(x: Tensor, weight: Tensor, residual: Optional[Tensor], stride, padding, dilation,
                         groups: int, training: bool, relu: bool) -> Optional[str]:
    """None when this backend runs the call, else why not (the call then runs on the torch backend)."""
    if x.dtype not in _DTYPES:
        return f"the CUDA BatchNorm kernels take float32, float16 or bfloat16, got {x.dtype}"
    return None


def conv_bn_act_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], residual: Optional[Tensor], stride: List[int],
                        padding: List[int], dilation: List[int], groups: int, training: bool,
                        momentum: float, eps: float, relu: bool, save_mask: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As fastres.ops.reference.conv_bn_act_forward: (y, z, mean, invstd, mask)."""
    fmt = memory_format_of(x)
    with torch.autocast(x.device.type, enabled=False):
        z = _conv(x, weight, bias, stride, padding, dilation, groups)
        if training:
            mean, invstd = bn_stats(z, running_mean, running_var, momentum, eps)
        else:
            assert running_mean is not None and running_var is not None
            mean, invstd = eval_stats(running_mean, running_var, eps)
        res = _cl(residual) if residual is not None else None
        want_mask = relu and save_mask
        y, mask = bn_apply(z, mean, invstd, bn_weight, bn_bias, res, relu, want_mask and fmt == _CL)
        if fmt != _CL:
            y = y.contiguous(memory_format=fmt)
            if want_mask:  # bit order = memory order of y, NCHW here
                mask = pack_relu_mask(y)
        z_saved = z.contiguous(memory_format=fmt) if training else x.new_empty(0)
    return y, z_saved, mean, invstd, mask


def conv_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor,
                         mask: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                         stride: List[int], padding: List[int], dilation: List[int], groups: int,
                         training: bool, relu: bool, needs: List[bool]
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As fastres.ops.reference.conv_bn_act_backward: (dx, dweight, dbias, dbn_weight, dbn_bias,
    dresidual), an empty tensor where `needs` is False."""
    fmt = memory_format_of(x)
    with torch.autocast(x.device.type, enabled=False):
        if not training:  # z is not saved in eval mode
            z = _conv(x, weight, bias, stride, padding, dilation, groups)
        z = _cl(z)
        if not relu:
            mask = z.new_empty(0, dtype=torch.uint8)
        elif fmt != _CL:
            mask = mask_nchw_to_nhwc(mask, z.shape)
        dz, dgamma, dbeta, dres = bn_backward(_cl(grad_y), z, mask, mean, invstd, bn_weight, training,
                                              relu, needs[5])
        return conv_bn_act_grads(dz, x, weight, bias, dgamma, dbeta, dres, bn_weight, stride, padding,
                                 dilation, groups, needs, conv_layout=_CL)


# ------------------------------------------------------------------------------------------------
# the backend of fastres::bn_act: the same kernels without the conv (z = x, channels_last for the kernels)

def bn_act_supports(x: Tensor, residual: Optional[Tensor], training: bool, relu: bool) -> Optional[str]:
    if x.dtype not in _DTYPES:
        return f"the CUDA BatchNorm kernels take float32, float16 or bfloat16, got {x.dtype}"
    if residual is not None and residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} != input dtype {x.dtype}"
    return None


def bn_act_forward(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], residual: Optional[Tensor],
                   training: bool, momentum: float, eps: float, relu: bool, save_mask: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """As fastres.ops.reference.bn_act_forward: (y, mean, invstd, mask)."""
    fmt = memory_format_of(x)
    with torch.autocast(x.device.type, enabled=False):
        z = _cl(x)
        if training:
            mean, invstd = bn_stats(z, running_mean, running_var, momentum, eps)
        else:
            assert running_mean is not None and running_var is not None
            mean, invstd = eval_stats(running_mean, running_var, eps)
        want_mask = relu and save_mask
        res = _cl(residual) if residual is not None else None
        y, mask = bn_apply(z, mean, invstd, bn_weight, bn_bias, res, relu, want_mask and fmt == _CL)
        if fmt != _CL:
            y = y.contiguous(memory_format=fmt)
            if want_mask:
                mask = pack_relu_mask(y)
    return y, mean, invstd, mask


def bn_act_backward(grad_y: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                    bn_weight: Optional[Tensor], training: bool, relu: bool, needs: List[bool]
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """As fastres.ops.reference.bn_act_backward: (dx, dbn_weight, dbn_bias, dresidual)."""
    fmt = memory_format_of(x)
    with torch.autocast(x.device.type, enabled=False):
        z = _cl(x)
        if not relu:
            mask = z.new_empty(0, dtype=torch.uint8)
        elif fmt != _CL:
            mask = mask_nchw_to_nhwc(mask, z.shape)
        dz, dgamma, dbeta, dres = bn_backward(_cl(grad_y), z, mask, mean, invstd, bn_weight, training, relu,
                                              needs[3])
        pdtype = bn_weight.dtype if bn_weight is not None else dgamma.dtype

        def empty() -> Tensor:
            return x.new_empty(0)
        return (dz.contiguous(memory_format=fmt) if needs[0] else empty(), dgamma.to(pdtype) if needs[1] else empty(),
                dbeta.to(pdtype) if needs[2] else empty(), dres.contiguous(memory_format=fmt) if needs[3] else empty())
