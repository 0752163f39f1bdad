"""What a frozen plan stands in for (fastres.models.plan): a fastres ResNet's body as a list of steps, and
the module TorchScript traces from them.

:func:`walk` reads the body (stem, max pooling, the stages' blocks) into hashable steps and the (conv, BN)
pairs whose folds they use, or raises :class:`NoPlan` when any part is not exactly what it knows: the
registered block and shortcut classes with the forwards they had when registered, exact nn.Conv2d (zero
padding, numeric padding, fp32 weight) + nn.BatchNorm2d pairs with running statistics, plain nn.ReLU, an
exact nn.MaxPool2d, shortcuts that are identities, Sequential(conv, bn) or the zero padding of option A.
The plan compares the steps on every call, so whatever they hold (each geometry, the ReLUs, the pooling,
the shortcuts) is what a changed model is checked against. :class:`Body` computes the steps with functions
bound at import (the tracer records whatever a name holds when it runs), and :func:`torch_own` tells
whether the functions and module-call machinery the per-layer path and torchvision use are still torch's.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastres.models.plain import has_shortcut_option
from fastres.nn import is_plain_relu
from fastres.nn_methods import own_method

F = torch.nn.functional
Tensor = torch.Tensor

__all__ = ["register", "walk", "Walk", "Body", "NoPlan", "torch_own"]

_KINDS: Dict[type, Tuple[str, Callable]] = {}   # block / shortcut class -> (kind, its forward when registered)
_SEQ_FORWARD = own_method(nn.Sequential, "forward")
_MP_FORWARD = own_method(nn.MaxPool2d, "forward")
# What a plan traces, bound now (the tracer records whatever a name holds when it runs), and what the
# per-layer path or torchvision would call, as torch has them now: a call with any of these replaced
# (a profiler's or a user's wrapper) runs the per-layer path, which calls the modules.
_CONV, _MAXPOOL, _RELU, _PAD = torch.conv2d, torch.max_pool2d, torch.relu, torch.constant_pad_nd
_TORCH_OWN = ((F, "conv2d"), (F, "max_pool2d"), (F, "relu"), (F, "batch_norm"), (F, "pad"), (torch, "relu"),
              (torch, "conv2d"), (nn.Module, "__call__"), (nn.Module, "_call_impl"),
              (nn.Module, "_wrapped_call_impl"))
_TORCH_OWN = tuple((owner, name, getattr(owner, name, None)) for owner, name in _TORCH_OWN)


def torch_own() -> bool:
    for owner, name, fn in _TORCH_OWN:
        if getattr(owner, name, None) is not fn:
            return False
    return True


def register(cls: type, kind: str) -> None:
    """Declare a block or shortcut class whose forward a plan may stand in for: kind "basic" (conv1/bn1,
    conv2/bn2, relu, downsample), "bottleneck" (+ conv3/bn3) or "zeropad" (option A: in_channels,
    out_channels, stride). Its forward as of now is recorded: a forward patched on the class later misses."""
    _KINDS[cls] = (kind, cls.forward)


class NoPlan(Exception):
    """The body is not one a plan knows."""


class Walk:
    """The body as steps (hashable: the plan's key) and the (conv, BN) pairs its convolutions fold.
    Values are numbered from 0 (the body's input); step i makes value i + 1. A step:
    ("conv", src, pair, stride, padding, dilation, groups, residual value or -1, relu),
    ("maxpool", src, kernel_size, stride, padding, dilation, ceil_mode), ("zeropad", src, stride, extra)."""

    def __init__(self) -> None:
        self.steps: List[tuple] = []
        self.pairs: List[Tuple[nn.Module, nn.Module]] = []

    def _add(self, step: tuple) -> int:
        self.steps.append(step)
        return len(self.steps)

    def conv(self, src: int, conv: nn.Module, bn: nn.Module, relu: bool, res: int = -1) -> int:
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str) or bn._buffers.get("running_mean") is None \
                or bn._buffers.get("running_var") is None or conv._parameters["weight"].dtype is not torch.float32:
            raise NoPlan
        self.pairs.append((conv, bn))
        return self._add(("conv", src, len(self.pairs) - 1, _two(conv.stride), _two(conv.padding),
                          _two(conv.dilation), int(conv.groups), res, relu))

    def maxpool(self, src: int, mp: nn.Module) -> int:
        if type(mp) is not nn.MaxPool2d or nn.MaxPool2d.forward is not _MP_FORWARD or _MP_FORWARD is None \
                or mp.return_indices:
            raise NoPlan
        stride = mp.stride if mp.stride is not None else mp.kernel_size   # (None: the kernel size, as F.max_pool2d)
        return self._add(("maxpool", src, _two(mp.kernel_size), _two(stride), _two(mp.padding), _two(mp.dilation),
                          bool(mp.ceil_mode)))

    def block(self, src: int, blk: nn.Module) -> int:
        kind = _kind(blk)
        mods = blk._modules   # (submodules read from the table: nn.Module.__getattr__ is the slow way)
        if kind not in ("basic", "bottleneck") or not is_plain_relu(mods.get("relu")):
            raise NoPlan
        res = -1
        if not (has_shortcut_option(blk) and blk.shortcut is None):   # (converted torchvision blocks always add)
            ds = mods.get("downsample", blk.__dict__.get("downsample"))
            if ds is None:
                res = src
            elif type(ds) is nn.Sequential and len(ds) == 2 and nn.Sequential.forward is _SEQ_FORWARD:
                res = self.conv(src, ds[0], ds[1], False)
            elif _kind(ds) == "zeropad":
                res = self._add(("zeropad", src, ds.stride, ds.out_channels - ds.in_channels))
            else:
                raise NoPlan
        out = self.conv(src, mods["conv1"], mods["bn1"], True)
        if kind == "bottleneck":
            out = self.conv(out, mods["conv2"], mods["bn2"], True)
            return self.conv(out, mods["conv3"], mods["bn3"], True, res)
        return self.conv(out, mods["conv2"], mods["bn2"], True, res)


def _two(v) -> Tuple[int, int]:
    """A 2-D geometry argument as a tuple of two ints (an int, a tuple or a list, as torch takes them)."""
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise NoPlan
    return (int(t[0]), int(t[1]))


def _kind(m: nn.Module) -> Optional[str]:
    k = _KINDS.get(type(m))
    return k[0] if k is not None and type(m).forward is k[1] else None


def walk(model: nn.Module, layers: Tuple[str, ...], maxpool: bool) -> Walk:
    w = Walk()
    if not is_plain_relu(model.relu):
        raise NoPlan
    v = w.conv(0, model.conv1, model.bn1, True)
    if maxpool:
        v = w.maxpool(v, model.maxpool)
    if nn.Sequential.forward is not _SEQ_FORWARD or _SEQ_FORWARD is None:
        raise NoPlan
    for name in layers:
        layer = getattr(model, name)
        if type(layer) is not nn.Sequential:
            raise NoPlan
        for blk in layer._modules.values():
            v = w.block(v, blk)
    return w


class Body(nn.Module):
    """What a plan traces: the steps of a :class:`Walk` on its constants (folded weight, bias per pair),
    one op per step, as the per-layer path computes them."""

    def __init__(self, steps: tuple, consts: List[Tensor]) -> None:
        super().__init__()
        self.steps, self.consts = steps, consts   # (a plain list: the tracer records them as constants)

    def forward(self, x: Tensor) -> Tensor:
        v = [x]
        for step in self.steps:
            op, src = step[0], v[step[1]]
            if op == "conv":
                _, _, i, stride, padding, dilation, groups, res, relu = step
                y = _CONV(src, self.consts[2 * i], self.consts[2 * i + 1], stride, padding, dilation, groups)
                if res >= 0:
                    y = y + v[res]
                if relu:
                    y = _RELU(y)
            elif op == "maxpool":
                _, _, k, stride, padding, dilation, ceil_mode = step
                y = _MAXPOOL(src, k, stride, padding, dilation, ceil_mode)
            else:   # zeropad
                _, _, stride, extra = step
                y = src[:, :, ::stride, ::stride] if stride != 1 else src
                if extra:
                    y = _PAD(y, (0, 0, 0, 0, 0, extra), 0.0)
            v.append(y)
        return v[-1]
