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
BatchNorm2d, a subclass with its own forward or a torch.nn class whose forward was patched
(fastres.nn_methods: the fused op would skip it), modules with hooks and the tracers that record module
calls (the modules must be called), and SyncBatchNorm while training across
several processes (its statistics need a collective; the conv and BN then run as the two modules,
still exact). torchvision's FrozenBatchNorm2d runs fused, as an eval-mode BatchNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import backends as backend
from fastres.backends import torch as aten_backend
from fastres.backends.common import pair_tensors
from fastres.errors import InputShapeError
from fastres.module_calls import (  # noqa: F401  (re-exported: where fastres's layers have always found them)
    _pair_hooked,
    global_hooks,
    hooked,
    inner_plain_forward_needed,
    is_fx_tracing,
    module_hooked,
    plain_forward_needed,
    tracing_modules,
    untraced,
)
from fastres.nn_methods import (
    BN_FORWARDS,
    CONV_CONV_FORWARD,
    CONV_FORWARD,
    RELU_FORWARD,
    bn_unpatched,
    conv_unpatched,
    frozen_bn_class,
    functions_unpatched,
    is_frozen_bn,
)
from fastres.ops.bn_act import run_bn_act
from fastres.ops.common import BNSpec, aten_reason
from fastres.ops.conv_bn_act import run_conv_bn_act
from fastres.plain_pair import plain_pair

Tensor = torch.Tensor


_vouched = aten_backend.vouched

__all__ = ["conv_bn_act_modules", "bn_act_modules", "unfusable_reason", "draws_nothing", "exact_pair", "hooked",
           "module_hooked", "global_hooks", "plain_forward_needed", "inner_plain_forward_needed", "is_plain_relu",
           "tracing_modules", "frozen_bn_class", "is_frozen_bn", "FusedConvBN2d", "FusedConvBNReLU2d"]


def exact_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether (conv, bn) is exactly an nn.Conv2d and an nn.BatchNorm2d whose classes run torch's own
    forwards (the usual pair: a few reads, no calls)."""
    return type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and nn.Conv2d.forward is CONV_FORWARD \
        and nn.Conv2d._conv_forward is CONV_CONV_FORWARD and nn.BatchNorm2d.forward is BN_FORWARDS[0] \
        and CONV_FORWARD is not None and CONV_CONV_FORWARD is not None and BN_FORWARDS[0] is not None


def draws_nothing(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether (conv, bn) is an exact nn.Conv2d and a BatchNorm (nn.BatchNorm2d, nn.SyncBatchNorm,
    torchvision's FrozenBatchNorm2d): modules that draw no random numbers, so a block may compute its
    shortcut before them (and fuse its add) without changing the order of random draws."""
    return type(conv) is nn.Conv2d and conv_unpatched(conv) and bn_unpatched(bn) and (
        type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) or is_frozen_bn(bn))


def unfusable_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why (conv, bn) can never run as the fused op, or None when they can (structure only)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    frozen = is_frozen_bn(bn)
    if not frozen and not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return f"{type(bn).__name__} is not an nn.BatchNorm2d"
    if not conv_unpatched(conv):
        return f"{type(conv).__name__} has its own forward (the fused op would skip it)"
    if not bn_unpatched(bn):
        return f"{type(bn).__name__} has its own forward (the fused op would skip it)"
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (only explicit padding is fused)"
    n_features = bn.weight.shape[0] if frozen else bn.num_features
    if conv.out_channels != n_features:
        return f"conv has {conv.out_channels} output channels but BatchNorm has {n_features} features"
    return None


def _needs_sync(bn: nn.Module) -> bool:
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(bn.process_group) > 1


def _unfused(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Optional[Tensor], relu: bool) -> Tensor:
    """The conv as its module; the BatchNorm (+ residual) (+ ReLU) after it as the fused op bn_act when
    the BatchNorm allows it (bn_act_modules decides: otherwise the module runs as itself)."""
    backend.count("conv_bn_act", "forward", "unfused")
    return bn_act_modules(conv(x), bn, residual, relu)


def is_plain_relu(m: object) -> bool:
    """Whether `m` is a ReLU a fused op may stand in for: nn.ReLU's own forward, no hooks. Blocks check
    it on every call, so a ReLU swapped for another activation (SiLU, GELU, LeakyReLU ...) runs as itself,
    and so does one whose forward could not run (its `inplace` deleted: nn.ReLU's AttributeError)."""
    return isinstance(m, nn.Module) and type(m).forward is RELU_FORWARD is not None and not module_hooked(m) \
        and "inplace" in m.__dict__


