"""bn_act_modules: a BatchNorm (+ residual) (+ ReLU) that no fusable conv precedes runs as the fused op
bn_act with nn.BatchNorm2d's rules (momentum, momentum=None, track_running_stats=False, eval), on the
torch backend and on triton (interpreter); a conv the fused conv cannot take (reflect padding) runs as
its module with its BatchNorm and ReLU fused after it."""
import copy

import pytest
import torch
import torch.nn as nn
from numerics import assert_as_good

import fastres
from fastres import backend
from fastres.convert.chains import FusedSequential
from fastres.kernels import interpreter_active
from fastres.nn import bn_act_modules, conv_bn_act_modules

NAMES = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter_active() and not torch.cuda.is_available(), reason="triton needs a GPU or the interpreter"))]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RULES = {"momentum": dict(momentum=0.3), "cumulative": dict(momentum=None),
         "no-running": dict(track_running_stats=False), "no-affine": dict(affine=False)}


@pytest.mark.parametrize("rules", list(RULES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_bn_act_modules_follows_batchnorm2d(name, train, rules):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, **RULES[rules]).to(DEV)
    if bn.running_mean is not None:
        bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 1.5), bn.num_batches_tracked.fill_(3)
    ref = copy.deepcopy(bn)
    oracle = copy.deepcopy(bn).double()
    for m in (bn, ref, oracle):
        m.train(train)
    x, res = torch.randn(4, 6, 5, 5, device=DEV) * 2 + 0.3, torch.randn(4, 6, 5, 5, device=DEV)
    with backend.use_backend(name):
        for _ in range(2):
            got = bn_act_modules(x, bn, res, relu=True)
    for _ in range(2):
        want = torch.relu(ref(x) + res)
        exact = torch.relu(oracle(x.double()) + res.double())
    assert_as_good(got, want, exact, f"{name} y")
    for (n, a), b, c in zip(ref.named_buffers(), bn.buffers(), oracle.buffers()):
        if n == "num_batches_tracked":
            assert torch.equal(a, b)
        else:
            assert_as_good(b, a, c, f"{name} {n}")


@pytest.mark.parametrize("name", NAMES)
def test_unfusable_conv_runs_as_itself_with_bn_act_after_it(name):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False).to(DEV)
    bn = nn.BatchNorm2d(8).to(DEV)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU())
    exact = copy.deepcopy(ref).double()
    report = fastres.convert(nn.Sequential(conv, bn, nn.ReLU())).fastres_report
    assert any("padding_mode" in why for _, why in report.left_alone)
    x = torch.randn(4, 3, 6, 6, device=DEV)
    backend.calls.clear()
    with backend.use_backend(name):
        got = conv_bn_act_modules(x, conv, bn, relu=True)
    assert backend.calls[("conv_bn_act", "forward", "unfused")] == 1
    assert backend.calls[("bn_act", "forward", name)] == 1
    want, oracle = ref(x), exact(x.double())
    assert_as_good(got, want, oracle, "reflect-padded conv, fused BN + ReLU")
    for key in ("running_mean", "running_var"):
        assert_as_good(getattr(bn, key), getattr(ref[1], key), getattr(exact[1], key), key)
    assert torch.equal(bn.num_batches_tracked, ref[1].num_batches_tracked)


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name):
    from torch.library import opcheck

    from fastres.layout import pack_relu_mask

    with backend.use_backend(name):
        args = (torch.randn(2, 7, 5, 5, device=DEV), torch.rand(7, device=DEV), torch.randn(7, device=DEV),
                torch.zeros(7, device=DEV), torch.ones(7, device=DEV), torch.randn(2, 7, 5, 5, device=DEV),
                True, 0.1, 1e-5, True, True)
        opcheck(torch.ops.fastres.bn_act.default, args)
        bargs = (torch.randn(2, 7, 5, 5, device=DEV), torch.randn(2, 7, 5, 5, device=DEV),
                 pack_relu_mask(torch.randn(2, 7, 5, 5, device=DEV)), torch.randn(7, device=DEV),
                 torch.rand(7, device=DEV) + 0.5, torch.rand(7, device=DEV), True, True, [True, True, True, True])
        opcheck(torch.ops.fastres.bn_act_backward.default, bargs)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_matches_eager(name):
    bn = nn.BatchNorm2d(6).to(DEV)
    ref = copy.deepcopy(bn)
    x = torch.randn(4, 6, 5, 5, device=DEV, requires_grad=True)
    with backend.use_backend(name):
        compiled = torch.compile(lambda t: bn_act_modules(t, bn, relu=True), fullgraph=True, backend="aot_eager")
        got = compiled(x)
        got.sum().backward()
        gx = x.grad.clone()
        x.grad = None
        want = bn_act_modules(x, ref, relu=True)
        want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_pre_activation_sequential_fuses_bn_relu_as_bn_act(name, train):
    torch.manual_seed(2)
    plain = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Conv2d(6, 6, 1)).to(DEV)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5)
    exact = copy.deepcopy(plain).double()
    model = fastres.convert(copy.deepcopy(plain))
    assert type(model) is FusedSequential
    assert [what for _, what in model.fastres_report.fused] == [
        "0 (BatchNorm2d) -> 1 (ReLU) (bn_act)", "2 (Conv2d) -> 3 (BatchNorm2d) -> 4 (ReLU)"]
    for m in (plain, exact, model):
        m.train(train)
    x = torch.randn(4, 4, 6, 6, device=DEV) * 1.5 + 0.2
    backend.calls.clear()
    with backend.use_backend(name):
        got = model(x)
    assert backend.calls[("bn_act", "forward", name)] == 1 and backend.calls[("conv_bn_act", "forward", name)] == 1
    assert_as_good(got, plain(x), exact(x.double()), f"pre-activation Sequential on {name}")
    for (n, a), b, c in zip(plain.named_buffers(), model.buffers(), exact.buffers()):
        if "running" in n:
            assert_as_good(b, a, c, n)
