"""Drop-in: a module attribute set by hand behaves as on torchvision, by default and inside fastres.frozen.

Users set ``conv.stride = 1`` (F.conv2d takes an int for both sides) or a list, and by mistake a float
stride or BatchNorm statistics in another dtype. Where torchvision runs, fastres gives its result (within
the house rule); where torchvision raises, fastres raises the same exception type, whatever ran before.
(Found by a user-style probe: an int stride, padding or dilation made frozen raise TypeError; a float
stride ran when an int stride of equal value had been seen before (the geometry cache took (1.0, 1.0)
for (1, 1)) and raised ValueError otherwise; frozen folded fp16 / fp64 statistics that nn.BatchNorm2d
rejects for an fp32 input.)
"""
import copy

import pytest
import torch
from numerics import assert_as_good
from workflow_helpers import batch, make, twin_of

import fastres
from fastres.models import plan

CL = torch.channels_last


def _geometry_edits():
    return {
        "stride 1 (int)": lambda m: setattr(m.layer1[0].conv1, "stride", 1),
        "padding 1 (int)": lambda m: setattr(m.layer2[1].conv2, "padding", 1),
        "dilation 1 (int)": lambda m: setattr(m.layer3[0].conv2, "dilation", 1),
        "stride [1, 1] (list)": lambda m: setattr(m.layer1[1].conv1, "stride", [1, 1]),
        "dilation 2, padding 2 (ints)": lambda m: (setattr(m.layer4[1].conv1, "dilation", 2),
                                                   setattr(m.layer4[1].conv1, "padding", 2)),
    }


@pytest.mark.parametrize("where", ["default", "frozen", "frozen plan"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("edit", list(_geometry_edits()))
def test_int_and_list_geometry_runs_as_in_torchvision(edit, fmt, where, monkeypatch):
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)
    model = make("basic").eval()
    x = batch(2, fmt)
    with torch.no_grad(), fastres.frozen(model, plan=where == "frozen plan") if where != "default" \
            else torch.no_grad():
        model(x)   # (folds, packs, and for the plan, calls toward it, made before the edit)
        _geometry_edits()[edit](model)
        got = [model(x) for _ in range(5)]
    tv = twin_of(model, "basic", swaps=_geometry_edits()[edit]).eval()
    with torch.no_grad():
        ref, oracle = tv(x), copy.deepcopy(tv).double()(x.double())
    for i, g in enumerate(got):
        assert_as_good(g, ref, oracle, f"{edit}, {where}, call {i}")


def _raises_like(model, tv, x, frozen):
    with torch.no_grad():
        with pytest.raises(Exception) as want:
            tv(x)
        for _ in range(2):
            with fastres.frozen(model) if frozen else torch.no_grad(), pytest.raises(want.type):
                model(x)


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
@pytest.mark.parametrize("seen_before", [False, True], ids=["fresh", "after-int-stride"])
def test_a_float_stride_raises_torchvisions_type_error(seen_before, frozen):
    model = make("basic").eval()
    x = batch(2)
    if seen_before:
        with torch.no_grad():
            model(x)   # (every (1, 1) geometry met, as a float's equal)
    edit = _geometry_edits()["stride 1 (int)"]
    tv = twin_of(model, "basic").eval()
    for m in (model, tv):
        edit(m)
        m.layer1[0].conv1.stride = (1.0, 1.0)
    _raises_like(model, tv, x, frozen)


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("which", ["running_var", "running_mean", "weight"])
def test_statistics_in_another_dtype_raise_as_in_torchvision(which, dtype, frozen):
    model = make("basic").eval()
    tv = twin_of(model, "basic").eval()
    for m in (model, tv):
        bn = m.layer2[0].bn1
        t = getattr(bn, which)
        if which == "weight":
            bn.weight = torch.nn.Parameter(t.detach().to(dtype))
        else:
            setattr(bn, which, t.to(dtype))
    _raises_like(model, tv, batch(2, CL), frozen)


@pytest.mark.parametrize("where", ["default", "frozen plan"])
@pytest.mark.parametrize("which", ["relu", "layer1.0.relu", "layer3.1.relu"])
def test_a_relu_without_its_inplace_raises_as_in_torchvision(which, where, monkeypatch):
    """nn.ReLU's forward reads self.inplace: deleted, torchvision raises AttributeError; so must the model
    (the fused ReLU does not read it), also once a plan is live."""
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    model = make("basic").eval()
    tv = twin_of(model, "basic").eval()
    x = batch(2)
    with torch.no_grad(), fastres.frozen(model) if where != "default" else torch.no_grad():
        for _ in range(6):
            model(x)
        for m in (model, tv):
            del m.get_submodule(which).inplace
        with pytest.raises(AttributeError):
            tv(x)
        for _ in range(2):
            with pytest.raises(AttributeError, match="inplace"):
                model(x)


@pytest.mark.parametrize("where", ["default", "frozen plan"])
def test_a_shortcut_attribute_on_a_converted_block_is_just_an_attribute(where, monkeypatch):
    """fastres's own blocks read `shortcut` as the paper's option (None: a plain block); a converted
    torchvision block has no such option and adds its identity whatever a user stores under that name."""
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    model = make("basic", "converted").eval()
    x = batch(2)
    for name in ("layer1.0", "layer2.1", "layer3.0"):
        model.get_submodule(name).shortcut = None
    with torch.no_grad(), fastres.frozen(model) if where != "default" else torch.no_grad():
        got = [model(x) for _ in range(5)]
    tv = twin_of(model, "basic").eval()
    with torch.no_grad():
        ref, oracle = tv(x), copy.deepcopy(tv).double()(x.double())
    for i, g in enumerate(got):
        assert_as_good(g, ref, oracle, f"{where}, call {i}")
