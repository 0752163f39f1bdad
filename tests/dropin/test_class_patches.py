"""Drop-in: a forward patched on a torch.nn class is the user's code, and it runs.

Tools and users monkeypatch torch.nn classes (``nn.ReLU.forward = f``, a wrapped ``nn.Conv2d._conv_forward``,
a traced ``nn.Linear.forward``); torchvision's ResNet then runs the patched code in every module of that
class. fastres's fused paths stand in for nn.Conv2d, nn.BatchNorm2d, nn.ReLU and nn.Linear only while
those run torch's own code (fastres.nn_methods.own_method, read at import and checked on every call): with a patch
the modules of that class run as themselves, by default and inside fastres.frozen, and the model gives what
torchvision gives under the same patch. (Found by a user-style probe: the fused path had skipped them.)
"""
import contextlib
import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from numerics import assert_as_good
from workflow_helpers import batch, make, twin_of

import fastres
from fastres import nn_methods
from fastres.nn_methods import functions_unpatched, nn_methods_unpatched, own_method


def _patches():
    conv_fwd, conv_conv, bn_fwd = nn.Conv2d.forward, nn.Conv2d._conv_forward, nn.BatchNorm2d.forward
    lin_fwd = nn.Linear.forward
    return {
        "ReLU.forward": (nn.ReLU, "forward", lambda self, t: torch.clamp(t, 0.0, 0.5)),
        "Conv2d.forward": (nn.Conv2d, "forward", lambda self, t: conv_fwd(self, t) * 1.5),
        "Conv2d._conv_forward": (nn.Conv2d, "_conv_forward", lambda self, t, w, b: conv_conv(self, t, w, b) - 0.25),
        "BatchNorm2d.forward": (nn.BatchNorm2d, "forward", lambda self, t: bn_fwd(self, t).tanh()),
        "Linear.forward": (nn.Linear, "forward", lambda self, t: lin_fwd(self, t) + 3.0),
    }


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
@pytest.mark.parametrize("kind", ["fused", "converted"])
@pytest.mark.parametrize("patch", list(_patches()))
def test_a_patched_nn_class_forward_runs_as_in_torchvision(patch, kind, frozen, monkeypatch):
    model = make("basic", kind).eval()
    if patch == "Linear.forward":   # (a head large enough for the frozen call's oneDNN matmul)
        model.fc = nn.Linear(512, 1000)
    tv = twin_of(model, "basic", swaps=(lambda m: setattr(m, "fc", nn.Linear(512, 1000)))
                 if patch == "Linear.forward" else None).eval()
    x = batch(2)
    with torch.no_grad():
        clean = model(x)
        cls, name, fn = _patches()[patch]
        monkeypatch.setattr(cls, name, fn)
        assert not nn_methods_unpatched()
        ref = tv(x)
        oracle = copy.deepcopy(tv).double()(x.double())
        if frozen:
            with fastres.frozen(model):
                model(x)
                got = model(x)
        else:
            got = model(x)
    assert (ref - clean).abs().max() > 1e-2 * clean.abs().max()   # (the patch changes the answer)
    assert_as_good(got, ref, oracle, f"{patch}, {kind}, {'frozen' if frozen else 'default'}")


class _Base:
    def run(self):
        return 1


class _Child(_Base):
    pass


def test_own_method_knows_a_patch_whenever_it_was_made():
    assert own_method(_Child, "run") is _Base.run                  # (found in the MRO, owned by its class)
    assert own_method(nn.BatchNorm2d, "forward") is nn.modules.batchnorm._BatchNorm.forward
    _Child.run = lambda self: 2                                     # a patch made before the library looked
    assert own_method(_Child, "run") is None
    assert own_method(_Child, "missing") is None
    assert nn_methods_unpatched()


