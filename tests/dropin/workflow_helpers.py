"""Shared pieces of the client-workflow tests: a fastres model and the torchvision model it stands
for, and the one check every workflow makes after each step: the fastres model's eval output equals
that of a *fresh* torchvision model loaded with the fastres model's current state_dict.

The check holds the fastres output to the house rule against that torchvision model run in float64
(tests/numerics.py). A stale cache or a skipped module shows as an error of the order of the
output itself (0.5-30x was seen before these tests existed), far outside the rule.
"""
import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
import torchvision
from model_helpers import randomize_bn
from numerics import assert_as_good

import fastres

# A BasicBlock net (ResNet-18) and a reduced Bottleneck net (one block per stage: every block kind,
# a projection shortcut per stage) at 64 px: layer4's BatchNorm sees 2x2 per image, 32 values per
# channel at batch 8 (enough for train-mode comparisons to be well conditioned: tests/numerics.py).
ARCHS = {
    "basic": (torchvision.models.resnet.BasicBlock, fastres.BasicBlock, [2, 2, 2, 2]),
    "bottleneck": (torchvision.models.resnet.Bottleneck, fastres.Bottleneck, [1, 1, 1, 1]),
}
BATCH, SIZE = 8, 64


def torchvision_net(arch: str) -> nn.Module:
    tv_block, _, layers = ARCHS[arch]
    return torchvision.models.resnet.ResNet(tv_block, layers, num_classes=10)


def make(arch: str = "basic", kind: str = "fused", seed: int = 0) -> nn.Module:
    """A fastres model with random BatchNorm state: "fused" (FusedResNet) or "converted"
    (fastres.convert of a torchvision ResNet)."""
    torch.manual_seed(seed)
    tv = torchvision_net(arch)
    randomize_bn(tv, seed, branch_scale=0.5)
    if kind == "converted":
        return fastres.convert(tv)
    _, block, layers = ARCHS[arch]
    model = fastres.FusedResNet(block, layers, num_classes=10)
    model.load_state_dict(tv.state_dict())
    return model


def batch(seed: int = 1, fmt=torch.contiguous_format) -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=fmt)


def twin_of(model: nn.Module, arch: str, swaps: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """A fresh torchvision model with `model`'s current state_dict (strict), after `swaps(tv)` has made
    the same module replacements the workflow made on `model`."""
    tv = torchvision_net(arch)
    if swaps is not None:
        swaps(tv)
    tv.load_state_dict(model.state_dict())
    return tv


def check_eval(model: nn.Module, arch: str, x: Optional[torch.Tensor] = None, swaps=None, what: str = "") -> None:
    """model's eval output vs the torchvision twin's (house rule, float64 oracle). Leaves model's
    train/eval mode as it was."""
    x = batch() if x is None else x
    was_training = model.training
    tv = twin_of(model, arch, swaps).eval()
    model.eval()
    with torch.no_grad():
        got, ref = model(x), tv(x)
        oracle = copy.deepcopy(tv).double()(x.double())
    model.train(was_training)
    assert_as_good(got, ref, oracle, what or "eval logits")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    model.train()
    x = batch(seed)
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
