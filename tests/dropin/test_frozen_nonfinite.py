"""NaN and infinity inside fastres.frozen come out as torchvision gives them.

oneDNN's ReLU post-op, which frozen's prepacked convolutions and its compiled plan fuse, turns a NaN into
0 (torch.relu keeps it): a NaN image went in and finite logits came out. Proved here, against the same
model on torchvision's own ops (a torchvision twin or the module outside the context): the NaN and the
infinity patterns are the same, and the finite values hold the house rule, for
- a NaN or an infinity in the input of a whole model (NCHW and channels_last, per layer and through a
  plan that is already live), of a fused conv + BN + ReLU layer and of a residual block (channels_last:
  where the post-op ran);
- a fold with a NaN or an infinity in it: a NaN or infinite conv weight, a NaN or negative running_var;
and that a finite input still takes the fast path (else the rest proves nothing).
"""
import copy

import pytest
import torch
import torch.nn as nn
from numerics import assert_as_good
from workflow_helpers import batch, make, twin_of

import fastres
from fastres.models import plan
from fastres.nn import FusedConvBNReLU2d

CL = torch.channels_last


def _same_nonfinite(got: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, what: str) -> None:
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN pattern {got.isnan().sum()} != {ref.isnan().sum()}"
    assert torch.equal(got.isinf(), ref.isinf()), f"{what}: infinity pattern differs"
    assert torch.equal(got[got.isinf()], ref[ref.isinf()]), f"{what}: infinities of another sign"
    fin = torch.isfinite(ref) & torch.isfinite(oracle)   # (the fp64 oracle may meet inf * 0 where fp32 does not)
    if fin.any():
        assert_as_good(got[fin], ref[fin], oracle[fin], what)


def _poisoned(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[0, 1, 3, 4] = value
    return x


@pytest.fixture
def eager_plans(monkeypatch):
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("use_plan", [False, True], ids=["per-layer", "plan"])
def test_model_input(value, fmt, use_plan, eager_plans):
    model = make("basic").eval()
    tv = twin_of(model, "basic").eval()
    x = batch(3, fmt)
    bad = _poisoned(x, value).contiguous(memory_format=fmt)
    with torch.no_grad():
        ref, oracle = tv(bad), copy.deepcopy(tv).double()(bad.double())
        with fastres.frozen(model, plan=use_plan):
            for _ in range(6):
                model(x)
            assert plan.live(model) == (use_plan and plan._fuser_available())
            got = model(bad)
            again = model(x)
    _same_nonfinite(got, ref, oracle, "a poisoned input")
    assert torch.isfinite(again).all()


def test_finite_input_still_runs_the_plan(eager_plans, monkeypatch):
    if not plan._fuser_available():
        pytest.skip("this torch has no oneDNN Graph fuser")
    model = make("basic").eval()
    x = batch(3)
    runs = []
    real = plan._Plan.run
    monkeypatch.setattr(plan._Plan, "run", lambda self, t: runs.append(1) or real(self, t))
    with torch.no_grad(), fastres.frozen(model):
        for _ in range(6):
            model(x)
        n = len(runs)
        model(_poisoned(x, float("nan")))
        assert len(runs) == n, "a NaN input ran through the plan"
        model(x)
    assert n == 4 and len(runs) == n + 1


def _layer(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = FusedConvBNReLU2d(8, 16, 3, padding=1, bias=False).eval()
    m.bn.running_mean.uniform_(-0.2, 0.2)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m


def _check_module(m: nn.Module, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        ref = m(x)
        oracle = fastres.unfuse(copy.deepcopy(m)).double()(x.double())
        with fastres.frozen(m):
            got = [m(x) for _ in range(3)]
    for g in got:
        _same_nonfinite(g, ref, oracle, what)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_layer_input(value):
    x = _poisoned(torch.randn(2, 8, 9, 9), value).contiguous(memory_format=CL)
    _check_module(_layer(0), x, "a fused conv + BN + ReLU layer")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_block_input(value):
    torch.manual_seed(1)
    blk = fastres.models.resnet.BasicBlock(8, 8).eval()
    for bn in (blk.bn1, blk.bn2):
        bn.running_var.uniform_(0.5, 2.0)
    x = _poisoned(torch.randn(2, 8, 9, 9), value).contiguous(memory_format=CL)
    _check_module(blk, x, "a residual block")


def _nan_weight(m):
    m.conv.weight[3, 2, 1, 1] = float("nan")


def _inf_weight(m):
    m.conv.weight[5, 0, 0, 2] = float("inf")


def _nan_var(m):
    m.bn.running_var[4] = float("nan")


def _negative_var(m):
    m.bn.running_var[7] = -1.0


@pytest.mark.parametrize("edit", [_nan_weight, _inf_weight, _nan_var, _negative_var],
                         ids=["nan-weight", "inf-weight", "nan-running_var", "negative-running_var"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_nonfinite_fold(edit, fmt):
    """Edited before the context and between two calls inside it (seen: in-place writes through the
    tensors themselves)."""
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=fmt)
    m = _layer(2)
    with torch.no_grad():
        edit(m)
    _check_module(m, x, f"{edit.__name__} before the context")
    m = _layer(2)
    with torch.no_grad(), fastres.frozen(m):
        m(x)
        edit(m)
        got = m(x)
    with torch.no_grad():
        ref = m(x)
        oracle = fastres.unfuse(copy.deepcopy(m)).double()(x.double())
    _same_nonfinite(got, ref, oracle, f"{edit.__name__} inside the context")


@pytest.mark.parametrize("edit", ["nan-weight", "negative-running_var"])
@pytest.mark.parametrize("use_plan", [False, True], ids=["per-layer", "plan"])
def test_model_fold(edit, use_plan, eager_plans):
    """A whole model's calls (vouched: their ReLUs fused), one layer's fold made non-finite inside the
    context after a plan went live."""
    model = make("basic").eval()
    x = batch(3, CL)
    with torch.no_grad(), fastres.frozen(model, plan=use_plan):
        for _ in range(6):
            model(x)
        blk = model.layer2[0]
        if edit == "nan-weight":
            blk.conv1.weight[2, 3, 1, 1] = float("nan")
        else:
            blk.bn1.running_var[5] = -1.0
        got = [model(x) for _ in range(6)]   # (and no plan is built from that fold)
    tv = twin_of(model, "basic").eval()
    with torch.no_grad():
        ref, oracle = tv(x), copy.deepcopy(tv).double()(x.double())
    assert ref.isnan().any()
    for i, g in enumerate(got):
        _same_nonfinite(g, ref, oracle, f"a model with a {edit} fold, call {i}")