def conv_bn_act_modules(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Optional[Tensor] = None,
                        relu: bool = False) -> Tensor:
    """act(bn(conv(x)) (+ residual)), fused; bn's running statistics are updated as nn.BatchNorm2d does.

    Runs the two modules themselves (exact, hooks honoured) when they cannot be fused, carry hooks, are
    being traced by torch.fx, or are a SyncBatchNorm training across processes. All of it is checked on
    every call (a module's attributes, hooks and class can change between calls), except what a vouched
    model call checked once for all its layers (fastres.backends.torch.conv_bn_act_vouched)."""
    if _vouched.on:
        y = aten_backend.conv_bn_act_vouched(x, conv, bn, residual, relu)
        if y is not None:
            backend.count("conv_bn_act", "forward", "torch")
            return y
    elif untraced.on:
        y = plain_pair(x, conv, bn, residual, relu)
        if y is not None:
            return y
    if exact_pair(conv, bn):
        # The usual pair, checked by attribute reads: unfusable_reason's structural checks (its class
        # checks hold by the exact types), plain_forward_needed (no SyncBatchNorm, no frozen BN here).
        why = (None if conv.padding_mode == "zeros" and type(conv.padding) is not str
               and conv.out_channels == bn.num_features else unfusable_reason(conv, bn))
        if why is None and (_pair_hooked(conv, bn) or (not untraced.on and tracing_modules())):
            why = "hooks, or a module tracer (torch.fx, torch.jit.trace, torch.export)"
        frozen, plain = False, True
    else:
        plain = False
        why = unfusable_reason(conv, bn)
        if why is None and plain_forward_needed(conv, bn):
            why = "hooks, or a module tracer (torch.fx, torch.jit.trace, torch.export)"
        if why is None and _needs_sync(bn):
            why = "SyncBatchNorm training across processes"
        frozen = why is None and is_frozen_bn(bn)
    if why is not None:
        if not torch.compiler.is_compiling() and not is_fx_tracing():
            backend.log.debug("fastres conv_bn_act: running unfused: %s", why)
        return _unfused(x, conv, bn, residual, relu)
    if not isinstance(x, Tensor):   # (a list, a NumPy array ...: the conv module raises torchvision's TypeError)
        return _unfused(x, conv, bn, residual, relu)
    if x.ndim != 4:
        if x.ndim == 3:   # conv2d takes an unbatched input; nn.BatchNorm2d then rejects it with this error
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        raise InputShapeError(f"expected a 4-D input (N, C, H, W) for {type(conv).__name__}, got {x.dim()}-D input "
                              f"of shape {tuple(x.shape)}")
    if frozen:  # always eval-mode BatchNorm with its buffers as the affine parameters
        return _eval(x, conv, bn, residual, relu, bn.eps)
    weight, bias, gamma, beta, rm, rv, tracked = (
        pair_tensors(conv, bn) if plain else
        (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
         getattr(bn, "num_batches_tracked", None)))
    batch_stats, keep, factor, count = _bn_rules(bn, tracked, rm, rv)
    if not batch_stats:
        return _eval(x, conv, bn, residual, relu, bn.eps, (weight, bias, gamma, beta, rm, rv))
    bn_spec = BNSpec(gamma, beta, rm if keep else None, rv if keep else None, True, factor, bn.eps)
    if not count:
        return run_conv_bn_act(x, weight, bias, bn_spec, residual, conv.stride, conv.padding, conv.dilation,
                               conv.groups, relu)
    tracked.add_(1)   # before the op, as nn.BatchNorm2d (see _counted)
    return _counted(tracked, run_conv_bn_act, x, weight, bias, bn_spec, residual, conv.stride, conv.padding,
                    conv.dilation, conv.groups, relu)


def _counted(tracked: Tensor, op, *args) -> Tensor:
    """op(*args) after num_batches_tracked (`tracked`) has moved, as nn.BatchNorm2d moves it before its
    batch_norm: a recomputation that stops once it has remade what backward needs (non-reentrant
    torch.utils.checkpoint) has counted its batch, as torchvision's has. A call the op rejects as a bad
    input (a RuntimeError, TypeError or IndexError: torchvision's conv raises those before its BatchNorm
    runs) takes the count back; BatchNorm's own ValueError ("Expected more than 1 value per channel when
    training") keeps it, as nn.BatchNorm2d, which counts before it raises."""
    try:
        return op(*args)
    except (RuntimeError, TypeError, IndexError):   # (fastres's InputShapeError is a RuntimeError)
        tracked.sub_(1)
        raise


