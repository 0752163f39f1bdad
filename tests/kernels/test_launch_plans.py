"""The launch plans of kernels/conv.py and kernels/batchnorm.py are remembered per metadata key: every
input of a plan must be in its key. These tests change one piece of metadata at a time between two
calls (the second call finds the first one's plan if the key misses it) and check the results against
float64 oracles; and a bad call must raise every time (an error is never remembered as a plan)."""
import pytest
import torch
from bn_helpers import _b, _close, _data, _vec
from conv_helpers import DEV, _rand, _ref
from conv_helpers import _close as _close_conv

from fastres.kernels import alloc
from fastres.kernels import batchnorm as kbn
from fastres.kernels import conv as kconv

CL, NCHW = torch.channels_last, torch.contiguous_format


@pytest.fixture(autouse=True)
def poison():
    with alloc.poisoned():
        yield


def _apply_ref(z, mean, invstd, res, relu):
    y = (z.double() - _b(mean)) * _b(invstd) + (0 if res is None else res.double())
    return y.clamp_min(0) if relu else y


@pytest.mark.parametrize("first,second", [(CL, NCHW), (NCHW, CL)])
def test_conv_residual_layout_changes_between_calls(first, second):
    """The residual's strides are part of the conv plan (the kernel reads it through them)."""
    x, w = _rand(2, 16, 6, 6, fmt=CL), _rand(16, 16, 3, 3)
    ref, mag = _ref(x, w, None, (1, 1), (1, 1), (1, 1))
    for fmt in (first, second):
        res = _rand(2, 16, 6, 6, fmt=fmt)
        out, _ = kconv.conv2d_nhwc(x, w, padding=1, residual=res)
        _close_conv(out, ref + res.double(), torch.float32, mag, f"residual {fmt}")


def test_conv_geometry_and_epilogue_changes_between_calls():
    x = _rand(2, 16, 7, 5, fmt=CL)
    for w, stride, padding in ((_rand(8, 16, 3, 3), 1, 1), (_rand(8, 16, 3, 3), 2, 1), (_rand(8, 16, 1, 1), 1, 0)):
        ref, mag = _ref(x, w, None, (stride,) * 2, (padding,) * 2, (1, 1))
        out, _ = kconv.conv2d_nhwc(x, w, stride=stride, padding=padding)
        _close_conv(out, ref, torch.float32, mag, f"stride {stride} padding {padding}")
        scale = _vec(8)
        out, _ = kconv.conv2d_nhwc(x, w, stride=stride, padding=padding, scale=scale, relu=True)
        _close_conv(out, (ref * scale.double()[None, :, None, None]).clamp_min(0), torch.float32, mag, "epilogue")


@pytest.mark.skipif(DEV != "cpu", reason="the plan of a CUDA call is checked from metadata alone here")
def test_conv_plan_follows_the_tf32_flag():
    """fp32 on a GPU: the precision switch follows torch.backends.cudnn.allow_tf32 at each call."""
    cuda = torch.device("cuda")
    shape, wshape = torch.Size((2, 16, 8, 8)), torch.Size((16, 16, 3, 3))
    plans = [kconv._launch_plan(shape, torch.float32, cuda, wshape, torch.float32, cuda, 1, 1, 1, None,
                                False, False, False, False, False, tf32, False) for tf32 in (True, False)]
    assert [p.flags["PRECISION"] for p in plans] == ["tf32", "ieee"]


def test_bad_conv_call_raises_every_time():
    x, w = _rand(2, 16, 6, 6, fmt=CL), _rand(8, 16, 3, 3)
    for _ in range(2):
        with pytest.raises(ValueError, match="residual of shape"):
            kconv.conv2d_nhwc(x, w, padding=1, residual=_rand(2, 8, 5, 5))


@pytest.mark.parametrize("zfmt,rfmt", [(CL, NCHW), (NCHW, CL), (CL, CL)])
def test_bn_apply_residual_layout_changes_between_calls(zfmt, rfmt):
    z = _data((2, 5, 4, 3), torch.float32, zfmt)
    mean, invstd = torch.randn(5), _vec(5)
    for fmt in (rfmt, zfmt):
        res = _data((2, 5, 4, 3), torch.float32, fmt)
        y, _ = kbn.bn_apply(z, mean, invstd, None, None, res, True, False)
        assert y.is_contiguous(memory_format=zfmt)
        _close(y, _apply_ref(z, mean, invstd, res, True), torch.float32, f"y, residual {fmt}")


def test_bn_plans_follow_the_block_sizes(monkeypatch):
    """The block sizes are module attributes (tests shrink them): they are part of every plan's key."""
    z = _data((2, 5, 4, 3), torch.float32, CL)
    want = z.double().mean((0, 2, 3))
    for flat, tile in ((32, 64), (1024, 4096), (32, 64)):
        monkeypatch.setattr(kbn, "FLAT_BLOCK", flat)
        monkeypatch.setattr(kbn, "TILE_ELEMS", tile)
        part = kbn.bn_partials(z)
        assert part.shape[0] == kbn._reduce_plan(24, 5)[0][0]
        mean, _ = kbn.bn_finalize(part, None, None, 0.1, 1e-5)
        _close(mean, want, torch.float32, f"mean, blocks {flat}/{tile}")


def test_bn_backward_grad_layout_changes_between_calls():
    z = _data((2, 5, 4, 3), torch.float32, CL)
    mean, invstd = torch.randn(5), _vec(5)
    for fmt in (NCHW, CL):
        g = _data((2, 5, 4, 3), torch.float32, fmt)
        dz, _, dbeta, _ = kbn.bn_backward(g, z, torch.empty(0, dtype=torch.uint8), mean, invstd, None,
                                          False, False, False)
        _close(dz, g.double() * _b(invstd), torch.float32, f"dz, grad {fmt}")
        _close(dbeta, g.double().sum((0, 2, 3)), torch.float32, f"dbeta, grad {fmt}")


def test_bad_bn_call_raises_every_time():
    z = _data((2, 3, 4, 4), torch.float32, CL)
    for _ in range(2):
        with pytest.raises(TypeError, match="mean of dtype float32"):
            kbn.bn_apply(z, torch.zeros(3, dtype=torch.float64), torch.ones(3), None, None, None, False, False)
