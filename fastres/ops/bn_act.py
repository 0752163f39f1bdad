"""bn_act: BatchNorm (+ residual added after BN) (+ ReLU), no convolution, as one torch.library op.

For a BatchNorm that follows no fusable convolution: a conv the fused conv cannot take (another
padding mode, a subclass with its own forward, a conv with hooks) or a pre-activation BN -> ReLU.
The same kernels as conv_bn_act's BatchNorm part (the math: fastres/ops/reference.py, z = x):

* ``fastres::bn_act``          -> (y, mean, invstd, mask); mutates running_mean / running_var.
* ``fastres::bn_act_backward`` -> (dx, dbn_weight, dbn_bias, dresidual).

On the torch backend :func:`bn_act` runs aten's batch_norm -> add_ -> relu_ (torchvision's ops). On a
fused backend the call chooses its backend once (fastres.backends.choose) and runs the kernels through
_BNAct, directly in eager mode and through the custom ops when traced. Saved for backward: x (it is
z), the fp32 mean and invstd, and the 1-bit ReLU mask. Inside, the BatchNorm arguments travel as one
fastres.ops.common.BNSpec, flattened where a backend function, a custom op or _BNAct is called.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastres import backends as backend
from fastres.backends import torch as aten_backend
from fastres.errors import InputDtypeError, InputShapeError, dtype_error
from fastres.layout import memory_format_of, stats_dtype
from fastres.ops.common import BNSpec, aten_reason, autocast_operands, differentiable_backward, eager

Tensor = torch.Tensor
OP = "bn_act"


def _support_args(x: Tensor, residual: Optional[Tensor], training: bool, relu: bool) -> dict:
    return dict(x=x, residual=residual, training=training, relu=relu)


@torch.library.custom_op("fastres::bn_act", mutates_args=("running_mean", "running_var"))
def _bn_act(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
            running_var: Optional[Tensor], residual: Optional[Tensor], training: bool, momentum: float, eps: float,
            relu: bool, save_mask: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _, fn = backend.implementation(OP, "forward", x.device, **_support_args(x, residual, training, relu))
    return fn(x, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, eps, relu, save_mask)


@_bn_act.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, eps, relu, save_mask):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    stats = x.new_empty(x.shape[1], dtype=stats_dtype(x))
    return y, stats, stats.clone(), x.new_empty((x.numel() + 7) // 8 if relu and save_mask else 0, dtype=torch.uint8)


@torch.library.custom_op("fastres::bn_act_backward", mutates_args=())
def _bn_act_backward(grad_y: Tensor, x: Tensor, mask: Tensor, mean: Tensor, invstd: Tensor,
                     bn_weight: Optional[Tensor], training: bool, relu: bool, needs: List[bool]
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _, fn = backend.implementation(OP, "backward", x.device, **_support_args(x, None, training, relu))
    return fn(grad_y.contiguous(memory_format=memory_format_of(x)), x, mask, mean, invstd, bn_weight, training,
              relu, needs)


@_bn_act_backward.register_fake
def _(grad_y, x, mask, mean, invstd, bn_weight, training, relu, needs):
    pdtype = bn_weight.dtype if bn_weight is not None else stats_dtype(x)
    c, fmt = x.shape[1], memory_format_of(x)

    def like_x(need: bool) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need else x.new_empty(0)
    return (like_x(needs[0]), x.new_empty(c if needs[1] else 0, dtype=pdtype),
            x.new_empty(c if needs[2] else 0, dtype=pdtype), like_x(needs[3]))


class _BNAct(torch.autograd.Function):
    """Autograd of bn_act on a fused backend (an op that mutates the running statistics cannot take
    register_autograd). A create_graph backward differentiates the aten form instead. Its arguments are
    the custom op's, flat (autograd tracks only top-level tensors): a BNSpec is flattened where it is applied."""

    @staticmethod
    def forward(ctx, name, x, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, eps,
                relu):
        save_mask = relu and any(ctx.needs_input_grad)
        args = (x, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, eps, relu, save_mask)
        if eager():   # the backend bn_act() chose (and counted)
            y, mean, invstd, mask = backend.module(name).bn_act_forward(*args)
        else:
            y, mean, invstd, mask = torch.ops.fastres.bn_act(*args)
        ctx.backend, ctx.training, ctx.relu, ctx.eps = name, training, relu, eps
        ctx.running = None if training else (running_mean, running_var)
        ctx.has = (bn_weight is not None, bn_bias is not None, residual is not None)
        ctx.save_for_backward(x, bn_weight, bn_bias, residual, mask, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, bn_weight, bn_bias, residual, mask, mean, invstd = ctx.saved_tensors
        ni = ctx.needs_input_grad[1:]   # (the first argument is the backend's name)
        has_gamma, has_beta, has_res = ctx.has
        needs = [ni[0], has_gamma and ni[1], has_beta and ni[2], has_res and ni[5]]
        if grad_y is None or not any(needs):
            return (None,) * 11
        if torch.is_grad_enabled():   # create_graph=True: differentiate the aten form (fastres.ops.common)
            dx, dg, db, dres = differentiable_backward(
                lambda rm, rv: aten_backend.bn_act_aten(x, bn_weight, bn_bias, rm, rv, residual, ctx.training, 0.0,
                                                        ctx.eps, ctx.relu),
                ctx.running, (x, bn_weight, bn_bias, residual), needs, grad_y)
        else:
            bargs = (grad_y, x, mask, mean, invstd, bn_weight, ctx.training, ctx.relu, needs)
            if eager():
                backend.count(OP, "backward", ctx.backend)
                grads = backend.module(ctx.backend).bn_act_backward(
                    grad_y.contiguous(memory_format=memory_format_of(x)), *bargs[1:])
            else:
                grads = torch.ops.fastres.bn_act_backward(*bargs)
            dx, dg, db, dres = (g if need else None for g, need in zip(grads, needs))
        return (None, dx, dg, db, None, None, dres) + (None,) * 4


def _check(x: Tensor, bn: BNSpec, residual) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"bn_act: expected a 4-D tensor input (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")   # nn.BatchNorm2d's error
    if not x.is_floating_point():
        raise dtype_error(f"bn_act: expected a floating-point input, got {x.dtype}", x.dtype)
    c = x.shape[1]
    for name, t in (("bn_weight", bn.weight), ("bn_bias", bn.bias), ("running_mean", bn.running_mean),
                    ("running_var", bn.running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise InputShapeError(f"bn_act: expected {name} of shape ({c},) for an input with {c} channels, "
                                  f"got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise RuntimeError(f"bn_act: expected {name} on the input's device {x.device}, got {t.device}")
    if (bn.running_mean is None) != (bn.running_var is None):
        raise InputShapeError("bn_act: running_mean and running_var must be given together")
    if not bn.training and bn.running_mean is None:
        raise InputShapeError("bn_act: eval mode (training=False) needs running_mean and running_var")
    if residual is not None and residual.shape != x.shape:
        raise InputShapeError(f"bn_act: expected residual of shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if bn.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def bn_act(x: Tensor, bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
           running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
           residual: Optional[Tensor] = None, *, training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
           relu: bool = False) -> Tensor:
    """y = act(batch_norm(x) (+ residual)), in one fused op (running statistics as conv_bn_act's)."""
    return run_bn_act(x, BNSpec(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps), residual,
                      relu)


def run_bn_act(x: Tensor, bn: BNSpec, residual: Optional[Tensor], relu: bool) -> Tensor:
    """:func:`bn_act` with its BatchNorm arguments as one BNSpec (what fastres.nn's modules call), flattened
    where the backend, the custom op or _BNAct is called."""
    if isinstance(x, Tensor) and residual is not None and residual.shape != x.shape:
        _check(x, bn, residual)   # (the add would broadcast)
    gamma, beta, running_mean, running_var, training, momentum, eps = bn
    if isinstance(x, Tensor) and backend.resolve_cached(OP, x.device) != "torch":
        name = backend.choose(OP, "forward", x.device, counted=eager(), aten_reason=aten_reason(x),
                              **_support_args(x, residual, training, relu))
        if name != "torch":
            _check(x, bn, residual)
            x, residual = autocast_operands(x.device.type, (x, residual))
            if residual is not None and residual.dtype != x.dtype:
                raise InputDtypeError(f"bn_act: expected residual of the input's dtype {x.dtype}, got {residual.dtype}")
            if eager() and not (torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (x, gamma, beta, residual))):
                return backend.module(name).bn_act_forward(x, gamma, beta, running_mean, running_var, residual,
                                                           bool(training), float(momentum), float(eps), bool(relu),
                                                           False)[0]
            return _BNAct.apply(name, x, gamma, beta, running_mean, running_var, residual, bool(training),
                                float(momentum), float(eps), bool(relu))
    else:
        backend.count(OP, "forward", "torch")
    try:
        return aten_backend.bn_act_aten(x, gamma, beta, running_mean, running_var, residual, training, momentum, eps,
                                        relu)
    except (RuntimeError, ValueError, TypeError, IndexError):
        _check(x, bn, residual)
        raise
