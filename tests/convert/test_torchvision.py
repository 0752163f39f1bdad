"""fastres.convert: torchvision ResNets and Sequential chains converted in place, weights and keys kept."""
import copy
import importlib
import io
import logging

import pytest
import torch
import torch.nn as nn
from model_helpers import FWD, count_convs, randomize_bn
from numerics import assert_as_good

import fastres.backend as backend
from fastres.convert import ConversionReport, FusedSequential, convert
from fastres.models import resnet20

fconvert = importlib.import_module("fastres.convert")  # the module (fastres.convert may name the function)
tv = pytest.importorskip("torchvision.models.resnet", reason="torchvision is needed as the reference")


def numerics_net(arch):
    """The net whose numbers are checked: ResNet-18 itself; for ResNet-50 a torchvision ResNet of the same
    Bottleneck blocks with layers [2, 1, 1, 1] (stem, a downsampling and an identity block, every stage),
    since ResNet-50 at a well-conditioned size costs ~30 s of CPU."""
    if arch == "resnet18":
        return tv.resnet18(num_classes=10)
    return tv.ResNet(tv.Bottleneck, [2, 1, 1, 1], num_classes=10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_convert_torchvision_resnet(arch):
    """Structure and checkpoints on the real torchvision model; numbers (train-mode output, every gradient,
    running statistics, eval output) against the float64 oracle by the house rule, where they are well
    conditioned: batch 8 at 64 px (layer4's BN sees 32 values per channel; at batch 2 torchvision's own
    fp32 gradients there are so far off float64 that the rule's ratio swings around 1), loss = <output, proj>
    (a fixed output gradient) and last BN of each block scaled by 0.2 (see randomize_bn; its fixed-seed
    note on ReLU ties applies: the seed below is tie-free under ATEN_CPU_CAPABILITY=avx2 and default)."""
    torch.manual_seed(0)
    model = getattr(tv, arch)(num_classes=10)
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

    seed = 4
    torch.manual_seed(seed)
    model = numerics_net(arch)
    randomize_bn(model, seed + 1, branch_scale=0.2)
    x, proj = torch.randn(8, 3, 64, 64), torch.randn(8, 10)
    ref, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    convert(model)
    assert type(model) is fconvert.ConvertedResNet
    n = count_convs(model)
    f0 = backend.calls[FWD]
    grads = []
    for m, dtype in ((ref, torch.float32), (model, torch.float32), (oracle, torch.float64)):
        inp = x.clone().to(dtype).requires_grad_()
        out = m(inp)
        (out * proj.to(dtype)).sum().backward()
        grads.append([out, inp.grad] + [p.grad for p in m.parameters()])
    assert backend.calls[FWD] - f0 == n  # every conv-BN pair ran fused (the torch backend's backward is aten's)
    names = ["output", "input grad"] + [k for k, _ in model.named_parameters()]
    for name, r, f, o in zip(names, *grads):
        assert_as_good(f, r, o, name)
    sd, sd_ref, sd64 = model.state_dict(), ref.state_dict(), oracle.state_dict()
    for k, v in sd.items():  # running statistics
        if "running" in k:
            assert_as_good(v, sd_ref[k], sd64[k], k)
        elif "num_batches" in k:
            assert v == sd_ref[k], k

    for m in (model, ref, oracle):
        m.eval()
    with torch.no_grad():
        assert_as_good(model(x), ref(x), oracle(x.double()), "eval output")


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
    f0 = backend.calls[FWD]
    y, want = model(xs[0]), ref(xs[1])
    assert backend.calls[FWD] - f0 == 2
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    want.square().sum().backward()
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
    y = compiled(xs[0])  # fullgraph=True: a graph break would raise (calls are not counted while compiling)
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


def test_a_patched_torchvision_block_class_is_left_alone(monkeypatch):
    """A user who patched torchvision's BasicBlock.forward before convert() keeps the patch: the blocks
    are reported left alone, and the model computes what torchvision computes."""
    import torchvision.models.resnet as tvr

    original = tvr.BasicBlock.forward

    def half_residual(self, x):
        return original(self, x) * 0.5

    monkeypatch.setattr(tvr.BasicBlock, "forward", half_residual)
    torch.manual_seed(3)
    ref = tvr.resnet18(num_classes=10).eval()
    model = convert(copy.deepcopy(ref)).eval()
    left = [why for name, why in model.fastres_report.left_alone if name.startswith("layer")]
    assert left and all("patched" in why for why in left)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
