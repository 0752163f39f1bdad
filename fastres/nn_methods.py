"""The torch.nn methods fastres's fused paths stand in for, and whether a module's class still runs them.

A fused conv + BN (+ add) (+ ReLU) computes what nn.Conv2d's forward (and its _conv_forward), nn.BatchNorm2d's
(or nn.SyncBatchNorm's, torchvision's FrozenBatchNorm2d's) and nn.ReLU's compute, and a vouched frozen
call's head what nn.Linear's does. Users and tools patch those classes (``nn.ReLU.forward = f``), before or
after fastres is imported; torchvision's ResNet then runs the patched code. So the fused paths run only
while each class holds torch's own method, recorded here once and recognised by where it was defined
(:func:`own_method`); the modules of a patched class run as themselves. The functions those modules
call (F.conv2d, F.batch_norm, F.relu) are wrapped by tools too: the default path calls them as
torchvision does, and fastres.frozen, whose folded paths call none of them, steps aside while one is
(:func:`functions_unpatched`).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["own_method", "conv_unpatched", "bn_unpatched", "nn_methods_unpatched", "functions_unpatched",
           "frozen_bn_class", "is_frozen_bn", "F_CONV2D", "F_BATCH_NORM", "F_RELU",
           "CONV_FORWARD", "CONV_CONV_FORWARD", "BN_FORWARDS", "RELU_FORWARD"]


def own_method(cls: type, name: str):
    """``cls.<name>`` when it is the library's own code (defined in the module of the class in `cls`'s MRO
    that holds it, under that class's name: nn.BatchNorm2d.forward is _BatchNorm.forward), else None. Read
    once at import for the torch.nn classes below; a method a user patches onto the class (or a base)
    before or after that is then never the one recorded."""
    for owner in cls.__mro__:
        fn = owner.__dict__.get(name)
        if fn is not None:
            ok = getattr(fn, "__module__", None) == owner.__module__ \
                and getattr(fn, "__qualname__", None) == f"{owner.__name__}.{name}"
            return fn if ok else None
    return None


# torch's own methods (None where the running torch's were not recognisable: nothing then fuses)
CONV_FORWARD, CONV_CONV_FORWARD = own_method(nn.Conv2d, "forward"), own_method(nn.Conv2d, "_conv_forward")
BN_FORWARDS = (own_method(nn.BatchNorm2d, "forward"), own_method(nn.SyncBatchNorm, "forward"))
RELU_FORWARD = own_method(nn.ReLU, "forward")
_NN_METHODS = [(nn.Conv2d, "forward", CONV_FORWARD), (nn.Conv2d, "_conv_forward", CONV_CONV_FORWARD),
               (nn.BatchNorm2d, "forward", BN_FORWARDS[0]), (nn.SyncBatchNorm, "forward", BN_FORWARDS[1]),
               (nn.ReLU, "forward", RELU_FORWARD), (nn.Linear, "forward", own_method(nn.Linear, "forward"))]


def _own_function(name: str):
    """torch.nn.functional.<name> when it is torch's own: conv2d the C builtin itself, batch_norm and relu
    the Python functions defined there under that name, not wrapped (functools.wraps leaves __wrapped__);
    else None."""
    fn = getattr(F, name, None)
    if name == "conv2d":
        return fn if fn is torch._C._VariableFunctions.conv2d else None
    ok = getattr(fn, "__module__", None) == F.__name__ and getattr(fn, "__qualname__", None) == name \
        and not hasattr(fn, "__wrapped__")
    return fn if ok else None


# What torchvision's modules call (nn.Conv2d -> F.conv2d, nn.BatchNorm2d -> F.batch_norm, nn.ReLU -> F.relu),
# as torch has them (None where not recognisable: a wrapper made before fastres was imported).
_FUNCTIONS = tuple((name, _own_function(name)) for name in ("conv2d", "batch_norm", "relu"))
F_CONV2D, F_BATCH_NORM, F_RELU = (fn for _, fn in _FUNCTIONS)   # (None: not recognisable)
_frozen_forward: list = []   # [torchvision's FrozenBatchNorm2d.forward], read when a frozen BN is first seen


def frozen_bn_class() -> Optional[type]:
    """torchvision's FrozenBatchNorm2d (what detection backbones use), when torchvision is loaded."""
    misc = sys.modules.get("torchvision.ops.misc")
    return getattr(misc, "FrozenBatchNorm2d", None)


def is_frozen_bn(bn: nn.Module) -> bool:
    cls = frozen_bn_class()
    return cls is not None and type(bn) is cls


def functions_unpatched() -> bool:
    """Whether F.conv2d, F.batch_norm and F.relu are torch's own. A wrapper there (a profiler's, a tool's,
    a user's) sees every call torchvision's modules make; the default path calls them too (the fused
    block's ReLU through F.relu), and fastres.frozen's folds, prepacked convolutions and plans, which call
    none of them, step aside while any is wrapped."""
    for name, fn in _FUNCTIONS:
        if fn is None or getattr(F, name) is not fn:
            return False
    return True


def conv_unpatched(conv: nn.Module) -> bool:
    """Whether `conv`'s class runs nn.Conv2d's own forward and _conv_forward (what the fused op computes)."""
    cls = type(conv)
    return cls.forward is CONV_FORWARD is not None and cls._conv_forward is CONV_CONV_FORWARD is not None


def bn_unpatched(bn: nn.Module) -> bool:
    """Whether `bn`'s class runs nn.BatchNorm2d's or nn.SyncBatchNorm's own forward (torchvision's
    FrozenBatchNorm2d: its own)."""
    f = type(bn).forward
    if is_frozen_bn(bn):
        if not _frozen_forward:
            _frozen_forward.append(own_method(type(bn), "forward"))
        return f is _frozen_forward[0] is not None
    return f is not None and f in BN_FORWARDS


def nn_methods_unpatched() -> bool:
    """Whether every torch.nn method recorded above is still torch's own (a vouched model call checks it
    once for all its layers)."""
    for cls, name, fn in _NN_METHODS:
        if fn is None or getattr(cls, name) is not fn:
            return False
    return True
