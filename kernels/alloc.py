"""Output allocation for kernel host code, with a poison switch for tests.

Every backend allocates the tensors its kernels write through :func:`empty`. Under :func:`poisoned`
(tests) they come filled with NaN (floating) or 0xA5 bytes (integer), so an element a kernel fails to
write shows up as a test failure instead of passing by luck on recycled memory.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

_poison = False


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
    if _poison:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.view(torch.uint8).fill_(0xA5) if t.numel() else None
    return t


def is_poisoned() -> bool:
    return _poison


@contextlib.contextmanager
def poisoned(on: bool = True) -> Iterator[None]:
    """Within the block, :func:`empty` returns poisoned tensors."""
    global _poison
    previous, _poison = _poison, on
    try:
        yield
    finally:
        _poison = previous
