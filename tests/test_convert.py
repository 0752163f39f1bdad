"""fastres.convert: torchvision ResNets and Sequential chains converted in place, weights and keys kept."""
import copy
import importlib
import io
import logging

import pytest
import torch
import torch.nn as nn

import fastres.backend as backend
from fastres.convert import ConversionReport, FusedSequential, convert
from fastres.models import resnet20
from model_helpers import BWD, FWD, assert_as_good, count_convs, randomize_bn

fconvert = importlib.import_module("fastres.convert")  # the module (fastres.convert may name the function)
tv = pytest.importorskip("torchvision.models.resnet", reason="torchvision is needed as the reference")


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet50", 64)])
def test_convert_torchvision_resnet(arch, size):
    torch.manual_seed(0)
    model = getattr(tv, arch)(num_classes=10)
    randomize_bn(model, 1, branch_scale=0.2)
    ref = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]

    assert convert(model) is model
    # classes swapped in place, still torchvision's classes; same parameters (an optimizer keeps working)
    assert isinstance(model, tv.ResNet) and type(model) is fconvert.ConvertedResNet
    blocks = [m for m in model.modules() if isinstance(m, (tv.BasicBlock, tv.Bottleneck))]
    assert blocks and all(type(b).__name__.startswith("Converted") for b in blocks)
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict().keys()) == list(before_sd.keys())
    report = model.fastres_report
    assert isinstance(report, ConversionReport) and report.left_alone == []
    assert len(report.fused) == 1 + len(blocks)
    assert "fastres_report" not in "".join(model.state_dict().keys())

    # checkpoints: before -> after and after -> a fresh torchvision model, strictly
    model.load_state_dict(before_sd, strict=True)
    getattr(tv, arch)(num_classes=10).load_state_dict(model.state_dict(), strict=True)

    x = torch.randn(2, 3, size, size)
    proj = torch.randn(2, 10)  # loss = <output, proj>: a fixed, non-saturating output gradient
    n = count_convs(model)
    f0, b0 = backend.calls[FWD], backend.calls[BWD]
    grads = []
    for m, dtype in ((ref, torch.float32), (model, torch.float32), (oracle, torch.float64)):
        inp = x.clone().to(dtype).requires_grad_()
        out = m(inp)
        (out * proj.to(dtype)).sum().backward()
        grads.append([out, inp.grad] + [p.grad for p in m.parameters()])
    assert backend.calls[FWD] - f0 == n and backend.calls[BWD] - b0 == n
    names = ["output", "input grad"] + [k for k, _ in model.named_parameters()]
    for name, r, f, o in zip(names, *grads):
        assert_as_good(f, r, o, name)
    for k, v in model.state_dict().items():  # running statistics
        if "running" in k:
            assert_as_good(v, ref.state_dict()[k], oracle.state_dict()[k], k)

    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_convert_twice_is_harmless_and_pickles():
    torch.manual_seed(1)
    model = convert(tv.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    convert(model)
    assert all(what.startswith("already fused") for _, what in model.fastres_report.fused)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert type(again) is fconvert.ConvertedResNet
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)
        torch.testing.assert_close(again(x), y)


def chain():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        nn.MaxPool2d(2), nn.Conv2d(8, 4, 1))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_convert_sequential_chain(train):
    torch.manual_seed(2)
    model = chain()
    randomize_bn(model, 2)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict().keys())
    convert(model)
    assert type(model) is FusedSequential and list(model.state_dict().keys()) == keys
    fused = [what for _, what in model.fastres_report.fused]
    assert fused == ["0 (Conv2d) -> 1 (BatchNorm2d) -> 2 (ReLU)", "3 (Conv2d) -> 4 (BatchNorm2d)"]
    assert model.fastres_report.left_alone == [("6", "the conv is the Sequential's last child: its output "
                                                     "leaves the Sequential")]
    model.train(train), ref.train(train)
    x = torch.randn(2, 3, 16, 16)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    f0, b0 = backend.calls[FWD], backend.calls[BWD]
    y, want = model(xs[0]), ref(xs[1])
    assert backend.calls[FWD] - f0 == 2
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    want.square().sum().backward()
    assert backend.calls[BWD] - b0 == 2
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=k)
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


