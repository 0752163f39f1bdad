"""conv_bn_act: conv2d + BatchNorm (+ residual added after BN) (+ ReLU) as one torch.library op.

Two custom ops, so that eager mode, torch.compile(fullgraph=True) and opcheck all see them, tied
together for autograd by the autograd.Function _ConvBNAct:

* ``fastres::conv_bn_act``          -> (y, z, mean, invstd, mask); mutates running_mean / running_var.
* ``fastres::conv_bn_act_backward`` -> (dx, dweight, dbias, dbn_weight, dbn_bias, dresidual).

Outputs are always fresh tensors (never an input, never each other); an output that is not needed
is a fresh empty tensor. Each dispatches at run time to the backend chosen in fastres.backends (the
math is written out in fastres/ops/reference.py). :func:`conv_bn_act` below is the function users and
modules call: on the torch backend it runs aten's ops directly (fastres/backends/torch.py); on a fused
backend it validates its inputs with errors that say what was expected, applies autocast, and runs
the kernels through _ConvBNAct (directly in eager mode, through the custom ops when traced).

What the forward saves for backward, and why:
* x, weight (and conv bias): convolution_backward needs them for dW and dx (eager conv saves them too).
* z, the pre-BN conv output (training only): xhat = (z - mean) * invstd for dgamma and dz. In eval
  mode z is recomputed in backward instead, as eval-mode backward is rare (frozen-BN fine-tuning).
* mask, only with ReLU: y > 0 packed as bits (1/16 of a bf16 y), so BN backward reads 1 bit per
  element for dReLU instead of y.
* mean, invstd: fp32 per channel, C floats each.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from fastres import backends as backend
from fastres.backends import torch as aten_backend
from fastres.errors import InputDtypeError, InputShapeError
from fastres.layout import conv_out_shape, memory_format_of, stats_dtype
from fastres.ops.common import aten_reason, autocast_operands, eager

Tensor = torch.Tensor
OP = "conv_bn_act"


def _support_args(x: Tensor, weight: Tensor, residual: Optional[Tensor], stride, padding, dilation,
                  groups: int, training: bool, relu: bool) -> dict:
    return dict(x=x, weight=weight, residual=residual, stride=stride, padding=padding,
                dilation=dilation, groups=groups, training=training, relu=relu)


@torch.library.custom_op("fastres::conv_bn_act", mutates_args=("running_mean", "running_var"))
def _conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                 bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 residual: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                 groups: int, training: bool, momentum: float, eps: float, relu: bool, save_mask: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, fn = backend.implementation(OP, "forward", x.device, **_support_args(
        x, weight, residual, stride, padding, dilation, groups, training, relu))
    return fn(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
              dilation, groups, training, momentum, eps, relu, save_mask)


def _new(like: Tensor, shape, dtype=None, fmt=torch.contiguous_format) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


@_conv_bn_act.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
      dilation, groups, training, momentum, eps, relu, save_mask):
    shape = conv_out_shape(x.shape, weight.shape, stride, padding, dilation)
    fmt = memory_format_of(x)
    y = _new(x, shape, fmt=fmt)
    z = _new(x, shape, fmt=fmt) if training else x.new_empty(0)
    stats = x.new_empty(shape[1], dtype=stats_dtype(x))
    nmask = (shape[0] * shape[1] * shape[2] * shape[3] + 7) // 8 if relu and save_mask else 0
    return y, z, stats, stats.clone(), x.new_empty(nmask, dtype=torch.uint8)


@torch.library.custom_op("fastres::conv_bn_act_backward", mutates_args=())
def _conv_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor,
                          mask: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                          stride: List[int], padding: List[int], dilation: List[int], groups: int,
                          training: bool, relu: bool, needs: List[bool]
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, fn = backend.implementation(OP, "backward", x.device, **_support_args(
        x, weight, None, stride, padding, dilation, groups, training, relu))
    return fn(grad_y.contiguous(memory_format=memory_format_of(x)), x, weight, bias, z, mask, mean, invstd,
              bn_weight, stride, padding, dilation, groups, training, relu, needs)


@_conv_bn_act_backward.register_fake
def _(grad_y, x, weight, bias, z, mask, mean, invstd, bn_weight, stride, padding, dilation, groups,
      training, relu, needs):
    def empty():
        return x.new_empty(0)

    pdtype = bn_weight.dtype if bn_weight is not None else stats_dtype(x)
    c = weight.shape[0]
    return (
        _new(x, x.shape, fmt=memory_format_of(x)) if needs[0] else empty(),
        _new(weight, weight.shape, fmt=memory_format_of(weight)) if needs[1] else empty(),
        bias.new_empty(bias.shape) if needs[2] and bias is not None else empty(),
        x.new_empty(c, dtype=pdtype) if needs[3] else empty(),
        x.new_empty(c, dtype=pdtype) if needs[4] else empty(),
        _new(x, grad_y.shape, fmt=memory_format_of(x)) if needs[5] else empty(),
    )


# FLOP formulas (torch.utils.flop_counter), so FlopCounterMode and the tools built on it (Lightning's
# measure_flops, MFU reports) count the convolutions of the fused backends as they count aten's.
# (On the torch backend the op is aten's own conv2d, counted by aten's formula.) BatchNorm, add and
# ReLU are not counted, as FlopCounterMode counts none of them for aten either.
@register_flop_formula(torch.ops.fastres.conv_bn_act)
def _conv_bn_act_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape[0], transposed=False)


@register_flop_formula(torch.ops.fastres.conv_bn_act_backward)
def _conv_bn_act_backward_flop(grad_y_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    needs = args[-1]  # dx and dW each cost one convolution (dgrad, wgrad)
    return conv_flop_count(x_shape, w_shape, grad_y_shape, transposed=False) * (int(needs[0]) + int(needs[1]))


class _ConvBNAct(torch.autograd.Function):
    """Autograd of conv_bn_act on a fused backend (triton, cuda). (An op that mutates its inputs - the
    running statistics - cannot take torch.library.register_autograd, so the op is wrapped in an
    autograd.Function; torch.compile traces through it.)

    In eager mode the backend's forward/backward run directly; under tracing through the custom ops.
    A backward run with autograd on (``create_graph=True``: double backward, gradient penalties, hvp)
    is computed by differentiating the same math as aten ops (fastres/backends/torch.py) from the saved
    inputs, so it can itself be differentiated."""

    @staticmethod
    def forward(ctx, name, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                padding, dilation, groups, training, momentum, eps, relu):
        save_mask = relu and any(ctx.needs_input_grad)
        args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                dilation, groups, training, momentum, eps, relu, save_mask)
        if eager():   # the backend conv_bn_act() chose (and counted): no second choice
            y, z, mean, invstd, mask = backend.module(name).conv_bn_act_forward(*args)
        else:
            y, z, mean, invstd, mask = torch.ops.fastres.conv_bn_act(*args)
        ctx.backend = name
        ctx.conv = (stride, padding, dilation, groups)
        ctx.training, ctx.relu, ctx.eps = training, relu, eps
        ctx.has = (bias is not None, bn_weight is not None, bn_bias is not None, residual is not None)
        # For a differentiable backward in eval mode: the running statistics used (not mutated in eval).
        ctx.running = None if training else (running_mean, running_var)
        ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, residual, z, mask, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, bn_weight, bn_bias, residual, z, mask, mean, invstd = ctx.saved_tensors
        has_bias, has_gamma, has_beta, has_res = ctx.has
        ni = ctx.needs_input_grad[1:]   # (the first argument is the backend's name)
        needs = [ni[0], ni[1], has_bias and ni[2], has_gamma and ni[3], has_beta and ni[4], has_res and ni[7]]
        if grad_y is None or not any(needs):
            return (None,) * 17
        stride, padding, dilation, groups = ctx.conv
        if torch.is_grad_enabled():
            dx, dw, db, dg, dbeta, dres = _differentiable_backward(
                ctx, grad_y, needs, x, weight, bias, bn_weight, bn_bias, residual)
        else:
            bargs = (grad_y, x, weight, bias, z, mask, mean, invstd, bn_weight, stride, padding, dilation,
                     groups, ctx.training, ctx.relu, needs)
            if eager():
                backend.count(OP, "backward", ctx.backend)
                grads = backend.module(ctx.backend).conv_bn_act_backward(
                    grad_y.contiguous(memory_format=memory_format_of(x)), *bargs[1:])
            else:
                grads = torch.ops.fastres.conv_bn_act_backward(*bargs)
            dx, dw, db, dg, dbeta, dres = (g if need else None for g, need in zip(grads, needs))
        return (None, dx, dw, db, dg, dbeta, None, None, dres) + (None,) * 8


def _differentiable_backward(ctx, grad_y, needs, x, weight, bias, bn_weight, bn_bias, residual):
    """The backward of conv_bn_act as a differentiable function of grad_y and of the inputs: the forward
    recomputed from the saved inputs as aten ops (batch statistics, running ones untouched, in
    training; the running statistics used in eval), differentiated with create_graph=True."""
    stride, padding, dilation, groups = ctx.conv
    rm, rv = ctx.running if ctx.running is not None else (None, None)
    leaves = (x, weight, bias, bn_weight, bn_bias, residual)
    wanted = [t for t, need in zip(leaves, needs) if need]
    with torch.enable_grad():
        y = aten_backend.conv_bn_act_aten(x, weight, bias, bn_weight, bn_bias, rm, rv, residual, stride,
                                          padding, dilation, groups, ctx.training, 0.0, ctx.eps, ctx.relu)
        got = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    return [next(got) if need else None for need in needs]


IntPair = Union[int, Sequence[int]]


class ConvSpec(NamedTuple):
    """The convolution's arguments as one typed record (what travels from a module to a backend;
    flattened only at the torch.library boundary, whose schema takes int[] lists)."""
    stride: List[int]
    padding: List[int]
    dilation: List[int]
    groups: int


def _pair(v: IntPair, name: str) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"conv_bn_act: {name} must be an int or a pair of ints, got {v!r}")
    return v


@functools.lru_cache(maxsize=1024)
def _spec(stride, padding, dilation, groups) -> ConvSpec:
    return ConvSpec(_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), groups)


def conv_spec(stride: IntPair, padding: IntPair, dilation: IntPair, groups: int) -> ConvSpec:
    """The checked ConvSpec of these arguments, remembered per value (a pure function of them). Its
    lists are shared between calls: nothing in fastres mutates them, and they never reach a user."""
    try:
        return _spec(stride if isinstance(stride, int) else tuple(stride),
                     padding if isinstance(padding, int) else tuple(padding),
                     dilation if isinstance(dilation, int) else tuple(dilation), groups)
    except TypeError:   # an unhashable element: checked (and rejected) without the cache
        return _spec.__wrapped__(stride, padding, dilation, groups)


def _check(x: Tensor, weight: Tensor, bias, bn_weight, bn_bias, running_mean, running_var, residual,
           stride, padding, dilation, groups: int, training: bool) -> None:
    """Raise the error that says what was expected for a bad call. What it checks is the tensors'
    metadata (shape, dtype, device), so a call that passed is remembered per metadata key (_checked);
    symbolic sizes (tracing) or non-tensor arguments are checked without it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"conv_bn_act: expected a 4-D tensor input (N, C, H, W), got {type(x).__name__}")
    tensors = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual)
    try:
        metas = [None if t is None else (t.shape, t.dtype, t.device) for t in tensors]
        _checked(*metas, tuple(stride), tuple(padding), tuple(dilation), groups, bool(training))
        return
    except (AttributeError, TypeError):   # (an unhashable key, or a bad call: checked again below)
        pass
    _check_tensors(*tensors, stride, padding, dilation, groups, training)


