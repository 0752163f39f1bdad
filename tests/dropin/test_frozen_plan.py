"""A vouched frozen call's body as one compiled plan (fastres.models.plan): TorchScript + oneDNN Graph.

Proved here: a plan is built and used where it should be (else the rest proves nothing), and its output
holds the house rule against a fresh torchvision model in float64; whatever changes between two calls
(weights and statistics by every route the fold cache sees, refresh(), a swapped or re-configured module,
a new input shape) never meets a stale plan: the output follows the model as it now is; no plan where
the call must see its ops or the user said no; a plan that fails gives the per-layer result; its
constants are freed when it is released; the fuser's global switch is left as it was. (test_workflows.py
runs the users' workflows with plans built as early as possible.)
"""
import copy
import threading

import pytest
import torch
import torch.nn as nn
from numerics import assert_as_good
from torch.utils._python_dispatch import TorchDispatchMode
from workflow_helpers import batch, check_eval, make

import fastres
from fastres.models import plan

pytestmark = pytest.mark.skipif(not plan._fuser_available(), reason="this torch has no oneDNN Graph fuser")


@pytest.fixture(autouse=True)
def eager_plans(monkeypatch):
    """A plan on the third call with a (structure, shape), whatever the time spent; the build cap reset."""
    monkeypatch.setattr(plan, "PLAN_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(plan, "builds", 0)


@pytest.fixture
def runs(monkeypatch):
    """How many calls ran through a plan."""
    counts = {"plan": 0}
    real = plan._Plan.run

    def counted(self, x):
        y = real(self, x)
        counts["plan"] += y is not None
        return y

    monkeypatch.setattr(plan._Plan, "run", counted)
    return counts


def _calls(model, x, n=5):
    with torch.no_grad():
        for _ in range(n):
            y = model(x)
    return y


@pytest.mark.parametrize("arch,kind,fmt", [("basic", "fused", torch.contiguous_format),
                                           ("bottleneck", "fused", torch.channels_last),
                                           ("bottleneck", "converted", torch.contiguous_format)],
                         ids=["basic-nchw", "bottleneck-channels_last", "converted-bottleneck-nchw"])
def test_plan_is_built_used_and_holds_the_house_rule(arch, kind, fmt, runs):
    model = make(arch, kind).eval()
    x = batch(2, fmt)
    with fastres.frozen(model):
        _calls(model, x)
        assert runs["plan"] == 3     # two per-layer calls, then the build's call and two more
        check_eval(model, arch, x, what="through the plan")
        assert runs["plan"] == 4
    assert plan._PLANS.get(model) is None     # released on exit


@pytest.mark.parametrize("shortcut", ["A", "B", None], ids=["option-A", "option-B", "plain"])
def test_cifar_nets_run_through_the_plan(shortcut, runs):
    torch.manual_seed(0)
    model = fastres.models.cifar.CifarResNet(20, shortcut=shortcut).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        oracle = fastres.unfuse(copy.deepcopy(model)).double()(x.double())
        with fastres.frozen(model):
            got = _calls(model, x)
    assert runs["plan"] == 3
    assert_as_good(got, ref, oracle, "resnet20 through the plan")


def _bn_data(m):
    m.layer2[0].bn2.running_mean.data.add_(0.3)


def _conv_copy(m):
    with torch.no_grad():
        m.layer3[0].conv1.weight.copy_(m.layer3[0].conv1.weight * 1.5)


def _sgd_step(m):
    p = m.layer1[0].conv2.weight
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    p.grad = None


def _stride(m):   # the same modules, another geometry: the structure walk must see it
    m.layer2[0].conv1.stride = (2, 2)
    m.layer2[0].conv2.stride = (1, 1)


CHANGES = {
    "bn-running-mean-.data": (_bn_data, None),
    "conv-weight-copy_": (_conv_copy, None),
    "optimizer-step": (_sgd_step, None),
    "data-in-place-then-refresh": ("refresh", None),
    "stride-moved-to-conv1": (_stride, _stride),
    "relu-swapped-for-identity": (lambda m: setattr(m.layer2[0], "relu", nn.Identity()),
                                  lambda t: setattr(t.layer2[0], "relu", nn.Identity())),
    "downsample-swapped": (lambda m: setattr(m.layer3[0], "downsample", nn.Sequential(
        nn.Conv2d(512, 1024, 1, stride=2, bias=False), nn.BatchNorm2d(1024)).eval()), None),
    "maxpool-kernel": (lambda m: setattr(m.maxpool, "kernel_size", 2),
                       lambda t: setattr(t.maxpool, "kernel_size", 2)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_what_changes_between_calls_never_meets_a_stale_plan(change, runs):
    arch = "bottleneck"
    model = make(arch).eval()
    edit, twin_swap = CHANGES[change]
    x = batch(3)
    with fastres.frozen(model) as f:
        _calls(model, x)
        assert runs["plan"] == 3
        if edit == "refresh":
            model.layer4[0].conv2.weight.data.mul_(0.5)   # invisible to every cache: the contract's refresh()
            f.refresh()
        else:
            edit(model)
        for i in range(4):   # per-layer, per-layer, a new plan, through it
            check_eval(model, arch, x, swaps=twin_swap, what=f"call {i} after {change}")


def test_each_input_shape_has_its_own_plan_and_the_oldest_goes(runs, monkeypatch):
    monkeypatch.setattr(plan, "PLANS_KEPT", 2)
    model = make("basic").eval()
    shapes = [(2, 3, 64, 64), (3, 3, 64, 64), (2, 3, 32, 32)]
    with fastres.frozen(model):
        for n, c, h, w in shapes + shapes[:1]:
            x = torch.randn(n, c, h, w)
            _calls(model, x, 4)
            check_eval(model, "basic", x, what=f"input {n}x{c}x{h}x{w}")
        assert len(plan._PLANS[model].plans) == 2


def test_no_plan_where_the_call_must_show_its_ops_or_the_user_said_no(runs):
    model = make("basic").eval()
    x = batch(4)

    class Seen(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops += 1
            return func(*args, **(kwargs or {}))

    with fastres.frozen(model):
        with Seen():
            _calls(model, x)
        assert runs["plan"] == 0 and Seen.ops > 0
    with fastres.frozen(model, plan=False):
        _calls(model, x)
        check_eval(model, "basic", x)
    assert runs["plan"] == 0
    with pytest.raises(TypeError, match="plan must be True or False"):
        fastres.frozen(model, plan="yes")


def test_inference_mode_and_an_input_that_requires_grad(runs):
    model = make("basic").eval()
    x = batch(5).requires_grad_()
    with fastres.frozen(model):
        with torch.inference_mode():
            for _ in range(5):
                got = model(x)
        assert runs["plan"] == 3
        check_eval(model, "basic", x.detach(), what="after inference_mode calls")
    assert not got.requires_grad


def test_a_plan_that_fails_gives_the_per_layer_result_and_is_not_tried_again(monkeypatch):
    model = make("basic").eval()
    x = batch(6)
    with fastres.frozen(model):
        _calls(model, x, 3)   # the third call built a plan
        mp = plan._PLANS[model]
        (key, p), = mp.plans.items()

        def broken(t):
            raise RuntimeError("a oneDNN Graph failure")
        p.fn = broken
        check_eval(model, "basic", x, what="after the plan failed")
        assert key in mp.failed and not mp.plans
        _calls(model, x, 3)
        assert not mp.plans


def test_released_plans_free_their_constants_and_the_fuser_switch_is_restored():
    before = torch._C._jit_llga_enabled()
    model = make("basic").eval()
    x = batch(7)
    with fastres.frozen(model):
        _calls(model, x)
        (p,) = plan._PLANS[model].plans.values()
        consts = list(p.consts)
        assert all(t.untyped_storage().nbytes() > 0 for t in consts)
    assert all(t.untyped_storage().nbytes() == 0 for t in consts)
    assert torch._C._jit_llga_enabled() == before


def test_without_the_fuser_the_per_layer_path(runs, monkeypatch):
    monkeypatch.setattr(plan, "_fuser_available", lambda: False)
    model = make("basic").eval()
    x = batch(9)
    with fastres.frozen(model):
        _calls(model, x)
        check_eval(model, "basic", x)
    assert runs["plan"] == 0


def test_the_build_cap_holds(runs, monkeypatch):
    monkeypatch.setattr(plan, "MAX_BUILDS", 1)
    model = make("basic").eval()
    with fastres.frozen(model):
        _calls(model, batch(8))
        _calls(model, torch.randn(3, 3, 64, 64))
        assert plan.builds == 1 and len(plan._PLANS[model].plans) == 1
        check_eval(model, "basic", torch.randn(3, 3, 64, 64))


def test_threads_each_in_their_own_context():
    model = make("bottleneck").eval()
    errors = []

    def work(seed):
        try:
            x = batch(seed)
            with fastres.frozen(model):
                for _ in range(5):
                    check_eval(model, "bottleneck", x, what=f"thread {seed}")
        except Exception as e:   # (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (10, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _wrap(owner, name, how):
    orig = getattr(owner, name)
    return lambda *a, **k: how(orig(*a, **k))


@pytest.mark.parametrize("target", ["F.max_pool2d", "F.relu", "torch.relu", "F.conv2d", "Module.__call__"])
@pytest.mark.parametrize("when", ["after the plan is live", "while it would be built"])
def test_a_wrapped_torch_function_or_module_call_is_never_skipped(target, when, runs, monkeypatch):
    """The plan's trace binds its functions at import, and a call with a torch function (or the module
    call machinery) replaced runs the per-layer path, which runs the wrapper as torchvision does. (Found by
    a user-style probe: the trace had recorded whatever the names held at build time.)"""
    owner, name = {"F.max_pool2d": (nn.functional, "max_pool2d"), "F.relu": (nn.functional, "relu"),
                   "torch.relu": (torch, "relu"), "F.conv2d": (nn.functional, "conv2d"),
                   "Module.__call__": (nn.Module, "__call__")}[target]
    model = make("basic").eval()
    x = batch(3)
    wrapped = _wrap(owner, name, lambda t: t * 1.01 + 0.01 if isinstance(t, torch.Tensor) else t)
    with fastres.frozen(model):
        if when == "after the plan is live":
            _calls(model, x)
            assert runs["plan"] == 3
        with monkeypatch.context() as mp:
            mp.setattr(owner, name, wrapped)
            before = runs["plan"]
            _calls(model, x, 4)
            assert runs["plan"] == before   # (whatever the per-layer path makes of the wrapper: no plan)
        for i in range(4):   # unwrapped again: no plan traced under the wrapper may run
            check_eval(model, "basic", x, what=f"call {i} after {target} was wrapped {when}")


def test_pool_arguments_as_lists(runs):
    model = make("basic").eval()
    model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding = [3, 3], [2, 2], [1, 1]
    with fastres.frozen(model):
        _calls(model, batch(4))
        assert runs["plan"] == 3
        check_eval(model, "basic", batch(4))


def test_a_plan_released_under_a_running_call_is_not_used(runs):
    """Another thread may release a plan (its context's exit, an eviction) between this call's lookup and
    its check: a released plan reads as not built from anything, and the per-layer path answers."""
    model = make("basic").eval()
    x = batch(5)
    with fastres.frozen(model):
        _calls(model, x)
        (p,) = plan._PLANS[model].plans.values()
        p.release()   # (still in the table, as if released by another thread mid-call)
        assert not p.built_from([None])
        n = runs["plan"]
        check_eval(model, "basic", x, what="after its plan was released")
        assert runs["plan"] == n


def test_another_models_context_leaves_this_models_plan_alone(runs):
    model, other = make("basic").eval(), make("bottleneck").eval()
    x = batch(6)
    with fastres.frozen(model):
        _calls(model, x)
        builds = plan.builds
        for _ in range(3):   # per-request contexts of another model, as a server might open them
            with fastres.frozen(other):
                _calls(other, x, 1)
        n = runs["plan"]
        _calls(model, x, 2)
        assert runs["plan"] == n + 2 and plan.builds == builds


def test_the_onednn_switches_turn_plans_off(runs, monkeypatch):
    from fastres.backends import torch as aten_backend
    model = make("basic").eval()
    x = batch(7)
    with fastres.frozen(model):
        _calls(model, x)
        monkeypatch.setattr(aten_backend, "onednn_enabled", False)
        n = runs["plan"]
        _calls(model, x, 3)
        assert runs["plan"] == n
        check_eval(model, "basic", x)


@pytest.mark.parametrize("head", ["identity", "linear", "sequential"])
def test_a_head_swapped_after_eval_still_runs_the_plan(head, runs):
    """Feature extractors set ``model.fc = nn.Identity()`` after ``model.eval()``: the new module is in
    train mode, which its forward never reads (no reason to give up the plan: it never went live); a
    train-mode Dropout still does (its forward reads it)."""
    model = make("basic").eval()
    model.fc = {"identity": nn.Identity(), "linear": nn.Linear(512, 7),
                "sequential": nn.Sequential(nn.Flatten(), nn.Identity())}[head]
    assert model.fc.training
    x = batch(2)
    with fastres.frozen(model):
        _calls(model, x)
        assert runs["plan"] == 3
        check_eval(model, "basic", x, swaps=lambda tv: setattr(tv, "fc", copy.deepcopy(model.fc)),
                   what=f"{head} head in train mode")
        model.fc = nn.Sequential(model.fc, nn.Dropout(0.5))
        before = runs["plan"]
        y = _calls(model, x, 3)
    assert runs["plan"] == before
    assert model.training is False and y.shape[0] == x.shape[0]
