"""The Triton BatchNorm kernels (kernels/batchnorm.py) against float64 references written here from the
definition, in both dense layouts, fp32 and fp16 (bf16 on a GPU), outputs poisoned before each launch.
Block sizes are shrunk so that every reduction runs over several tiles with a ragged last one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from numerics import assert_as_good

from fastres.kernels import batchnorm as kbn
from fastres.layout import pack_relu_mask

SHAPES = [(2, 3, 5, 7), (1, 17, 3, 3), (2, 5, 4, 3)]   # numel 210, 153, 120: none a multiple of the block
LAYOUTS = [torch.channels_last, torch.contiguous_format]
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


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


# ---- statistics -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_stats_and_running_update(shape, fmt, dtype, poison):
    z = _data(shape, dtype, fmt, scale=3.0, shift=10.0)   # large mean: a naive sum-of-squares would lose digits
    c = shape[1]
    rm0, rv0 = torch.randn(c), _vec(c)
    rm, rv = rm0.clone(), rv0.clone()
    momentum, eps = 0.3, 1e-3
    mean, invstd = kbn.bn_stats(z, rm, rv, momentum, eps)
    m64, v64 = _stats64(z)
    n = z.numel() // c
    assert mean.dtype == invstd.dtype == torch.float32 and mean.shape == invstd.shape == (c,)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(v64 + eps), rtol=1e-5, atol=0)
    torch.testing.assert_close(rm.double(), (1 - momentum) * rm0.double() + momentum * m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.double(), (1 - momentum) * rv0.double() + momentum * v64 * n / (n - 1),
                               rtol=1e-5, atol=1e-5)


def test_bn_stats_without_running_stats(poison):
    z = _data((2, 5, 3, 3), torch.float32, torch.channels_last)
    mean, invstd = kbn.bn_stats(z, None, None, 0.1, 1e-5)
    m64, v64 = _stats64(z)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(v64 + 1e-5), rtol=1e-5, atol=0)


@pytest.mark.parametrize("c", [3, 17])
def test_bn_finalize_merges_uneven_torch_partials(c, poison):
    """Partials built in torch from 11 chunks of uneven sizes (T = 11 > BLOCK_T = 4, ragged last step)."""
    sizes = [1, 7, 3, 16, 2, 9, 1, 5, 12, 4, 6]
    chunks = [torch.randn(s, c, dtype=torch.float64) * 2 + 5 for s in sizes]
    parts = torch.stack([torch.stack([torch.full((c,), float(len(ch)), dtype=torch.float64), ch.mean(0),
                                      ((ch - ch.mean(0)) ** 2).sum(0)]) for ch in chunks]).float()
    allv = torch.cat(chunks)
    rm, rv = torch.zeros(c), torch.ones(c)
    mean, invstd = kbn.bn_finalize(parts, rm, rv, 1.0, 1e-5)   # momentum 1: running = batch stats
    torch.testing.assert_close(mean.double(), allv.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(allv.var(0, correction=0) + 1e-5), rtol=1e-5, atol=0)
    torch.testing.assert_close(rm.double(), allv.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.double(), allv.var(0, correction=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_stats_match_nn_batchnorm2d_over_steps(momentum, poison):
    """Three training steps: running_mean / running_var as nn.BatchNorm2d (momentum None: 1/step)."""
    c = 5
    ref = nn.BatchNorm2d(c, momentum=momentum).double()
    rm, rv = ref.running_mean.float().clone(), ref.running_var.float().clone()
    for step in range(1, 4):
        z = _data((2, c, 3, 4), torch.float32, torch.channels_last, scale=1.0 + step, shift=step)
        ref(z.double())
        factor = 1.0 / step if momentum is None else momentum
        kbn.bn_stats(z, rm, rv, factor, ref.eps)
        torch.testing.assert_close(rm.double(), ref.running_mean, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        torch.testing.assert_close(rv.double(), ref.running_var, rtol=1e-5, atol=1e-6, msg=f"step {step}")


def test_running_stats_in_half_precision(poison):
    """A model converted with .half() keeps fp16 running buffers: updated in fp32, stored in fp16."""
    z = _data((2, 3, 4, 4), torch.float16, torch.channels_last)
    rm, rv = torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)
    kbn.bn_stats(z, rm, rv, 0.5, 1e-5)
    m64, v64 = _stats64(z)
    n = z.numel() // 3
    assert rm.dtype == rv.dtype == torch.float16
    torch.testing.assert_close(rm.double(), 0.5 * m64, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rv.double(), 0.5 + 0.5 * v64 * n / (n - 1), rtol=1e-3, atol=1e-3)


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


# ---- apply --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,residual,relu", [(True, True, True), (True, False, False), (False, True, False),
                                                  (False, False, True)])
def test_bn_apply(shape, fmt, dtype, affine, residual, relu, poison):
    c = shape[1]
    z = _data(shape, dtype, fmt)
    mean, invstd = torch.randn(c), _vec(c)
    w, b = (_vec(c), torch.randn(c)) if affine else (None, None)
    res = _data(shape, dtype, fmt, scale=1.0, shift=0.0) if residual else None
    y, mask = kbn.bn_apply(z, mean, invstd, w, b, res, relu, True)
    want = (z.double() - _b(mean)) * _b(invstd)
    if affine:
        want = want * _b(w) + _b(b)
    if residual:
        want = want + res.double()
    if relu:
        want = torch.relu(want)
    assert y.dtype == dtype and y.shape == z.shape and y.is_contiguous(memory_format=fmt)
    _close(y, want, dtype, "y")
    if relu:
        assert mask.dtype == torch.uint8 and torch.equal(mask, pack_relu_mask(y))
        assert 0 < int(mask.sum()) and torch.equal(mask, pack_relu_mask(want.to(dtype).contiguous(memory_format=fmt)))
    else:
        assert mask.numel() == 0 and mask.dtype == torch.uint8


def test_bn_apply_mask_off_and_residual_in_other_layout(poison):
    z = _data((2, 5, 3, 3), torch.float32, torch.channels_last)
    res = torch.randn(2, 5, 3, 3)   # NCHW: brought to z's layout
    mean, invstd = torch.randn(5), _vec(5)
    y, mask = kbn.bn_apply(z, mean, invstd, None, None, res, True, False)
    assert mask.numel() == 0
    want = torch.relu((z.double() - _b(mean)) * _b(invstd) + res.double())
    _close(y, want, torch.float32, "y")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_pack_mask_matches_reference(shape, fmt, poison):
    y = torch.relu(_data(shape, torch.float16, fmt, shift=0.0))
    assert torch.equal(kbn.pack_mask(y), pack_relu_mask(y))


# ---- backward -----------------------------------------------------------------------------------

def _backward_reference(z, g, mean, invstd, w, res_on, relu, training, eps):
    """float64 autograd through y = act(w * xhat + beta (+ res)); training: batch statistics of z."""
    z64 = z.double().clone().requires_grad_()
    w64 = (w.double() if w is not None else torch.ones(z.shape[1], dtype=torch.float64)).requires_grad_()
    b64 = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    r64 = torch.zeros(z.shape, dtype=torch.float64, requires_grad=True)
    if training:
        xhat = F.batch_norm(z64, None, None, None, None, True, 0.0, eps)
    else:
        xhat = (z64 - _b(mean)) * _b(invstd)
    y = xhat * w64[None, :, None, None] + b64[None, :, None, None] + (r64 if res_on else 0)
    if relu:
        y = torch.relu(y)
    dz, dw, db, dr = torch.autograd.grad(y, (z64, w64, b64, r64), g.double())
    return y.detach(), dz, dw, db, dr


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training,relu,affine", [(True, True, True), (True, False, False), (False, True, True),
                                                  (False, False, True)])
def test_bn_backward(shape, fmt, dtype, training, relu, affine, poison):
    c, eps = shape[1], 1e-5
    z = _data(shape, dtype, fmt)
    g = _data(shape, dtype, fmt, scale=1.0, shift=0.0)
    w = _vec(c) if affine else None
    if training:
        m64, v64 = _stats64(z)
        mean, invstd = m64.float(), torch.rsqrt(v64 + eps).float()
    else:
        mean, invstd = torch.randn(c), _vec(c)
    y64, dz64, dw64, db64, dr64 = _backward_reference(z, g, mean, invstd, w, True, relu, training, eps)
    mask = pack_relu_mask(y64.contiguous(memory_format=fmt)) if relu else torch.empty(0, dtype=torch.uint8)
    dz, dgamma, dbeta, dres = kbn.bn_backward(g, z, mask, mean, invstd, w, training, relu, True)
    assert dz.dtype == dres.dtype == dtype and dgamma.dtype == dbeta.dtype == torch.float32
    assert dz.is_contiguous(memory_format=fmt) and dres.is_contiguous(memory_format=fmt)
    _close(dz, dz64, dtype, "dz")
    _close(dgamma, dw64, dtype, "dgamma")
    _close(dbeta, db64, dtype, "dbeta")
    assert torch.equal(dres.double(), dr64), "dres must be grad_y masked, exactly"


def test_bn_backward_without_dres_and_grad_in_other_layout(poison):
    z = _data((2, 5, 3, 4), torch.float32, torch.channels_last)
    g = torch.randn(2, 5, 3, 4)   # NCHW while z is NHWC
    mean, invstd = torch.randn(5), _vec(5)
    dz, dgamma, dbeta, dres = kbn.bn_backward(g, z, torch.empty(0, dtype=torch.uint8), mean, invstd, None,
                                              False, False, False)
    assert dres.numel() == 0
    _close(dz, g.double() * _b(invstd), torch.float32, "dz")
    _close(dbeta, g.double().sum((0, 2, 3)), torch.float32, "dbeta")
    _close(dgamma, (g.double() * (z.double() - _b(mean)) * _b(invstd)).sum((0, 2, 3)), torch.float32, "dgamma")


# ---- errors -------------------------------------------------------------------------------------

def _z():
    return torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("call,err,match", [
    (lambda: kbn.bn_stats(_z().double(), None, None, 0.1, 1e-5), TypeError, "float32, float16 or bfloat16"),
    (lambda: kbn.bn_stats(torch.randn(3, 4, 4), None, None, 0.1, 1e-5), ValueError, "4-D"),
    (lambda: kbn.bn_stats(torch.randn(2, 4, 3, 8)[..., ::2], None, None, 0.1, 1e-5), ValueError, "dense NHWC"),
    (lambda: kbn.bn_stats(_z(), torch.zeros(4), torch.ones(4), 0.1, 1e-5), ValueError, r"running_mean.*\(3,\)"),
    (lambda: kbn.bn_finalize(torch.zeros(2, 2, 3), None, None, 0.1, 1e-5), ValueError, r"\(T, 3, C\)"),
    (lambda: kbn.bn_apply(_z(), torch.zeros(3, dtype=torch.float64), torch.ones(3), None, None, None, False, False),
     TypeError, "mean of dtype float32"),
    (lambda: kbn.bn_apply(_z(), torch.zeros(3), torch.ones(3), None, None, torch.randn(2, 3, 4, 5), False, False),
     ValueError, "residual of shape"),
    (lambda: kbn.bn_apply(_z(), torch.zeros(3), torch.ones(3), None, None, _z().half(), False, False),
     TypeError, "residual of dtype"),
    (lambda: kbn.bn_backward(_z(), _z(), torch.zeros(5, dtype=torch.uint8), torch.zeros(3), torch.ones(3), None,
                             True, True, False), ValueError, r"uint8 \(12,\)"),
])
def test_bad_input_errors_name_what_was_expected(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---- GPU: ResNet-50 shapes, batch 32 ----------------------------------------------------------------

R50 = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", R50)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_resnet50_shapes(shape, dtype, monkeypatch, poison):
    monkeypatch.undo()   # the real block sizes, not the small ones of the autouse fixture
    dev, c, eps = "cuda", shape[1], 1e-5
    z = _data(shape, dtype, torch.channels_last, device=dev)
    g = _data(shape, dtype, torch.channels_last, scale=1.0, shift=0.0, device=dev)
    res = _data(shape, dtype, torch.channels_last, scale=1.0, shift=0.0, device=dev)
    w, b = _vec(c, device=dev), torch.randn(c, device=dev)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    mean, invstd = kbn.bn_stats(z, rm, rv, 0.1, eps)
    m64, v64 = _stats64(z)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(v64 + eps), rtol=1e-5, atol=0)
    y, mask = kbn.bn_apply(z, mean, invstd, w, b, res, True, True)
    want = torch.relu((z.double() - _b(m64)) * _b(torch.rsqrt(v64 + eps)) * _b(w) + _b(b) + res.double())
    _close(y, want, dtype, "y")
    assert torch.equal(mask, pack_relu_mask(y))
    dz, dgamma, dbeta, dres = kbn.bn_backward(g, z, mask, mean, invstd, w, True, True, True)
    gm = torch.where(y > 0, g.double(), 0.0)
    xhat = (z.double() - _b(m64)) * _b(torch.rsqrt(v64 + eps))
    n = z.numel() // c
    sg, sgx = gm.sum((0, 2, 3)), (gm * xhat).sum((0, 2, 3))
    dz64 = _b(w * torch.rsqrt(v64 + eps)) * (gm - _b(sg / n) - xhat * _b(sgx / n))
    _close(dbeta, sg, torch.float32 if dtype == torch.float32 else torch.float16, "dbeta")
    _close(dgamma, sgx, torch.float32 if dtype == torch.float32 else torch.float16, "dgamma")
    _close(dz, dz64, dtype, "dz")
    assert torch.equal(dres, gm.to(dtype))


@pytest.mark.gpu
def test_gpu_tensors_on_the_second_device_while_the_first_is_current(monkeypatch, poison):
    """Every launch runs on its tensors' device, not the current one."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    monkeypatch.undo()
    torch.cuda.set_device(0)
    dev, c, eps = torch.device("cuda:1"), 96, 1e-5
    z = _data((4, c, 9, 9), torch.float32, torch.channels_last, device=dev)
    g = _data((4, c, 9, 9), torch.float32, torch.channels_last, scale=1.0, shift=0.0, device=dev)
    w, b = _vec(c, device=dev), torch.randn(c, device=dev)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    mean, invstd = kbn.bn_stats(z, rm, rv, 0.1, eps)
    y, mask = kbn.bn_apply(z, mean, invstd, w, b, None, True, True)
    dz, dgamma, dbeta, _ = kbn.bn_backward(g, z, mask, mean, invstd, w, True, True, False)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
    assert all(t.device == dev for t in (mean, invstd, y, mask, dz, dgamma, dbeta))
    m64, v64 = _stats64(z.cpu())
    torch.testing.assert_close(mean.cpu().double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm.cpu().double(), 0.1 * m64, rtol=1e-5, atol=1e-6)
    want = torch.relu((z.cpu().double() - _b(m64)) * _b(torch.rsqrt(v64 + eps)) * _b(w.cpu()) + _b(b.cpu()))
    _close(y.cpu(), want, torch.float32, "y")
    assert torch.equal(mask.cpu(), pack_relu_mask(y.cpu())) and torch.equal(kbn.pack_mask(y).cpu(), mask.cpu())
    gm = torch.where(want > 0, g.cpu().double(), 0.0)
    _close(dbeta.cpu(), gm.sum((0, 2, 3)), torch.float32, "dbeta")
