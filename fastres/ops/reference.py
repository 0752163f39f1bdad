"""The oracle: every fused op as plain, readable PyTorch math, float64-capable.

Every kernel test and every parity run compares against these functions (run in float64 for the
reference, or in the tested dtype for "PyTorch's own error"). They follow the backend contract of
fastres/backends/__init__.py (same arguments, same outputs), so a test can swap them for any backend.
It depends on nothing it checks: only PyTorch and the tensor conventions of fastres/layout.py.
The backward math of conv_bn_act is derived here, once; the kernels point to it.

conv_bn_act, forward (per output channel c, over the N*Ho*Wo positions of z):
    z      = conv2d(x, W) + b
    mean   = mean(z),  var = mean((z - mean)^2)          biased: used to normalise
    invstd = 1 / sqrt(var + eps)
    y      = act(gamma * (z - mean) * invstd + beta (+ residual))
    running_mean <- (1 - m) * running_mean + m * mean
    running_var  <- (1 - m) * running_var  + m * var * n / (n - 1)   unbiased, n = N*Ho*Wo
In eval mode mean/invstd come from the running statistics and z is not kept.

bn_act is the same op without the convolution (z = x; dx = dz).

conv_bn_act, backward (g = dL/dy masked by y > 0 when act is ReLU, read from the bit mask; xhat = (z - mean) * invstd):
    dbeta  = sum(g),  dgamma = sum(g * xhat),  dresidual = g
    training: dz = gamma * invstd * (g - dbeta / n - xhat * dgamma / n)
    eval:     dz = gamma * invstd * g            (mean and invstd are constants)
    dx, dW, db = convolution_backward(dz)
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastres.layout import memory_format_of, pack_relu_mask, stats_dtype, unpack_relu_mask

Tensor = torch.Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Per-channel reductions accumulate as PyTorch's own BatchNorm does on that device: in float64
    on a CPU (ATen's CPU accumulate type for float), in float32 on a GPU (float64 stays float64)."""
    return torch.float64 if t.device.type == "cpu" or t.dtype == torch.float64 else torch.float32


def _bcast(v: Tensor) -> Tensor:
    return v[None, :, None, None]


def conv_bn_act_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], residual: Optional[Tensor], stride: List[int],
                        padding: List[int], dilation: List[int], groups: int, training: bool,
                        momentum: float, eps: float, relu: bool, save_mask: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, z, mean, invstd, mask): z is empty in eval mode; mask is the packed ReLU mask
    (pack_relu_mask) when relu and save_mask, else empty. Updates running stats in training."""
    fmt = memory_format_of(x)
    with torch.autocast(x.device.type, enabled=False):
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        y, mean, invstd, mask = _bn_act(z, x.dtype, fmt, bn_weight, bn_bias, running_mean, running_var, residual,
                                        training, momentum, eps, relu, save_mask)
        z_saved = z.contiguous(memory_format=fmt) if training else x.new_empty(0)
    return y, z_saved, mean, invstd, mask


def _bn_act(z: Tensor, dtype: torch.dtype, fmt, bn_weight, bn_bias, running_mean, running_var, residual,
            training: bool, momentum: float, eps: float, relu: bool, save_mask: bool):
    """BatchNorm (+ residual) (+ ReLU) of z: (y in `dtype` and `fmt`, mean, invstd, mask)."""
    ct = stats_dtype(z)
    zf = z.to(ct)
    if training:
        var, mean = torch.var_mean(zf.to(_acc_dtype(zf)), dim=(0, 2, 3), correction=0)
        var, mean = var.to(ct), mean.to(ct)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            n = zf.numel() // zf.shape[1]
            with torch.no_grad():
                running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (n / max(n - 1, 1))
                running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    else:
        assert running_mean is not None and running_var is not None
        mean = running_mean.to(ct, copy=True)
        invstd = torch.rsqrt(running_var.to(ct) + eps)
    scale = invstd if bn_weight is None else invstd * bn_weight.to(ct)
    yf = (zf - _bcast(mean)) * _bcast(scale)
    if bn_bias is not None:
        yf = yf + _bcast(bn_bias.to(ct))
    if residual is not None:
        yf = yf + residual.to(ct)
    if relu:
        yf = torch.relu(yf)
    y = yf.to(dtype).contiguous(memory_format=fmt)
    mask = pack_relu_mask(y) if relu and save_mask else z.new_empty(0, dtype=torch.uint8)
    return y, mean, invstd, mask


def bn_act_forward(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], residual: Optional[Tensor],
                   training: bool, momentum: float, eps: float, relu: bool, save_mask: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_act, the op without a conv: (y, mean, invstd, mask) with y = act(bn(x) (+ residual)), as
    conv_bn_act_forward's with z = x (x is saved by the caller, so no z is returned)."""
    with torch.autocast(x.device.type, enabled=False):
        return _bn_act(x, x.dtype, memory_format_of(x), bn_weight, bn_bias, running_mean, running_var, residual,
                       training, momentum, eps, relu, save_mask)


