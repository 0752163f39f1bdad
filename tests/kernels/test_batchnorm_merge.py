"""The 2-D merges of the Triton BatchNorm kernels (finalize, backward reduce: groups of tiles and the
last-program merge) against float64 and nn.BatchNorm2d, and the merge plan at ResNet-50 sizes."""
import pytest
import torch
import torch.nn as nn
from bn_helpers import DTYPES, LAYOUTS, SHAPES, _b, _close, _data, _stats64, _vec, small_blocks  # noqa: F401  (small_blocks: autouse)
from numerics import assert_as_good

from fastres.kernels import batchnorm as kbn

# ---- the 2-D merges (finalize, backward reduce): groups of tiles, last-program merge ------------------

# MERGE_PROGRAMS -> on (4, c, 12, 10) with 16-row tiles (T = 30): one group of 30 tiles (8 steps of 4),
# a few groups of 10 to 15 tiles (several steps each), one tile per group (30 groups, a final merge of 8 steps)
PROGRAMS = [1, 6, 10 ** 6]


def _house(got, want64, torch_same, what):
    """The house rule (tests/numerics.py): no worse than 2x PyTorch's same-dtype error + a few ulps."""
    assert_as_good(got, torch_same, want64, name=what)


def _plan_of(t, c):
    grid, meta, chunk = kbn._merge_plan(t, c)
    return grid[0], chunk


MERGE_CASES = [(torch.float32, 17), (torch.float16, 5)]   # dtype, channels: 5 and 2 channel blocks, ragged


