"""fastres.frozen's fold cache against what its key could miss, and against other threads.

* A new conv weight must never pass for the one a fold was made from: ``p.data = a; p.data = b`` between
  two calls, and torch.func.functional_call with new tensors on every call, free the old weight, and the
  allocator then often hands the next one the same address (seen: 1 to 5 stale calls in 20); the cache
  entry keeps its source weight allocated, so the key's address cannot come back. Loops, since one try
  proves nothing about an allocator.
* A context covers the thread that entered it: another thread outside any context reads the live tensors
  (an invisible edit there is fine, as on torchvision), and one frozen object entered by two threads
  is counted per thread.
* A bad swap inside the context raises what it raises outside it (the default path's error), not an
  error from inside the fold.
* What the contract says no cache can see (torch.optim's functional fused forms) is made right by refresh().
Each output is held to the house rule against the unfrozen model run in float64.
"""
import copy
import importlib
import threading

import pytest
import torch
import torch.nn as nn
from numerics import assert_as_good
from torch.func import functional_call
from workflow_helpers import batch, make

import fastres
from fastres.backends import torch as aten_backend
from fastres.models import plan


@pytest.fixture(autouse=True)
def plans_early(monkeypatch):
    """Inside frozen, a compiled plan (fastres.models.plan) from the third call with one structure and
    shape instead of after a quarter of a second: every test here meets plans as well as the per-layer path."""
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def cifar_net() -> nn.Module:
    torch.manual_seed(0)
    model = fastres.resnet20().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


def check(got: torch.Tensor, model: nn.Module, params=None, what: str = "") -> None:
    """`got` against `model` (a twin never frozen) in fp32 and in float64, with `params` if given."""
    ref_model = copy.deepcopy(model)
    oracle_model = copy.deepcopy(model).double()
    with torch.no_grad():
        if params is None:
            ref, oracle = ref_model(X), oracle_model(X.double())
        else:
            ref = functional_call(ref_model, params, (X,))
            oracle = functional_call(oracle_model, {k: v.double() for k, v in params.items()}, (X.double(),))
    assert_as_good(got, ref, oracle, what)


def test_a_weight_assigned_twice_between_calls_is_never_taken_for_the_folded_one():
    model = cifar_net()
    conv = model.layer2[0].conv1
    with torch.no_grad(), fastres.frozen(model):
        for it in range(60):
            model(X)   # a fold of the current weight
            conv.weight.data = torch.empty(conv.weight.shape).normal_(0, 0.05)
            conv.weight.data = torch.empty(conv.weight.shape).normal_(0, 0.05)
            check(model(X), model, what=f"after two .data assignments, iteration {it}")


def test_functional_call_with_new_tensors_on_every_call():
    model = cifar_net()
    base = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad(), fastres.frozen(model):
        for i in range(20):
            params = {k: v * (1.0 + 0.1 * i) if v.dim() == 4 else v for k, v in base.items()}
            got = functional_call(model, params, (X,))
            check(got, model, params, what=f"functional_call {i}")
            del params, got


