"""fastres._cpu's helpers beside the guard's proofs (csrc/cpu/): the input's finiteness test and the guard's
prefetch, against what they stand for.

- all_finite(x) equals torch.isfinite(x).all() on fresh random inputs, NCHW and channels_last, with a NaN,
  +inf or -inf put at a random place (the first and last value and block edges included), on the
  caller's thread and split over the pool (above 2^20 values); it answers None for what it does not take
  (another dtype or device, a strided view, a zero tensor, a storage shrunk under the tensor), and
  fastres.models.input_layout._finite then gives torch's answer.
- guard_lines gives sorted, distinct 64-byte-aligned addresses, and prefetch takes any bytes, addresses
  that are not mapped included (a prefetch is a hint: it never faults).
"""
import random

import pytest
import torch

from fastres import _native
from fastres.models import input_layout

pytestmark = pytest.mark.skipif(_native.cpu is None, reason=f"fastres._cpu is not built: {_native.why}")
CL = torch.channels_last


def _cpu():
    return _native.cpu


@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (2, 3, 64, 64), (1, 3, 224, 224), (5, 3, 300, 300)],
                         ids=["tiny", "b2-64", "b1-224", "parallel"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_all_finite_equals_torch(shape, fmt):
    gen = torch.Generator().manual_seed(sum(shape) + (fmt is CL))
    rng = random.Random(sum(shape))
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    assert _cpu().all_finite(x) is True
    n = x.numel()
    for where in sorted(w for w in {0, n - 1, 1023, 1024, n // 2, rng.randrange(n)} if w < n):
        for value in (float("nan"), float("inf"), -float("inf")):
            y = x.clone(memory_format=fmt)
            _storage_order(y)[where] = value
            assert not torch.isfinite(y).all()
            assert _cpu().all_finite(y) is False, (where, value)
            assert input_layout._finite(y) is False


def _storage_order(y: torch.Tensor) -> torch.Tensor:
    """A 1-D view of `y` in the order its values lie in memory."""
    v = (y.permute(0, 2, 3, 1) if not y.is_contiguous() else y).view(-1)
    assert v.data_ptr() == y.data_ptr()
    return v


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 3, 8, 8).double(),
    lambda: torch.randn(2, 3, 8, 8).half(),
    lambda: torch.randn(2, 3, 8, 16)[..., ::2],
    lambda: torch.randn(2, 3, 8, 8).transpose(2, 3),
    lambda: torch._efficientzerotensor(2, 3, 8, 8),
], ids=["float64", "float16", "strided", "transposed", "zerotensor"])
def test_all_finite_declines_what_it_does_not_take(make):
    x = make()
    assert _cpu().all_finite(x) is None
    x = x.clone()
    x[1, 2, 3, 2] = float("nan")
    assert input_layout._finite(x) is bool(torch.isfinite(x.sum()))


def test_all_finite_edges():
    assert _cpu().all_finite(torch.empty(0, 3, 4, 4)) is True
    assert _cpu().all_finite(1.0) is None and _cpu().all_finite([1.0]) is None
    x = torch.randn(2, 3, 4, 4)
    x.untyped_storage().resize_(16)   # (a storage shrunk under the tensor: not read past its end)
    assert _cpu().all_finite(x) is None
    big = torch.full((1, 3, 8, 8), 3e38)   # (finite values whose fp32 sum overflows are finite)
    assert _cpu().all_finite(big) is True and not torch.isfinite(big.sum())


def test_guard_lines_are_aligned_sorted_and_distinct():
    import torch.nn as nn

    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    records = [(m, type(m), dict(m.__dict__), bytes(len(m.__dict__)), tuple(m._modules.values())) for m in (conv, bn)]
    got = _cpu().guard_lines(records, [(conv, bn)])
    lines = [int.from_bytes(got[i:i + 8], "little") for i in range(0, len(got), 8)]
    assert lines and lines == sorted(set(lines)) and all(a % 64 == 0 for a in lines)
    for address in (id(conv), conv.weight.data_ptr(), bn.running_var.data_ptr()):
        assert address & ~63 in lines
    odd = _cpu().guard_lines([("not", "a record")], [(1, 2, 3)])   # (what it cannot read: left out, no error)
    assert isinstance(odd, bytes) and len(odd) % 8 == 0


def test_prefetch_never_faults():
    rng = random.Random(0)
    addresses = [0, 1, 64, 2**47 - 64, 2**63 - 64, 2**64 - 64] + [rng.randrange(2**64) & ~63 for _ in range(1000)]
    _cpu().prefetch(b"".join(a.to_bytes(8, "little") for a in addresses))
    _cpu().prefetch(b"")
    _cpu().prefetch(b"\x01\x02\x03")   # (a length that is not a multiple of 8: the whole addresses only)
    with pytest.raises(TypeError, match="bytes"):
        _cpu().prefetch([0, 64])