@pytest.mark.parametrize("programs", PROGRAMS)
@pytest.mark.parametrize("dtype,c", MERGE_CASES)
def test_finalize_2d_merge_matches_float64_and_batchnorm2d(programs, c, dtype, monkeypatch, poison):
    """bn_stats over 30 tiles x cdiv(c, 4) channel blocks (a ragged last block), at four group sizes:
    mean, invstd and the running statistics of nn.BatchNorm2d, against float64, bit-identical twice."""
    monkeypatch.setattr(kbn, "MERGE_PROGRAMS", programs)
    z = _data((4, c, 12, 10), dtype, torch.channels_last, scale=3.0, shift=10.0)
    groups, chunk = _plan_of(30, c)
    part = kbn.bn_partials(z)
    assert part.shape[0] == 30 and groups == -(-30 // chunk)
    assert {1: groups == 1, 6: 1 < groups < 30 and chunk > 4, 10 ** 6: chunk == 1}[programs], (groups, chunk)
    momentum, eps = 0.3, 1e-3
    ref64 = nn.BatchNorm2d(c, eps=eps, momentum=momentum).double()
    ref32 = nn.BatchNorm2d(c, eps=eps, momentum=momentum)
    rm0, rv0 = torch.randn(c), _vec(c)
    for ref in (ref64, ref32):
        ref.running_mean.copy_(rm0)
        ref.running_var.copy_(rv0)
    ref64(z.double())
    ref32(z.float())
    runs = []
    for _ in range(2):
        rm, rv = rm0.clone(), rv0.clone()
        mean, invstd = kbn.bn_finalize(part, rm, rv, momentum, eps)
        runs.append((mean, invstd, rm, rv))
    m64, v64 = _stats64(z)
    v32, m32 = torch.var_mean(z.float(), dim=(0, 2, 3), correction=0)
    _house(mean, m64, m32, "mean")
    _house(invstd, torch.rsqrt(v64 + eps), torch.rsqrt(v32 + eps), "invstd")
    _house(rm, ref64.running_mean, ref32.running_mean, "running_mean")
    _house(rv, ref64.running_var, ref32.running_var, "running_var")
    for a, b, name in zip(*runs, ("mean", "invstd", "running_mean", "running_var")):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("programs", PROGRAMS)
def test_finalize_2d_merge_of_uneven_torch_partials(programs, monkeypatch, poison):
    """57 partials of sizes 0 to 9 (empty tiles included), 9 channels, built in float64."""
    monkeypatch.setattr(kbn, "MERGE_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(torch.seed() % 2 ** 31)
    sizes = torch.randint(0, 10, (57,), generator=gen).tolist()
    sizes[0] = max(sizes[0], 2)
    c = 9
    chunks = [torch.randn(s, c, dtype=torch.float64) * 2 + 5 for s in sizes]
    rows = []
    for ch in chunks:
        mu = ch.mean(0) if len(ch) else torch.zeros(c, dtype=torch.float64)
        rows.append(torch.stack([torch.full((c,), float(len(ch)), dtype=torch.float64), mu,
                                 ((ch - mu) ** 2).sum(0)]))
    parts = torch.stack(rows).float()
    allv = torch.cat(chunks)
    mean, invstd = kbn.bn_finalize(parts, None, None, 0.1, 1e-5)
    mean2, invstd2 = kbn.bn_finalize(parts, None, None, 0.1, 1e-5)
    assert torch.equal(mean, mean2) and torch.equal(invstd, invstd2)
    x32 = allv.float()
    _house(mean, allv.mean(0), x32.mean(0), "mean")
    _house(invstd, torch.rsqrt(allv.var(0, correction=0) + 1e-5), torch.rsqrt(x32.var(0, correction=0) + 1e-5),
           "invstd")


@pytest.mark.parametrize("programs", PROGRAMS)
@pytest.mark.parametrize("dtype,c", MERGE_CASES)
def test_backward_2d_reduce_matches_float64(programs, c, dtype, monkeypatch, poison):
    """dgamma / dbeta over 30 tiles at four group sizes, against float64; two runs bit-identical."""
    monkeypatch.setattr(kbn, "MERGE_PROGRAMS", programs)
    monkeypatch.setattr(kbn, "FLAT_BLOCK", 4096)   # dz is not the subject here: few elementwise programs
    z = _data((4, c, 12, 10), dtype, torch.channels_last)
    g = _data((4, c, 12, 10), dtype, torch.channels_last, scale=1.0, shift=0.3)
    mean, invstd = torch.randn(c), _vec(c)
    runs = [kbn.bn_backward(g, z, torch.empty(0, dtype=torch.uint8), mean, invstd, _vec(c), False, False, False)
            for _ in range(2)]
    for a, b in zip(runs[0][1:3], runs[1][1:3]):
        assert torch.equal(a, b), "dgamma / dbeta differ between two identical runs"
    xhat64 = (z.double() - _b(mean)) * _b(invstd)
    xhat32 = (z.float() - mean[None, :, None, None]) * invstd[None, :, None, None]
    _, dgamma, dbeta, _ = runs[0]
    _house(dbeta, g.double().sum((0, 2, 3)), g.float().sum((0, 2, 3)), "dbeta")
    _house(dgamma, (g.double() * xhat64).sum((0, 2, 3)), (g.float() * xhat32).sum((0, 2, 3)), "dgamma")


def test_merge_plan_fills_the_gpu_at_resnet50_batch256(monkeypatch):
    """The real plan (MERGE_PROGRAMS 528): >= 132 programs for the conv's 128-row tiles and for the
    tile kernels' own, at every ResNet-50 batch-256 BatchNorm shape."""
    monkeypatch.undo()
    for c, hw in [(64, 112 * 112), (64, 56 * 56), (256, 56 * 56), (128, 28 * 28), (512, 28 * 28),
                  (256, 14 * 14), (1024, 14 * 14), (512, 7 * 7), (2048, 7 * 7)]:
        m = 256 * hw
        for t in (-(-m // 128), kbn._reduce_plan(m, c)[0][0]):
            grid, meta, chunk = kbn._merge_plan(t, c)
            assert grid[0] * grid[1] >= 132 and grid[0] == -(-t // chunk), (c, hw, t, grid)
