"""Each fused backend ("triton", "cuda") keeps the rules of the op and of the modules: the kernels ran
(nothing fell back), a call outside the kernels runs on torch and is counted, supports() says why,
NaN propagates as on torch, nn.BatchNorm2d's module rules (affine=False, no running stats,
momentum=None), the ReLU mask follows y's memory order, and a small ResNet trains like the torch
backend. Numbers are compared with the house rule (tests/numerics.py) against float64.
Which backend runs where: fused_params.py.
"""
import copy

import pytest
import torch
import torch.nn as nn
from fused_params import BACKENDS, DEVICE, MODULES, skip_unless_dtype_runs
from numerics import assert_as_good

import fastres
from fastres import backend
from fastres.layout import pack_relu_mask
from fastres.nn import FusedConvBN2d
from fastres.ops import conv_bn_act


@pytest.mark.parametrize("name", BACKENDS)
def test_kernels_ran_and_nothing_fell_back(name, poison):
    backend.calls.clear()
    fastres.set_backend(name)
    m = FusedConvBN2d(3, 5, 3, padding=1, relu=True).to(DEVICE)
    m(torch.randn(2, 3, 4, 4, device=DEVICE)).sum().backward()
    assert backend.calls[("conv_bn_act", "forward", name)] == 1
    assert backend.calls[("conv_bn_act", "backward", name)] == 1
    assert not any(k[2].startswith(f"{name}->") for k in backend.calls), dict(backend.calls)


# A call outside each backend's kernels: triton has no grouped conv; the cuda kernels take no float64.
UNCOVERED = {
    "triton": dict(x=(2, 4, 5, 5), w=(6, 2, 3, 3), groups=2, dtype=torch.float32),
    "cuda": dict(x=(2, 4, 5, 5), w=(6, 4, 3, 3), groups=1, dtype=torch.float64),
}


@pytest.mark.parametrize("name", BACKENDS)
def test_uncovered_call_runs_torch_and_is_counted(name):
    u = UNCOVERED[name]
    backend.calls.clear()
    x = torch.randn(u["x"], device=DEVICE, dtype=u["dtype"])
    w = torch.randn(u["w"], device=DEVICE, dtype=u["dtype"])
    with backend.use_backend(name):
        y = conv_bn_act(x, w, groups=u["groups"], padding=1)
    assert backend.calls[("conv_bn_act", "forward", f"{name}->torch")] == 1
    assert backend.calls[("conv_bn_act", "forward", name)] == 0
    with backend.use_backend("torch"):
        torch.testing.assert_close(y, conv_bn_act(x, w, groups=u["groups"], padding=1), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODULES)
def test_supports_reasons(name):
    supports = backend.module(name).conv_bn_act_supports
    kw = dict(residual=None, stride=[1, 1], padding=[0, 0], dilation=[1, 1], training=True, relu=False)
    x, w = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 1, 1)
    assert supports(x, w, groups=1, **kw) is None
    assert "float64" in supports(x.double(), w.double(), groups=1, **kw)
    grouped = supports(x, torch.randn(4, 2, 1, 1), groups=2, **kw)
    assert (grouped is not None and "groups=2" in grouped) if name == "triton" else grouped is None


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_nan_propagates_like_torch(name, training):
    """A NaN input must come out as NaN, as on the torch backend (torch.relu keeps NaN): a ReLU that
    drops it would zero a diverged channel and hide the divergence. Under the interpreter maximum()
    keeps NaN anyway; on a GPU it would not, which is what this test guards there."""
    m = FusedConvBN2d(3, 4, 1, relu=True).to(DEVICE).train(training)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    x[0, :, 1, 2] = float("nan")
    with fastres.use_backend("torch"):
        want = torch.isnan(m(x))
    fastres.set_backend(name)
    got = torch.isnan(m(x))
    assert want.any() and torch.equal(got, want)


@pytest.mark.parametrize("bn_kwargs", [dict(affine=False), dict(track_running_stats=False),
                                       dict(momentum=None)], ids=["affine=False", "no-running-stats",
                                                                  "momentum=None"])
