"""The CIFAR-10 networks of the paper's section 4.2, fused.

A 3x3 conv with 16 filters (+ BN + ReLU), then three stages of n BasicBlocks with 16, 32 and 64 filters
on 32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3 has stride 2), global average pooling
and a fully connected layer: 6n + 2 weighted layers. Option A shortcuts (zero padding, no extra
parameters) by default, as in the paper: resnet20/32/44/56/110/1202 have 0.27M, 0.46M, 0.66M, 0.85M,
1.7M and 19.4M parameters. plain20..110 are the same nets without shortcuts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fastres.models import plan
from fastres.models.input_layout import allow, classify, inference_call, vouch
from fastres.models.resnet import BasicBlock, check_shortcut, init_weights, make_shortcut, stem_forward

Tensor = torch.Tensor

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
           "plain20", "plain32", "plain44", "plain56", "plain110"]


def cifar_plain_forward(self, x: Tensor) -> Tensor:
    """CifarResNet's forward module by module (fastres.unfuse's PlainCifarResNet.forward)."""
    x = self.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = torch.flatten(self.avgpool(x), 1)
    return self.fc(x)


_STAGES = ("layer1", "layer2", "layer3")


def cifar_body(self, x: Tensor) -> Tensor:
    """Everything before the pooled head: stem and the three stages."""
    x = stem_forward(self, x)
    return self.layer3(self.layer2(self.layer1(x)))


class CifarResNet(nn.Module):
    """The paper's 6n+2-layer CIFAR net. `shortcut`: "A" (default), "B", "C" or None (plain)."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: Optional[str] = "A",
                 in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), "
                             f"got {depth!r}")
        self.depth = depth
        self.shortcut = check_shortcut(shortcut)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            ds = make_shortcut(self.shortcut, self.inplanes, planes, s, nn.BatchNorm2d)
            layers.append(BasicBlock(self.inplanes, planes, s, ds, shortcut=self.shortcut))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():   # TorchScript compiles the plain forward (module by module)
            return self.cifar_plain_forward(x)
        given = x
        hit = plan.armed(self, x)   # a frozen plan whose guard holds: its body output (fastres.models.plan)
        if hit is not None:
            with vouch(True, given, hit[1]):
                return classify(self.avgpool, self.fc, hit[0], True)
        x, ok = inference_call(self, x)   # channels_last for CPU inference (input_layout)
        with vouch(ok, given, x):   # (a vouched call's body may run as one plan: fastres.models.plan)
            x = plan.body(self, x, _STAGES, False, cifar_body) if ok else cifar_body(self, x)
            return classify(self.avgpool, self.fc, x, ok)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, shortcut={self.shortcut!r}"

    cifar_plain_forward = cifar_plain_forward


allow(CifarResNet)


def _factory(depth: int, shortcut: Optional[str]):
    def build(**kwargs) -> CifarResNet:
        return CifarResNet(depth, **{"shortcut": shortcut, **kwargs})

    kind = "plain net" if shortcut is None else "ResNet"
    build.__name__ = build.__qualname__ = f"{'plain' if shortcut is None else 'resnet'}{depth}"
    build.__doc__ = f"The paper's {depth}-layer CIFAR-10 {kind} (section 4.2). Keyword arguments go to CifarResNet."
    return build


resnet20 = _factory(20, "A")
resnet32 = _factory(32, "A")
resnet44 = _factory(44, "A")
resnet56 = _factory(56, "A")
resnet110 = _factory(110, "A")
resnet1202 = _factory(1202, "A")
plain20 = _factory(20, None)
plain32 = _factory(32, None)
plain44 = _factory(44, None)
plain56 = _factory(56, None)
plain110 = _factory(110, None)
