"""Fused conv-BN(-ReLU) modules and the function every fused block calls.

:func:`conv_bn_act_modules` runs an ``nn.Conv2d`` and an ``nn.BatchNorm2d`` (plus an optional
residual and ReLU) as one fused op, with exactly nn.BatchNorm2d's semantics: momentum,
momentum=None (cumulative average over num_batches_tracked), track_running_stats=False, affine=False,
eval mode, biased variance to normalise and unbiased variance in running_var. The modules keep their
parameters and buffers, so state_dicts, optimizers, ``.half()``, ``.to(memory_format=...)`` and
``nn.SyncBatchNorm.convert_sync_batchnorm`` keep working.

Cases the fused op does not express run the same modules unfused, and say so (DEBUG log on the
``fastres`` logger, counted in fastres.backend.calls as ("conv_bn_act", "forward", "unfused")):
a conv whose padding_mode is not "zeros" or whose padding is a string, a BatchNorm that is not a
BatchNorm2d, a subclass with its own forward (the fused op would skip it), and SyncBatchNorm while training across several processes (its statistics need a
collective; the conv and BN then run as the two modules, still exact).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import backends as backend
from fastres.ops.conv_bn_act import conv_bn_act

Tensor = torch.Tensor

__all__ = ["conv_bn_act_modules", "unfusable_reason", "FusedConvBN2d", "FusedConvBNReLU2d"]


def unfusable_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why (conv, bn) can never run as the fused op, or None when they can (structure only)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if not isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, nn.SyncBatchNorm):
        return f"{type(bn).__name__} is not an nn.BatchNorm2d"
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} has its own forward (the fused op would skip it)"
    if type(bn).forward not in (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward):
        return f"{type(bn).__name__} has its own forward (the fused op would skip it)"
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (only explicit padding is fused)"
    if conv.out_channels != bn.num_features:
        return f"conv has {conv.out_channels} output channels but BatchNorm has {bn.num_features} features"
    return None


def _needs_sync(bn: nn.Module) -> bool:
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(bn.process_group) > 1


def _unfused(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Optional[Tensor], relu: bool) -> Tensor:
    backend.calls[("conv_bn_act", "forward", "unfused")] += 1
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def conv_bn_act_modules(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Optional[Tensor] = None,
                        relu: bool = False) -> Tensor:
    """act(bn(conv(x)) (+ residual)), fused; bn's running statistics are updated as nn.BatchNorm2d does."""
    why = unfusable_reason(conv, bn)
    if why is None and _needs_sync(bn):
        why = "SyncBatchNorm training across processes"
    if why is not None:
        backend.log.debug("fastres conv_bn_act: running unfused: %s", why)
        return _unfused(x, conv, bn, residual, relu)
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")

    # nn.BatchNorm2d.forward's rules, step for step.
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return conv_bn_act(
        x, conv.weight, conv.bias, bn.weight, bn.bias,
        bn.running_mean if keep else None, bn.running_var if keep else None, residual,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        training=use_batch_stats, momentum=factor, eps=bn.eps, relu=relu)


class FusedConvBN2d(nn.Module):
    """nn.Conv2d followed by nn.BatchNorm2d (+ residual) (+ ReLU), run as one fused op.

    Holds a real ``conv`` (nn.Conv2d) and ``bn`` (nn.BatchNorm2d): the state_dict keys are
    ``conv.weight``, ``bn.weight``, ``bn.running_mean`` ... . ``forward(x, residual=None)`` adds
    `residual` after BatchNorm and before the ReLU.
    """

    relu_default = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, relu: Optional[bool] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **kw)
        self.relu = self.relu_default if relu is None else bool(relu)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: Optional[bool] = None) -> "FusedConvBN2d":
        """Wrap existing modules (their parameters are shared, not copied)."""
        why = unfusable_reason(conv, bn)
        if why is not None:
            raise ValueError(f"cannot fuse {type(conv).__name__} and {type(bn).__name__}: {why}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn = conv, bn
        self.relu = cls.relu_default if relu is None else bool(relu)
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return conv_bn_act_modules(x, self.conv, self.bn, residual, self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class FusedConvBNReLU2d(FusedConvBN2d):
    """FusedConvBN2d with the ReLU on by default."""

    relu_default = True
