"""Drop-in: the default eval path's one-frame checks (fastres.plain_pair, fastres.models.block_forward)
answer as the general checks, and the model call's "no module tracer" state (fastres.module_calls.untraced)
lives exactly as long as the call.

Inside a fastres model call that found no module tracer, an eval (conv, BN) pair and its block check
everything the general path checks by reads of the modules' tables (a CPU runs that code from cold
caches after each convolution: measured 45 us per layer through the general path's helper calls, 2-3%
of a ResNet-18 forward on a CPU, slower than torchvision). Every edit below must still send the call
where it went before: the values torchvision gives under the same edit, its hooks and wrappers called
as often, the same op counts.
"""
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from workflow_helpers import batch, make, twin_of

import fastres
from fastres import FusedConvBNReLU2d, backend
from fastres.backends import torch as aten_backend
from fastres.module_calls import untraced

KINDS = ["fused", "converted"]
FMTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", list(FMTS))
def test_default_eval_is_torchvisions_bits(arch, kind, fmt):
    """The fast eval path runs torchvision's aten ops on the same tensors: the same bits, in both layouts,
    and every pair counted on the torch backend."""
    model = make(arch, kind).eval()
    tv = twin_of(model, arch).eval()
    x = batch(2, FMTS[fmt])
    if fmt == "channels_last":
        model, tv = model.to(memory_format=torch.channels_last), tv.to(memory_format=torch.channels_last)
    backend.calls.clear()
    with torch.no_grad():
        got, want = model(x), tv(x)
    assert torch.equal(got, want)
    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert backend.calls[("conv_bn_act", "forward", "torch")] == pairs
    assert not untraced.on


def _edits():
    """name -> (edit(model) returning a counter of what torchvision would call, or None)."""
    def hook_on(attr, kind):
        def edit(m):
            seen = [0]
            mod = m.layer2[0]
            for a in attr.split("."):
                mod = mod[int(a)] if a.isdigit() else getattr(mod, a)
            if kind == "forward":
                mod.register_forward_hook(lambda *a: seen.__setitem__(0, seen[0] + 1))
            else:
                mod.register_forward_pre_hook(lambda *a: seen.__setitem__(0, seen[0] + 1))
            return seen
        return edit

    def instance_forward(attr):
        def edit(m):
            mod = getattr(m.layer3[0], attr)
            cls_forward = type(mod).forward
            mod.forward = lambda t: cls_forward(mod, t) * 0.5
        return edit

    def attr_edit(fn):
        def edit(m):
            fn(m)
        return edit

    return {
        "forward hook on conv1": hook_on("conv1", "forward"),
        "forward pre-hook on bn2": hook_on("bn2", "pre"),
        "forward hook on the relu": hook_on("relu", "forward"),
        "forward hook on downsample.0": hook_on("downsample.0", "forward"),
        "forward hook on the downsample": hook_on("downsample", "forward"),
        "instance forward on conv2": instance_forward("conv2"),
        "instance forward on bn1": instance_forward("bn1"),
        "instance forward on the downsample": instance_forward("downsample"),
        "bn1 in train mode": attr_edit(lambda m: m.layer1[0].bn1.train()),
        "relu swapped for a SiLU": attr_edit(lambda m: setattr(m.layer2[1], "relu", nn.SiLU())),
        "conv1 padding_mode reflect": attr_edit(lambda m: setattr(m.layer1[1].conv1, "padding_mode", "reflect")),
        "a list stride": attr_edit(lambda m: setattr(m.layer2[0].conv1, "stride", [2, 2])),
        "downsample with a third module": attr_edit(lambda m: m.layer2[0].downsample.append(nn.Identity())),
        "bn2 running statistics dropped": attr_edit(
            lambda m: (setattr(m.layer4[0].bn2, "running_mean", None), setattr(m.layer4[0].bn2, "running_var", None),
                       setattr(m.layer4[0].bn2, "track_running_stats", False))),
    }