def conv_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor,
                         mask: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                         stride: List[int], padding: List[int], dilation: List[int], groups: int,
                         training: bool, relu: bool, needs: List[bool]
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias, dbn_weight, dbn_bias, dresidual); an empty tensor where `needs`
    (same order) is False. `z` is the saved pre-BN conv output (recomputed here in eval mode, where
    it is not saved); `mask` the packed ReLU mask (empty without ReLU)."""
    need_dx, need_dw, need_db, need_dg, need_dbeta, need_dres = needs
    def empty() -> Tensor:  # a fresh one per output: custom-op outputs may not alias each other
        return x.new_empty(0)

    with torch.autocast(x.device.type, enabled=False):
        if not training:
            z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        dz, sum_gx, sum_g, g = _bn_act_backward(grad_y, z, mask, mean, invstd, bn_weight, training, relu)
        dz = dz.to(x.dtype)
        fmt, pdtype = memory_format_of(x), (bn_weight.dtype if bn_weight is not None else stats_dtype(x))
        dx = (torch.nn.grad.conv2d_input(x.shape, weight, dz, stride, padding, dilation, groups)
              .contiguous(memory_format=fmt) if need_dx else empty())
        dw = (torch.nn.grad.conv2d_weight(x, weight.shape, dz, stride, padding, dilation, groups)
              .to(weight.dtype).contiguous(memory_format=memory_format_of(weight)) if need_dw else empty())
        db = dz.sum(dim=(0, 2, 3), dtype=_acc_dtype(dz)).to(bias.dtype) if need_db else empty()
        return (dx, dw, db, sum_gx.to(pdtype) if need_dg else empty(), sum_g.to(pdtype) if need_dbeta else empty(),
                g.to(x.dtype).contiguous(memory_format=fmt) if need_dres else empty())


def _bn_act_backward(grad_y: Tensor, z: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                     bn_weight: Optional[Tensor], training: bool, relu: bool):
    """(dz, sum(g * xhat), sum(g), g) in the statistics' dtype: the BatchNorm part of the backward."""
    ct = stats_dtype(z)
    g = grad_y.to(ct)
    if relu:
        g = g.masked_fill(~unpack_relu_mask(mask, g), 0.0)
    xhat = (z.to(ct) - _bcast(mean)) * _bcast(invstd)
    sum_g = g.sum(dim=(0, 2, 3), dtype=_acc_dtype(g)).to(ct)
    sum_gx = (g * xhat).sum(dim=(0, 2, 3), dtype=_acc_dtype(g)).to(ct)
    scale = invstd if bn_weight is None else invstd * bn_weight.to(ct)
    if training:
        n = g.numel() // g.shape[1]
        dz = (g - _bcast(sum_g / n) - xhat * _bcast(sum_gx / n)) * _bcast(scale)
    else:
        dz = g * _bcast(scale)
    return dz, sum_gx, sum_g, g


def bn_act_backward(grad_y: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                    bn_weight: Optional[Tensor], training: bool, relu: bool, needs: List[bool]
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dbn_weight, dbn_bias, dresidual) of bn_act; an empty tensor where `needs` is False."""
    def empty() -> Tensor:
        return x.new_empty(0)

    with torch.autocast(x.device.type, enabled=False):
        dz, sum_gx, sum_g, g = _bn_act_backward(grad_y, x, mask, mean, invstd, bn_weight, training, relu)
        fmt, pdtype = memory_format_of(x), (bn_weight.dtype if bn_weight is not None else stats_dtype(x))
        return (dz.to(x.dtype).contiguous(memory_format=fmt) if needs[0] else empty(),
                sum_gx.to(pdtype) if needs[1] else empty(), sum_g.to(pdtype) if needs[2] else empty(),
                g.to(x.dtype).contiguous(memory_format=fmt) if needs[3] else empty())
