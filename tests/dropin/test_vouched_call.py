"""A vouched model call inside fastres.frozen (fastres.models.input_layout.inference_call): the model checks
once per call what holds for all its layers, and each (conv, BN) pair then runs
fastres.backends.torch.conv_bn_act_vouched, which checks only what may differ between layers.

Proved here: the vouched path is taken where it should be (else the rest proves nothing) and nowhere
else; it gives bit for bit what the per-layer path gives; a layer that changed between calls (a swapped
BatchNorm, a swapped activation, a new padding mode or dilation) still runs as the module it now is, within
the house rule of a fresh torchvision model with the same change; the vouched state never leaks (an
exception inside the call, another thread). What users do to the weights between calls inside frozen (every
optimizer form, .data edits, recalibration, load_state_dict) is test_workflows.py's job: its fused models
take this path.
"""
import copy
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from numerics import assert_as_good
from workflow_helpers import BATCH, batch, check_eval, make

import fastres
from fastres.backends import torch as aten_backend
from fastres.models import input_layout, resnet


@pytest.fixture
def spy(monkeypatch):
    """Counts of vouched layer calls that ran (hit) and that handed over to the full path (miss)."""
    counts = {"hit": 0, "miss": 0}
    real = aten_backend.conv_bn_act_vouched

    def counted(*args):
        y = real(*args)
        counts["hit" if y is not None else "miss"] += 1
        return y

    monkeypatch.setattr(aten_backend, "conv_bn_act_vouched", counted)
    return counts


def _n_pairs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("arch,fmt", [("basic", torch.contiguous_format), ("bottleneck", torch.channels_last)],
                         ids=["basic-nchw", "bottleneck-channels_last"])
def test_vouched_call_is_taken_and_equals_the_per_layer_path_bit_for_bit(arch, fmt, spy, monkeypatch):
    """(The head through aten's F.linear in both runs here: its oneDNN matmul has a test of its own.)"""
    model = make(arch).eval()
    x = batch(3, fmt)
    monkeypatch.setattr(aten_backend, "linear_vouched", lambda t, fc: torch.nn.functional.linear(t, fc.weight, fc.bias))
    monkeypatch.setattr(aten_backend, "pooled_linear_vouched", lambda t, fc: None)   # (test_pooled_linear.py)
    with torch.no_grad(), fastres.frozen(model):
        model(x)                      # the first call packs every weight on the full path
        spy["hit"] = spy["miss"] = 0
        got = model(x)
        assert spy == {"hit": _n_pairs(model), "miss": 0}
        monkeypatch.setattr(resnet, "inference_call",
                            lambda m, t: (t.contiguous(memory_format=torch.channels_last), False))
        spy["hit"] = 0
        per_layer = model(x)
        assert spy["hit"] == 0
    torch.testing.assert_close(got, per_layer, rtol=0, atol=0)
    check_eval(model, arch, x)


@pytest.mark.parametrize("case", ["outside frozen", "hook", "train mode", "grad enabled", "float64"])
def test_not_vouched_where_a_check_fails(case, spy):
    model = make("basic").eval()
    x = batch(4)
    grad = torch.enable_grad() if case == "grad enabled" else torch.no_grad()
    if case == "hook":
        model.layer3[1].bn1.register_forward_hook(lambda m, i, o: None)
    if case == "train mode":
        model.layer2.train()
    if case == "float64":
        model.double()
        x = x.double()
    ctx = fastres.frozen(model) if case != "outside frozen" else torch.no_grad()
    with grad, ctx:
        model(x)
        model(x)
    assert spy == {"hit": 0, "miss": 0}


def _swap_bn(m: nn.Module) -> None:
    old = m.layer2[1].bn2
    new = nn.BatchNorm2d(old.num_features).eval()
    new.load_state_dict(old.state_dict())
    m.layer2[1].bn2 = new


def _no_running_stats(m: nn.Module) -> None:
    bn = m.layer2[1].bn1
    bn.running_mean = bn.running_var = None   # eval then normalises with batch statistics (found in review)


SWAPS = {
    "new BatchNorm module": _swap_bn,
    "no running statistics": _no_running_stats,
    "ReLU -> SiLU": lambda m: setattr(m.layer3[0], "relu", nn.SiLU()),
    "padding_mode reflect": lambda m: setattr(m.layer1[1].conv1, "padding_mode", "reflect"),
    "dilation 2": lambda m: (setattr(m.layer2[1].conv1, "dilation", (2, 2)),
                             setattr(m.layer2[1].conv1, "padding", (2, 2))),
}


@pytest.mark.parametrize("swap", list(SWAPS))
def test_a_layer_changed_between_calls_runs_as_what_it_now_is(swap, spy):
    model = make("basic").eval()
    with fastres.frozen(model):
        check_eval(model, "basic")    # packs every weight
        spy["hit"] = spy["miss"] = 0
        check_eval(model, "basic")
        assert spy == {"hit": _n_pairs(model), "miss": 0}
        SWAPS[swap](model)
        for call in range(2):         # the first call after the change, and the one after it
            check_eval(model, "basic", swaps=SWAPS[swap], what=f"call {call} after {swap}")


