"""convert() of timm's ResNets: timm's BasicBlock / Bottleneck / ResNet stem, deep stems, avg-down
shortcuts and blocks with extras (se, drop_path, drop_block, anti-aliasing)."""
import copy
import importlib
import io

import pytest
import torch
import torch.nn as nn
from model_helpers import FWD, UNFUSED, assert_as_good, count_convs, randomize_bn
from numerics import assert_near

import fastres.backend as backend
from fastres.convert import convert

timm = pytest.importorskip("timm", reason="timm is needed for its ResNets")
tr = importlib.import_module("timm.models.resnet")
ct = importlib.import_module("fastres.convert")  # the package: its __getattr__ names the converted classes


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    randomize_bn(model, seed + 1, branch_scale=0.2)
    return model


def forward_backward(model, x, proj):
    inp = x.clone().requires_grad_()
    out = model(inp)
    (out * proj.to(out.dtype)).sum().backward()
    return [out, inp.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d"])
def test_convert_timm_resnet(arch):
    model = make(arch)
    ref, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert(model) is model
    assert type(model) is ct.ConvertedTimmResNet and isinstance(model, tr.ResNet)
    blocks = [m for m in model.modules() if isinstance(m, (tr.BasicBlock, tr.Bottleneck))]
    assert blocks and all(type(b).__name__.startswith("ConvertedTimm") for b in blocks)
    report = model.fastres_report
    assert report.left_alone == [] and len(report.fused) == 1 + len(blocks)
    assert list(model.state_dict().keys()) == list(before.keys())
    model.load_state_dict(before, strict=True)  # checkpoints both ways, strictly
    timm.create_model(arch, pretrained=False, num_classes=10).load_state_dict(model.state_dict(), strict=True)

    x = torch.randn(2, 3, 64, 64)
    n = count_convs(model)
    for train in (False, True):  # fp32 outputs by the house rule (train: batch statistics, updated buffers)
        for m in (model, ref, oracle):
            m.train(train)
        f0, u0 = backend.calls[FWD], backend.calls[UNFUSED]
        with torch.no_grad():
            got = model(x)
            want, best = ref(x), oracle(x.double())
        assert backend.calls[FWD] - f0 == n and backend.calls[UNFUSED] == u0  # every conv fused
        assert_as_good(got, want, best, f"{arch} output (train={train})")
    for k, v in model.state_dict().items():
        if "running" in k:
            assert_as_good(v, ref.state_dict()[k], oracle.state_dict()[k], k)

    # Gradients in float64 (train mode) against timm's float64 model: fp32 ReLU ties (inputs within
    # rounding of zero, masked differently by two fp32 paths) would move a gradient by a whole term.
    fused64 = model.double()
    proj = torch.randn(2, 10, dtype=torch.float64)
    f0 = backend.calls[FWD]
    got = forward_backward(fused64, x.double(), proj)
    assert backend.calls[FWD] - f0 == n
    best = forward_backward(oracle, x.double(), proj)
    names = ["output", "input grad"] + [k for k, _ in model.named_parameters()]
    for name, g, o in zip(names, got, best):
        assert_near(g, o, name, rel=1e-10)


@pytest.mark.parametrize("arch", ["resnet10t", "resnet18d", "resnet26", "resnet26d", "resnet50c", "resnet50s"])
def test_timm_family_fully_fused(arch):
    """The rest of the plain family: 7x7, deep, deep-tiered stems; conv and avg-down shortcuts."""
    model = make(arch, seed=3).eval()
    oracle = copy.deepcopy(model).double()
    ref = copy.deepcopy(model)
    convert(model)
    assert model.fastres_report.left_alone == []
    x = torch.randn(2, 3, 64, 64)
    f0 = backend.calls[FWD]
    with torch.no_grad():
        got = model(x)
        assert backend.calls[FWD] - f0 == count_convs(model)
        assert_as_good(got, ref(x), oracle(x.double()), arch)


def test_timm_blocks_with_extras():
    """se and drop_path run as themselves between the fused ops; drop_path / drop_block pass their
    input through in eval mode, where the add and ReLU fuse again. Same RNG order as timm's forward."""
    kw = dict(drop_path_rate=0.2, drop_block_rate=0.2)
    model = make("seresnet50", seed=4, **kw)
    ref = copy.deepcopy(model)
    convert(model)
    what = dict(model.fastres_report.fused)
    assert "se (SEModule)" in what["layer1.0"] and "drop_path (DropPath)" in what["layer4.2"]
    assert "drop_block (DropBlock2d)" in what["layer4.2"]
    assert all(type(b) is ct.ConvertedTimmBottleneck for b in model.modules() if isinstance(b, tr.Bottleneck))
    n_bn_convs = sum(isinstance(m, nn.Conv2d) and ".se." not in k for k, m in model.named_modules())
    x = torch.randn(2, 3, 64, 64)
    for train in (True, False):
        model.train(train), ref.train(train)
        f0 = backend.calls[FWD]
        with torch.no_grad():
            torch.manual_seed(5)
            got = model(x)
            torch.manual_seed(5)
            want = ref(x)
        assert backend.calls[FWD] - f0 == n_bn_convs  # the se's 1x1 convs have no BatchNorm
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_timm_hooks_fx_checkpointing():
    model = make("resnet18", seed=6).eval()
    ref = copy.deepcopy(model)
    model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    seen = []
    convert(model)
    assert type(model.layer1[0]) is tr.BasicBlock and "hook" in dict(model.fastres_report.left_alone)["layer1.0"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    assert seen
    # a hook added after conversion: the block runs timm's own forward, so the hook fires
    model.layer2[0].bn2.register_forward_hook(lambda m, i, o: seen.append("bn2"))
    u0 = backend.calls[UNFUSED]
    with torch.no_grad():
        model(x)
    assert "bn2" in seen and backend.calls[UNFUSED] == u0
    # torch.fx sees timm's modules, not the fused op
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv1", "bn1", "act1", "layer3.0.conv2", "layer3.0.downsample.1"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-4, atol=1e-5)
    # gradient checkpointing: timm's forward_features, blocks still fused
    model.train(), ref.train()
    model.set_grad_checkpointing(True)
    f0 = backend.calls[FWD]
    y = model(x)
    # all but the stem (timm's forward_features), layer1.0 (left alone) and layer2.0 (hooked): 20 - 6
    assert backend.calls[FWD] - f0 == count_convs(model) - 6
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)


def test_convert_timm_twice_and_group_norm():
    model = convert(make("resnet18", seed=7))
    convert(model)
    assert model.fastres_report.left_alone == []
    assert all(what.startswith("already fused") for _, what in model.fastres_report.fused)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert type(again) is ct.ConvertedTimmResNet and type(again.layer2[0]) is ct.ConvertedTimmBasicBlock
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x))
    gn = timm.create_model("resnet50_gn", pretrained=False, num_classes=10).eval()
    ref = copy.deepcopy(gn)
    convert(gn)
    why = dict(gn.fastres_report.left_alone)
    assert "GroupNorm is not an nn.BatchNorm2d" in why["layer1.0.conv1"]
    with torch.no_grad():
        torch.testing.assert_close(gn(x), ref(x))  # the documented fallback: the same modules, exact


def test_a_patched_timm_block_class_is_left_alone(monkeypatch):
    """timm's BasicBlock.forward patched before convert(): those blocks are left alone and reported,
    and the model computes what timm computes."""
    original = tr.BasicBlock.forward

    def half_residual(self, x):
        return original(self, x) * 0.5

    monkeypatch.setattr(tr.BasicBlock, "forward", half_residual)
    ref = make("resnet18").eval()
    model = convert(copy.deepcopy(ref)).eval()
    blocks = [why for name, why in model.fastres_report.left_alone if name.startswith("layer") and name.count(".") == 1]
    assert len(blocks) == 8 and all("patched" in why for why in blocks)   # (their convs are listed too)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
