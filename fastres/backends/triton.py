"""The "triton" backend of fastres::conv_bn_act: the Triton conv (kernels/conv.py) + the Triton BatchNorm
kernels (kernels/batchnorm.py). Same functions, arguments and outputs as fastres/ops/reference.py
(the math is written out there); fastres.backends picks this module when the user asks for "triton".

Forward, training:  z, partials = conv2d_nhwc(x, W, b, want_stats=True)   one launch: conv + tile stats
                    mean, invstd = bn_finalize(partials, running stats)     one launch: merge + running update
                    y, mask      = bn_apply(z, ..., residual, relu)         one launch: scale/shift/add/ReLU/bits
Forward, eval:      y = conv2d_nhwc(x, W, scale=gamma*invstd, shift=..., residual, relu)   one launch
Backward:           dz, dgamma, dbeta, dres = bn_backward(...)  (z recomputed by the conv in eval mode)
                    dx, dW, db = aten.convolution_backward(dz)
The conv writes channels_last; for an NCHW input, z and y are brought to NCHW (one copy each) so that
every output has the input's memory format and the ReLU bit mask follows y's memory order.
The conv consumes a channels_last weight in place (others are re-laid on every call by kernels/conv.py:
nothing derived from a weight is cached across calls). On a GPU it autotunes on the first launch of each
shape bucket: before capturing a model in a CUDA graph, run fastres.kernels.warmup.warmup(model, x) once.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastres.backends.common import conv_bn_act_grads, eval_stats, format_of
from fastres.kernels import interpreter_active
from fastres.kernels.batchnorm import bn_apply, bn_backward, bn_finalize, bn_partials, pack_mask
from fastres.kernels.conv import conv2d_nhwc, conv2d_nhwc_supports
from fastres.layout import memory_format_of

Tensor = torch.Tensor

# The backend's declaration (read by fastres.backends' registry). Importing this module imported triton
# and the kernels, so the backend is available wherever the import succeeds.
NAME = "triton"
DEVICES = ("cuda",)   # and CPU tensors through Triton's interpreter (tests)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("conv_bn_act", "bn_act")


def available() -> Tuple[bool, str]:
    return True, ""


def device_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
        return None
    return (f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported); got tensors on {device}")

__all__ = ["conv_bn_act_forward", "conv_bn_act_backward", "conv_bn_act_supports", "bn_act_forward",
           "bn_act_backward", "bn_act_supports"]


def conv_bn_act_supports(x: Tensor, weight: Tensor, residual: Optional[Tensor], stride, padding, dilation,
                         groups: int, training: bool, relu: bool) -> Optional[str]:
    """None when the Triton kernels cover this call, else why not (the torch backend then runs it)."""
    why = conv2d_nhwc_supports(x, weight, stride, padding, dilation, groups)
    if why is not None:
        return f"triton conv: {why}"
    if residual is not None and residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} != input dtype {x.dtype}"
    return None


def conv_bn_act_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], residual: Optional[Tensor], stride: List[int],
                        padding: List[int], dilation: List[int], groups: int, training: bool,
                        momentum: float, eps: float, relu: bool, save_mask: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mean, invstd, mask) as fastres.ops.reference.conv_bn_act_forward."""
    fmt = format_of(x)
    save = bool(relu and save_mask)
    if training:
        z, partials = conv2d_nhwc(x, weight, bias, stride=tuple(stride), padding=tuple(padding),
                                  dilation=tuple(dilation), want_stats=True)
        mean, invstd = bn_finalize(partials, running_mean, running_var, momentum, eps)
        z = z.contiguous(memory_format=fmt)
        y, mask = bn_apply(z, mean, invstd, bn_weight, bn_bias, residual, relu, save)
        return y, z, mean, invstd, mask

    # Eval: BatchNorm is an affine map per output channel, folded into the conv's epilogue:
    #   y = act((conv(x) + b - running_mean) * s + beta (+ residual)),  s = gamma / sqrt(running_var + eps)
    #     = act(conv(x) * s + shift (+ residual)),                      shift = beta + (b - running_mean) * s.
    # Multiplying the fp32 accumulator by s[c] in the epilogue is the same fold as using the weights
    # W[c] * s[c], without rounding W * s to the data dtype (bf16 keeps only 8 bits of it), in one launch.
    assert running_mean is not None and running_var is not None
    mean, invstd = eval_stats(running_mean, running_var, eps)
    scale = invstd if bn_weight is None else invstd * bn_weight.float()
    off = -mean if bias is None else bias.float() - mean
    shift = off * scale if bn_bias is None else bn_bias.float() + off * scale
    y, _ = conv2d_nhwc(x, weight, None, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                       scale=scale, shift=shift, residual=residual, relu=relu)
    y = y.contiguous(memory_format=fmt)
    mask = pack_mask(y) if save else x.new_empty(0, dtype=torch.uint8)
    return y, x.new_empty(0), mean, invstd, mask


