"""ConvSpec (fastres/ops/conv_bn_act_checks.py): inside conv_bn_act the convolution's arguments travel as
one checked record, built (or taken from the call's plan) once per call and flattened only where a custom
op, _ConvBNAct or a backend function is called. Its fields keep the order every flat signature has, every
path puts each field where the backend reads it (distinct values per field: a swap shows), and the
record a call carries is the one it built, not a copy."""
import importlib
import inspect

import pytest
import torch
from spy_helpers import Seen
from torch.utils.flop_counter import FlopCounterMode

import fastres
from fastres import backend
from fastres.backends import torch as aten_backend
from fastres.backends.contract import Backend
from fastres.kernels import interpreter_active
from fastres.ops.conv_bn_act_checks import ConvSpec

conv_bn_act_op = importlib.import_module("fastres.ops.conv_bn_act")   # (fastres.ops re-exports the function)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter_active() and not torch.cuda.is_available(), reason="triton needs a GPU or the interpreter"))
FLAT = ["stride", "padding", "dilation", "groups"]
# Distinct per field (the triton kernels take groups=1 only); what the backend must see, as lists.
GEOMETRY = {"torch": dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
            "triton": dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=1)}


def _params(fn):
    return [n for n in inspect.signature(fn).parameters if n not in ("self", "ctx")]


def _schema(op):
    return [a.name for a in op.default._schema.arguments]


def test_fields_follow_the_order_of_every_flat_signature():
    assert list(ConvSpec._fields) == FLAT
    flat = {
        "fastres::conv_bn_act": _schema(torch.ops.fastres.conv_bn_act),
        "fastres::conv_bn_act_backward": _schema(torch.ops.fastres.conv_bn_act_backward),
        "Backend.conv_bn_act_supports": _params(Backend.conv_bn_act_supports),
        "Backend.conv_bn_act_forward": _params(Backend.conv_bn_act_forward),
        "Backend.conv_bn_act_backward": _params(Backend.conv_bn_act_backward),
        "conv_bn_act_aten": _params(aten_backend.conv_bn_act_aten),
        "_ConvBNAct.forward": _params(conv_bn_act_op._ConvBNAct.forward),
        "_support_args": _params(conv_bn_act_op._support_args),
        "fastres.conv_bn_act": _params(fastres.conv_bn_act),
        "run_conv_bn_act": _params(conv_bn_act_op.run_conv_bn_act),
    }
    for where, names in flat.items():
        got = [n for n in names if n in FLAT]
        assert got == FLAT, where
        start = names.index("stride")
        assert names[start:start + 4] == FLAT, where   # (adjacent: one record unpacked in place)


def _spy(monkeypatch, name, fn):
    """The spy on backend `name`'s function `fn` ("forward", "backward"): the torch backend's aten form
    (its forward), or a fused backend's contract function."""
    if name == "torch":
        mod, attr, sig = aten_backend, "conv_bn_act_aten", aten_backend.conv_bn_act_aten
    else:
        mod, attr = backend.module(name), f"conv_bn_act_{fn}"
        sig = getattr(Backend, attr)
    seen = Seen(getattr(mod, attr), sig)
    monkeypatch.setattr(mod, attr, seen)
    return seen


def _inputs(groups, requires_grad):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 7, 7, generator=gen).to(DEV).requires_grad_(requires_grad)
    w = (torch.randn(8, 8 // groups, 3, 3, generator=gen) * 0.2).to(DEV).requires_grad_(requires_grad)
    gamma, beta = ((torch.rand(8, generator=gen) + 0.5).to(DEV).requires_grad_(requires_grad) for _ in range(2))
    rm, rv = torch.zeros(8, device=DEV), torch.ones(8, device=DEV)
    return x, w, gamma, beta, rm, rv


def _expect(call, geometry):
    for key in ("stride", "padding", "dilation"):
        assert list(call[key]) == list(geometry[key]), key
    assert call["groups"] == geometry["groups"]


@pytest.mark.parametrize("how", ["grad", "no_grad", "dispatch_mode"])
@pytest.mark.parametrize("name", ["torch", TRITON])
def test_each_field_reaches_its_place(name, how, monkeypatch):
    """Planned eager calls (the first builds the plan, the second takes it) with and without an autograd
    node, and calls through the custom ops (a TorchDispatchMode is active); the backward too."""
    geometry = GEOMETRY[name]
    x, w, gamma, beta, rm, rv = _inputs(geometry["groups"], how != "no_grad")
    forward = _spy(monkeypatch, name, "forward")
    back = None if name == "torch" else _spy(monkeypatch, name, "backward")
    with fastres.use_backend(name), torch.set_grad_enabled(how != "no_grad"):
        for _ in range(2):
            if how == "dispatch_mode":
                with FlopCounterMode(display=False):
                    y = fastres.conv_bn_act(x, w, None, gamma, beta, rm, rv, relu=True, **geometry)
            else:
                y = fastres.conv_bn_act(x, w, None, gamma, beta, rm, rv, relu=True, **geometry)
            if y.requires_grad:
                y.sum().backward()
    assert len(forward.calls) == 2
    for call in forward.calls + (back.calls if back is not None else []):
        _expect(call, geometry)
    if back is not None:
        assert len(back.calls) == (2 if how != "no_grad" else 0)


def _record_specs(monkeypatch):
    """Every ConvSpec conv_spec() builds in fastres.ops.conv_bn_act, and every record explain() and
    _aten() are handed there."""
    built, handed = [], []
    real_spec, real_explain, real_aten = conv_bn_act_op.conv_spec, conv_bn_act_op.explain, conv_bn_act_op._aten

    def spec(*a):
        built.append(real_spec(*a))
        return built[-1]

    def explain(x, weight, bias, bn, residual, conv):
        handed.append(conv)
        return real_explain(x, weight, bias, bn, residual, conv)

    def aten(x, weight, bias, bn, residual, conv, relu):
        handed.append(conv)
        return real_aten(x, weight, bias, bn, residual, conv, relu)

    monkeypatch.setattr(conv_bn_act_op, "conv_spec", spec)
    monkeypatch.setattr(conv_bn_act_op, "explain", explain)
    monkeypatch.setattr(conv_bn_act_op, "_aten", aten)
    return built, handed


@pytest.mark.parametrize("name", ["torch", TRITON])
def test_one_record_per_call_passed_on(name, monkeypatch):
    """The torch backend (decided afresh per call) builds one ConvSpec per call; a planned call builds one
    with its plan and then carries the plan's. Whatever is handed on is that record itself."""
    geometry = GEOMETRY[name]
    x, w, gamma, beta, rm, rv = _inputs(geometry["groups"], True)
    # (a stride no other test uses: the first call below builds a new plan)
    geometry = dict(geometry, stride=(2, 1))
    conv_bn_act_op._PLANS.clear()
    built, handed = _record_specs(monkeypatch)
    with fastres.use_backend(name):
        for i in range(3):
            fastres.conv_bn_act(x, w, None, gamma, beta, rm, rv, relu=True, **geometry)
            assert len(built) == (i + 1 if name == "torch" else 1)
    assert all(type(spec) is ConvSpec for spec in built)
    assert handed and all(any(conv is spec for spec in built) for conv in handed)
    if name != "torch":
        (plan,) = conv_bn_act_op._PLANS.values()
        assert plan.conv is built[0]
