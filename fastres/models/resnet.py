"""ResNet for ImageNet (He et al. 2015, Table 1), with every conv -> BN (-> add) (-> ReLU) fused.

The modules carry torchvision's names (conv1, bn1, layer1.0.downsample.0, fc ...), so a torchvision
state_dict loads strictly and the reverse. Each block runs its convolutions through
:func:`fastres.nn.conv_bn_act_modules`; the residual is added inside the second (third) fused op.

Shortcuts (the paper's options, section 3.3 and 4.1):

* ``"B"`` (default, torchvision's choice): identity, and a projection (1x1 conv + BN, stored as
  ``downsample.0`` / ``downsample.1``) only where the shape changes.
* ``"A"``: parameter-free: identity, or, where the shape changes, the input subsampled by the stride
  and zero-padded with the new channels (:class:`ZeroPadShortcut`, stored as ``downsample``).
* ``"C"``: a projection on every block. ``None``: no shortcut at all: the paper's plain networks.

``norm_layer``: a BatchNorm2d-like layer (nn.BatchNorm2d, nn.SyncBatchNorm, or a factory returning them)
runs fused. Any other normalisation (``lambda c: nn.GroupNorm(32, c)``) runs unfused, conv then norm,
through conv_bn_act_modules' fallback (fastres.backend.calls: ("conv_bn_act", "forward", "unfused")).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.models import plan
from fastres.models.block_forward import basic_block_forward, bottleneck_forward, shortcut_of  # noqa: F401
from fastres.models.input_layout import allow, classify, inference_call, vouch
from fastres.models.plain import (
    basic_block_plain_forward,
    bottleneck_plain_forward,
    resnet_plain_forward,
)
from fastres.models.pool import max_pool
from fastres.nn import (
    conv_bn_act_modules,
    is_plain_relu,
    plain_forward_needed,
)

Tensor = torch.Tensor

__all__ = [
    "SHORTCUTS", "ZeroPadShortcut", "BasicBlock", "Bottleneck", "FusedResNet", "make_shortcut",
    "FusedResNet18", "FusedResNet34", "FusedResNet50", "FusedResNet101", "FusedResNet152",
    "FusedResNeXt50_32x4d", "FusedResNeXt101_32x8d", "FusedWideResNet50_2", "FusedWideResNet101_2", "plain18",
    "plain34"]

SHORTCUTS = ("A", "B", "C", None)


def check_shortcut(shortcut) -> Optional[str]:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of 'A' (zero-padding identity), 'B' (projection where the "
                         f"shape changes), 'C' (projection on every block) or None (plain, no shortcut); "
                         f"got {shortcut!r}")
    return shortcut


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: keep every `stride`-th pixel and append out_channels - in_channels zero channels. No
    parameters. (The count comes from the module, not the input's shape: torch.fx traces it.)"""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut: expected out_channels >= in_channels, got {in_channels} -> "
                             f"{out_channels} (option A can only add channels; use shortcut='B')")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def make_shortcut(shortcut: Optional[str], in_planes: int, out_planes: int, stride: int,
                  norm_layer: Callable[[int], nn.Module]) -> Optional[nn.Module]:
    """The `downsample` module of a block for option `shortcut`, or None for an identity (or no) shortcut."""
    check_shortcut(shortcut)
    changes = stride != 1 or in_planes != out_planes
    if shortcut is None or (shortcut in ("A", "B") and not changes):
        return None
    if shortcut == "A":
        return ZeroPadShortcut(in_planes, out_planes, stride)
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), norm_layer(out_planes))


def _block_shortcut(shortcut, downsample, inplanes: int, out: int, stride: int, norm_layer):
    check_shortcut(shortcut)
    if shortcut is None and downsample is not None:
        raise ValueError("a plain block (shortcut=None) takes no downsample module")
    if downsample is None:
        downsample = make_shortcut(shortcut, inplanes, out, stride, norm_layer)
    return downsample


