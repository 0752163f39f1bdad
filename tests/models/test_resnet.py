"""fastres.models.resnet against torchvision.models.resnet: names, outputs, gradients, running stats."""
import copy

import pytest
import torch
import torch.nn as nn
from model_helpers import FWD, UNFUSED, count_convs, randomize_bn
from numerics import assert_as_good

import fastres.backend as backend
from fastres.models import resnet as fr

tvm = pytest.importorskip("torchvision.models", reason="torchvision is needed as the reference")


PAIRS = {
    18: (tvm.resnet18, fr.FusedResNet18),
    34: (tvm.resnet34, fr.FusedResNet34),
    50: (tvm.resnet50, fr.FusedResNet50),
    101: (tvm.resnet101, fr.FusedResNet101),
    152: (tvm.resnet152, fr.FusedResNet152),
}


def clone_model(ctor, state, dtype=torch.float32, **kwargs):
    """A model built on the meta device (no init cost) holding a private copy of `state`, loaded strictly."""
    with torch.device("meta"):
        model = ctor(**kwargs)
    model.load_state_dict({k: v.clone().to(dtype) if v.is_floating_point() else v.clone()
                           for k, v in state.items()}, strict=True, assign=True)
    return model


def trio(depth: int, seed: int = 0, branch_scale: float = 1.0):
    """(torchvision fp32, fused fp32, torchvision fp64 oracle) with the same random weights."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = PAIRS[depth][0](num_classes=10)
    randomize_bn(ref, gen, branch_scale)
    sd = ref.state_dict()
    fused = clone_model(PAIRS[depth][1], sd, num_classes=10)
    oracle = clone_model(PAIRS[depth][0], sd, torch.float64, num_classes=10)
    return ref, fused, oracle


def assert_close(a, b, rel=1e-4):
    scale = max(b.abs().max().item(), 1e-6)
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_matches_torchvision_eval_and_train(depth):
    """state_dict keys (both ways, strict), eval outputs, then train outputs and running statistics."""
    ref, fused, oracle = trio(depth, seed=depth)
    assert list(fused.state_dict().keys()) == list(ref.state_dict().keys())
    ref.load_state_dict(fused.state_dict(), strict=True)  # and the reverse direction
    for train in (False, True):
        x = torch.randn(2, 3, 64, 64)  # layer4 sees 2x2 maps: train-mode BN over 8 values per channel
        for m in (ref, fused, oracle):
            m.train(train)
        before, unfused = backend.calls[FWD], backend.calls[UNFUSED]
        with torch.no_grad():
            got = fused(x)
            want, want64 = ref(x), oracle(x.double())
        assert backend.calls[FWD] - before == count_convs(fused)  # every conv ran in the fused op
        assert backend.calls[UNFUSED] == unfused
        assert_as_good(got, want, want64, f"train={train} output")
    sd, sd_ref, sd64 = fused.state_dict(), ref.state_dict(), oracle.state_dict()
    for k in sd:
        if "running" in k:
            assert_as_good(sd[k], sd_ref[k], sd64[k], k)
        elif "num_batches" in k:
            assert sd[k] == sd_ref[k], k


@pytest.mark.parametrize("depth,size", [(18, 64), (50, 64)])
def test_train_gradients_match_torchvision(depth, size):
    ref, fused, oracle = trio(depth, seed=100 + depth, branch_scale=0.2)
    x = torch.randn(2, 3, size, size)
    proj = torch.randn(2, 10)  # loss = <output, proj>: a fixed, non-saturating output gradient
    before = backend.calls[FWD]
    grads = []
    for model, dtype in ((ref, torch.float32), (fused, torch.float32), (oracle, torch.float64)):
        inp = x.clone().to(dtype).requires_grad_()
        out = model(inp)
        (out * proj.to(dtype)).sum().backward()
        grads.append([out, inp.grad] + [p.grad for p in model.parameters()])
    assert backend.calls[FWD] - before == count_convs(fused)  # the oracles' forwards are not fused
    names = ["output", "input"] + [n for n, _ in fused.named_parameters()]
    for name, r, f, o in zip(names, *grads):
        assert_as_good(f, r, o, name)


@pytest.mark.parametrize("name,ctor,tv", [
    ("resnext50_32x4d", fr.FusedResNeXt50_32x4d, "resnext50_32x4d"),
    ("resnext101_32x8d", fr.FusedResNeXt101_32x8d, "resnext101_32x8d"),
    ("wide_resnet50_2", fr.FusedWideResNet50_2, "wide_resnet50_2"),
    ("wide_resnet101_2", fr.FusedWideResNet101_2, "wide_resnet101_2"),
])
def test_resnext_and_wide_keys_match(name, ctor, tv):
    with torch.device("meta"):  # names and shapes only: no init cost
        ref = getattr(tvm, tv)()
        fused = ctor()
    ref_sd, sd = ref.state_dict(), fused.state_dict()
    assert list(sd.keys()) == list(ref_sd.keys())
    assert all(sd[k].shape == v.shape for k, v in ref_sd.items())


def test_resnext_forward_matches_torchvision():
    """Grouped convolutions run fused on the torch backend (layers kept small: [1, 1, 1, 1])."""
    torch.manual_seed(3)
    ref = tvm.resnet.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, groups=32, width_per_group=4)
    randomize_bn(ref, torch.Generator().manual_seed(3))
    fused = fr.FusedResNet(fr.Bottleneck, [1, 1, 1, 1], num_classes=10, groups=32, width_per_group=4)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        ref.train(train), fused.train(train)
        before = backend.calls[FWD]
        with torch.no_grad():
            got = fused(x)
            assert_close(got, ref(x))
        assert backend.calls[FWD] - before == count_convs(fused)  # grouped convs ran fused too


def test_dilation_matches_torchvision():
    torch.manual_seed(4)
    kw = dict(num_classes=10, replace_stride_with_dilation=[False, True, True])
    ref = tvm.resnet.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], **kw).eval()
    randomize_bn(ref, torch.Generator().manual_seed(4))
    fused = fr.FusedResNet(fr.Bottleneck, [1, 1, 1, 1], **kw).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(fused(x), ref(x))


def test_zero_init_residual_like_torchvision():
    fused = fr.FusedResNet50(zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for b in fused.modules() if isinstance(b, fr.Bottleneck))
    fused = fr.FusedResNet18(zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 for b in fused.modules() if isinstance(b, fr.BasicBlock))
    assert fused.bn1.weight.abs().sum() > 0


def test_shortcut_options_structure():
    b = fr.FusedResNet18(shortcut="B")
    a = fr.FusedResNet18(shortcut="A")
    c = fr.FusedResNet18(shortcut="C")
    p = fr.plain18()
    blocks = lambda m: [mod for mod in m.modules() if isinstance(mod, fr.BasicBlock)]  # noqa: E731
    # B: projections at layer2.0, layer3.0, layer4.0 only (ResNet-18's layer1 keeps 64 channels)
    assert [i for i, blk in enumerate(blocks(b)) if blk.downsample is not None] == [2, 4, 6]
    assert all(isinstance(blk.downsample, (fr.ZeroPadShortcut, type(None))) for blk in blocks(a))
    assert sum(isinstance(blk.downsample, fr.ZeroPadShortcut) for blk in blocks(a)) == 3
    assert all(isinstance(blk.downsample, nn.Sequential) for blk in blocks(c))
    assert all(blk.downsample is None and blk.shortcut is None for blk in blocks(p))
    n = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    assert n(p) == n(a) < n(b) < n(c)
    with pytest.raises(ValueError, match="shortcut must be one of"):
        fr.FusedResNet18(shortcut="D")


def test_zero_pad_shortcut():
    x = torch.randn(2, 4, 6, 6)
    y = fr.ZeroPadShortcut(4, 8, stride=2)(x)
    assert y.shape == (2, 8, 3, 3)
    torch.testing.assert_close(y[:, :4], x[:, :, ::2, ::2])
    assert (y[:, 4:] == 0).all()
    with pytest.raises(ValueError, match="out_channels >= in_channels"):
        fr.ZeroPadShortcut(8, 4)


@pytest.mark.parametrize("shortcut", ["A", "C", None])
def test_blocks_match_hand_written(shortcut):
    """Each shortcut option computes what its definition says (a hand-written unfused block)."""
    torch.manual_seed(5)
    blk = fr.Bottleneck(16, 8, stride=2, shortcut=shortcut).train()
    randomize_bn(blk, torch.Generator().manual_seed(5))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = copy.deepcopy(blk)
        out = ref.relu(ref.bn1(ref.conv1(x)))
        out = ref.relu(ref.bn2(ref.conv2(out)))
        out = ref.bn3(ref.conv3(out))
        if shortcut == "A":
            sc = torch.cat([x[:, :, ::2, ::2], x.new_zeros(2, 16, 4, 4)], 1)
            out = out + sc
        elif shortcut == "C":
            out = out + ref.downsample[1](ref.downsample[0](x))
        want = torch.relu(out)
        got = blk(x)
    assert_close(got, want)


def test_group_norm_runs_unfused_and_correct():
    torch.manual_seed(6)
    gn = lambda c: nn.GroupNorm(4, c)  # noqa: E731
    ref = tvm.resnet.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=gn)
    fused = fr.FusedResNet(fr.BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=gn)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    before = backend.calls[UNFUSED]
    with torch.no_grad():
        assert_close(fused(x), ref(x))
    assert backend.calls[UNFUSED] > before


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        fr.FusedResNet(fr.BasicBlock, [1, 1, 1, 1], groups=2)
    with pytest.raises(ValueError, match="list of 4"):
        fr.FusedResNet(fr.BasicBlock, [1, 1, 1])
    with pytest.raises(ValueError, match="plain block"):
        fr.BasicBlock(4, 4, downsample=nn.Identity(), shortcut=None)
