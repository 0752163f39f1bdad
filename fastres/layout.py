"""Tensor conventions every backend of fastres shares: memory formats, output shapes, the dtype of the
BatchNorm statistics, and the packed ReLU bit mask.

Plain PyTorch, no kernels: imported by fastres.ops (the custom ops and their fakes), by every backend
in fastres.backends and by the oracle, fastres/ops/reference.py.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from fastres.kernels.shapes import conv_out_hw

Tensor = torch.Tensor

__all__ = ["memory_format_of", "conv_out_shape", "int_pair", "pack_relu_mask", "unpack_relu_mask", "stats_dtype"]


def memory_format_of(t: Tensor) -> torch.memory_format:
    """The memory format fastres writes an output in when its input is `t` (4-D)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def int_pair(v) -> Optional[Tuple[int, int]]:
    """A 2-D geometry argument as F.conv2d reads it (an int for both sides, a tuple or list of two ints)
    as a tuple of two ints, or None (a float, a string padding, another length). Exact ints: (1.0, 1.0)
    equals (1, 1) and hashes alike, but F.conv2d rejects it."""
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    if type(v) is int:
        return (v, v)
    if type(v) is list and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return (v[0], v[1])
    return None


def conv_out_shape(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """(N, Cout, Ho, Wo) of conv2d (the formula: fastres.kernels.shapes)."""
    n, _, h, w = x_shape
    cout, _, kh, kw = w_shape
    return [n, cout, *conv_out_hw(h, w, kh, kw, stride, padding, dilation)]


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