class _Meta:
    """A tensor's metadata standing in for it in _check_tensors (what the checks read)."""
    __slots__ = ("shape", "dtype", "device")

    def __init__(self, meta):
        self.shape, self.dtype, self.device = meta

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


@functools.lru_cache(maxsize=4096)
def _checked(*key) -> bool:
    metas, rest = key[:8], key[8:]
    _check_tensors(*(None if m is None else _Meta(m) for m in metas), *rest)
    return True


def _check_tensors(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                   stride, padding, dilation, groups: int, training: bool) -> None:
    if x.dim() != 4:
        raise InputShapeError(f"conv_bn_act: expected a 4-D input (N, C, H, W), got {x.dim()}-D input")
    if not x.is_floating_point():
        raise InputDtypeError(f"conv_bn_act: expected a floating-point input (float32, float16, bfloat16 or float64), "
                        f"got {x.dtype}")
    if weight.dim() != 4:
        raise InputShapeError(f"conv_bn_act: expected a 4-D weight (Cout, Cin/groups, kH, kW), got {weight.dim()}-D")
    if x.shape[1] != weight.shape[1] * groups:
        raise InputShapeError(f"conv_bn_act: expected input with {weight.shape[1] * groups} channels "
                         f"(weight {tuple(weight.shape)}, groups={groups}), got input of shape {tuple(x.shape)} "
                         f"with {x.shape[1]} channels")
    for name, t in (("weight", weight), ("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"conv_bn_act: expected {name} on the input's device {x.device}, got {t.device}")
    c = weight.shape[0]
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise InputShapeError(f"conv_bn_act: expected {name} of shape ({c},), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise InputShapeError("conv_bn_act: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise InputShapeError("conv_bn_act: eval mode (training=False) needs running_mean and running_var")
    shape = conv_out_shape(x.shape, weight.shape, stride, padding, dilation)
    if shape[2] <= 0 or shape[3] <= 0:
        raise InputShapeError(f"conv_bn_act: input {tuple(x.shape)} is too small for a {tuple(weight.shape[2:])} "
                         f"kernel with padding {padding}, dilation {dilation}")
    if residual is not None and list(residual.shape) != shape:
        raise InputShapeError(f"conv_bn_act: expected residual of shape {tuple(shape)} (the conv output), "
                         f"got {tuple(residual.shape)}")
    if training and shape[0] * shape[2] * shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(shape)}")


def explain(x: Tensor, weight: Tensor, bias, bn_weight, bn_bias, running_mean, running_var, residual,
            stride, padding, dilation, groups: int, training: bool) -> None:
    """Raise the error that says what was expected for a bad call (nothing when the call is good)."""
    _check(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
           dilation, groups, training)
    dev = x.device.type
    if not (dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)) and weight.dtype != x.dtype:
        raise InputDtypeError(f"conv_bn_act: expected weight of the input's dtype {x.dtype}, got {weight.dtype} "
                        f"(float32, float16, bfloat16 and float64 work; use autocast or convert the model "
                        f"with .to(dtype))")


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                bn_bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                running_var: Optional[Tensor] = None, residual: Optional[Tensor] = None, *,
                stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5, relu: bool = False) -> Tensor:
    """y = act(batch_norm(conv2d(x, weight, bias)) (+ residual)), in one fused op.

    training=True normalises with batch statistics and, when running_mean/running_var are given,
    updates them in place with `momentum` (the effective factor: pass 1/num_batches_tracked for a
    cumulative average). training=False normalises with the running statistics.
    Under autocast, x, weight, bias and residual are cast to the autocast dtype; BatchNorm
    parameters and statistics stay in their own dtype (fp32).

    On the torch backend this is aten's conv2d -> batch_norm -> add_ -> relu_ (autocast as aten does it);
    a bad call is explained by :func:`explain` when aten rejects it. On a fused backend the inputs are
    checked first, then the kernels run through _ConvBNAct.
    """
    stride, padding, dilation, groups = conv_spec(stride, padding, dilation, groups)
    if not isinstance(x, Tensor) or x.dim() != 4:
        explain(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                dilation, groups, training)
    if backend.resolve_cached(OP, x.device) != "torch":   # a fused backend is asked for: choose once
        name = backend.choose(OP, "forward", x.device, counted=eager(),
                              aten_reason=aten_reason(x), **_support_args(
                                  x, weight, residual, stride, padding, dilation, groups, training, relu))
        if name != "torch":
            return _fused(name, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                          padding, dilation, groups, training, momentum, eps, relu)
    else:
        backend.count(OP, "forward", "torch")
    if residual is not None and list(residual.shape) != conv_out_shape(x.shape, weight.shape, stride, padding,
                                                                       dilation):
        explain(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                dilation, groups, training)
    try:
        y = aten_backend.conv_bn_act_aten(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                          residual, stride, padding, dilation, groups, training, momentum,
                                          eps, relu)
    except (RuntimeError, ValueError, TypeError, IndexError):
        explain(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                dilation, groups, training)
        raise
    return y


def _fused(name, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
           dilation, groups, training, momentum, eps, relu) -> Tensor:
    explain(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
            dilation, groups, training)
    x, weight, bias, residual = autocast_operands(x.device.type, (x, weight, bias, residual))
    if residual is not None and residual.dtype != x.dtype:
        raise InputDtypeError(f"conv_bn_act: expected residual of the input's dtype {x.dtype}, got {residual.dtype}")
    if eager() and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, bn_weight, bn_bias, residual))):
        # nothing to differentiate: the backend's forward directly, no autograd node, no ReLU mask
        return backend.module(name).conv_bn_act_forward(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
            int(groups), bool(training), float(momentum), float(eps), bool(relu), False)[0]
    return _ConvBNAct.apply(name, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                            stride, padding, dilation, int(groups), bool(training), float(momentum),
                            float(eps), bool(relu))