class BasicBlock(nn.Module):
    """Two 3x3 convs; out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), both fused.

    torchvision's constructor and names. `downsample=None` builds the shortcut `shortcut` asks for
    (an identity where the shape does not change, for options A and B).
    """

    expansion: int = 1
    SHORTCUT_OPTION = True   # (its `shortcut` is the paper's option: fastres.models.plain.has_shortcut_option)

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, shortcut: Optional[str] = "B") -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got groups={groups}, "
                             f"base_width={base_width}")
        if dilation > 1:
            raise NotImplementedError("dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = _block_shortcut(shortcut, downsample, inplanes, planes * self.expansion, stride,
                                          norm_layer)
        self.stride = stride
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():   # TorchScript compiles torchvision's forward (fastres.models.plain)
            return self.basic_block_plain_forward(x)
        return basic_block_forward(self, x)

    basic_block_plain_forward = basic_block_plain_forward


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, groups, dilation on the 3x3 as torchvision: "ResNet v1.5"), 1x1 expand;
    all three fused, the residual added in the third."""

    expansion: int = 4
    SHORTCUT_OPTION = True

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, shortcut: Optional[str] = "B") -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _block_shortcut(shortcut, downsample, inplanes, planes * self.expansion, stride,
                                          norm_layer)
        self.stride = stride
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():   # TorchScript compiles torchvision's forward (fastres.models.plain)
            return self.bottleneck_plain_forward(x)
        return bottleneck_forward(self, x)

    bottleneck_plain_forward = bottleneck_plain_forward


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's initialisation: He normal (fan_out) convs, unit/zero norm affine parameters;
    zero_init_residual zeroes the last BN of each block, so each block starts as its shortcut."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else (
                getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None)
            if last is not None and getattr(last, "weight", None) is not None:
                nn.init.constant_(last.weight, 0)


class FusedResNet(nn.Module):
    """torchvision.models.ResNet with fused blocks and stem; the same constructor plus `shortcut`."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, shortcut: Optional[str] = "B") -> None:
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.shortcut = check_shortcut(shortcut)
        if len(layers) != 4:
            raise ValueError(f"layers should be a list of 4 block counts, got {layers!r}")
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, got "
                             f"{replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self, zero_init_residual)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = make_shortcut(self.shortcut, self.inplanes, planes * block.expansion, stride, norm_layer)
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer, shortcut=self.shortcut)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer, shortcut=self.shortcut))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():   # TorchScript compiles torchvision's forward (fastres.models.plain)
            return self.resnet_plain_forward(x)
        return resnet_forward(self, x)

    resnet_plain_forward = resnet_plain_forward

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def resnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Stem (fused conv1 + bn1 + ReLU), maxpool, the four stages, pool, fc. CPU inference on NCHW input
    runs in channels_last (fastres.models.input_layout)."""
    given = x
    hit = plan.armed(model, x)   # a frozen plan whose guard holds: its body output (fastres.models.plan)
    if hit is not None:
        with vouch(True, given, hit[1]):
            return classify(model.avgpool, model.fc, hit[0], True)
    x, ok = inference_call(model, x)
    with vouch(ok, given, x):
        # a vouched call's body may run as one compiled plan (fastres.models.plan)
        x = plan.body(model, x, ("layer1", "layer2", "layer3", "layer4"), True, resnet_body) if ok \
            else resnet_body(model, x)
        return classify(model.avgpool, model.fc, x, ok)


def resnet_body(model: nn.Module, x: Tensor) -> Tensor:
    """Everything before the pooled head: stem, max pooling, the four stages."""
    x = max_pool(model.maxpool, stem_forward(model, x))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def stem_forward(model: nn.Module, x: Tensor) -> Tensor:
    """relu(bn1(conv1(x))): fused, or module by module under torch.fx, with hooks, or when `relu` is not
    a plain nn.ReLU."""
    if not is_plain_relu(model.relu) or plain_forward_needed(model.conv1, model.bn1, model.relu):
        return model.relu(model.bn1(model.conv1(x)))
    return conv_bn_act_modules(x, model.conv1, model.bn1, relu=True)


allow(ZeroPadShortcut, BasicBlock, Bottleneck, FusedResNet)
for _cls, _kind in ((BasicBlock, "basic"), (Bottleneck, "bottleneck"), (ZeroPadShortcut, "zeropad")):
    plan.register(_cls, _kind)   # (fastres.models.plan may stand in for their forwards)


def FusedResNet18(**kwargs) -> FusedResNet:
    """ResNet-18 (torchvision.models.resnet18's layout)."""
    return FusedResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def FusedResNet34(**kwargs) -> FusedResNet:
    return FusedResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def FusedResNet50(**kwargs) -> FusedResNet:
    return FusedResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def FusedResNet101(**kwargs) -> FusedResNet:
    return FusedResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def FusedResNet152(**kwargs) -> FusedResNet:
    return FusedResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


def FusedResNeXt50_32x4d(**kwargs) -> FusedResNet:
    return FusedResNet(Bottleneck, [3, 4, 6, 3], **{"groups": 32, "width_per_group": 4, **kwargs})


def FusedResNeXt101_32x8d(**kwargs) -> FusedResNet:
    return FusedResNet(Bottleneck, [3, 4, 23, 3], **{"groups": 32, "width_per_group": 8, **kwargs})


def FusedWideResNet50_2(**kwargs) -> FusedResNet:
    return FusedResNet(Bottleneck, [3, 4, 6, 3], **{"width_per_group": 128, **kwargs})


def FusedWideResNet101_2(**kwargs) -> FusedResNet:
    return FusedResNet(Bottleneck, [3, 4, 23, 3], **{"width_per_group": 128, **kwargs})


def plain18(**kwargs) -> FusedResNet:
    """The paper's 18-layer plain net (ImageNet): ResNet-18's layout without shortcuts."""
    return FusedResNet(BasicBlock, [2, 2, 2, 2], **{"shortcut": None, **kwargs})


def plain34(**kwargs) -> FusedResNet:
    """The paper's 34-layer plain net (ImageNet, Fig. 3 middle)."""
    return FusedResNet(BasicBlock, [3, 4, 6, 3], **{"shortcut": None, **kwargs})
