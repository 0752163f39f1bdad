"""Shared by the tests of kernels/conv.py: random inputs, the float64 reference and the closeness checks."""

import math
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from numerics import TOL

from fastres.kernels import interpreter_active

triton = pytest.importorskip("triton")
from fastres.kernels import conv as kconv  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

if DEV == "cpu" and not interpreter_active():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)


def _rand(*shape, dtype=torch.float32, fmt=torch.contiguous_format, device=DEV):
    return torch.randn(*shape, device=device).to(dtype).contiguous(memory_format=fmt)


def _ref(x, w, b, stride, padding, dilation):
    """(float64 conv2d (+ bias) of the exact inputs, its error scale). The scale is
    max(conv2d(|x|, |w|) + |b|): rounding errors of a dot product are relative to the sum of the
    magnitudes of its terms, not to its result (which cancellation can make arbitrarily small)."""
    xd, wd, bd = x.double(), w.double(), None if b is None else b.double()
    ref = F.conv2d(xd, wd, bd, stride, padding, dilation)
    mag = F.conv2d(xd.abs(), wd.abs(), None if bd is None else bd.abs(), stride, padding, dilation)
    return ref, mag.max().item()


def _close(out, ref, dtype, mag, what="output"):
    """|out - ref| <= tol * (|ref| + mag): relative to the element and to the error scale `mag`."""
    assert not torch.isnan(out).any(), f"{what}: NaN (poisoned element never written?)"
    err = (out.double() - ref).abs()
    bound = TOL[dtype] * (ref.abs() + mag)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max err "
                           f"{err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}, scale {mag:.3g}, "
                           f"tol {TOL[dtype]}")


def _check_stats(part, v_ref, mag, block_m, rtol=1e-5):
    """merge_stats(part) against float64 torch.var_mean of v_ref, and the per-tile counts.
    The statistics come from the fp32 accumulator, so each element of v carries an error of about
    e = rtol / 5 * mag (mag: the error scale from _ref); the mean then errs by at most e and the
    variance by about 2 * std * e.
    rtol: 1e-5 for fp32 accumulation with IEEE rounding (the interpreter, fp32 on a GPU); GPU tensor
    cores accumulating 16-bit products round less carefully, so those tests pass 1e-4 (still 40x
    finer than the bf16 rounding of the conv output itself)."""
    n, c, ho, wo = v_ref.shape
    m = n * ho * wo
    tiles = math.ceil(m / block_m)
    assert part.dtype == torch.float32 and tuple(part.shape) == (tiles, 3, c)
    assert not torch.isnan(part).any(), "statistics: NaN (poisoned element never written?)"
    counts = torch.tensor([min(block_m, m - t * block_m) for t in range(tiles)], dtype=torch.float32)
    torch.testing.assert_close(part[:, 0, :].cpu(), counts[:, None].expand(tiles, c), rtol=0, atol=0)
    mean, var, cnt = merge_stats(part)
    var_ref, mean_ref = torch.var_mean(v_ref, dim=(0, 2, 3), correction=0)
    assert torch.all(cnt == m)
    e = rtol / 5 * mag
    torch.testing.assert_close(mean.double(), mean_ref, rtol=0, atol=e)
    torch.testing.assert_close(var.double(), var_ref, rtol=rtol, atol=2 * e * var_ref.sqrt().max().item() + e * e)


def _block_m():
    return kconv.BLOCK_M_GPU if DEV == "cuda" else kconv.BLOCK_M_INTERPRETER


RESNET50_CASES = [  # every distinct conv of ResNet-50 (torchvision v1.5: stride on the 3x3): (Cin, H, Cout, k, s)
    (3, 224, 64, 7, 2), (64, 56, 64, 1, 1), (64, 56, 64, 3, 1), (64, 56, 256, 1, 1), (256, 56, 64, 1, 1),
    (256, 56, 128, 1, 1), (128, 56, 128, 3, 2), (128, 28, 512, 1, 1), (256, 56, 512, 1, 2), (512, 28, 128, 1, 1),
    (128, 28, 128, 3, 1), (512, 28, 256, 1, 1), (256, 28, 256, 3, 2), (256, 14, 1024, 1, 1), (512, 28, 1024, 1, 2),
    (1024, 14, 256, 1, 1), (256, 14, 256, 3, 1), (1024, 14, 512, 1, 1), (512, 14, 512, 3, 2), (512, 7, 2048, 1, 1),
    (1024, 14, 2048, 1, 2), (2048, 7, 512, 1, 1), (512, 7, 512, 3, 1),
]


# The conv's statistics epilogue is checked through this plain-torch merge of its partials (the backends
# merge them with the BatchNorm finalize kernel).
def merge_stats(partials: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's parallel merge of per-tile (count, mean, M2) partials, in plain torch.

    partials: (T, 3, C) as returned by conv2d_nhwc(want_stats=True).
    Returns (mean, var_biased, count), each a (C,) fp32 tensor (count is the same for every channel:
    the number of rows merged). Computed in float64:
        n = sum n_t,  mean = sum n_t * mean_t / n,  M2 = sum M2_t + sum n_t * (mean_t - mean)^2,
        var_biased = M2 / n.
    """
    if not isinstance(partials, torch.Tensor) or partials.dim() != 3 or partials.shape[1] != 3:
        got = tuple(partials.shape) if isinstance(partials, torch.Tensor) else type(partials).__name__
        raise ValueError(f"merge_stats: expected partials of shape (T, 3, C), got {got}")
    p = partials.to(torch.float64)
    cnt, mu, m2 = p[:, 0], p[:, 1], p[:, 2]
    n = cnt.sum(0)
    mean = (cnt * mu).sum(0) / n
    var = (m2.sum(0) + (cnt * (mu - mean) ** 2).sum(0)) / n
    return mean.float(), var.float(), n.float()
