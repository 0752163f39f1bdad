"""torchvision's ResNet forwards, module by module, written once: fastres's fused blocks run them when
they must call every module (hooks, torch.fx, a replaced ReLU), and fastres.unfuse's plain classes use
them as their forward methods (so they compile with torch.jit.script). A plain block (shortcut None) adds
nothing."""
from __future__ import annotations

import torch
import torch.nn as nn

Tensor = torch.Tensor

__all__ = ["basic_block_plain_forward", "bottleneck_plain_forward", "resnet_plain_forward", "plain_block_forward",
           "tv_basic_block_forward", "tv_bottleneck_forward", "has_shortcut_option"]


def basic_block_plain_forward(self, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.shortcut is not None:
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
    return self.relu(out)


def bottleneck_plain_forward(self, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.shortcut is not None:
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
    return self.relu(out)


def resnet_plain_forward(self, x: Tensor) -> Tensor:
    x = self.relu(self.bn1(self.conv1(x)))
    x = self.maxpool(x)
    x = self.layer1(x)
    x = self.layer2(x)
    x = self.layer3(x)
    x = self.layer4(x)
    x = self.avgpool(x)
    x = torch.flatten(x, 1)
    return self.fc(x)


def has_shortcut_option(block: nn.Module) -> bool:
    """Whether `block` is one of fastres's own blocks (their class says so), whose `shortcut` attribute is
    the paper's option (None: a plain block, no add). A converted torchvision block always adds its
    identity, as torchvision's forward does, whatever attribute a user sets on it."""
    return getattr(type(block), "SHORTCUT_OPTION", False) is True


def plain_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's BasicBlock / Bottleneck forward, module by module (torchvision's own blocks, which
    have no shortcut option, always add theirs)."""
    if not has_shortcut_option(block):
        return type(block).__mro__[1].forward(block, x)   # a converted torchvision block: its base's forward
    return (bottleneck_plain_forward if hasattr(block, "conv3") else basic_block_plain_forward)(block, x)


# A converted torchvision block has no shortcut option (it always adds its identity): what
# TorchScript compiles for one (fastres.convert.torchvision), module by module.
def tv_basic_block_forward(self, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    out += identity
    return self.relu(out)


def tv_bottleneck_forward(self, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    out += identity
    return self.relu(out)