def test_vouched_state_is_reset_after_an_exception_and_is_per_thread():
    model = make("basic").eval()
    bad = torch.randn(2, 5, 64, 64)     # 5 channels: the stem conv raises
    with torch.no_grad(), fastres.frozen(model):
        model(batch(1))
        with pytest.raises(RuntimeError):
            model(bad)
        assert not input_layout.vouched()
        seen = []
        with input_layout.vouch(True):
            worker = threading.Thread(target=lambda: seen.append(input_layout.vouched()))
            worker.start()
            worker.join()
            assert input_layout.vouched()
        assert seen == [False] and not input_layout.vouched()
    check_eval(model, "basic", what="after the failed call")


@pytest.mark.parametrize("batch_size,bias", [(1, True), (8, True), (16, False)])
def test_vouched_head_is_nn_linear_within_the_house_rule(batch_size, bias, monkeypatch):
    """(512 -> 1000: ResNet-18's ImageNet head; smaller heads run F.linear, test below.)"""
    torch.manual_seed(batch_size)
    fc = nn.Linear(512, 1000, bias=bias).eval()
    x = torch.randn(batch_size, 512)
    model = make("basic").eval()
    model.fc = fc
    feats = []
    real = aten_backend.linear_vouched

    def spy(t, m):
        feats.append(t)
        return real(t, m)

    monkeypatch.setattr(aten_backend, "linear_vouched", spy)
    monkeypatch.setattr(aten_backend, "pooled_linear_vouched", lambda t, m: None)   # (test_pooled_linear.py)
    with torch.no_grad(), fastres.frozen(model):
        model(batch(2))
        assert len(feats) == 1          # the head ran through it
        got = real(x, fc)
    assert got is not None
    want = torch.nn.functional.linear(x.double(), fc.weight.double(), None if fc.bias is None else fc.bias.double())
    assert_as_good(got, fc(x), want, "vouched head")


def test_a_call_that_is_not_vouched_does_not_touch_the_thread_state():
    """torch.compile traces the model's forward with the vouch False: writing (or reading) the thread-local
    there made dynamo guard on it and then fail that guard in the same frame (test_compile_graphs.py, run
    alone in a fresh process). Checked in a fresh thread, whose thread-local state is still empty."""
    state = []

    def fresh_thread():
        with input_layout.vouch(False):
            state.append(dict(aten_backend.vouched.__dict__))
        state.append(dict(aten_backend.vouched.__dict__))

    worker = threading.Thread(target=fresh_thread)
    worker.start()
    worker.join()
    assert state == [{}, {}]


def _strided_bias(fc):
    fc.bias = nn.Parameter(torch.randn(2 * fc.out_features)[::2])


def _expanded_bias(fc):
    fc.bias = nn.Parameter(torch.randn(1).expand(fc.out_features))


@pytest.mark.parametrize("head", ["strided bias", "expanded bias", "small head"])
def test_heads_oneDNN_would_get_wrong_or_slow_run_as_nn_linear(head):
    """oneDNN's matmul reads a bias as contiguous (a strided view gave wrong logits, an expanded one NaN:
    found in review) and is slower than F.linear on small heads: those run the module, and the model
    inside frozen still gives what it gives outside, by the house rule."""
    model = make("basic").eval()
    if head == "small head":
        assert aten_backend.linear_vouched(torch.randn(2, 512), model.fc) is None   # 512 -> 10
    else:
        model.fc = nn.Linear(512, 1000).eval()
        (_strided_bias if head == "strided bias" else _expanded_bias)(model.fc)
        assert aten_backend.linear_vouched(torch.randn(2, 512), model.fc) is None
    x = batch(5)
    with torch.no_grad():
        want = model(x)
        oracle = copy.deepcopy(model).double()(x.double())
        with fastres.frozen(model):
            model(x)
            got = model(x)
    assert_as_good(got, want, oracle, f"logits, {head}")


def test_onednn_switched_off_is_honoured_by_a_vouched_call(spy, monkeypatch):
    model = make("basic").eval()
    x = batch(6)
    with torch.no_grad(), fastres.frozen(model):
        model(x)
        model(x)
        assert spy["hit"] > 0
        monkeypatch.setattr(aten_backend, "onednn_enabled", False)
        spy["hit"] = 0
        model(x)
        assert spy["hit"] == 0