def _bn_rules(bn: nn.Module, tracked: Optional[Tensor], running_mean: Optional[Tensor],
              running_var: Optional[Tensor]):
    """nn.BatchNorm2d.forward's rules, step for step, as (use batch statistics, keep running statistics,
    the effective momentum, whether num_batches_tracked moves). It moves just before the op runs (and
    back if the op rejects the call: _counted), so the momentum=None factor is computed with its next
    value. tracked, running_mean, running_var: bn's, as this call read them."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    count = bn.training and bn.track_running_stats and tracked is not None
    if count and bn.momentum is None:
        factor = 1.0 / (float(tracked) + 1.0)
    batch_stats = bn.training or (running_mean is None and running_var is None)
    keep = not bn.training or bn.track_running_stats
    return batch_stats, keep, factor, count


def bn_act_modules(x: Tensor, bn: nn.Module, residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """act(bn(x) (+ residual)) as the fused op bn_act, with nn.BatchNorm2d's semantics, for a BatchNorm
    no fusable conv precedes. The module itself runs (exact) when it is no plain BatchNorm2d (or its class's
    forward is patched), has hooks, a module tracer runs, or it is a SyncBatchNorm training across processes."""
    plain = (type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) or is_frozen_bn(bn)) and bn_unpatched(bn)
    if not plain or plain_forward_needed(bn) or _needs_sync(bn):
        backend.count("bn_act", "forward", "unfused")
        y = bn(x)
        if residual is not None:
            y = y + residual
        return F.relu(y) if relu else y
    if is_frozen_bn(bn):
        return run_bn_act(x, BNSpec(bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0, bn.eps),
                          residual, relu)
    batch_stats, keep, factor, count = _bn_rules(bn, bn.num_batches_tracked, bn.running_mean, bn.running_var)
    bn_spec = BNSpec(bn.weight, bn.bias, bn.running_mean if keep else None, bn.running_var if keep else None,
                  batch_stats, factor, bn.eps)
    if not count:
        return run_bn_act(x, bn_spec, residual, relu)
    tracked = bn.num_batches_tracked
    tracked.add_(1)   # before the op, as nn.BatchNorm2d (see _counted)
    return _counted(tracked, run_bn_act, x, bn_spec, residual, relu)


def _eval(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool, eps: float,
          tensors: Optional[tuple] = None) -> Tensor:
    """Eval-mode BatchNorm (running statistics): the fused op, which on the torch backend is torchvision's
    own conv2d -> batch_norm -> add -> relu, read from the live tensors on every call (`tensors`: conv.weight,
    conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var as this call read them). Inside
    :func:`fastres.frozen` the torch backend folds BatchNorm into the conv once instead
    (fastres.backends.torch.conv_bn_act_frozen)."""
    if aten_backend.frozen_active(bn) and not torch.compiler.is_compiling() and aten_reason(x) is None \
            and functions_unpatched() and backend.resolve_cached("conv_bn_act", x.device) == "torch":
        y = aten_backend.conv_bn_act_frozen(x, conv, bn, eps, residual, relu)
        if y is not None:
            backend.count("conv_bn_act", "forward", "torch")
            return y
    if tensors is None:
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    weight, bias, gamma, beta, rm, rv = tensors
    bn_spec = BNSpec(gamma, beta, rm, rv, False, 0.0, eps)
    return run_conv_bn_act(x, weight, bias, bn_spec, residual, conv.stride, conv.padding, conv.dilation, conv.groups,
                           relu)


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
        if torch.jit.is_scripting():   # TorchScript compiles the modules one by one (fastres.models.plain)
            return self.plain_forward(x, residual)
        mods = self._modules   # (self.conv and self.bn, which Module.__setattr__ keeps here)
        return conv_bn_act_modules(x, mods["conv"], mods["bn"], residual, self.relu)

    def plain_forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """conv, bn, (+ residual), (ReLU), each module called (fastres.unfuse's PlainConvBN2d.forward)."""
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        if self.relu:
            y = F.relu(y)
        return y

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class FusedConvBNReLU2d(FusedConvBN2d):
    """FusedConvBN2d with the ReLU on by default."""

    relu_default = True
