"""The chains convert() can prove: consecutive (Conv2d, BatchNorm2d[, ReLU]) children of an nn.Sequential.

nn.Sequential's forward passes each child's output only to the next child, so such a run of children
is a provable conv -> BN (-> ReLU) chain. FusedSequential finds its chains from its current children at
every call, so SyncBatchNorm conversion, ``.to()`` and replaced children keep working (a replaced
child that no longer forms a chain simply runs on its own).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from fastres.nn import (
    bn_act_modules,
    conv_bn_act_modules,
    is_frozen_bn,
    is_plain_relu,
    module_hooked,
    unfusable_reason,
)

__all__ = ["pair_reason", "chain_at", "bn_chain_at", "FusedSequential", "run_chains"]


def pair_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why (conv, bn) cannot run as one fused op with exactly their own semantics, or None."""
    why = unfusable_reason(conv, bn)
    if why is not None:
        return why
    if module_hooked(conv) or module_hooked(bn):
        return "a hook is registered on the conv or the BatchNorm (the fused op would skip it)"
    return None


def chain_at(mods: List[nn.Module], i: int) -> Tuple[int, Optional[str]]:
    """(length of the fusable chain starting at mods[i]: 0, 2 (conv, bn) or 3 (conv, bn, relu),
    why mods[i], a Conv2d, starts no chain (None when it does, or when mods[i] is no Conv2d))."""
    if not isinstance(mods[i], nn.Conv2d):
        return 0, None
    if i + 1 >= len(mods):
        return 0, "the conv is the Sequential's last child: its output leaves the Sequential"
    nxt = mods[i + 1]
    if not isinstance(nxt, nn.modules.batchnorm._NormBase) and not is_frozen_bn(nxt):
        return 0, f"the conv is followed by {type(nxt).__name__}, not a BatchNorm2d"
    why = pair_reason(mods[i], nxt)
    if why is not None:
        return 0, why
    return (3 if i + 2 < len(mods) and is_plain_relu(mods[i + 2]) else 2), None


def bn_chain_at(mods: List[nn.Module], i: int) -> int:
    """2 when mods[i], mods[i + 1] are a plain BatchNorm2d and a plain nn.ReLU that no conv chain took
    (the pre-activation order BN -> ReLU -> conv): they run as the fused op bn_act; else 0."""
    bn = mods[i]
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm) or module_hooked(bn) or i + 1 >= len(mods):
        return 0
    return 2 if is_plain_relu(mods[i + 1]) else 0


class FusedSequential(nn.Sequential):
    """nn.Sequential whose (Conv2d, BatchNorm2d[, ReLU]) runs of children run as one fused op, and
    whose (BatchNorm2d, ReLU) pairs that follow no such conv run as the fused op bn_act.

    The chains are found at call time from the current children, so the module stays an honest
    Sequential after children are replaced (SyncBatchNorm conversion) or appended."""

    def forward(self, input):
        if torch.jit.is_scripting():   # TorchScript compiles nn.Sequential's loop: each child called
            return self.sequential_plain_forward(input)
        return run_chains(list(self._modules.values()), input)

    def sequential_plain_forward(self, input):
        for module in self:
            input = module(input)
        return input


def run_chains(mods: List[nn.Module], x):
    """nn.Sequential's forward over `mods` (each output goes only to the next module), with every
    (Conv2d, BatchNorm2d[, ReLU]) run that chain_at() accepts run as one fused op, and every
    (BatchNorm2d, ReLU) pair bn_chain_at() accepts as bn_act."""
    i = 0
    while i < len(mods):
        n, _ = chain_at(mods, i)
        if n:
            x = conv_bn_act_modules(x, mods[i], mods[i + 1], relu=n == 3)
            i += n
        elif bn_chain_at(mods, i):
            x = bn_act_modules(x, mods[i], relu=True)
            i += 2
        else:
            x = mods[i](x)
            i += 1
    return x