@pytest.fixture
def writes(monkeypatch):
    """Whether each residual a vouched layer saw was written in place (True) or not (False)."""
    seen = []
    real = aten_backend._writable

    def spy(residual, x, conv, geom):
        seen.append(real(residual, x, conv, geom))
        return seen[-1]

    monkeypatch.setattr(aten_backend, "_writable", spy)
    return seen


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_outputs_written_into_residuals_equal_the_out_of_place_path(arch, writes, monkeypatch):
    model = make(arch).eval()
    x = batch(3, torch.channels_last)
    with torch.no_grad(), fastres.frozen(model):
        model(x)
        writes.clear()
        got = model(x)
        assert writes and all(writes)   # every block's residual is the call's own (else this proves nothing)
        monkeypatch.setattr(aten_backend, "_writable", lambda *a: False)
        want = model(x)
    assert torch.equal(got, want)


def test_the_callers_tensors_are_never_written(writes):
    """A model's stem always makes a new tensor, so its blocks never see the caller's; a nested model call
    could, so vouch() keeps the tensors it was given from writes: here a block called inside a vouched
    call that was given the block's input."""
    model = make("basic").eval()
    x = batch(3, torch.channels_last)
    block = model.layer1[1]   # an identity block: its residual is its input
    with torch.no_grad(), fastres.frozen(model):
        model(x)   # packs every weight for these shapes
        t = torch.randn(x.shape[0], 64, x.shape[2] // 4, x.shape[3] // 4).contiguous(memory_format=torch.channels_last)
        before, writes[:] = t.clone(), []
        with input_layout.vouch(True, t):
            got = block(t)
        assert writes == [False] and torch.equal(t, before)
        with input_layout.vouch(True):
            again = block(t)
        assert writes == [False, True]   # (not given: written, so the first check could fail)
    assert torch.equal(got, again)


@pytest.fixture
def pool_spy(monkeypatch):
    """The input shapes input_layout.features handed to F.avg_pool2d (its global-pool shortcut)."""
    shapes = []
    real = torch.nn.functional.avg_pool2d

    def counted(t, *args, **kwargs):
        shapes.append(tuple(t.shape))
        return real(t, *args, **kwargs)

    monkeypatch.setattr(input_layout, "F", SimpleNamespace(avg_pool2d=counted))
    return shapes


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("shape,size", [((1, 512, 7, 7), (1, 1)), ((8, 2048, 2, 2), 1), ((3, 64, 8, 8), (1, 1)),
                                        ((2, 16, 1, 1), (1, 1)), ((2, 8, 5, 3), 1)])
def test_vouched_global_pool_is_the_mean_within_the_house_rule(shape, size, fmt, pool_spy):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape).abs().contiguous(memory_format=fmt)   # (post-ReLU features: well conditioned)
    pool = nn.AdaptiveAvgPool2d(size)
    got = input_layout.features(pool, x, True)
    assert pool_spy == [shape]
    want = torch.flatten(pool(x), 1)
    assert got.shape == want.shape and got.stride() == want.stride()
    assert_as_good(got, want, x.double().mean((2, 3)), "pooled features")


class _MyPool(nn.AdaptiveAvgPool2d):
    pass


@pytest.mark.parametrize("case", ["not vouched", "pooled to 2x2", "a subclass", "class forward patched"])
def test_global_pool_shortcut_only_where_it_is_that_pool(case, pool_spy, monkeypatch):
    """Anything but a vouched call's exact global nn.AdaptiveAvgPool2d runs the module (a patched class
    forward is the user's code: it is what runs)."""
    x = torch.randn(2, 8, 4, 4)
    assert input_layout.features(nn.AdaptiveAvgPool2d(1), x, True).shape == (2, 8) and pool_spy == [(2, 8, 4, 4)]
    pool_spy.clear()   # (the plain case took the shortcut: the refusals below are refusals)
    pool = {"pooled to 2x2": nn.AdaptiveAvgPool2d((2, 2)), "a subclass": _MyPool(1)}.get(case, nn.AdaptiveAvgPool2d(1))
    seen = []
    if case == "class forward patched":
        real = nn.AdaptiveAvgPool2d.forward
        monkeypatch.setattr(nn.AdaptiveAvgPool2d, "forward", lambda self, t: seen.append(t) or real(self, t) * 2)
    got = input_layout.features(pool, x, case != "not vouched")
    assert pool_spy == []
    assert torch.equal(got, torch.flatten(pool(x), 1))
    assert len(seen) == 2 * (case == "class forward patched")


def test_frozen_model_pools_through_the_shortcut_and_matches_torchvision(pool_spy, monkeypatch):
    """(Where the pooled head's one C++ call does not take the head: test_pooled_linear.py.)"""
    monkeypatch.setattr(aten_backend, "pooled_linear_vouched", lambda t, fc: None)
    model = make("bottleneck").eval()
    with torch.no_grad(), fastres.frozen(model):
        model(batch())
        assert pool_spy == [(BATCH, 2048, 2, 2)]
        check_eval(model, "bottleneck", what="frozen logits, pooled through avg_pool2d")
    assert len(pool_spy) == 2
