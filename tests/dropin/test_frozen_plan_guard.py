"""The guard of a frozen plan (fastres.models.plan_guard): the per-call proof that nothing the last full
check read has changed.

Proved here: a guard is armed and used (its hits), so the rest proves something; every change a user can
make between two calls makes it fail - asserted on the guard itself, so that a change with a small effect
on the logits cannot hide behind the tolerance - and the output then follows the model as it now is
(house rule against the torchvision twin, float64 oracle), until a new plan and guard take over; what
the guard cannot prove (an attribute that can change in place) keeps the full check on every call; a
guard that never holds stops being armed; nothing outlives the frozen() context.
"""
import copy
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from numerics import assert_as_good
from workflow_helpers import batch, check_eval, make

import fastres
from fastres.models import plan, plan_guard

pytestmark = pytest.mark.skipif(not plan._fuser_available(), reason="this torch has no oneDNN Graph fuser")
ARCH = "basic"


@pytest.fixture(autouse=True)
def eager_plans(monkeypatch):
    """A plan on the third call with a (structure, shape), whatever the time spent; the build cap reset."""
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)


@pytest.fixture(autouse=True, params=["native", "python"])
def proof(request, monkeypatch):
    """Every test twice: the guard's proof in C++ (fastres._cpu: csrc/cpu/plan_guard.cpp) and in Python."""
    if request.param == "python":
        monkeypatch.setattr(plan_guard, "_native", None)
    elif plan_guard._native is None:
        from fastres import _native
        pytest.skip(f"the C++ proof is not available here: {_native.why}")
    return request.param


def _armed(model, x):
    """Calls until the guard for x's shape has held twice; the guard (in the form the test runs)."""
    with torch.no_grad():
        for _ in range(8):
            model(x)
    g = plan._PLANS[model].guards.get(tuple(x.shape))
    assert g is not None and g.hits >= 2, "no guard armed and used: the tests below would prove nothing"
    assert (g.native is not None) == (plan_guard._native is not None), "not the proof this test runs"
    return g


def _sgd(m, **kw):
    p = m.layer2[0].conv1.weight
    opt = torch.optim.SGD([p], lr=0.1, **kw)
    p.grad = torch.ones_like(p)
    opt.step()
    p.grad = None


def _adam_fused(m):   # leaves the version counter alone (fastres/backends/fold_cache.py)
    p = m.layer1[1].bn2.weight
    opt = torch.optim.Adam([p], lr=0.1, fused=True)
    p.grad = torch.ones_like(p)
    opt.step()
    p.grad = None


def _recalibrate(m):   # a training forward updates the running statistics without a version bump
    m.train()
    with torch.no_grad():
        m(batch(21))
    m.eval()


def _batch_norm_call(m):   # the statistics updated by a function call, not the module
    bn = m.layer3[1].bn1
    F.batch_norm(torch.randn(4, bn.num_features, 3, 3), bn.running_mean, bn.running_var, training=True,
                 momentum=0.5)


def _load(m):
    sd = {k: v * 1.1 if v.is_floating_point() else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd)


def _class_attr(m):   # an attribute a block reads from its class: set on the instance
    m.layer2[1].__dict__["_norm_layer"] = nn.BatchNorm2d


def _eps(m):
    m.layer4[0].bn2.eps = 0.5


def _move_stride(m):   # the same modules, another geometry
    m.layer3[0].conv1.stride = (1, 1)
    m.layer3[0].conv2.stride = (2, 2)


def _gelu(m):
    m.layer2[0].relu = nn.GELU()


def _in_place(w):
    with torch.no_grad():
        w.mul_(1.2)


def _neg_view(m):   # the same bits in memory, the values negated (a view's neg bit)
    bn = m.layer2[0].bn2
    bn.weight.data = torch._neg_view(bn.weight.data.clone())


def _strided(m):   # memory that starts with the values seen, read through a stride of 2: other values
    bn = m.layer3[1].bn2
    base = torch.cat([bn.running_var, bn.running_var.flip(0) + 1.0])
    bn.running_var.data = base[::2]