def _instance_patches():
    return {
        "conv.forward": ("layer2.0.conv1", "forward", lambda orig: (lambda t: orig(t) * 0.5)),
        "conv._conv_forward": ("layer1.1.conv2", "_conv_forward", lambda orig: (lambda t, w, b: orig(t, w, b) + 0.25)),
        "bn.forward": ("layer3.0.bn2", "forward", lambda orig: (lambda t: orig(t).tanh())),
        "downsample conv.forward": ("layer4.0.downsample.0", "forward", lambda orig: (lambda t: orig(t) * 2.0)),
        "stem relu.forward": ("relu", "forward", lambda orig: (lambda t: torch.clamp(orig(t), max=0.5))),
    }


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
@pytest.mark.parametrize("patch", list(_instance_patches()))
def test_a_forward_set_on_one_module_runs_as_in_torchvision(patch, frozen):
    """A forward set on one module instance (``conv.forward = f``: the user's code, as wrapping tools do it)
    runs wherever that module would run, as torchvision runs it. (Found by a user-style probe: the fused
    path, by default and inside frozen, had skipped it.)"""
    model = make("basic").eval()
    path, name, wrap = _instance_patches()[patch]
    tv, tv64 = twin_of(model, "basic").eval(), twin_of(model, "basic").double().eval()
    for m in (model, tv, tv64):   # (each patch wraps its own module's method)
        mod = m.get_submodule(path)
        setattr(mod, name, wrap(getattr(mod, name)))
    x = batch(2)
    ctx = fastres.frozen(model) if frozen else torch.no_grad()
    with torch.no_grad(), ctx:
        for _ in range(4):   # (inside frozen: past the per-layer calls that come before a plan)
            got = model(x)
        ref = tv(x)
        oracle = tv64(x.double())
    assert_as_good(got, ref, oracle, f"{patch} set on the instance")


def _function_wrappers():
    conv2d, batch_norm, relu = F.conv2d, F.batch_norm, F.relu

    @functools.wraps(relu)
    def relu_wrapped(input, inplace=False):   # (looks like torch's own but for __wrapped__)
        return relu(input, inplace=inplace).clamp(max=0.7)

    return {
        "F.conv2d": ("conv2d", lambda *a, **k: conv2d(*a, **k) * 1.01 + 0.01),
        "F.batch_norm": ("batch_norm", lambda *a, **k: batch_norm(*a, **k).tanh()),
        "F.relu (functools.wraps)": ("relu", relu_wrapped),
    }


@pytest.mark.parametrize("frozen", ["default", "frozen", "frozen, wrapped inside"])
@pytest.mark.parametrize("kind", ["fused", "converted"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("target", list(_function_wrappers()))
def test_a_wrapped_functional_sees_the_calls_torchvision_makes(target, fmt, kind, frozen, monkeypatch):
    """F.conv2d / F.batch_norm / F.relu wrapped (a tool's or a user's wrapper, changing the values here):
    the model gives what torchvision gives under the same wrapper, and the wrapper is called as often,
    by default and inside fastres.frozen (past the calls that would build a plan), wrapped before the
    context or inside it once folds, packs and a plan exist. (Found by a user-style probe: the fused
    block's ReLU skipped F.relu; frozen's folds skipped all three.)"""
    monkeypatch.setattr(fastres.models.plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(fastres.models.plan, "builds", 0)
    model = make("basic", kind).eval()
    tv = twin_of(model, "basic").eval()
    x = batch(2, fmt)
    name, wrapper = _function_wrappers()[target]
    calls = [0]

    def counted(*a, **k):
        calls[0] += 1
        return wrapper(*a, **k)

    inside = frozen == "frozen, wrapped inside"
    with torch.no_grad(), fastres.frozen(model) if inside else contextlib.nullcontext():
        for _ in range(6):
            clean = model(x)
        monkeypatch.setattr(F, name, counted)
        assert not functions_unpatched()
        ref = tv(x)
        want = calls[0]
        oracle = copy.deepcopy(tv).double()(x.double())
        with fastres.frozen(model) if frozen == "frozen" else contextlib.nullcontext():
            for _ in range(5):
                calls[0] = 0
                got = model(x)
                assert calls[0] == want, f"{target} called {calls[0]} times, torchvision {want}"
    assert (ref - clean).abs().max() > 1e-2 * clean.abs().max()   # (the wrapper changes the answer)
    assert_as_good(got, ref, oracle, f"{target}, {kind}, {frozen}")
    monkeypatch.undo()
    assert functions_unpatched()


def test_a_functional_wrapped_before_import_is_not_torchs_own(monkeypatch):
    """A wrapper made before fastres looked (functools.wraps copies the name and module) is known by its
    __wrapped__; another function under the name by where it was defined; F.conv2d must be the builtin."""
    for name in ("conv2d", "batch_norm", "relu"):
        assert nn_methods._own_function(name) is getattr(F, name)
        orig = getattr(F, name)
        monkeypatch.setattr(F, name, functools.wraps(orig)(lambda *a, _o=orig, **k: _o(*a, **k)))
        assert nn_methods._own_function(name) is None
        monkeypatch.setattr(F, name, lambda *a, _o=orig, **k: _o(*a, **k))
        assert nn_methods._own_function(name) is None
        monkeypatch.undo()
