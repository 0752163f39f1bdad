"""fastres.unfuse(model): convert()'s inverse, in place; the plain model runs no fused op."""
import copy
import importlib
import io

import pytest
import torch
import torch.nn as nn
from model_helpers import FWD, assert_as_good, randomize_bn

import fastres.backend as backend
from fastres.convert import FusedSequential, convert
from fastres.models import FusedResNet18, FusedResNet50, plain18, resnet20
from fastres.nn import FusedConvBN2d, FusedConvBNReLU2d

uf = importlib.import_module("fastres.convert.unfuse")
unfuse = uf.unfuse
tv = pytest.importorskip("torchvision.models.resnet", reason="torchvision is needed as the reference")


def snapshot(model):
    return [(k, v.clone()) for k, v in model.state_dict().items()]


def same_state(model, snap):
    sd = model.state_dict()
    assert list(sd.keys()) == [k for k, _ in snap]
    for k, v in snap:
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("make,plain_cls", [(FusedResNet18, tv.ResNet), (FusedResNet50, tv.ResNet),
                                            (plain18, uf.PlainResNet), (resnet20, uf.PlainCifarResNet)])
def test_unfuse_fastres_models(make, plain_cls):
    torch.manual_seed(20)
    model = make(num_classes=10)
    randomize_bn(model, 21, branch_scale=0.2)
    fused, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    snap, children = snapshot(model), [id(m) for m in model.modules()]
    assert unfuse(model) is model and type(model) is plain_cls
    assert [id(m) for m in model.modules()] == children
    same_state(model, snap)
    assert model.fastres_report.left_alone == [] and model.fastres_report.restored
    if plain_cls is tv.ResNet:
        assert all(type(b) in (tv.BasicBlock, tv.Bottleneck) for b in model.layer1)
    x = torch.randn(4, 3, 32, 32)
    for train in (False, True):
        for m in (model, fused, oracle):
            m.train(train)
        f0 = backend.calls[FWD]
        with torch.no_grad():
            want = model(x)
        assert backend.calls[FWD] == f0  # plain: no fused op ran
        with torch.no_grad():
            got, best = fused(x), oracle(x.double())
        assert_as_good(got, want, best, f"fused vs unfused output (train={train})")
    for k, v in model.state_dict().items():
        if "running" in k:
            assert_as_good(fused.state_dict()[k], v, oracle.state_dict()[k], k)
    convert(model)  # and back: fused again, same state
    assert list(model.state_dict()) == [k for k, _ in snap]
    f0 = backend.calls[FWD]
    with torch.no_grad():
        model.eval()(x)
    assert backend.calls[FWD] > f0


def test_unfused_torchvision_shaped_model_is_torchvision():
    torch.manual_seed(22)
    model = FusedResNet18(num_classes=10)
    randomize_bn(model, 23)
    unfuse(model).eval()
    twin = tv.resnet18(num_classes=10).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))  # the very same module calls, in the same order
        scripted = torch.jit.script(model)
        assert torch.equal(scripted(x), twin(x))


@pytest.mark.parametrize("make", [resnet20, plain18])
def test_unfused_plain_classes_script_and_trace(make):
    torch.manual_seed(24)
    model = unfuse(make(num_classes=10)).eval()
    randomize_bn(model, 25)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=0, atol=0)
        traced = torch.jit.trace(model, x)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x * 2), model(x * 2), rtol=0, atol=0)
    graph = str(loaded.inlined_graph)
    assert "aten::batch_norm" in graph and "fastres::" not in graph  # no fused custom op


def test_unfuse_converted_torchvision_and_sequential():
    model = tv.resnet18(num_classes=10)
    model.layer1 = nn.Sequential(*model.layer1)
    model.fc = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))  # a FusedSequential after convert
    snap = snapshot(model)
    convert(model)
    assert type(model.fc) is FusedSequential
    unfuse(model)
    assert type(model) is tv.ResNet and type(model.fc) is nn.Sequential
    assert all(type(b) is tv.BasicBlock for layer in (model.layer1, model.layer4) for b in layer)
    assert not [m for m in model.modules() if type(m).__module__.startswith("fastres")]
    same_state(model, snap)


def test_unfuse_conv_bn_modules():
    torch.manual_seed(26)
    a = FusedConvBN2d(3, 8, 3, padding=1)
    b = FusedConvBNReLU2d(3, 8, 3, padding=1)
    seq = nn.Sequential(a, b)
    fused = copy.deepcopy(seq)
    unfuse(seq)
    assert type(a) is uf.PlainConvBN2d and type(b) is uf.PlainConvBNReLU2d and b.relu and not a.relu
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    for m, f in zip(seq, fused):
        torch.testing.assert_close(m(x, r), f(x, r), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.eval()(x), f.eval()(x), rtol=1e-5, atol=1e-6)
    torch.jit.script(a)
    convert(seq)
    assert type(a) is FusedConvBN2d and type(b) is FusedConvBNReLU2d


def test_unfuse_timm():
    timm = pytest.importorskip("timm", reason="timm is needed for its ResNets")
    tr = importlib.import_module("timm.models.resnet")
    model = convert(timm.create_model("resnet50d", pretrained=False, num_classes=10))
    snap = snapshot(model)
    unfuse(model)
    assert type(model) is tr.ResNet and all(type(b) is tr.Bottleneck for b in model.layer1)
    assert not [m for m in model.modules() if type(m).__module__.startswith("fastres")]
    same_state(model, snap)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        unfuse("resnet18")