CHANGES = {
    "bn-weight-.data-in-place": (lambda m: m.layer1[0].bn1.weight.data.mul_(1.5), None),
    "running-stats-by-a-training-forward": (_recalibrate, None),
    "running-stats-by-F.batch_norm": (_batch_norm_call, None),
    "conv-weight-.data-swapped": (lambda m: setattr(m.layer2[1].conv2.weight, "data",
                                                    m.layer2[1].conv2.weight.data * 0.9), None),
    "conv-weight-in-place": (lambda m: _in_place(m.layer3[0].conv1.weight), None),
    "sgd-for-loop": (lambda m: _sgd(m, foreach=False), None),
    "sgd-foreach": (lambda m: _sgd(m, foreach=True), None),
    "adam-fused": (_adam_fused, None),
    "load_state_dict": (_load, None),
    "bn-eps": (_eps, _eps),
    "stride-moved": (_move_stride, _move_stride),
    "relu-swapped": (_gelu, _gelu),
    "bn-forward-on-the-instance": (lambda m: setattr(m.layer1[1].bn1, "forward", lambda t: t * 0.5),
                                   lambda t: setattr(t.layer1[1].bn1, "forward", lambda u: u * 0.5)),
    "bn-class-changed": (lambda m: setattr(m.layer4[1].bn1, "__class__", _HalfBN),
                         lambda t: setattr(t.layer4[1].bn1, "__class__", _HalfBN)),
    "fc-swapped": (lambda m: setattr(m, "fc", nn.Linear(512, 10)), None),
    "class-attribute-shadowed": (_class_attr, None),
    "refresh-after-.data": ("refresh", None),
    "bn-weight-neg-view": (_neg_view, None),
    "running-var-strided-view": (_strided, None),
}


class _HalfBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 0.5


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_fails_the_guard_and_the_output_follows(change):
    model = make(ARCH).eval()
    edit, twin_swap = CHANGES[change]
    x = batch(3)
    with fastres.frozen(model) as f:
        g = _armed(model, x)
        assert g.holds()
        if edit == "refresh":
            model.layer4[1].conv1.weight.data.mul_(0.5)   # invisible to every cache: the contract's refresh()
            f.refresh()
        else:
            if change == "fc-swapped":
                torch.manual_seed(5)
            edit(model)
        assert not g.holds(), f"the guard held after {change}"
        for i in range(6):   # full checks, a new plan, its guard
            check_eval(model, ARCH, x, swaps=twin_swap, what=f"call {i} after {change}")


def test_a_hook_fails_the_guard_and_sees_its_tensor():
    model = make(ARCH).eval()
    x = batch(4)
    seen = []
    with fastres.frozen(model):
        g = _armed(model, x)
        h = model.layer3[1].conv2.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        assert not g.holds()
        check_eval(model, ARCH, x, what="with a hook")
        assert seen == [torch.Size([x.shape[0], 256, 4, 4])]
        h.remove()
        for i in range(6):
            check_eval(model, ARCH, x, what=f"call {i} after the hook went")
        assert plan._PLANS[model].guards[tuple(x.shape)].hits > 0   # the fast path is back


def test_a_conv_bias_that_appears_fails_the_guard():
    model = make(ARCH).eval()
    x = batch(11)
    conv = model.layer1[0].conv2
    with fastres.frozen(model):
        g = _armed(model, x)
        conv.bias = nn.Parameter(torch.full((conv.out_channels,), 0.25))
        assert not g.holds()
        with torch.no_grad():
            got = [model(x) for _ in range(6)]
            oracle = fastres.unfuse(copy.deepcopy(model)).double()(x.double())
            with fastres.frozen(model, plan=False):
                ref = model(x)
    for i, y in enumerate(got):
        assert_as_good(y, ref, oracle, f"call {i} after a conv bias appeared")


def test_a_class_patch_fails_the_guard(monkeypatch):
    model = make(ARCH).eval()
    x = batch(5)
    with fastres.frozen(model):
        g = _armed(model, x)
        real = nn.BatchNorm2d.forward
        monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, t: real(self, t) * 1.01 + 0.01)
        assert not g.holds()
        for i in range(4):
            check_eval(model, ARCH, x, what=f"call {i} with BatchNorm2d.forward patched")


def test_a_geometry_attribute_rebound_to_an_equal_float_fails_the_guard():
    """stride (1.0, 1.0) equals (1, 1) but is not what torch's conv2d accepts: the full check answers."""
    model = make(ARCH).eval()
    x = batch(6)
    with fastres.frozen(model):
        g = _armed(model, x)
        model.layer2[1].conv1.stride = (1.0, 1.0)
        assert not g.holds()
        model.layer2[1].conv1.stride = (1, 1)   # an equal tuple of ints: the full check passes, a new guard
        for i in range(4):
            check_eval(model, ARCH, x, what=f"call {i} after stride was rebound")
        assert plan._PLANS[model].guards[tuple(x.shape)] is not g


