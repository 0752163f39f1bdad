"""BNSpec (fastres/ops/common.py): the BatchNorm arguments travel from the modules and the public
functionals as one record and are flattened only where a custom op, an autograd.Function or a backend
function is called. Its fields keep the order every flat signature has, and every path puts each
field where the backend reads it (distinct values per field: a swap shows)."""
import importlib
import inspect

import pytest
import torch
import torch.nn as nn
from spy_helpers import Seen
from torch.utils.flop_counter import FlopCounterMode

import fastres
from fastres import backend
from fastres.backends import torch as aten_backend
from fastres.backends.contract import Backend
from fastres.kernels import interpreter_active
from fastres.nn import bn_act_modules, conv_bn_act_modules
from fastres.ops.common import BNSpec

# (the modules: fastres.ops re-exports the functions under the same names)
conv_bn_act_op = importlib.import_module("fastres.ops.conv_bn_act")
bn_act_op = importlib.import_module("fastres.ops.bn_act")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter_active() and not torch.cuda.is_available(), reason="triton needs a GPU or the interpreter"))]
# The flat names of BNSpec's fields, in the order of the custom ops' schemas.
FLAT = ["bn_weight", "bn_bias", "running_mean", "running_var", "training", "momentum", "eps"]


def _bn_names(names):
    return [n for n in names if n in FLAT]


def _params(fn):
    return [n for n in inspect.signature(fn).parameters if n not in ("self", "ctx")]


def test_fields_follow_the_order_of_every_flat_signature():
    assert ["bn_" + f if f in ("weight", "bias") else f for f in BNSpec._fields] == FLAT
    flat = {
        "fastres::conv_bn_act": [a.name for a in torch.ops.fastres.conv_bn_act.default._schema.arguments],
        "fastres::bn_act": [a.name for a in torch.ops.fastres.bn_act.default._schema.arguments],
        "Backend.conv_bn_act_forward": _params(Backend.conv_bn_act_forward),
        "Backend.bn_act_forward": _params(Backend.bn_act_forward),
        "conv_bn_act_aten": _params(aten_backend.conv_bn_act_aten),
        "bn_act_aten": _params(aten_backend.bn_act_aten),
        "_ConvBNAct.forward": _params(conv_bn_act_op._ConvBNAct.forward),
        "_BNAct.forward": _params(bn_act_op._BNAct.forward),
        "fastres.conv_bn_act": _params(fastres.conv_bn_act),
        "fastres.bn_act": _params(fastres.bn_act),
    }
    for where, names in flat.items():
        assert _bn_names(names) == FLAT, where


def _spy(monkeypatch, name, op):
    """The spy on what `op`'s BatchNorm arguments reach on backend `name`: the torch backend's aten
    form, or a fused backend's contract function."""
    if name == "torch":
        fn = f"{op}_aten"
        mod, real, sig = aten_backend, getattr(aten_backend, fn), getattr(aten_backend, fn)
    else:
        fn = f"{op}_forward"
        mod = backend.module(name)
        real, sig = getattr(mod, fn), getattr(Backend, fn)
    seen = Seen(real, sig)
    monkeypatch.setattr(mod, fn, seen)
    return seen


def _check_seen(call, gamma, beta, rm, rv, training, momentum, eps):
    for key, t in (("bn_weight", gamma), ("bn_bias", beta), ("running_mean", rm), ("running_var", rv)):
        got = call[key]
        assert (got is None) == (t is None), key
        assert t is None or got.data_ptr() == t.data_ptr(), key
    assert (call["training"], call["momentum"], call["eps"]) == (training, momentum, eps)


def _bn_tensors(c):
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(c, generator=gen) + 0.5).to(DEV) for _ in range(4)]


@pytest.mark.parametrize("how", ["grad", "no_grad", "dispatch_mode"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_functionals_hand_each_field_to_its_place(name, training, how, monkeypatch):
    """fastres.conv_bn_act / fastres.bn_act: planned eager calls with and without an autograd node, and
    calls through the custom ops (a TorchDispatchMode is active)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(DEV).requires_grad_(how != "no_grad")
    w = (torch.randn(8, 8, 3, 3, generator=gen) * 0.2).to(DEV).requires_grad_(how != "no_grad")
    gamma, beta, rm, rv = _bn_tensors(8)
    for t in (gamma, beta):
        t.requires_grad_(how != "no_grad")
    kw = dict(training=training, momentum=0.25, eps=1e-3, relu=True)
    with fastres.use_backend(name):
        for op, call in (("conv_bn_act", lambda: fastres.conv_bn_act(x, w, None, gamma, beta, rm, rv, padding=1, **kw)),
                         ("bn_act", lambda: fastres.bn_act(x, gamma, beta, rm, rv, **kw))):
            seen = _spy(monkeypatch, name, op)
            with torch.set_grad_enabled(how != "no_grad"):
                if how == "dispatch_mode":
                    with FlopCounterMode(display=False):
                        call()
                else:
                    call()
            assert len(seen.calls) == 1, op
            _check_seen(seen.calls[0], gamma, beta, rm, rv, training, 0.25, 1e-3)


@pytest.mark.parametrize("momentum", [0.3, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_modules_hand_each_field_to_its_place(name, training, momentum, monkeypatch):
    """conv_bn_act_modules and bn_act_modules build the record from the modules (the effective momentum,
    the module's eps, the running buffers; eval: momentum 0)."""
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False).to(DEV)
    bn = nn.BatchNorm2d(8, eps=1e-3, momentum=momentum).to(DEV)
    bn.num_batches_tracked.fill_(3)
    bn.train(training)
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(2)).to(DEV)
    factor = (0.3 if momentum else 1.0 / 4.0) if training else 0.0
    # (bn_act_modules hands an eval call the module's momentum, conv_bn_act_modules 0.0: neither is read in eval)
    factors = dict(conv_bn_act=factor, bn_act=factor if training else (momentum or 0.0))
    with fastres.use_backend(name):
        for op, call in (("conv_bn_act", lambda: conv_bn_act_modules(x, conv, bn, relu=True)),
                         ("bn_act", lambda: bn_act_modules(x, bn, relu=True))):
            bn.num_batches_tracked.fill_(3)
            seen = _spy(monkeypatch, name, op)
            call()
            assert len(seen.calls) == 1, op
            _check_seen(seen.calls[0], bn.weight, bn.bias, bn.running_mean, bn.running_var, training,
                        factors[op], 1e-3)


def test_functionals_build_one_record_and_pass_it_on(monkeypatch):
    """The public functionals keep their flat signatures and pass one BNSpec to the path inside."""
    got = []
    for mod, fn in ((conv_bn_act_op, "run_conv_bn_act"), (bn_act_op, "run_bn_act")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _real=real: got.append(a) or _real(*a))
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 1, 1)
    gamma, beta, rm, rv = (torch.rand(4) + 0.5 for _ in range(4))
    with fastres.use_backend("torch"):
        fastres.conv_bn_act(x, w, None, gamma, beta, rm, rv, training=False, momentum=0.5, eps=1e-4)
        fastres.bn_act(x, gamma, beta, rm, rv, training=False, momentum=0.5, eps=1e-4)
    assert len(got) == 2
    for args in got:
        (spec,) = [a for a in args if type(a) is BNSpec]
        assert all(a is b for a, b in zip(spec[:4], (gamma, beta, rm, rv)))
        assert spec[4:] == (False, 0.5, 1e-4)