_CHANGE_VALUES = {"instance forward on conv2", "instance forward on bn1", "instance forward on the downsample",
                  "bn1 in train mode",
                  "relu swapped for a SiLU", "conv1 padding_mode reflect", "bn2 running statistics dropped"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("edit", list(_edits()))
def test_an_edit_runs_as_in_torchvision(edit, fmt, kind):
    model = make("basic", kind).eval()
    tv = twin_of(model, "basic").eval()
    x = batch(3, FMTS[fmt])
    with torch.no_grad():
        clean = model(x)
        seen_model, seen_tv = _edits()[edit](model), _edits()[edit](tv)
        for _ in range(2):
            got, want = model(x), tv(x)
    assert torch.equal(got, want), edit   # (the same aten ops as torchvision's, fused or not)
    if seen_model is not None:
        assert seen_model[0] == seen_tv[0] > 0, edit
    if edit in _CHANGE_VALUES:
        assert (got - clean).abs().max() > 1e-3 * clean.abs().max(), "the edit changes nothing"


def test_a_global_hook_and_wrapped_functionals_are_still_seen(monkeypatch):
    """A global module hook, or an F.batch_norm / F.relu wrapper, registered between two calls: called by
    the next call as often as torchvision calls it."""
    model = make("basic").eval()
    tv = twin_of(model, "basic").eval()
    x = batch(4)
    with torch.no_grad():
        model(x)
        seen = []
        h = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        try:
            tv(x)
            want, seen[:] = len(seen), []
            model(x)
            assert len(seen) == want > 0, "the global hook is called as often as torchvision calls it"
        finally:
            h.remove()
        for name in ("batch_norm", "relu"):
            real, calls = getattr(F, name), [0]

            def counted(*a, _real=real, **k):
                calls[0] += 1
                return _real(*a, **k)

            monkeypatch.setattr(F, name, counted)
            tv(x)
            want, calls[0] = calls[0], 0
            model(x)
            assert calls[0] == want > 0, name
            monkeypatch.undo()


def test_the_state_lives_only_inside_a_model_call():
    """Set while a fastres model's layers run (a head that looks at it), reset on return and after an
    error; not set under a module tracer; per thread."""
    model = make("basic").eval()
    inside = []

    class Spy(nn.Module):
        def forward(self, t):
            inside.append(untraced.on)
            return t

    model.fc = nn.Sequential(Spy(), model.fc)
    x = batch(5)
    with torch.no_grad():
        model(x)
        assert inside == [True] and not untraced.on
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 4, 32, 32))   # (4 channels: the stem's conv raises)
        assert not untraced.on
        other = []
        t = threading.Thread(target=lambda: other.append(untraced.on))
        t.start()
        t.join()
        assert other == [False]
    traced = torch.jit.trace(model, x, check_trace=False)
    assert inside[-1] is False and not untraced.on
    assert any(n.kind() == "aten::_convolution" for n in traced.inlined_graph.nodes())


def _with_extra_layer(model, tv):
    """A FusedConvBNReLU2d appended to layer2 of `model` (an nn.Sequential(conv, bn, relu) with the same
    tensors on torchvision's twin): a pair that no fused block checks before its own call."""
    torch.manual_seed(7)
    extra = FusedConvBNReLU2d(128, 128, 3, padding=1, bias=False)
    extra.bn.running_mean.uniform_(-0.5, 0.5)
    extra.bn.running_var.uniform_(0.5, 2.0)
    extra.eval()
    model.layer2.append(extra)
    tv.layer2.append(nn.Sequential(extra.conv, extra.bn, nn.ReLU(inplace=True)).eval())
    return extra


@pytest.mark.parametrize("where", ["conv forward hook", "bn forward pre-hook", "global forward hook",
                                   "conv instance forward", "bn instance forward"])
def test_a_hook_on_a_layer_no_block_checks_is_called(where):
    """The appended layer's modules are shared with torchvision's twin: a hook or an instance forward on one
    is on both; the fastres model must call it as often, and give the same bits."""
    model = make("basic").eval()
    tv = twin_of(model, "basic").eval()
    extra = _with_extra_layer(model, tv)
    x = batch(6)
    seen, handles = [], []
    with torch.no_grad():
        clean = model(x)
        if where == "conv forward hook":
            handles.append(extra.conv.register_forward_hook(lambda *a: seen.append(1)))
        elif where == "bn forward pre-hook":
            handles.append(extra.bn.register_forward_pre_hook(lambda *a: seen.append(1)))
        elif where == "global forward hook":
            handles.append(torch.nn.modules.module.register_module_forward_hook(
                lambda m, *a: seen.append(1) if m is extra.conv or m is extra.bn else None))
        else:
            mod = extra.conv if where.startswith("conv") else extra.bn
            cls_forward = type(mod).forward

            def own(t, _mod=mod):
                seen.append(1)
                return cls_forward(_mod, t) * 0.5
            mod.forward = own
        try:
            want = tv(x)
            n, seen[:] = len(seen), []
            got = model(x)
        finally:
            for h in handles:
                h.remove()
    assert len(seen) == n > 0, where
    assert torch.equal(got, want)
    assert torch.equal(clean, want) == ("instance" not in where)


def test_an_unvouched_call_inside_frozen_takes_the_folds(monkeypatch):
    """Inside fastres.frozen a call that is not vouched (a hook on the head) still runs each pair through
    frozen's fold (fastres.backends.torch.conv_bn_act_frozen), not the unfolded eval path."""
    model = make("basic").eval()
    folded = [0]
    real = aten_backend.conv_bn_act_frozen

    def spy(*a, **k):
        folded[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(aten_backend, "conv_bn_act_frozen", spy)
    model.fc.register_forward_hook(lambda *a: None)
    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad(), fastres.frozen(model, plan=False):
        model(batch(7, torch.channels_last))
    assert folded[0] == pairs


@pytest.mark.parametrize("momentum", [0.3, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", list(FMTS))
def test_training_steps_are_torchvisions(fmt, kind, momentum):
    """Training pairs (fastres.plain_pair._train; momentum=None: the general path): three SGD steps give
    torchvision's losses, parameters and BatchNorm state (running statistics, num_batches_tracked)."""
    model = make("basic", kind)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    tv = twin_of(model, "basic")
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    if fmt == "channels_last":
        model, tv = model.to(memory_format=torch.channels_last), tv.to(memory_format=torch.channels_last)
    model.train(), tv.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, tv)]
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(3))
    for step in range(3):
        x = batch(10 + step, FMTS[fmt])
        losses = []
        for m, opt in zip((model, tv), opts):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), step
    for (k, a), b in zip(model.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), k