@pytest.mark.parametrize("name", BACKENDS)
def test_module_rules_match_torch_backend(name, bn_kwargs, poison):
    """Two training steps of one module on `name` in fp32, on torch in fp32 and on torch in float64:
    output, input gradient, every parameter gradient and every buffer, by the house rule. No conv bias:
    in training BatchNorm cancels it and its gradient is rounding noise around 0, which the house rule
    cannot judge against the oracle's magnitude (test_fused_backends.py checks it on its own scale)."""
    torch.manual_seed(0)
    nets = {"fused": FusedConvBN2d(3, 5, 3, padding=1, bias=False, relu=True, **bn_kwargs).to(DEVICE)}
    nets["torch"] = copy.deepcopy(nets["fused"])
    nets["oracle"] = copy.deepcopy(nets["fused"]).double()
    runs = {"fused": name, "torch": "torch", "oracle": "torch"}
    for step in range(2):
        x = torch.randn(2, 3, 4, 4, device=DEVICE) * (step + 1)
        out = {}
        for key, net in nets.items():
            xi = x.to(torch.float64 if key == "oracle" else torch.float32, copy=True).requires_grad_()
            with backend.use_backend(runs[key]):
                y = net(xi)
                y.square().sum().backward()
            out[key] = [("y", y.detach()), ("dx", xi.grad)]
            out[key] += [(f"{k}.grad", p.grad) for k, p in net.named_parameters()]
            out[key] += list(net.named_buffers())
        for (k, got), (_, ref), (_, oracle) in zip(out["fused"], out["torch"], out["oracle"]):
            if got.dtype == torch.long:  # num_batches_tracked
                assert torch.equal(got, oracle), k
            else:
                assert_as_good(got, ref, oracle, name=f"step {step} {k}")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", BACKENDS)
def test_op_mask_follows_memory_order_of_y(name, dtype, channels_last, poison):
    """The op's packed mask is pack_relu_mask(y) (bit order = memory order of y) in both layouts."""
    skip_unless_dtype_runs(dtype)
    x = torch.randn(3, 16, 9, 7, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 16, 3, 3, device=DEVICE, dtype=dtype) * 0.1
    c = 12
    args = (x, w, None, torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE),
            torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE), None, [1, 1], [1, 1], [1, 1], 1,
            True, 0.1, 1e-5, True, True)
    with backend.use_backend(name):
        y, z, mean, invstd, mask = torch.ops.fastres.conv_bn_act(*args)
    assert torch.equal(mask, pack_relu_mask(y))
    assert z.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _small_net():
    """The paper's CIFAR ResNet at its smallest depth, 8 (one BasicBlock per stage, option A shortcuts):
    the same model code as resnet20, a third of the interpreter time."""
    from fastres.models.cifar import CifarResNet

    return CifarResNet(8, num_classes=4).to(DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_cifar_resnet_trains_like_torch_backend(name, poison):
    """Three SGD steps (momentum 0.9, lr 0.01) on 8x8 inputs, batch 2, on `name` and on torch in fp32
    and float64: the loss at every step, then every parameter and buffer, by the house rule."""
    torch.manual_seed(0)
    nets = {"fused": _small_net()}
    nets["torch"] = copy.deepcopy(nets["fused"])
    nets["oracle"] = copy.deepcopy(nets["fused"]).double()
    runs = {"fused": name, "torch": "torch", "oracle": "torch"}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in nets.items()}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 8, 8, generator=g).to(DEVICE), torch.randint(0, 4, (2,), generator=g).to(DEVICE))
            for _ in range(3)]
    backend.calls.clear()
    for step, (x, target) in enumerate(data):
        losses = {}
        for key, net in nets.items():
            with backend.use_backend(runs[key]):
                opts[key].zero_grad()
                loss = nn.functional.cross_entropy(net(x.to(next(net.parameters()).dtype)), target)
                loss.backward()
                opts[key].step()
            losses[key] = loss.detach()
        assert_as_good(losses["fused"], losses["torch"], losses["oracle"], name=f"loss at step {step}")
    assert backend.calls[("conv_bn_act", "forward", name)] > 0
    assert backend.calls[("conv_bn_act", "backward", name)] > 0
    states = [nets[k].state_dict() for k in ("fused", "torch", "oracle")]
    for k in states[0]:
        got, ref, oracle = (s[k] for s in states)
        if got.dtype == torch.long:
            assert torch.equal(got, oracle), k
        else:
            assert_as_good(got, ref, oracle, name=k)
