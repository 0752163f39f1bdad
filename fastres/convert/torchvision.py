"""convert() for torchvision's ResNet, BasicBlock and Bottleneck: fused subclasses of exactly those
classes, whose forwards are fastres.models.resnet's (every conv -> bn, the residual add and the ReLU
fused; a downsample Sequential(conv, bn) too; a replaced ReLU or a hooked module runs as torchvision's
forward would run it, checked per call).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastres.convert.chains import pair_reason
from fastres.models import plan
from fastres.models import resnet as _fr
from fastres.models.input_layout import allow
from fastres.models.plain import resnet_plain_forward, tv_basic_block_forward, tv_bottleneck_forward
from fastres.nn import is_plain_relu, unfusable_reason
from fastres.nn_methods import own_method

Tensor = torch.Tensor

__all__ = ["torchvision_classes", "converted_class", "pairs_of", "resnet_module_reason", "patched_method",
           "CLASS_NAMES"]

# Fused subclasses of torchvision's classes, made on first use (torchvision is optional). Their module
# is the package fastres.convert, whose __getattr__ makes them, so pickled converted models load again.
CLASS_NAMES = ("ConvertedResNet", "ConvertedBasicBlock", "ConvertedBottleneck")
_tv_classes: Dict[str, type] = {}


# The converted classes' methods: fused in Python; where TorchScript compiles them, torchvision's own code
# module by module (TorchScript does not compile what follows ``if torch.jit.is_scripting(): return``; it
# names a compiled method by its def, so each def carries the name of the attribute it becomes).
class _ResNetMethods:
    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.resnet_plain_forward(x)
        return _fr.resnet_forward(self, x)


class _BasicBlockMethods:
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.tv_basic_block_forward(x)
        return _fr.basic_block_forward(self, x)


class _BottleneckMethods:
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.tv_bottleneck_forward(x)
        return _fr.bottleneck_forward(self, x)


def torchvision_classes() -> Dict[type, type]:
    """{torchvision class: fused subclass}, empty when torchvision is not installed."""
    try:
        import torchvision.models.resnet as tv
    except ImportError:
        return {}
    if not _tv_classes:
        bodies = {
            "ConvertedResNet": (tv.ResNet, {"_forward_impl": _ResNetMethods._forward_impl,
                                            "resnet_plain_forward": resnet_plain_forward}),
            "ConvertedBasicBlock": (tv.BasicBlock, {"forward": _BasicBlockMethods.forward,
                                                    "tv_basic_block_forward": tv_basic_block_forward}),
            "ConvertedBottleneck": (tv.Bottleneck, {"forward": _BottleneckMethods.forward,
                                                    "tv_bottleneck_forward": tv_bottleneck_forward}),
        }
        for name, (base, body) in bodies.items():
            doc = f"torchvision's {base.__name__}, converted by fastres.convert: its forward runs fused."
            cls = type(name, (base,), {**body, "__module__": "fastres.convert", "__qualname__": name, "__doc__": doc})
            _tv_classes[name] = cls
            allow(cls)   # channels_last CPU inference (fastres.models.input_layout) sees through them
        plan.register(_tv_classes["ConvertedBasicBlock"], "basic")   # (fastres.models.plan may stand in for them)
        plan.register(_tv_classes["ConvertedBottleneck"], "bottleneck")
    return {cls.__mro__[1]: cls for cls in _tv_classes.values()}


def converted_class(name: str) -> type:
    """The converted class called `name` (one of CLASS_NAMES); KeyError without torchvision."""
    torchvision_classes()
    return _tv_classes[name]


def pairs_of(m: nn.Module) -> List[Tuple[str, str]]:
    """The (conv, bn) attribute pairs a ResNet module's fused forward runs."""
    names = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    return [(c, b) for c, b in names if hasattr(m, c) and hasattr(m, b)]


# The methods a converted class stands in for: torchvision's own code must be what they replace.
_REPLACED = {"ResNet": ("forward", "_forward_impl"), "BasicBlock": ("forward",), "Bottleneck": ("forward",)}


def patched_method(cls: type, names) -> Optional[str]:
    """The first of the methods `names` of a library's class `cls` (which a converted class replaces)
    that is not the library's own code (a user patched the class, e.g. ``BasicBlock.forward = f``), or None."""
    for name in names:
        if name not in cls.__dict__ or own_method(cls, name) is None:   # (defined in cls itself, as its own)
            return name
    return None


def resnet_module_reason(m: nn.Module) -> Optional[str]:
    """Why a torchvision ResNet / block cannot take the fused forward (torchvision's class patched with
    other code, hooks the fused forward would skip, or a replaced ReLU), or None."""
    patched = patched_method(type(m), _REPLACED.get(type(m).__name__, ()))
    if patched is not None:
        return f"torchvision's {type(m).__name__}.{patched} is not torchvision's code (patched): it runs as itself"
    if not is_plain_relu(m.relu):
        return f"its relu is {type(m.relu).__name__} (or has hooks), not a plain nn.ReLU"
    pairs = [(getattr(m, c), getattr(m, b)) for c, b in pairs_of(m)]
    ds = getattr(m, "downsample", None)
    if ds is not None and type(ds) is nn.Sequential and len(ds) == 2:
        pairs.append((ds[0], ds[1]))
    for conv, bn in pairs:
        if unfusable_reason(conv, bn) is None:  # (pairs it rejects run as the two modules: exact)
            why = pair_reason(conv, bn)
            if why is not None:
                return why
    return None
