"""The guard of a frozen plan (fastres.models.plan_guard), continued: the cases a user-style probe found
(a None moved between a pair's tensors, a module that calls itself equal, geometry edited in place, plans
that outlived their context), plan=False over a wrapper, converted models guarded like fastres's own,
and what a review of the C++ form found (an __eq__ that changes the module while it is compared, an
OrderedDict submodule table reordered, tensors torch gives no strides for).
"""
import collections
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from numerics import assert_as_good
from test_frozen_plan_guard import ARCH, _armed, proof  # noqa: F401  (proof: both forms of the proof)
from workflow_helpers import batch, check_eval, make

import fastres
from fastres.models import plan

pytestmark = pytest.mark.skipif(not plan._fuser_available(), reason="this torch has no oneDNN Graph fuser")


@pytest.fixture(autouse=True)
def eager_plans(monkeypatch):
    """A plan on the third call with a (structure, shape), whatever the time spent; the build cap reset."""
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)


def _against_unfused(model, x, calls, what):
    """Each output of `calls` (made inside the context after an edit) against the model as it now is,
    module by module in plain torch (fastres.unfuse of a copy), float64 oracle."""
    with torch.no_grad():
        plain = fastres.unfuse(copy.deepcopy(model))
        ref, oracle = plain(x), copy.deepcopy(plain).double()(x.double())
    for i, y in enumerate(calls):
        assert_as_good(y, ref, oracle, f"call {i} {what}")


def test_a_none_moved_between_a_pairs_tensors_fails_the_guard():
    """The BN weight dropped and the conv given a bias with its values: the same tensors, in the same
    order and bits, but another fold (found by a user-style probe: the guard compared them as one list)."""
    model = make(ARCH).eval()
    x = batch(14)
    conv, bn = model.layer2[1].conv1, model.layer2[1].bn1
    with fastres.frozen(model):
        g = _armed(model, x)
        w = bn.weight.detach().clone()
        bn.weight = None
        conv.bias = nn.Parameter(w)
        assert not g.holds()
        with torch.no_grad():
            got = [model(x) for _ in range(6)]
    _against_unfused(model, x, got, "after a None moved")


class _SameConfigConv(nn.Conv2d):
    """A conv that calls itself equal to any conv of its configuration (a user's __eq__)."""

    def __eq__(self, other):
        return isinstance(other, nn.Conv2d) and self.weight.shape == other.weight.shape

    __hash__ = nn.Conv2d.__hash__


def test_a_submodule_swapped_for_one_that_calls_itself_equal_fails_the_guard():
    model = make(ARCH).eval()
    x = batch(15)
    with fastres.frozen(model):
        g = _armed(model, x)
        torch.manual_seed(3)
        model.layer1[1].conv1 = _SameConfigConv(64, 64, 3, padding=1, bias=False).eval()
        assert not g.holds()
        with torch.no_grad():
            got = [model(x) for _ in range(6)]
    _against_unfused(model, x, got, "after the conv was swapped")


def test_geometry_that_is_not_plain_is_not_guarded():
    import array

    model = make(ARCH).eval()
    model.layer1[0].conv1.padding = array.array("l", [1, 1])   # mutable in place, as a list is
    x = batch(16)
    with fastres.frozen(model):
        with torch.no_grad():
            for _ in range(8):
                model(x)
        assert plan.live(model) and not plan._PLANS[model].guards


def test_plans_go_with_the_context_that_froze_their_folds():
    """A model swapped out of the context's model, and one sharing its modules: their plans (and the
    guards that hold their modules) are released on exit, and the models can be collected."""
    import gc
    import weakref

    net = make(ARCH).eval()
    outer = nn.Sequential(net)
    x = batch(17)
    with fastres.frozen(outer):
        _armed(net, x)
        outer[0] = make(ARCH, seed=1).eval()
    assert plan._PLANS.get(net) is None
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None

    a = make(ARCH).eval()
    b = copy.copy(a)   # the same stem and stages, another object
    b._modules = dict(a._modules)
    with fastres.frozen(a):
        _armed(b, x)
    assert plan._PLANS.get(b) is None


def test_plan_false_on_a_wrapper_covers_the_models_in_it():
    net = make(ARCH).eval()
    with fastres.frozen(nn.Sequential(net), plan=False):
        with torch.no_grad():
            for _ in range(6):
                net(batch(18))
        assert plan._PLANS.get(net) is None or not plan._PLANS[net].plans


@pytest.mark.parametrize("kind", ["converted", "fused"])
def test_a_converted_bottleneck_model_is_guarded_too(kind):
    model = make("bottleneck", kind).eval()
    x = batch(19)
    with fastres.frozen(model):
        g = _armed(model, x)
        model.layer3[0].bn2.running_var.data.mul_(1.3)
        assert not g.holds()
        for i in range(6):
            check_eval(model, "bottleneck", x, what=f"{kind} call {i} after a running_var edit")


class _Meddler:
    """An attribute value whose == registers a forward hook on its module: code that runs while a guard
    compares values."""

    def __init__(self, module):
        self.module = module

    def __eq__(self, other):
        self.module.register_forward_hook(lambda mod, args, out: None)
        return True

    __hash__ = object.__hash__


def test_an_eq_that_changes_the_module_mid_check_fails_the_guard():
    model = make(ARCH).eval()
    x = batch(21)
    conv = model.layer2[0].conv1
    conv.note = 1
    with fastres.frozen(model):
        g = _armed(model, x)
        conv.__dict__["note"] = _Meddler(conv)
        assert not g.holds()
        check_eval(model, ARCH, x, what="after an attribute whose == registers a hook")


def test_a_reordered_ordereddict_submodule_table_fails_the_guard():
    """An OrderedDict `_modules` (as a model pickled whole by an old torch has) reordered in place: the
    blocks run in the new order. (The C++ form does not take such a table: the Python form proves it.)"""
    model = make(ARCH).eval()
    x = batch(22)
    model.layer1._modules = collections.OrderedDict(model.layer1._modules)

    def reorder(m):
        m.layer1._modules = collections.OrderedDict(m.layer1._modules)
        m.layer1._modules.move_to_end("0")

    with fastres.frozen(model):
        with torch.no_grad():
            for _ in range(8):
                model(x)
        g = plan._PLANS[model].guards.get(tuple(x.shape))
        assert g is not None and g.hits >= 2 and g.native is None
        model.layer1._modules.move_to_end("0")
        assert not g.holds()
        for i in range(4):
            check_eval(model, ARCH, x, swaps=reorder, what=f"call {i} after the blocks were reordered")


def test_a_nested_or_sparse_tensor_in_a_table_fails_the_guard_without_a_crash():
    model = make(ARCH).eval()
    x = batch(23)
    bn, conv = model.layer2[1].bn1, model.layer3[0].conv1
    with fastres.frozen(model):
        g = _armed(model, x)
        saved = bn._buffers["running_var"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # (nested tensors' prototype notice)
            bn._buffers["running_var"] = torch.nested.nested_tensor([saved.clone()])
        assert not g.holds()
        bn._buffers["running_var"] = saved
        g = _armed(model, x)
        w = conv._parameters["weight"]
        conv._parameters["weight"] = nn.Parameter(w.detach().to_sparse(), requires_grad=False)
        assert not g.holds()
        conv._parameters["weight"] = w
        check_eval(model, ARCH, x, what="after the tables were restored")