def test_another_thread_outside_the_context_reads_the_live_weights():
    model = cifar_net()
    entered, edited, done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def serve():
        with torch.no_grad(), fastres.frozen(model):
            model(X)          # folds made and cached
            entered.set()
            edited.wait(30)
            model(X)          # (inside the context an in-place .data edit needs refresh(): not checked)
            done.set()

    def other():
        entered.wait(30)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.mul_(1.1)   # invisible to any cache: fine outside a context, as on torchvision
        with torch.no_grad():
            seen["other"] = model(X)
        edited.set()

    threads = [threading.Thread(target=serve), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert done.is_set() and "other" in seen
    check(seen["other"], model, what="a thread outside frozen() while another thread holds it")


def test_one_frozen_object_entered_by_two_threads_counts_per_thread():
    model = cifar_net()
    f = fastres.frozen(model)
    bn = model.bn1
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    states = {}

    def a():
        with f:
            a_in.set()
            b_in.wait(30)
            states["a inside"] = aten_backend.frozen_active(bn)
        a_out.set()
        states["a after"] = aten_backend.frozen_active(bn)

    def b():
        a_in.wait(30)
        with f:
            b_in.set()
            a_out.wait(30)
            states["b inside, after a left"] = aten_backend.frozen_active(bn)
            with torch.no_grad():
                states["b output"] = model(X)
        states["b after"] = aten_backend.frozen_active(bn)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert states.get("a inside") and states.get("b inside, after a left"), states
    assert states.get("a after") is False and states.get("b after") is False, states
    assert not aten_backend.frozen_active(bn)   # the main thread never entered
    check(states["b output"], model, what="thread b inside the shared frozen object")


def test_a_conv_and_batchnorm_that_disagree_raise_as_outside_the_context():
    """(An ImageNet net at 64 px: its calls inside frozen() are vouched for, the path that folded first.)"""
    model = make("basic").eval()
    x = batch()
    with torch.no_grad(), fastres.frozen(model):
        model(x)    # every layer folded and packed
    model.layer1[1].conv1 = nn.Conv2d(64, 32, 3, padding=1, bias=False).eval()   # bn1 expects 64 channels
    with torch.no_grad():
        with pytest.raises(Exception) as outside:
            model(x)
        with fastres.frozen(model), pytest.raises(Exception) as inside:
            model(x)
    assert type(inside.value) is type(outside.value) and str(inside.value) == str(outside.value)


def test_functional_fused_optimizer_is_seen_after_refresh():
    """torch.optim's functional fused SGD leaves the version counter alone and fires no step hook: the
    contract lists it among the edits that need refresh(); after refresh() the output is the live one."""
    sgd = importlib.import_module("torch.optim.sgd")
    model = cifar_net()
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad(), fastres.frozen(model) as f:
        model(X)
        grads = [torch.randn_like(w) for w in convs]
        sgd.sgd(convs, grads, [None] * len(convs), weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0,
                nesterov=False, maximize=False, fused=True)
        f.refresh()
        check(model(X), model, what="after functional fused SGD and refresh()")


@pytest.mark.skipif(not aten_backend._onednn_available(), reason="this PyTorch has no oneDNN inference ops")
def test_alternating_input_shapes_keep_their_packs_and_stay_right(monkeypatch):
    """Dynamic batching: a fold keeps a prepacked weight per input shape (up to PACKS_KEPT), so batch
    sizes that alternate do not repack every layer on every call (a user probe measured frozen at 0.6x
    the default path that way); a shape beyond them evicts the oldest, and every output stays right."""
    model = cifar_net()
    real = torch._C._nn.mkldnn_reorder_conv2d_weight
    packs = []

    def spy(*args):
        packs.append(args[-1])
        return real(*args)

    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", spy)
    xs = {n: torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)) for n in range(1, 7)}
    ref = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()

    def run(n):
        got = model(xs[n])
        assert_as_good(got, ref(xs[n]), oracle(xs[n].double()), f"batch {n}")

    with torch.no_grad(), fastres.frozen(model, plan=False):   # (the per-layer path's packs: no plan)
        for n in (1, 3, 1, 3):
            run(n)
        first = len(packs)   # batches 1 and 3: one pack per layer each
        assert first > 0 and first % 2 == 0
        for n in (1, 3, 2, 4, 1, 3, 2, 4):   # four shapes: all kept after their first call
            run(n)
        kept = len(packs)
        assert kept == 2 * first, "batches 2 and 4 packed once each, 1 and 3 not again"
        for n in (5, 6, 1):   # beyond PACKS_KEPT: the oldest are evicted and repacked when they return
            run(n)
        assert len(packs) == kept + 3 * (first // 2)


def test_small_tensors_enter_the_key_by_value_dtype_and_object_kind(monkeypatch):
    """The BatchNorm tensors are compared by value on every call (torch.equal ignores dtype, so their dtype
    is in the key): a new tensor object with the same values and dtype keeps the fold, new values remake it,
    and each result matches the unfrozen model; a dtype BatchNorm rejects is never folded (its error)."""
    from fastres.backends import fold_cache

    model = cifar_net()
    bn = model.layer2[0].bn1
    folds = []
    real = fold_cache.fold
    monkeypatch.setattr(fold_cache, "fold", lambda *a: folds.append(1) or real(*a))
    with torch.no_grad(), fastres.frozen(model):
        model(X)
        n = len(folds)
        model(X)
        assert len(folds) == n   # nothing changed: no fold
        bn.running_var = bn.running_var.clone()   # another object, same values and dtype
        model(X)
        assert len(folds) == n
        bn.running_var = bn.running_var * 1.5   # new values
        got = model(X)
        assert len(folds) == n + 1
        check(got, model, what="new values")
        bn.running_mean = bn.running_mean.double()   # same values, a dtype nn.BatchNorm2d rejects: its error
        with pytest.raises(RuntimeError, match="expected scalar type"):
            model(X)
        assert len(folds) == n + 1


@pytest.mark.parametrize("change", ["transpose through .data", "transpose_ in place", "as_strided_"])
def test_a_weight_restrided_in_place_is_refolded(change):
    """Same object, storage, address, shape and version counter, new values: only the strides tell
    (found by a user-style probe: the output had not moved)."""
    model = cifar_net()
    conv = model.layer2[1].conv1   # 3x3, 32 -> 32: a transpose keeps the shape
    with torch.no_grad(), fastres.frozen(model):
        model(X)
        model(X)
        w = conv.weight
        if change == "transpose through .data":
            w.data = w.data.transpose(2, 3)
        elif change == "transpose_ in place":
            w.requires_grad_(False)
            w.transpose_(0, 1)
        else:
            w.requires_grad_(False)
            w.as_strided_(w.shape, (w.stride(0), w.stride(1), 1, 3))
        got = model(X)
    check(got, model, what=f"after {change}")
