"""What every backend of conv_bn_act shares after its BatchNorm backward: the convolution's backward
and the outputs in their promised dtypes and memory formats (the contract in fastres/backends/__init__.py).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from fastres.layout import memory_format_of

Tensor = torch.Tensor

__all__ = ["conv_bn_act_grads", "eval_stats", "format_of", "pair_tensors"]


def pair_tensors(conv: torch.nn.Module, bn: torch.nn.Module):
    """(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
    of an exact nn.Conv2d and nn.BatchNorm2d, read on every call from the modules' parameter and buffer
    tables, where Module.__setattr__ keeps them: what Module.__getattr__ returns, without its call. A name
    not in its table (deleted, or set again as a plain attribute) is read as the attribute."""
    try:
        cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
        return (cp["weight"], cp["bias"], bp["weight"], bp["bias"], bb["running_mean"], bb["running_var"],
                bb["num_batches_tracked"])
    except KeyError:
        return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                bn.num_batches_tracked)


def format_of(t: Tensor) -> torch.memory_format:
    """fastres.layout.memory_format_of(t), remembered per (shape, strides): what it reads (is_contiguous
    decides from sizes and strides alone). Symbolic sizes (unhashable) are asked directly."""
    try:
        return _format_of(t.shape, t.stride())
    except TypeError:
        return memory_format_of(t)


@functools.lru_cache(maxsize=4096)
def _format_of(shape, strides) -> torch.memory_format:
    return memory_format_of(torch.empty_strided(shape, strides, device="meta"))


def eval_stats(running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(mean, invstd) of an eval-mode forward, fp32 and fresh (the contract's outputs may not alias the
    running statistics): running_mean and 1 / sqrt(running_var + eps)."""
    return running_mean.to(torch.float32, copy=True), torch.rsqrt(running_var.float() + eps)


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

    if need_dx or need_dw or need_db:
        xc, wc = (x, weight) if conv_layout is None else (x.contiguous(memory_format=conv_layout),
                                                          weight.contiguous(memory_format=conv_layout))
        gx, gw, gb = torch.ops.aten.convolution_backward(
            dz, xc, wc, [weight.shape[0]] if bias is not None else None,
            stride, padding, dilation, False, [0, 0], groups, [need_dx, need_dw, need_db])
        dx = gx.contiguous(memory_format=format_of(x)) if need_dx else empty()
        if need_dw:
            dw = (gw if gw.dtype == weight.dtype else gw.to(weight.dtype)).contiguous(
                memory_format=format_of(weight))
        else:
            dw = empty()
        db = (gb if gb.dtype == bias.dtype else gb.to(bias.dtype)) if need_db else empty()
    else:
        dx, dw, db = empty(), empty(), empty()
    pdtype = bn_weight.dtype if bn_weight is not None else sum_g.dtype
    dgamma = (sum_gx if sum_gx.dtype == pdtype else sum_gx.to(pdtype)) if need_dg else empty()
    dbeta = (sum_g if sum_g.dtype == pdtype else sum_g.to(pdtype)) if need_dbeta else empty()
    dres = dres.contiguous(memory_format=format_of(x)) if need_dres else empty()
    return dx, dw, db, dgamma, dbeta, dres
