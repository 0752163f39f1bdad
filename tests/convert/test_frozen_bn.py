"""convert() with torchvision's FrozenBatchNorm2d (detection backbones): conv -> frozen BN fused.

FrozenBatchNorm2d is an eval-mode BatchNorm whose weight, bias and statistics are buffers: the fused
model must give the unconverted model's output and input / conv-weight gradients, and no BN gradients."""
import copy

import pytest
import torch
import torch.nn as nn
from model_helpers import FWD, assert_as_good, count_convs
from numerics import assert_near

import fastres.backend as backend
from fastres.convert import FusedSequential, convert

tv = pytest.importorskip("torchvision.models.resnet", reason="torchvision is needed as the reference")
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402


def randomize_frozen(model: nn.Module, seed: int, branch_scale: float = 1.0) -> None:
    """Random frozen-BN buffers (weight, bias, running_mean, running_var); the last BN of each block
    scaled by branch_scale (a well-conditioned deep net, as model_helpers.randomize_bn)."""
    gen = torch.Generator().manual_seed(seed)
    last = {id(getattr(b, "bn3", None) or b.bn2) for b in model.modules() if hasattr(b, "conv2")}
    for m in model.modules():
        if type(m) is FrozenBatchNorm2d:
            c = m.weight.shape[0]
            m.weight.copy_((torch.rand(c, generator=gen) + 0.5) * (branch_scale if id(m) in last else 1.0))
            m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def run(model, x, dtype, proj):
    inp = x.clone().to(dtype).requires_grad_()
    out = model(inp)
    (out * proj.to(dtype)).sum().backward()
    return [out, inp.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_frozen_bn_torchvision_resnet(arch):
    """Outputs in fp32 by the house rule; gradients in float64, against the unconverted float64 model:
    in fp32 a random deep net's ReLU inputs come within rounding of zero (1e-7 for ResNet-50 at 64 px,
    below fp32's ~1e-6 error there), so two fp32 paths may mask one element differently (a tie, not a
    bug) and move a gradient by a whole term; float64 has no such ties."""
    torch.manual_seed(10)
    model = getattr(tv, arch)(num_classes=10, norm_layer=FrozenBatchNorm2d)  # train mode: BN stays frozen
    randomize_frozen(model, 11, branch_scale=0.2)
    ref, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict().keys())
    convert(model)
    assert model.fastres_report.left_alone == []
    assert list(model.state_dict().keys()) == keys
    assert all(not b.requires_grad for m in model.modules() if type(m) is FrozenBatchNorm2d for b in m.buffers())

    x, proj = torch.randn(2, 3, 64, 64), torch.randn(2, 10)
    n = count_convs(model)
    f0 = backend.calls[FWD]
    with torch.no_grad():
        got, want, best = model(x), ref(x), oracle(x.double())
    assert backend.calls[FWD] - f0 == n  # every conv -> frozen BN pair ran as the fused op
    assert_as_good(got, want, best, "output")

    fused64 = model.double()
    f0 = backend.calls[FWD]
    got = run(fused64, x, torch.float64, proj)
    assert backend.calls[FWD] - f0 == n
    best = run(oracle, x, torch.float64, proj)
    names = ["output", "input grad"] + [k for k, _ in model.named_parameters()]
    assert len(names) == len(got) and all(k.startswith(("conv", "layer", "fc")) for k in names[2:])
    for name, g, o in zip(names, got, best):
        assert_near(g, o, name, rel=1e-10)
    for (k, v), w in zip(fused64.state_dict().items(), oracle.state_dict().values()):
        assert torch.equal(v, w), k  # buffers untouched: frozen


def test_frozen_bn_sequential_chain():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), FrozenBatchNorm2d(16, eps=1e-3),
                          nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4))  # (a bias before train-mode BN: grad 0)
    randomize_frozen(model, 13)
    ref, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    convert(model)
    assert type(model) is FusedSequential
    assert [w for _, w in model.fastres_report.fused] == [
        "0 (Conv2d) -> 1 (FrozenBatchNorm2d) -> 2 (ReLU)", "3 (Conv2d) -> 4 (FrozenBatchNorm2d)",
        "5 (Conv2d) -> 6 (BatchNorm2d)"]
    x = torch.randn(4, 3, 16, 16)
    proj = torch.randn(4, 4, 8, 8)
    f0 = backend.calls[FWD]
    got = run(model, x, torch.float32, proj)
    assert backend.calls[FWD] - f0 == 3
    want, best = run(ref, x, torch.float32, proj), run(oracle, x, torch.float64, proj)
    names = ["output", "input grad"] + [k for k, _ in model.named_parameters()]
    for name, g, r, o in zip(names, got, want, best):
        assert_as_good(g, r, o, name)
