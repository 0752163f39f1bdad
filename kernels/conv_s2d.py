"""Space-to-depth: a stride-2 conv over few input channels (the ResNet stem) as a stride-1 conv over 4x as many.

With the input zero-padded explicitly (xpad[hp, wp] = x[hp - pad_h, wp - pad_w]), output (ho, wo) of a
stride-2 conv reads xpad[2 ho + r, 2 wo + s]. Write r = 2 r2 + dh, s = 2 s2 + dw (dh, dw in {0, 1}) and
regroup the input by 2x2 pixel blocks: X2[n, u, v, (dh, dw, c)] = xpad[n, c, 2u + dh, 2v + dw]. Then

    out[n, ho, wo] = sum over r2, s2, (dh, dw, c) of  X2[n, ho + r2, wo + s2, (dh, dw, c)] * W2[(r2, s2), (dh, dw, c)]
    W2[co, r2, s2, dh, dw, c] = W[co, c, 2 r2 + dh, 2 s2 + dw]   (0 where 2 r2 + dh >= kh or 2 s2 + dw >= kw)

a stride-1, unpadded conv with a ceil(kh/2) x ceil(kw/2) filter over 4 * Cin channels. For the 7x7/2 stem on
3 channels that is a 4x4 filter over 12 (padded: 16) channels, K = 256 instead of 49 taps x 16 padded
channels = 784 for the direct form, and no padding masks in the kernel. The same products are summed,
in another order. Channels are laid (dh, dw, c) with c padded to 4, so CIN_P = 16 exactly.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["s2d_applies", "s2d_shape", "s2d_input", "s2d_weight", "S2D_CIN_P"]

S2D_MAX_CIN = 4
S2D_CIN_P = 4 * S2D_MAX_CIN   # channels of the rewritten input: (dh, dw, c) with c padded to 4


def s2d_applies(cin: int, stride: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether the host rewrites this conv by space-to-depth (stride 2, dilation 1, Cin <= 4)."""
    return tuple(stride) == (2, 2) and tuple(dilation) == (1, 1) and cin <= S2D_MAX_CIN


def s2d_shape(h: int, w: int, kh: int, kw: int, padding: Sequence[int]) -> Tuple[int, int, int, int]:
    """(H2, W2, kh2, kw2): the rewritten input's height and width (padded input halved, rounded up) and filter."""
    return (h + 2 * padding[0] + 1) // 2, (w + 2 * padding[1] + 1) // 2, (kh + 1) // 2, (kw + 1) // 2


def s2d_input(x: Tensor, padding: Sequence[int]) -> Tensor:
    """x (N, C, H, W), C <= 4, as X2: an (N, 16, H2, W2) channels_last tensor (padding and pad channels 0)."""
    n, c, h, w = x.shape
    ph, pw = padding
    h2, w2, _, _ = s2d_shape(h, w, 1, 1, padding)
    buf = torch.zeros((n, h2, w2, 2, 2, 4), dtype=x.dtype, device=x.device)
    blocks = buf.permute(0, 5, 1, 3, 2, 4)    # [n, c, u, dh, v, dw] = xpad[n, c, 2u + dh, 2v + dw]
    for dh in (0, 1):
        u0, u1 = (ph - dh + 1) // 2, min(h2, (h - 1 + ph - dh) // 2 + 1)   # rows u inside the image
        for dw in (0, 1):
            v0, v1 = (pw - dw + 1) // 2, min(w2, (w - 1 + pw - dw) // 2 + 1)
            if u1 > u0 and v1 > v0:
                hs, ws = 2 * u0 + dh - ph, 2 * v0 + dw - pw
                blocks[:, :c, u0:u1, dh, v0:v1, dw] = x[:, :, hs::2, ws::2][:, :, :u1 - u0, :v1 - v0]
    return buf.view(n, h2, w2, S2D_CIN_P).permute(0, 3, 1, 2)


def s2d_weight(weight: Tensor) -> Tensor:
    """weight (Cout, C, kh, kw), C <= 4, as W2: a (Cout, kh2, kw2, 16) contiguous tensor."""
    cout, c, kh, kw = weight.shape
    kh2, kw2 = (kh + 1) // 2, (kw + 1) // 2
    out = torch.zeros((cout, kh2, kw2, 2, 2, 4), dtype=weight.dtype, device=weight.device)
    for dh in (0, 1):
        for dw in (0, 1):
            part = weight[:, :, dh::2, dw::2]                 # filter rows 2 r2 + dh, columns 2 s2 + dw
            out[:, :part.shape[2], :part.shape[3], dh, dw, :c] = part.permute(0, 2, 3, 1)
    return out.view(cout, kh2, kw2, S2D_CIN_P)