def conv_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor,
                         mask: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                         stride: List[int], padding: List[int], dilation: List[int], groups: int,
                         training: bool, relu: bool, needs: List[bool]
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dbn_weight, dbn_bias, dresidual) as fastres.ops.reference.conv_bn_act_backward."""
    fmt = format_of(x)
    if not training:  # z is not saved in eval mode: recompute it (conv + bias, no epilogue)
        z, _ = conv2d_nhwc(x, weight, bias, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))
    z = z.contiguous(memory_format=fmt)
    dz, sum_gx, sum_g, dres = bn_backward(grad_y, z, mask, mean, invstd, bn_weight, training, relu,
                                          bool(needs[5]))
    return conv_bn_act_grads(dz, x, weight, bias, sum_gx, sum_g, dres, bn_weight, stride, padding,
                             dilation, groups, needs)


# ------------------------------------------------------------------------------------------------
# bn_act: the same BatchNorm kernels without the conv (z = x)
# training: mean, invstd = bn_finalize(bn_partials(x))   two launches: tile stats, merge + running update
#           y, mask = bn_apply(x, ...)                    one launch
# eval:     y, mask = bn_apply(x, running statistics)     one launch
# backward: dx, dgamma, dbeta, dres = bn_backward(...)    the BatchNorm backward kernels

def bn_act_supports(x: Tensor, residual: Optional[Tensor], training: bool, relu: bool) -> Optional[str]:
    if x.dtype not in DTYPES:
        return f"the Triton BatchNorm kernels take float32, float16 or bfloat16, got {x.dtype}"
    if residual is not None and (residual.dtype != x.dtype or memory_format_of(residual) != memory_format_of(x)):
        return "residual dtype or memory format differs from the input's"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "a strided input (neither NCHW- nor channels_last-contiguous)"
    return None


def bn_act_forward(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], residual: Optional[Tensor],
                   training: bool, momentum: float, eps: float, relu: bool, save_mask: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, mask) as fastres.ops.reference.bn_act_forward."""
    if training:
        mean, invstd = bn_finalize(bn_partials(x), running_mean, running_var, momentum, eps)
    else:
        assert running_mean is not None and running_var is not None
        mean, invstd = eval_stats(running_mean, running_var, eps)
    y, mask = bn_apply(x, mean, invstd, bn_weight, bn_bias, residual, relu, bool(relu and save_mask))
    return y, mean, invstd, mask


def bn_act_backward(grad_y: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                    bn_weight: Optional[Tensor], training: bool, relu: bool, needs: List[bool]
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dbn_weight, dbn_bias, dresidual) as fastres.ops.reference.bn_act_backward."""
    dz, sum_gx, sum_g, dres = bn_backward(grad_y.contiguous(memory_format=format_of(x)), x, mask, mean, invstd,
                                          bn_weight, training, relu, bool(needs[3]))
    pdtype = bn_weight.dtype if bn_weight is not None else sum_g.dtype

    def empty() -> Tensor:
        return x.new_empty(0)
    return (dz if needs[0] else empty(), sum_gx.to(pdtype) if needs[1] else empty(),
            sum_g.to(pdtype) if needs[2] else empty(), dres if needs[3] else empty())
