"""unfuse(model): convert()'s inverse, in place: every module runs its children one by one again.

For tools that must see the plain model (TorchScript, ONNX / TensorRT exporters, graph rewriters):

* a class convert() swapped goes back to its base: torchvision's ResNet / BasicBlock / Bottleneck,
  timm's ResNet / BasicBlock / Bottleneck, FusedSequential -> nn.Sequential;
* fastres's own fused modules take a plain-forward subclass (``PlainResNet``, ``PlainBasicBlock``,
  ``PlainBottleneck``, ``PlainCifarResNet``, ``PlainConvBN2d``, ``PlainConvBNReLU2d``) whose forward
  calls every module as torchvision's does and compiles with torch.jit.script; a FusedResNet shaped as
  torchvision builds it (shortcut "B" or "C": identity or Sequential(conv, bn) downsamples) becomes
  torchvision's own ResNet / BasicBlock / Bottleneck when torchvision is installed.

Only classes change: the model object, its children, parameters, buffers and state_dict (keys and
values) stay the same, and so do its outputs (the same math, PyTorch's own rounding). convert() of an
unfused fastres model puts the fused classes back. Subclasses of these classes are left alone (their
forward is their own) and listed in the report, stored as ``model.fastres_report``.

(``torch.jit.script(model)`` needs no unfuse: where TorchScript compiles a fused class's method it
compiles the same plain code these classes run; fastres.nn.scripting_aware.)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch
import torch.nn as nn

from fastres.convert.chains import FusedSequential
from fastres.convert.report import UnfuseReport, finish
from fastres.convert.timm import timm_classes
from fastres.convert.torchvision import torchvision_classes
from fastres.models.cifar import CifarResNet, cifar_plain_forward
from fastres.models.plain import basic_block_plain_forward, bottleneck_plain_forward, resnet_plain_forward
from fastres.models.resnet import BasicBlock, Bottleneck, FusedResNet
from fastres.nn import FusedConvBN2d, FusedConvBNReLU2d

Tensor = torch.Tensor

__all__ = ["unfuse", "UnfuseReport", "PlainResNet", "PlainBasicBlock", "PlainBottleneck",
           "PlainCifarResNet", "PlainConvBN2d", "PlainConvBNReLU2d", "refuse_classes"]

class PlainConvBN2d(FusedConvBN2d):
    """FusedConvBN2d unfused: conv, bn, (+ residual), (ReLU), each module called."""

    forward = FusedConvBN2d.plain_forward


class PlainConvBNReLU2d(PlainConvBN2d, FusedConvBNReLU2d):
    """FusedConvBNReLU2d unfused (PlainConvBN2d's forward, the ReLU on by default)."""


class PlainBasicBlock(BasicBlock):
    """fastres BasicBlock unfused: torchvision's BasicBlock forward (no add for a plain block)."""

    forward = basic_block_plain_forward


class PlainBottleneck(Bottleneck):
    """fastres Bottleneck unfused: torchvision's Bottleneck forward (no add for a plain block)."""

    forward = bottleneck_plain_forward


class PlainResNet(FusedResNet):
    """FusedResNet unfused: torchvision's ResNet forward."""

    forward = resnet_plain_forward

    def _forward_impl(self, x: Tensor) -> Tensor:   # torchvision's name for it; forward does not call it
        return self.forward(x)


class PlainCifarResNet(CifarResNet):
    """CifarResNet unfused: stem conv, bn, ReLU, the three stages, pool, fc, each module called."""

    forward = cifar_plain_forward


_PLAIN: Dict[type, type] = {
    FusedResNet: PlainResNet, BasicBlock: PlainBasicBlock, Bottleneck: PlainBottleneck,
    CifarResNet: PlainCifarResNet, FusedConvBN2d: PlainConvBN2d, FusedConvBNReLU2d: PlainConvBNReLU2d,
}


def refuse_classes() -> Dict[type, type]:
    """{plain class: the fastres fused class it came from} (what convert() swaps back)."""
    return {plain: fused for fused, plain in _PLAIN.items()}


def _torchvision_shaped(model: nn.Module) -> Optional[List[nn.Module]]:
    """The blocks of a FusedResNet torchvision's classes can run exactly (every block a fastres
    BasicBlock / Bottleneck with a shortcut, its downsample None or Sequential(conv, bn)), else None."""
    if getattr(model, "shortcut", None) not in ("B", "C"):
        return None
    blocks = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        if type(stage) not in (nn.Sequential, FusedSequential):
            return None
        for block in stage.children():
            ds = block.downsample if type(block) in (BasicBlock, Bottleneck) else None
            if (type(block) not in (BasicBlock, Bottleneck) or block.shortcut is None
                    or (ds is not None and (type(ds) not in (nn.Sequential, FusedSequential) or len(ds) != 2))):
                return None
            blocks.append(block)
    return blocks


def _to_torchvision(model: nn.Module) -> Dict[int, type]:
    """{id(module): torchvision class} for every torchvision-shaped FusedResNet inside `model` and its
    blocks; empty when torchvision is not installed."""
    try:
        import torchvision.models.resnet as tv
    except ImportError:
        return {}
    out: Dict[int, type] = {}
    for m in model.modules():
        if type(m) is FusedResNet:
            blocks = _torchvision_shaped(m)
            if blocks is not None:
                out[id(m)] = tv.ResNet
                out.update({id(b): tv.BasicBlock if type(b) is BasicBlock else tv.Bottleneck for b in blocks})
    return out


def unfuse(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Undo convert() and fastres's fusion, in place: see the module docstring. Returns `model` (same
    object, same state_dict); the UnfuseReport is stored as ``model.fastres_report``, logged on the
    "fastres" logger and printed when `verbose`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse: expected an nn.Module, got {type(model).__name__}")
    back = {conv: base for base, conv in {**torchvision_classes(), **timm_classes()}.items()}
    back[FusedSequential] = nn.Sequential
    fused_kinds = tuple(back) + tuple(_PLAIN)
    to_tv = _to_torchvision(model)
    report = UnfuseReport()
    seen: Set[int] = set()
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        old = type(m)
        new = back.get(old) or to_tv.get(id(m)) or _PLAIN.get(old)
        if new is not None:
            m.__class__ = new
            report.restored.append((name, f"{old.__name__} -> {new.__module__}.{new.__name__}"))
        elif isinstance(m, fused_kinds) and old not in _PLAIN.values():
            report.left_alone.append((name, f"{old.__name__} subclasses a fused class with its own code: "
                                            f"its forward is kept"))
    return finish(model, report, verbose)

