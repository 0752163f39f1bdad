"""Swapped submodules run as themselves, and bad calls fail as torchvision's do.

A user may replace any module of a block or of the stem after building or converting: `relu` by another
activation, a BatchNorm by Identity, a conv by another conv, the downsample by anything. The fused
forwards check on every call that the modules are the ones they fuse; anything else runs as that
module, exactly as torchvision's forward would run it. Bad input raises what torchvision raises
(RuntimeError for a wrong channel count or dtype) and leaves the modules' state as torchvision leaves it.
"""
import copy

import pytest
import torch
import torch.nn as nn
from workflow_helpers import batch, check_eval, make, torchvision_net

import fastres

ACTS = {"silu": nn.SiLU, "gelu": nn.GELU, "leaky": lambda: nn.LeakyReLU(0.1)}


def swap_relus(act, everywhere=True):
    def swaps(m):
        m.relu = act()
        if everywhere:
            for b in m.modules():
                if hasattr(b, "conv2") and hasattr(b, "relu"):
                    b.relu = act()
    return swaps


def swap_block_parts(m):
    m.layer1[0].bn1 = nn.Identity()
    m.layer2[0].conv2 = nn.Conv2d(m.layer2[0].conv2.in_channels, m.layer2[0].conv2.out_channels, 3, padding=2,
                                  dilation=2, bias=False)
    m.layer3[0].downsample = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(m.layer3[0].conv1.in_channels,
                                           m.layer3[0].bn2.num_features, 1, bias=False),
                                           nn.BatchNorm2d(m.layer3[0].bn2.num_features))
    m.layer4[0].bn2 = nn.GroupNorm(8, m.layer4[0].bn2.num_features)


def _train_outputs(model, x):
    model.train()
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["fused", "converted"])
@pytest.mark.parametrize("everywhere", [True, False], ids=["all-relus", "stem-relu"])
@pytest.mark.parametrize("act", list(ACTS))
def test_replaced_relu_runs_in_eval_and_training(act, everywhere, kind):
    swaps = swap_relus(ACTS[act], everywhere)
    model = make("basic", kind)
    swaps(model)
    check_eval(model, "basic", swaps=swaps, what=f"{act} in eval")
    tv = torchvision_net("basic")
    swaps(tv)
    tv.load_state_dict(model.state_dict())
    x = batch(3)
    got, grads = _train_outputs(model, x)
    want, want_grads = _train_outputs(tv, x)
    # The same aten ops on the same values (the swapped blocks run module by module): any skipped
    # module is off by the order of the output itself.
    torch.testing.assert_close(got, want)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, msg=n)
    for (n, a), b in zip(tv.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, msg=n)


@pytest.mark.parametrize("kind", ["fused", "converted"])
def test_swapped_block_submodules_run_as_themselves(kind):
    model = make("basic", kind)
    torch.manual_seed(7)
    swap_block_parts(model)
    donor = copy.deepcopy(model)   # the twin gets the very same new modules (and their weights)

    def swaps(tv):
        for name in ("layer1.0.bn1", "layer2.0.conv2", "layer3.0.downsample", "layer4.0.bn2"):
            parent, attr = name.rsplit(".", 1)
            setattr(tv.get_submodule(parent), attr, copy.deepcopy(donor.get_submodule(name)))
    check_eval(model, "basic", swaps=swaps, what="swapped submodules")


def test_replaced_activation_in_a_converted_timm_model():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=10)
    model = fastres.convert(copy.deepcopy(ref))
    for m in (ref, model):
        m.act1 = nn.SiLU()
        m.layer1[0].act1 = nn.GELU()
        m.layer2[1].act2 = nn.LeakyReLU(0.1)
        m.eval()
    x = batch(4)
    with torch.no_grad():
        got, want = model(x), ref(x)
        oracle = copy.deepcopy(ref).double()(x.double())
    from numerics import assert_as_good
    assert_as_good(got, want, oracle, "timm with replaced activations")


def _bad_calls(model):
    return {
        "channels": lambda: model(torch.randn(2, 4, 32, 32)),
        "dtype": lambda: model(torch.randn(2, 3, 32, 32, dtype=torch.float64)),
        "integer": lambda: model(torch.ones(2, 3, 32, 32, dtype=torch.int64)),
        "bool": lambda: model(torch.ones(2, 3, 32, 32, dtype=torch.bool)),   # aten: NotImplementedError
        "rank": lambda: model(torch.randn(2, 2, 3, 32, 32)),
        "list": lambda: model([[0.5] * 32] * 32),   # not a tensor: conv2d's TypeError
        "tuple": lambda: model((torch.randn(2, 3, 32, 32),)),
    }


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad", ["channels", "dtype", "integer", "bool", "rank", "list", "tuple"])
@pytest.mark.parametrize("kind", ["fused", "converted"])
def test_bad_input_raises_torchvisions_exception_type_and_leaves_state(kind, bad, train):
    model = make("basic", kind)
    tv = torchvision_net("basic")
    tv.load_state_dict(model.state_dict())
    model.train(train), tv.train(train)
    with pytest.raises(Exception) as want:
        _bad_calls(tv)[bad]()
    with pytest.raises(type(want.value)):   # the same class, or a subclass with a clearer message
        _bad_calls(model)[bad]()
    for (n, a), b in zip(tv.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{n} after a rejected {bad} call"


def test_error_classes_are_runtime_errors_with_the_precise_kind():
    assert issubclass(fastres.InputShapeError, RuntimeError) and issubclass(fastres.InputShapeError, ValueError)
    assert issubclass(fastres.InputDtypeError, RuntimeError) and issubclass(fastres.InputDtypeError, TypeError)
    layer = fastres.FusedConvBNReLU2d(3, 8, 3, padding=1)
    with pytest.raises(fastres.InputShapeError, match="expected input with 3 channels"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))          # as nn.BatchNorm2d raises it


def _dropout_before_every_conv(model):
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(mod, name, nn.Sequential(nn.Dropout2d(0.2), child))


@pytest.mark.parametrize("kind", ["fused", "converted", "timm"])
def test_random_draws_in_both_branches_come_in_torchvisions_order(kind):
    """MC-dropout (dropout wrapped around every conv, downsample included): each branch draws random
    numbers, so the block must run its downsample where torchvision's (timm's) forward does, after the
    main branch, for the same seed to give the same output."""
    if kind == "timm":
        timm = pytest.importorskip("timm", reason="timm is not installed")
        torch.manual_seed(0)
        ref = timm.create_model("resnet18", num_classes=10)
        model = fastres.convert(copy.deepcopy(ref))
    else:
        model = make("basic", kind)
        ref = torchvision_net("basic")
        ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        _dropout_before_every_conv(m)
    x = batch(2)
    for train in (True, False):
        for m in (model, ref):
            m.train(train)
            for d in m.modules():
                if isinstance(d, nn.Dropout2d):
                    d.train()   # MC-dropout: sampling at eval too
        torch.manual_seed(5)
        got = model(x)
        torch.manual_seed(5)
        want = ref(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"train={train}")


@pytest.mark.parametrize("kind", ["fused", "converted"])
def test_batchnorms_one_value_error_leaves_the_count_as_torchvision(kind):
    """Batch 1 in training at 32 px: layer4's BatchNorm sees one value per channel and raises its own
    ValueError after counting the batch (nn.BatchNorm2d counts first); fastres's state must match."""
    model = make("basic", kind).train()
    tv = torchvision_net("basic").train()
    tv.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    for m in (tv, model):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            m(x)
    for (n, a), b in zip(tv.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