def test_another_thread_and_inference_mode_are_not_this_guards_calls():
    model = make(ARCH).eval()
    x = batch(7)
    with fastres.frozen(model):
        g = _armed(model, x)
        answers = []

        def other_thread():   # no frozen() context there (gradients off, as a guarded call has them)
            with torch.no_grad():
                answers.append(g.holds())

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert answers == [False] and g.holds()
        with torch.inference_mode():
            assert not g.holds()
            for i in range(4):
                check_eval(model, ARCH, x, what=f"inference_mode call {i}")


def test_an_attribute_that_can_change_in_place_keeps_the_full_check():
    model = make(ARCH).eval()
    model.maxpool.padding = [1, 1]   # a list: mutable in place
    x = batch(8)
    with fastres.frozen(model):
        with torch.no_grad():
            for _ in range(8):
                model(x)
        assert not plan._PLANS[model].guards and plan.live(model)
        model.maxpool.padding[0] = 0
        model.maxpool.padding[1] = 0
        check_eval(model, ARCH, x, swaps=lambda t: setattr(t.maxpool, "padding", 0), what="padding edited in place")


def test_a_guard_that_never_holds_is_no_longer_armed(monkeypatch):
    model = make(ARCH).eval()
    x = batch(9)
    with fastres.frozen(model):
        _armed(model, x)
        with torch.no_grad():
            for i in range(12):   # an attribute rebound on every call: the guard fails, the full check passes
                model.layer1[0].requests = i + 1000
                model(x)
        mp = plan._PLANS[model]
        assert tuple(x.shape) not in mp.guards or mp.guards[tuple(x.shape)].hits == 0
        assert max(mp.misses.values()) >= plan._GUARD_MISSES
        check_eval(model, ARCH, x, what="after the guard was given up")


def test_nothing_outlives_the_context_of_a_model_that_holds_it():
    inner = make(ARCH).eval()
    outer = nn.Sequential(inner)
    x = batch(10)
    with fastres.frozen(outer):
        _armed(inner, x)
    assert plan._PLANS.get(inner) is None


def test_a_context_entered_on_part_of_the_model_fails_the_guard():
    """A frozen() context entered on some of its BatchNorms remakes their folds (fastres/frozen.py): the
    plan built from the old ones is not used, as the full check would not use it."""
    model = make(ARCH).eval()
    x = batch(12)
    with fastres.frozen(model):
        g = _armed(model, x)
        with fastres.frozen(model.layer2):
            assert not g.holds()
            for i in range(4):
                check_eval(model, ARCH, x, what=f"call {i} in the inner context")


def test_a_renamed_or_deleted_attribute_fails_the_guard():
    """The instance dict must keep its keys: one renamed in place (the same count, position and value) or
    deleted fails the guard. (A ReLU's `inplace`, the last key of its dict; the fused ReLU does not read
    it, so only the guard is asserted.)"""
    model = make(ARCH).eval()
    x = batch(14)
    relu = model.layer2[1].relu
    with fastres.frozen(model):
        g = _armed(model, x)
        d = relu.__dict__
        d["inplace_"] = d.pop("inplace")
        assert not g.holds()
        d["inplace"] = d.pop("inplace_")
        g = _armed(model, x)
        del d["inplace"]
        assert not g.holds()


def test_a_longer_tensor_with_the_same_leading_values_fails_the_guard():
    """A BatchNorm weight one value longer, its first values those seen: the call then fails as torch's
    BatchNorm does."""
    model = make(ARCH).eval()
    x = batch(15)
    bn = model.layer2[0].bn1
    with fastres.frozen(model):
        g = _armed(model, x)
        bn.weight.data = torch.cat([bn.weight.data, bn.weight.data[:1]])
        assert not g.holds()
        with torch.no_grad(), pytest.raises(RuntimeError):
            model(x)


def test_lengths_moved_between_tensors_fail_the_guard():
    """The same values, concatenated, in tensors of other lengths (a weight one longer, the bias one
    shorter): the bits agree, the lengths do not; the call then fails as torch's BatchNorm does."""
    model = make(ARCH).eval()
    x = batch(13)
    bn = model.layer1[1].bn2
    with fastres.frozen(model):
        g = _armed(model, x)
        w, b = bn.weight.data.clone(), bn.bias.data.clone()
        bn.weight.data = torch.cat([w, b[:1]])
        bn.bias.data = b[1:].clone()
        assert not g.holds()
        with torch.no_grad(), pytest.raises(RuntimeError):
            model(x)
        with torch.no_grad(), pytest.raises(RuntimeError):
            nn.BatchNorm2d.forward(bn, torch.randn(2, 64, 4, 4))
