"""The Triton BatchNorm kernels (kernels/batchnorm.py) against float64 references written here from the
definition, in both dense layouts, fp32 and fp16 (bf16 on a GPU), outputs poisoned before each launch.
Block sizes are shrunk so that every reduction runs over several tiles with a ragged last one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bn_helpers import DTYPES, LAYOUTS, SHAPES, _b, _close, _data, _stats64, _vec, small_blocks  # noqa: F401  (small_blocks: autouse)

from fastres.kernels import batchnorm as kbn
from fastres.layout import pack_relu_mask

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
