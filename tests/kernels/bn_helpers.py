"""Shared by the tests of kernels/batchnorm.py: shapes, layouts, the small-block fixture and the checks."""
import pytest
import torch
from numerics import TOL

from fastres.kernels import batchnorm as kbn

SHAPES = [(2, 3, 5, 7), (1, 17, 3, 3), (2, 5, 4, 3)]   # numel 210, 153, 120: none a multiple of the block
LAYOUTS = [torch.channels_last, torch.contiguous_format]
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Several programs per kernel: 32-element flat blocks, 16-row tiles, 4 partial rows per merge step,
    merges aiming at 6 programs (groups of several tiles)."""
    monkeypatch.setattr(kbn, "FLAT_BLOCK", 32)
    monkeypatch.setattr(kbn, "TILE_ELEMS", 64)
    monkeypatch.setattr(kbn, "MAX_BLOCK_C", 4)
    monkeypatch.setattr(kbn, "BLOCK_T", 4)
    monkeypatch.setattr(kbn, "MERGE_PROGRAMS", 6)


def _data(shape, dtype, fmt, scale=2.0, shift=0.5, device="cpu"):
    return (torch.randn(shape, device=device) * scale + shift).to(dtype).contiguous(memory_format=fmt)


def _vec(c, lo=0.5, hi=1.5, device="cpu"):
    return torch.rand(c, device=device) * (hi - lo) + lo


def _b(v):
    return v.double()[None, :, None, None]


def _close(got, want, dtype, what):
    tol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * max(scale, 1.0),
                               msg=lambda m: f"{what} ({dtype}): {m}")


def _stats64(z):
    var, mean = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    return mean, var
