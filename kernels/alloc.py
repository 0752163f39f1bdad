"""Output allocation for kernel host code, with a poison switch for tests.

Every backend allocates the tensors its kernels write through :data:`empty`, looked up on this module
at the call (``alloc.empty(...)``, not a name imported once): it is torch.empty itself, so an
allocation costs one call, and :func:`poisoned` (tests) rebinds it, within its block, to a version
whose tensors come filled with NaN (floating) or 0xA5 bytes (integer), so an element a kernel fails to
write shows up as a test failure instead of passing by luck on recycled memory.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

_poison = False


def _poisoned_empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    elif t.numel():
        t.view(torch.uint8).fill_(0xA5)
    return t


# empty(shape, *, dtype, device, memory_format=torch.contiguous_format): torch.empty, or the poisoning
# allocator inside poisoned().
empty = torch.empty


def is_poisoned() -> bool:
    return _poison


@contextlib.contextmanager
def poisoned(on: bool = True) -> Iterator[None]:
    """Within the block, :data:`empty` returns poisoned tensors (on=False: plain ones)."""
    global _poison, empty
    previous = _poison, empty
    _poison, empty = on, (_poisoned_empty if on else torch.empty)
    try:
        yield
    finally:
        _poison, empty = previous
