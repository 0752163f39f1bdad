"""The usual (conv, BN) pair of a fastres model call that found no module tracer, in one frame.

fastres.nn.conv_bn_act_modules decides each call afresh: a module's class, hooks, attributes and tensors
can change between calls, and the general path asks helpers for each (hooks, tracers, backend, counting,
BatchNorm's rules). On a CPU that code runs from cold caches after each convolution, where each call and
each object touched costs: 45 us per pair in a ResNet-18 forward at 224 px (2 cores), which made the default
path 2-3% slower than torchvision's. In a model call that asked once whether a module tracer runs
(fastres.module_calls.untraced) :func:`plain_pair` makes the general path's checks for the usual pair by
reads of the modules' own tables and runs the torch backend's aten ops (~9 us per pair); anything else, and
any call aten rejects, goes to the general path, which decides (and raises) as before.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.backends import cudnn as _cudnn

from fastres import backends as backend
from fastres.backends import torch as aten_backend
from fastres.backends.fold_cache import holding as _frozen_holding
from fastres.module_calls import _hooks, untraced
from fastres.nn_methods import BN_FORWARDS, CONV_CONV_FORWARD, CONV_FORWARD, F_BATCH_NORM, F_CONV2D, F_RELU
from fastres.ops.conv_bn_act import _TENSOR_TYPES, OP

Tensor = torch.Tensor

__all__ = ["plain_pair"]

_calls, _TORCH_FORWARD = backend.calls, (OP, "forward", "torch")


def plain_pair(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Optional[Tensor],
               relu: bool) -> Optional[Tensor]:
    """The usual call in a fastres model call that found no module tracer (fastres.module_calls.untraced), or
    None (the general path decides): an exact nn.Conv2d and nn.BatchNorm2d whose classes run torch's own
    forwards, no hooks (theirs or global), running statistics (eval; training: :func:`_train`), no frozen()
    context holding the BatchNorm, a CPU tensor (exactly torch.Tensor or a Parameter) and the torch backend
    chosen there: torchvision's aten ops (conv2d -> batch_norm -> add_ -> relu_) on the modules' live
    tensors, counted as the general path counts them (in eval, with F.batch_norm and F.relu torch's own, the
    ops they call for these tensors called directly: the same ops with the same arguments; a wrapper there
    is called). Every check the general path makes for such a call is a read of the modules' own tables. A
    bad call (aten raises) is left to the general path, which raises the error that explains it."""
    if type(bn) is not nn.BatchNorm2d or type(conv) is not nn.Conv2d:
        return None
    cd, bd, h = conv.__dict__, bn.__dict__, _hooks
    try:
        training = bd["training"]
        if (type(x) not in _TENSOR_TYPES or not x.is_cpu or not untraced.cpu_torch
                or (_frozen_holding and aten_backend.frozen_active(bn)) or nn.Conv2d.forward is not CONV_FORWARD
                or nn.Conv2d._conv_forward is not CONV_CONV_FORWARD or nn.BatchNorm2d.forward is not BN_FORWARDS[0]
                or cd["padding_mode"] != "zeros" or type(cd["padding"]) is str
                or cd["out_channels"] != bd["num_features"] or x.ndim != 4
                or h._global_forward_hooks or h._global_forward_pre_hooks or h._global_backward_hooks
                or h._global_backward_pre_hooks or cd["_forward_hooks"] or cd["_forward_pre_hooks"]
                or cd["_backward_hooks"] or cd["_backward_pre_hooks"] or bd["_forward_hooks"]
                or bd["_forward_pre_hooks"] or bd["_backward_hooks"] or bd["_backward_pre_hooks"]
                or "forward" in cd or "_conv_forward" in cd or "forward" in bd or "_conv_forward" in bd):
            return None
        cp, bp, bb = cd["_parameters"], bd["_parameters"], bd["_buffers"]
        rm, rv = bb["running_mean"], bb["running_var"]
        if rm is None or rv is None:
            return None
        if training:
            return _train(x, cd, bd, cp, bp, bb, rm, rv, residual, relu)
        if F.conv2d is not F_CONV2D or F.batch_norm is not F_BATCH_NORM or F.relu is not F_RELU \
                or F_CONV2D is None or F_BATCH_NORM is None or F_RELU is None:   # (wrapped: call them)
            y = aten_backend.conv_bn_act_aten(x, cp["weight"], cp["bias"], bp["weight"], bp["bias"], rm, rv,
                                              residual, cd["stride"], cd["padding"], cd["dilation"], cd["groups"],
                                              False, 0.0, bd["eps"], relu)
        else:   # torch's own F.batch_norm and F.relu: the ops they call for these tensors, without their frames
            z = F_CONV2D(x, cp["weight"], cp["bias"], cd["stride"], cd["padding"], cd["dilation"], cd["groups"])
            if residual is not None and residual.shape != z.shape:
                return None
            y = torch.batch_norm(z, bp["weight"], bp["bias"], rm, rv, False, 0.0, bd["eps"], _cudnn.enabled)
            if residual is not None:
                y.add_(residual)
            if relu:
                y = torch.relu_(y)
    except _BAD_CALL:   # (an attribute deleted or set elsewhere, a bad call: the general path)
        return None
    _calls[_TORCH_FORWARD] += 1   # (backend.count: no tracer runs)
    return y


# What a bad call raises (anything else, a checkpoint's stop of its recomputation among them, goes on up)
_BAD_CALL = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)


def _train(x, cd, bd, cp, bp, bb, rm, rv, residual, relu) -> Optional[Tensor]:
    """plain_pair's training call (batch statistics, running statistics updated with the module's
    momentum, num_batches_tracked moved before the op as nn.BatchNorm2d moves it), or None for the
    general path: momentum=None (the cumulative average), track_running_stats=False, no counter, and a
    call aten rejects (the count taken back first: the general path counts and raises as _counted says)."""
    tracked, momentum = bb["num_batches_tracked"], bd["momentum"]
    if tracked is None or momentum is None or bd["track_running_stats"] is not True:
        return None
    tracked.add_(1)
    try:
        y = aten_backend.conv_bn_act_aten(x, cp["weight"], cp["bias"], bp["weight"], bp["bias"], rm, rv, residual,
                                          cd["stride"], cd["padding"], cd["dilation"], cd["groups"], True, momentum,
                                          bd["eps"], relu)
    except _BAD_CALL:
        tracked.sub_(1)
        return None
    _calls[_TORCH_FORWARD] += 1
    return y