def test_sequential_after_sync_batchnorm_and_replaced_children():
    torch.manual_seed(3)
    model = convert(chain()).eval()
    randomize_bn(model, 3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = nn.Sequential(*model)(x)  # the same children run by nn.Sequential's own forward
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1], nn.SyncBatchNorm) and type(synced) is FusedSequential
    f0 = backend.calls[FWD]
    with torch.no_grad():
        torch.testing.assert_close(synced(x), want, rtol=1e-4, atol=1e-5)
    assert backend.calls[FWD] - f0 == 2  # found by name at call time: SyncBatchNorm still fused
    synced[2] = nn.Tanh()  # no ReLU any more: the chain shrinks to conv -> bn, then Tanh runs
    with torch.no_grad():
        torch.testing.assert_close(synced(x), nn.Sequential(*synced)(x), rtol=1e-4, atol=1e-5)


class Reuse(nn.Module):
    """The conv's output is used twice: convert() cannot prove a chain here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_unfusable_patterns_are_left_alone_with_reasons(caplog):
    model = nn.Sequential(
        Reuse(),
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8)),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(16)),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()),
    )
    model[3][0].register_forward_hook(lambda *a: None)
    keys = list(model.state_dict().keys())
    with caplog.at_level(logging.INFO, logger="fastres"):
        convert(model)
    why = dict(model.fastres_report.left_alone)
    assert "cannot prove" in why["0.conv"]
    assert "padding_mode='reflect'" in why["1.0"]
    assert "16 features" in why["2.0"]
    assert "hook" in why["3.0"]
    assert "followed by ReLU" in why["4.0"]
    assert model.fastres_report.fused == []
    assert all(type(m) in (nn.Sequential, Reuse) for m in model.children()) and type(model) is nn.Sequential
    assert list(model.state_dict().keys()) == keys
    assert "padding_mode='reflect'" in caplog.text


def test_torchvision_block_with_a_hook_is_left_alone(capsys):
    model = tv.resnet18(num_classes=10)
    seen = []
    model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    convert(model, verbose=True)
    assert type(model.layer1[0]) is tv.BasicBlock
    assert type(model.layer1[1]) is fconvert.ConvertedBasicBlock
    assert "hook" in dict(model.fastres_report.left_alone)["layer1.0"]
    assert "left alone  layer1.0" in capsys.readouterr().out
    model.eval()(torch.randn(1, 3, 32, 32))
    assert seen  # the hook still fires


def test_fastres_models_are_already_fused():
    model = resnet20()
    keys = list(model.state_dict().keys())
    convert(model)
    assert model.fastres_report.left_alone == []
    assert list(model.state_dict().keys()) == keys
    with pytest.raises(TypeError, match="expected an nn.Module"):
        convert("resnet18")


def test_converted_sequential_compiles_fullgraph():
    """FusedSequential's call-time chain lookup traces without graph breaks (aot_eager keeps it quick;
    inductor is covered by tests/models/test_cifar.py)."""
    torch.manual_seed(5)
    model = convert(chain())
    randomize_bn(model, 5)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ref.__class__ = nn.Sequential  # the oracle: the same children run by nn.Sequential's forward
    f0 = backend.calls[FWD]
    y = compiled(xs[0])
    assert backend.calls[FWD] - f0 == 2
    want = ref(xs[1])
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


class ScaledConv(nn.Conv2d):
    """A Conv2d subclass with its own forward: fusing it would skip that forward."""

    def forward(self, x):
        return super().forward(x) * 2


def test_custom_conv_subclass_is_left_alone():
    model = tv.resnet18(num_classes=10)
    old = model.layer2[1].conv2
    model.layer2[1].conv2 = ScaledConv(old.in_channels, old.out_channels, 3, padding=1, bias=False)
    seq = nn.Sequential(ScaledConv(3, 4, 1), nn.BatchNorm2d(4))
    convert(model), convert(seq)
    # The block still converts; the pair with the custom conv runs as its two modules (exact).
    assert type(model.layer2[1]) is fconvert.ConvertedBasicBlock
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    calls = backend.calls
    calls.clear()
    y = model(x)
    assert calls[("conv_bn_act", "forward", "unfused")] == 1
    torch.testing.assert_close(y, tv.ResNet.forward(model, x))
    assert type(seq) is nn.Sequential and "own forward" in dict(seq.fastres_report.left_alone)["0"]
