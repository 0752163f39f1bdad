"""conv_bn_act on the "triton" backend (kernels/conv_bn_act.py) against the torch backend and float64.

Every comparison runs the same inputs three times: triton in the test dtype, torch in the test dtype,
and torch in float64 (the reference). The triton error against float64 must be within twice the torch
error in the same dtype, or within the dtype's bound (fp32 1e-5, fp16 1e-3, bf16 1.6e-2, relative to
the largest magnitude), whichever is larger. Kernel outputs are poisoned (NaN) before every launch.
"""
import copy

import pytest
import torch
import torch.nn as nn

import fastres
from fastres import backend
from fastres.nn import FusedConvBN2d
from fastres.ops import conv_bn_act

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
NAMES = ["y", "running_mean", "running_var", "dx", "dW", "db", "dgamma", "dbeta", "dres"]

CASES = [  # (N, Cin, H, W, Cout, k, stride, padding, conv bias)
    (2, 3, 6, 5, 5, 3, 1, 1, False),
    (1, 5, 7, 7, 17, 1, 2, 0, True),   # batch 1, odd channel counts, strided 1x1
    (2, 4, 5, 5, 3, 3, 2, 1, True),
]


def _inputs(case, residual, seed):
    n, cin, h, w, cout, k, s, p, has_bias = case
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return dict(
        x=torch.randn(n, cin, h, w, generator=g), w=torch.randn(cout, cin, k, k, generator=g) * 0.3,
        b=torch.randn(cout, generator=g) if has_bias else None,
        gamma=torch.rand(cout, generator=g) + 0.5, beta=torch.randn(cout, generator=g),
        res=torch.randn(n, cout, ho, wo, generator=g) if residual else None,
        rm=torch.randn(cout, generator=g), rv=torch.rand(cout, generator=g) + 0.5,
        gy=torch.randn(n, cout, ho, wo, generator=g), stride=s, padding=p)


def _run(name, inp, dtype, channels_last, training, relu):
    """Forward + backward of the op on backend `name` in `dtype`; returns the tensors of NAMES."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = inp["x"].to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w = inp["w"].to(dtype).requires_grad_()
    b = inp["b"].to(dtype).requires_grad_() if inp["b"] is not None else None
    gamma, beta = inp["gamma"].clone().requires_grad_(), inp["beta"].clone().requires_grad_()
    res = inp["res"].to(dtype).contiguous(memory_format=fmt).requires_grad_() if inp["res"] is not None else None
    rm, rv = inp["rm"].clone(), inp["rv"].clone()
    with backend.use_backend(name):
        y = conv_bn_act(x, w, b, gamma, beta, rm, rv, res, stride=inp["stride"], padding=inp["padding"],
                        training=training, relu=relu)
        leaves = [t for t in (x, w, b, gamma, beta, res) if t is not None]
        grads = iter(torch.autograd.grad(y, leaves, inp["gy"].to(dtype)))
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    out = dict(y=y.detach(), running_mean=rm, running_var=rv)
    for key, t in zip(["dx", "dW", "db", "dgamma", "dbeta", "dres"], (x, w, b, gamma, beta, res)):
        if t is not None:
            out[key] = next(grads)
            assert out[key].dtype == t.dtype, f"{key}: dtype {out[key].dtype}, expected {t.dtype}"
    assert out["dx"].is_contiguous(memory_format=fmt)
    return out


def _compare(inp, dtype, channels_last, training, relu):
    ref = _run("torch", inp, torch.float64, channels_last, training, relu)
    eager = _run("torch", inp, dtype, channels_last, training, relu)
    got = _run("triton", inp, dtype, channels_last, training, relu)
    assert set(got) == set(ref) == set(eager)
    for key in got:
        assert got[key].shape == ref[key].shape, key
        want = ref[key]
        scale = max(want.abs().max().item(), 1.0)
        err = (got[key].double() - want).abs().max().item()
        err_torch = (eager[key].double() - want).abs().max().item()
        bound = max(2 * err_torch, TOL[dtype] * scale)
        assert err <= bound, (f"{key} ({dtype}, training={training}, relu={relu}): max error {err:.3g} vs "
                              f"float64, torch {dtype} error {err_torch:.3g}, bound {bound:.3g}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_fp32_vs_torch_and_float64(case, relu, residual, channels_last, training, poison):
    _compare(_inputs(case, residual, seed=hash((case, relu, residual)) % 1000), torch.float32, channels_last,
             training, relu)


@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("training", [True, False])
def test_fp16_vs_torch_and_float64(case, training, poison):
    # A conv bias only in eval mode: in training BatchNorm cancels it, its exact gradient is 0 and what
    # any fp16 path returns for it is rounding noise (no meaningful error ratio). fp32 tests cover it.
    case = case[:-1] + (not training,)
    _compare(_inputs(case, residual=True, seed=7), torch.float16, True, training, relu=True)


def test_triton_kernels_ran_and_nothing_fell_back(poison):
    backend.calls.clear()
    fastres.set_backend("triton")
    m = FusedConvBN2d(3, 5, 3, padding=1, relu=True)
    m(torch.randn(2, 3, 4, 4)).sum().backward()
    assert backend.calls[("conv_bn_act", "forward", "triton")] == 1
    assert backend.calls[("conv_bn_act", "backward", "triton")] == 1
    assert not any(k[2].startswith("triton->") for k in backend.calls), dict(backend.calls)


@pytest.mark.parametrize("training", [True, False])
def test_nan_propagates_like_torch(training):
    """A NaN input must come out as NaN, as on the torch backend (torch.relu keeps NaN): a ReLU that
    drops it would zero a diverged channel and hide the divergence. Under the interpreter maximum()
    keeps NaN anyway; on a GPU it would not, which is what this test guards there."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = FusedConvBN2d(3, 4, 1, relu=True).to(dev).train(training)
    x = torch.randn(2, 3, 4, 4, device=dev)
    x[0, :, 1, 2] = float("nan")
    with fastres.use_backend("torch"):
        want = torch.isnan(m(x))
    fastres.set_backend("triton")
    got = torch.isnan(m(x))
    assert want.any() and torch.equal(got, want)


