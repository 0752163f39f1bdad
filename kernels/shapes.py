"""The output size of a convolution, written once for fastres (kernels, layout, report). Plain integer
arithmetic: importing it imports neither triton nor torch."""
from __future__ import annotations

from typing import Sequence, Tuple

__all__ = ["conv_out_hw", "cdiv", "next_pow2"]


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int] = (1, 1)) -> Tuple[int, int]:
    """(Ho, Wo) of conv2d over an (h, w) input with a (kh, kw) filter: floor((h + 2p - d(k - 1) - 1) / s) + 1."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: triton.cdiv's value in one Python call (the host path counts calls)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1): triton.next_power_of_2's value in one Python call."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
