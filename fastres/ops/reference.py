"""The "torch" backend: every fused op in plain PyTorch.

This is the CPU path and the oracle of every kernel test: the Triton and CUDA backends implement the
same functions, with the same arguments and the same outputs (values, dtypes, memory formats).

conv_bn_act, forward (per output channel c, over the N*Ho*Wo positions of z):
    z      = conv2d(x, W) + b
    mean   = mean(z),  var = mean((z - mean)^2)          biased: used to normalise
    invstd = 1 / sqrt(var + eps)
    y      = act(gamma * (z - mean) * invstd + beta (+ residual))
    running_mean <- (1 - m) * running_mean + m * mean
    running_var  <- (1 - m) * running_var  + m * var * n / (n - 1)   unbiased, n = N*Ho*Wo
In eval mode mean/invstd come from the running statistics and z is not kept.

conv_bn_act, backward (g = dL/dy masked by y > 0 when act is ReLU, read from the bit mask; xhat = (z - mean) * invstd):
    dbeta  = sum(g),  dgamma = sum(g * xhat),  dresidual = g
    training: dz = gamma * invstd * (g - dbeta / n - xhat * dgamma / n)
    eval:     dz = gamma * invstd * g            (mean and invstd are constants)
    dx, dW, db = convolution_backward(dz)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def memory_format_of(t: Tensor) -> torch.memory_format:
    """The memory format fastres writes an output in when its input is `t` (4-D)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_out_shape(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """(N, Cout, Ho, Wo) of conv2d."""
    n, _, h, w = x_shape
    cout, _, kh, kw = w_shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, cout, ho, wo]


def _storage_order(t: Tensor) -> Tensor:
    """`t` flattened in its memory order (NHWC for channels_last, NCHW otherwise)."""
    if memory_format_of(t) == torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


_BITS = 1 << torch.arange(8, dtype=torch.int32)


def pack_relu_mask(y: Tensor) -> Tensor:
    """The ReLU mask of y as bits: bit (i % 8) of byte i // 8 is y_i > 0, where i is the element's
    position in memory order (uint8, ceil(numel / 8) bytes). Every backend writes this layout."""
    pos = _storage_order(y) > 0
    pad = (-pos.numel()) % 8
    if pad:
        pos = torch.cat([pos, pos.new_zeros(pad)])
    return (pos.view(-1, 8).to(torch.int32) * _BITS.to(y.device)).sum(1).to(torch.uint8)


def unpack_relu_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Inverse of pack_relu_mask: a bool tensor shaped and laid out like `like`."""
    bits = (mask.to(torch.int32)[:, None] & _BITS.to(mask.device)) != 0
    flat = bits.reshape(-1)[: like.numel()]
    if memory_format_of(like) == torch.channels_last:
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the BatchNorm statistics (mean, invstd) and of the arithmetic around them: float32
    for fp32/fp16/bf16 data, float64 for float64 data (so a float64 model stays a float64 oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
        ct = stats_dtype(x)
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
        y = yf.to(x.dtype).contiguous(memory_format=fmt)
        z_saved = z.contiguous(memory_format=fmt) if training else x.new_empty(0)
        mask = pack_relu_mask(y) if relu and save_mask else x.new_empty(0, dtype=torch.uint8)
    return y, z_saved, mean, invstd, mask


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
        ct = stats_dtype(x)
        g = grad_y.to(ct)
        if relu:
            g = g.masked_fill(~unpack_relu_mask(mask, g), 0.0)
        if not training:
            z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        xhat = (z.to(ct) - _bcast(mean)) * _bcast(invstd)
        sum_g = g.sum(dim=(0, 2, 3), dtype=_acc_dtype(g)).to(ct)
        sum_gx = (g * xhat).sum(dim=(0, 2, 3), dtype=_acc_dtype(g)).to(ct)
        scale = invstd if bn_weight is None else invstd * bn_weight.to(ct)
        if training:
            n = g.numel() // g.shape[1]
            dz = (g - _bcast(sum_g / n) - xhat * _bcast(sum_gx / n)) * _bcast(scale)
        else:
            dz = g * _bcast(scale)
        return conv_bn_act_grads(dz.to(x.dtype), x, weight, bias, sum_gx, sum_g, g.to(x.dtype), bn_weight,
                                 stride, padding, dilation, groups, needs)


def conv_bn_act_grads(dz: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], sum_gx: Tensor,
                      sum_g: Tensor, dres: Tensor, bn_weight: Optional[Tensor], stride: List[int],
                      padding: List[int], dilation: List[int], groups: int, needs: List[bool],
                      conv_layout: Optional[torch.memory_format] = None
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The end of conv_bn_act's backward, the same for every backend once its BatchNorm backward has
    produced dz (in x's dtype), sum(g * xhat), sum(g) and dres = g: dx, dW, db by
    aten.convolution_backward (cuDNN on a GPU), then every output in its promised dtype and memory
    format, a fresh empty tensor where `needs` is False. `conv_layout` makes x and weight that memory
    format for the convolution (the outputs still follow x's and weight's own)."""
    need_dx, need_dw, need_db, need_dg, need_dbeta, need_dres = needs

    def empty() -> Tensor:  # a fresh one per output: custom-op outputs may not alias each other
        return x.new_empty(0)

    dx, dw, db = empty(), empty(), empty()
    if need_dx or need_dw or need_db:
        xc, wc = (x, weight) if conv_layout is None else (x.contiguous(memory_format=conv_layout),
                                                          weight.contiguous(memory_format=conv_layout))
        gx, gw, gb = torch.ops.aten.convolution_backward(
            dz, xc, wc, [weight.shape[0]] if bias is not None else None,
            stride, padding, dilation, False, [0, 0], groups, [need_dx, need_dw, need_db])
        if need_dx:
            dx = gx.contiguous(memory_format=memory_format_of(x))
        if need_dw:
            dw = gw.to(weight.dtype).contiguous(memory_format=memory_format_of(weight))
        if need_db:
            db = gb.to(bias.dtype)
    pdtype = bn_weight.dtype if bn_weight is not None else sum_g.dtype
    dgamma = sum_gx.to(pdtype) if need_dg else empty()
    dbeta = sum_g.to(pdtype) if need_dbeta else empty()
    dres = dres.contiguous(memory_format=memory_format_of(x)) if need_dres else empty()
    return dx, dw, db, dgamma, dbeta, dres