def test_uncovered_call_runs_torch_and_is_counted():
    """A grouped conv is not covered by the Triton conv: torch runs it, counted, with the same result."""
    backend.calls.clear()
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3)
    with backend.use_backend("triton"):
        y = conv_bn_act(x, w, groups=2, padding=1)
    assert backend.calls[("conv_bn_act", "forward", "triton->torch")] == 1
    assert backend.calls[("conv_bn_act", "forward", "triton")] == 0
    with backend.use_backend("torch"):
        torch.testing.assert_close(y, conv_bn_act(x, w, groups=2, padding=1))


def test_supports_reasons():
    from fastres.backends.triton import conv_bn_act_supports

    kw = dict(residual=None, stride=[1, 1], padding=[0, 0], dilation=[1, 1], training=True, relu=False)
    x, w = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 1, 1)
    assert conv_bn_act_supports(x, w, groups=1, **kw) is None
    assert "groups=2" in conv_bn_act_supports(x, torch.randn(4, 2, 1, 1), groups=2, **kw)
    assert "float64" in conv_bn_act_supports(x.double(), w.double(), groups=1, **kw)


@pytest.mark.parametrize("bn_kwargs", [dict(affine=False), dict(track_running_stats=False),
                                       dict(momentum=None)], ids=["affine=False", "no-running-stats",
                                                                  "momentum=None"])
def test_module_rules_match_torch_backend(bn_kwargs, poison):
    torch.manual_seed(0)
    a = FusedConvBN2d(3, 5, 3, padding=1, bias=True, relu=True, **bn_kwargs)
    b = copy.deepcopy(a)
    for step in range(2):
        x = torch.randn(2, 3, 4, 4) * (step + 1)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with backend.use_backend("triton"):
            ya = a(xa)
            ya.square().sum().backward()
        with backend.use_backend("torch"):
            yb = b(xb)
            yb.square().sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=k)
        for (k, ba), bb in zip(a.named_buffers(), b.buffers()):
            torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6, msg=k)


def _small_net():
    """The paper's CIFAR ResNet at its smallest depth, 8 (one BasicBlock per stage, option A shortcuts):
    the same model code as resnet20, a third of the interpreter time."""
    from fastres.models.cifar import CifarResNet

    return CifarResNet(8, num_classes=4)


@pytest.mark.slow
def test_cifar_resnet_trains_like_torch_backend(poison):
    """Three SGD steps (momentum 0.9) on 8x8 inputs, batch 2: the loss at every step, then every parameter and buffer."""
    torch.manual_seed(0)
    nets = {"torch": _small_net(), "triton": None}
    nets["triton"] = copy.deepcopy(nets["torch"])
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for k, m in nets.items()}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 4, (2,), generator=g)) for _ in range(3)]
    backend.calls.clear()
    for step, (x, target) in enumerate(data):
        losses = {}
        for name, net in nets.items():
            with backend.use_backend(name):
                opts[name].zero_grad()
                loss = nn.functional.cross_entropy(net(x), target)
                loss.backward()
                opts[name].step()
            losses[name] = loss.item()
        assert abs(losses["triton"] - losses["torch"]) <= 1e-5 * max(1.0, abs(losses["torch"])), (step, losses)
    assert backend.calls[("conv_bn_act", "forward", "triton")] > 0
    assert backend.calls[("conv_bn_act", "backward", "triton")] > 0
    sa, sb = nets["triton"].state_dict(), nets["torch"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)


# ---- GPU: ResNet-50 layer shapes, batch 32 ----------------------------------------------------------

R50 = [  # (N, Cin, H, W, Cout, k, stride, padding, conv bias)
    (32, 64, 56, 56, 64, 3, 1, 1, False),     # layer1 3x3
    (32, 256, 56, 56, 64, 1, 1, 0, False),    # layer1 1x1 reduce
    (32, 128, 56, 56, 128, 3, 2, 1, False),   # layer2 first 3x3, stride 2
    (32, 1024, 14, 14, 256, 1, 1, 0, False),  # layer3 1x1 reduce
    (32, 512, 7, 7, 2048, 1, 1, 0, False),    # layer4 1x1 expand (+ residual)
]


def _to_cuda(inp):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("case", R50)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_gpu_resnet50_shapes(case, dtype, training, poison):
    torch.manual_seed(0)
    _compare(_to_cuda(_inputs(case, residual=True, seed=3)), dtype, True, training, relu=True)
