"""How a fused block (fastres's BasicBlock and Bottleneck, a converted torchvision block) runs its layers.

Each (conv, BN) pair runs through :func:`fastres.nn.conv_bn_act_modules`; the residual is added inside the
last one (:func:`_last_stage`). A block runs its modules one by one, as torchvision's forward does, when a
module tracer records the call, a module below it has a hook or an instance forward, or its `relu` is
not a plain nn.ReLU (:func:`_plain_needed`): checked on every call.

Inside a fastres model call that found no module tracer (fastres.module_calls.untraced) those checks are
reads of the modules' own tables, with no helper calls, and a block reads its children from its table
(``block.conv1`` is a call of Module.__getattr__), each where torchvision's forward reads it: on a CPU,
after each large convolution, this code runs from cold caches, where each call and each object touched
counts (measured: ~340 us per ResNet-18 forward at 224 px, 2 cores, in _plain_needed, draws_nothing and
the downsample's test before this). The answers are the general checks' answers; anything unusual (a
child set as a plain attribute, a table missing) takes the general path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fastres.backends.torch import vouched as _vouched
from fastres.models.plain import has_shortcut_option, plain_block_forward
from fastres.module_calls import _hooks, _subtree_hooked, inner_plain_forward_needed, untraced
from fastres.nn import conv_bn_act_modules, draws_nothing, exact_pair, is_plain_relu, unfusable_reason
from fastres.nn_methods import RELU_FORWARD

Tensor = torch.Tensor

__all__ = ["basic_block_forward", "bottleneck_forward", "shortcut_of"]


def _fast_pair(a: nn.Module, b: nn.Module) -> bool:
    """unfusable_reason(a, b) is None, for the usual pair, by attribute reads (else the caller asks it)."""
    return exact_pair(a, b) and a.padding_mode == "zeros" and type(a.padding) is not str \
        and a.out_channels == b.num_features


def _downsample_pair(m: nn.Module):
    """(conv, bn) of a downsample that is exactly Sequential(conv, bn), fusable (one fused op), else None."""
    if type(m) is not nn.Sequential:
        return None
    mods = m._modules
    if len(mods) != 2:
        return None
    a, b = mods.values()
    return (a, b) if _fast_pair(a, b) or unfusable_reason(a, b) is None else None


def shortcut_of(block: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The residual a block adds: None for a plain block, x for identity, else downsample(x) (fused
    when the downsample is Sequential(conv, bn))."""
    if has_shortcut_option(block) and block.shortcut is None:
        return None
    ds = block.downsample
    if ds is None:
        return x
    pair = _downsample_pair(ds)
    if pair is not None:
        return conv_bn_act_modules(x, pair[0], pair[1])
    return ds(x)


def _untraced_plain_needed(block: nn.Module) -> Optional[bool]:
    """_plain_needed's answer in an untraced model call, by table reads; None: ask the general checks."""
    try:
        relu = block.__dict__["_modules"]["relu"]
        rd = relu.__dict__
        if type(relu).forward is not RELU_FORWARD or RELU_FORWARD is None or "inplace" not in rd \
                or rd["_forward_hooks"] or rd["_forward_pre_hooks"] or rd["_backward_hooks"] \
                or rd["_backward_pre_hooks"] or "forward" in rd or "_conv_forward" in rd:
            return None
    except (KeyError, AttributeError):
        return None
    if _vouched.on:
        return False
    h = _hooks
    return bool(h._global_forward_hooks or h._global_forward_pre_hooks or h._global_backward_hooks
                or h._global_backward_pre_hooks) or _subtree_hooked(block)


def _plain_needed(block: nn.Module) -> bool:
    """A block runs its modules one by one, exactly as torchvision's forward does, when torch.fx traces
    it, any of its modules has hooks (see fastres.nn.plain_forward_needed), or its `relu` is not a plain
    nn.ReLU (replaced by another activation: the fused ReLU would stand in for a module that is not there).
    Checked on every call."""
    if untraced.on:
        answer = _untraced_plain_needed(block)
        if answer is not None:
            return answer
    # every module inside the block (its own hooks run anyway); a vouched model call checked them all
    return not is_plain_relu(block.relu) or (not _vouched.on and inner_plain_forward_needed(block))


def basic_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    if _plain_needed(block):
        return plain_block_forward(block, x)
    m = block._modules   # (each child from the table, read where torchvision's forward reads it)
    out = conv_bn_act_modules(x, m["conv1"] if "conv1" in m else block.conv1, m["bn1"] if "bn1" in m else block.bn1,
                              relu=True)
    return _last_stage(block, x, out, m["conv2"] if "conv2" in m else block.conv2,
                       m["bn2"] if "bn2" in m else block.bn2)


def bottleneck_forward(block: nn.Module, x: Tensor) -> Tensor:
    if _plain_needed(block):
        return plain_block_forward(block, x)
    m = block._modules
    out = conv_bn_act_modules(x, m["conv1"] if "conv1" in m else block.conv1, m["bn1"] if "bn1" in m else block.bn1,
                              relu=True)
    out = conv_bn_act_modules(out, m["conv2"] if "conv2" in m else block.conv2,
                              m["bn2"] if "bn2" in m else block.bn2, relu=True)
    return _last_stage(block, x, out, m["conv3"] if "conv3" in m else block.conv3,
                       m["bn3"] if "bn3" in m else block.bn3)


def _last_stage(block: nn.Module, x: Tensor, out: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor:
    """relu(bn(conv(out)) + shortcut(x)), the shortcut computed after everything before this pair, as
    torchvision computes it after bn2 / bn3: modules that draw random numbers in both branches (dropout
    wrapped around convs, MC-dropout) draw them in torchvision's order. A plain nn.Conv2d and BatchNorm
    draw none, so for them the shortcut goes first and its add runs inside the fused op."""
    if exact_pair(conv, bn) or draws_nothing(conv, bn):
        return conv_bn_act_modules(out, conv, bn, residual=shortcut_of(block, x), relu=True)
    y = conv_bn_act_modules(out, conv, bn)
    residual = shortcut_of(block, x)
    if residual is not None:
        y += residual   # (torchvision adds in place too)
    return torch.relu_(y)
