"""The output size of a convolution, written once for fastres (kernels, layout, report). Plain integer
arithmetic: importing it imports neither triton nor torch."""
from __future__ import annotations

from typing import Sequence, Tuple

__all__ = ["conv_out_hw"]


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int] = (1, 1)) -> Tuple[int, int]:
    """(Ho, Wo) of conv2d over an (h, w) input with a (kh, kw) filter: floor((h + 2p - d(k - 1) - 1) / s) + 1."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo
