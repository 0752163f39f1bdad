"""conv_bn_act on the torch backend: the op against a float64 reference written here from the
definition, BatchNorm semantics against nn.BatchNorm2d rule by rule, the op contract (opcheck,
compile) and the errors for bad input."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres import backend
from fastres.layout import pack_relu_mask, unpack_relu_mask
from fastres.nn import FusedConvBN2d
from fastres.ops import conv_bn_act

CASES = [  # (N, Cin, H, W, Cout, k, stride, padding)
    (2, 3, 9, 9, 5, 3, 1, 1),
    (2, 5, 8, 7, 17, 1, 2, 0),
    (1, 4, 11, 11, 3, 7, 2, 3),
    (2, 17, 5, 6, 8, 3, 2, 1),
]


def float64_reference(x, w, b, gamma, beta, res, stride, padding, relu, eps=1e-5):
    """y for batch statistics, straight from the definition, in float64."""
    z = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (z - mean) / torch.sqrt(var + eps) * gamma.double()[None, :, None, None] + beta.double()[None, :, None, None]
    if res is not None:
        y = y + res.double()
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_backward_vs_float64(case, relu, residual, channels_last):
    n, cin, h, w_, cout, k, s, p = case
    x = torch.randn(n, cin, h, w_)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k) * 0.3
    gamma, beta = torch.rand(cout) + 0.5, torch.randn(cout)
    ho, wo = (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1
    res = torch.randn(n, cout, ho, wo) if residual else None
    leaves = [t.requires_grad_() for t in (x, w, gamma, beta)] + ([res.requires_grad_()] if residual else [])
    rm, rv = torch.randn(cout), torch.rand(cout) + 0.5

    y = conv_bn_act(x, w, None, gamma, beta, rm.clone(), rv.clone(), res, stride=s, padding=p, relu=relu)
    ref = float64_reference(x, w, None, gamma, beta, res, s, p, relu)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, g.float())
    want = torch.autograd.grad(ref, leaves, g)
    for name, a, b in zip(["dx", "dW", "dgamma", "dbeta", "dres"], got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def _pair(bn_kwargs, conv_bias=False, seed=0):
    torch.manual_seed(seed)
    fused = FusedConvBN2d(4, 6, 3, padding=1, bias=conv_bias, **bn_kwargs)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias)
    bn = nn.BatchNorm2d(6, **bn_kwargs)
    with torch.no_grad():
        if fused.bn.weight is not None:
            fused.bn.weight.uniform_(0.5, 1.5)
            fused.bn.bias.uniform_(-0.5, 0.5)
    conv.load_state_dict(fused.conv.state_dict())
    bn.load_state_dict(fused.bn.state_dict())
    return fused, nn.Sequential(conv, bn)


BN_RULES = {
    "momentum": dict(momentum=0.3),
    "momentum=None (cumulative average)": dict(momentum=None),
    "track_running_stats=False": dict(track_running_stats=False),
    "affine=False": dict(affine=False),
    "eps": dict(eps=1e-2),
}


@pytest.mark.parametrize("rule", list(BN_RULES))
@pytest.mark.parametrize("conv_bias", [False, True])
def test_batchnorm_semantics_match_nn_batchnorm2d(rule, conv_bias):
    fused, ref = _pair(BN_RULES[rule], conv_bias)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x = torch.randn(3, 4, 6, 5) * (step + 1)
        for model, opt in ((fused, opt_f), (ref, opt_r)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        for (k, a), (k2, b) in zip(fused.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{rule} step {step}: {k} vs {k2}")
    fused.eval(), ref.eval()
    x = torch.randn(1, 4, 6, 5)  # batch 1 is fine in eval
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    g = torch.randn(1, 6, 6, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(xa).backward(g), ref(xb).backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_num_batches_tracked_and_unbiased_running_var():
    fused, ref = _pair({})
    x = torch.randn(2, 4, 3, 3)
    fused(x), ref(x)
    assert fused.bn.num_batches_tracked.item() == 1
    z = ref[0](x).detach()
    n = z.numel() // z.shape[1]
    unbiased = z.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(fused.bn.running_var, 0.9 * torch.ones(6) + 0.1 * unbiased)
    assert n > 1


def test_one_value_per_channel_in_training_raises_like_batchnorm():
    fused, _ = _pair({})
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused(torch.randn(1, 4, 1, 1))
    fused.eval()
    assert fused(torch.randn(1, 4, 1, 1)).shape == (1, 6, 1, 1)


def test_relu_mask_roundtrip_both_layouts():
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = torch.randn(2, 5, 3, 3).contiguous(memory_format=fmt)
        mask = pack_relu_mask(y)
        assert mask.dtype == torch.uint8 and mask.numel() == (y.numel() + 7) // 8
        assert torch.equal(unpack_relu_mask(mask, y), y > 0)


def test_module_conveniences():
    fused, _ = _pair({})
    keys = set(fused.state_dict())
    assert {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
            "bn.num_batches_tracked"} == keys
    cl = fused.to(memory_format=torch.channels_last)
    y = cl(torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(_pair({})[0])
    assert isinstance(sync.bn, nn.SyncBatchNorm)
    sync.eval()
    assert sync(torch.randn(2, 4, 5, 5)).shape == (2, 6, 5, 5)
    half = _pair({})[0].half()
    assert half.conv.weight.dtype == torch.float16 and half.bn.running_mean.dtype == torch.float16
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedConvBN2d.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5))


def test_autocast_keeps_bn_state_fp32():
    fused, ref = _pair({})
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
        yr = ref(x)
    assert y.dtype == torch.bfloat16
    assert fused.bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), yr.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(fused.bn.running_mean, ref[1].running_mean, rtol=2e-2, atol=2e-2)


def test_opcheck():
    from torch.library import opcheck

    args = (torch.randn(2, 5, 9, 9), torch.randn(7, 5, 3, 3), None, torch.rand(7), torch.randn(7),
            torch.zeros(7), torch.ones(7), torch.randn(2, 7, 5, 5), [2, 2], [1, 1], [1, 1], 1, True, 0.1,
            1e-5, True, True)
    opcheck(torch.ops.fastres.conv_bn_act.default, args)
    bargs = (torch.randn(2, 7, 5, 5), torch.randn(2, 5, 9, 9), torch.randn(7, 5, 3, 3), None,
             torch.randn(2, 7, 5, 5), pack_relu_mask(torch.randn(2, 7, 5, 5)), torch.randn(7),
             torch.rand(7) + 0.5, torch.rand(7), [2, 2], [1, 1], [1, 1], 1, True, True,
             [True, True, False, True, True, True])
    opcheck(torch.ops.fastres.conv_bn_act_backward.default, bargs)


def test_compile_fullgraph_matches_eager():
    fused, _ = _pair({})
    twin, _ = _pair({})
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 4, 6, 6)
    res = torch.randn(2, 6, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa, res), twin(xb, res)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(fused.bn.running_var, twin.bn.running_var)
    ya.square().sum().backward(), yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_torch_backend_is_counted():
    """Each forward on the torch backend is counted; its backward is aten's own autograd (uncounted)."""
    backend.calls.clear()
    fused, _ = _pair({})
    fused(torch.randn(2, 4, 5, 5)).sum().backward()
    assert backend.calls[("conv_bn_act", "forward", "torch")] == 1
    assert fused.conv.weight.grad is not None and fused.bn.weight.grad is not None
    fused.eval()
    with torch.no_grad():
        fused(torch.randn(2, 4, 5, 5))
    assert backend.calls[("conv_bn_act", "forward", "torch")] == 2


@pytest.mark.parametrize("make,err,match", [
    (lambda: conv_bn_act(torch.randn(4, 5, 5), torch.randn(3, 4, 3, 3)), ValueError, "4-D input"),
    (lambda: conv_bn_act(torch.randint(0, 5, (1, 4, 5, 5)), torch.randn(3, 4, 3, 3)), TypeError,
     "floating-point input"),
    (lambda: conv_bn_act(torch.randn(1, 5, 5, 5), torch.randn(3, 4, 3, 3)), ValueError,
     "expected input with 4 channels"),
    (lambda: conv_bn_act(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), residual=torch.randn(2, 3, 5, 5)),
     ValueError, r"expected residual of shape \(2, 3, 3, 3\)"),
    (lambda: conv_bn_act(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3).double()), TypeError,
     "expected weight of the input's dtype"),
    (lambda: conv_bn_act(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), bn_weight=torch.ones(4)),
     ValueError, r"expected bn_weight of shape \(3,\)"),
    (lambda: conv_bn_act(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), training=False), ValueError,
     "eval mode"),
    (lambda: conv_bn_act(torch.randn(2, 4, 2, 2), torch.randn(3, 4, 3, 3)), ValueError, "too small"),
    (lambda: FusedConvBN2d(4, 3, 3)(torch.randn(2, 4, 5)), ValueError, "4D input"),
])
def test_bad_input_errors_name_what_was_expected(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_unknown_backend():
    with pytest.raises(ValueError, match="expected one of auto, triton, cuda, torch"):
        fastres.set_backend("tensorrt")


def test_subclass_with_its_own_forward_runs_unfused():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2.0

    conv, bn = ScaledConv(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False).eval()
    with torch.no_grad():
        bn.running_var.fill_(2.0)
    backend.calls.clear()
    x = torch.randn(2, 3, 5, 5)
    y = fastres.nn.conv_bn_act_modules(x, conv, bn)
    torch.testing.assert_close(y, bn(conv(x)))
    assert backend.calls[("conv_bn_act", "forward", "unfused")] == 1


def test_float64_model_stays_float64():
    """The torch backend keeps float64 data in float64 end to end (a fused model can be an oracle)."""
    fused, ref = _pair({}, conv_bias=True)
    fused, ref = fused.double(), ref.double()
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), ref(xb)
    assert ya.dtype == torch.float64
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(fused.bn.running_var, ref[1].running_var, rtol=1e-12, atol=1e-12)
