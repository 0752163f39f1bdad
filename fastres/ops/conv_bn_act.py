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
the kernels through _ConvBNAct (directly in eager mode, through the custom ops when traced). In plain
eager mode those decisions are made once per key and remembered (the plans at the end of this file).
Inside, the BatchNorm arguments travel as one fastres.ops.common.BNSpec and the convolution's as one
checked ConvSpec (fastres.ops.conv_bn_act_checks), each flattened only where a backend function, a
custom op or _ConvBNAct is called.

What the forward saves for backward, and why:
* x, weight (and conv bias): convolution_backward needs them for dW and dx (eager conv saves them too).
* z, the pre-BN conv output (training only): xhat = (z - mean) * invstd for dgamma and dz. In eval
  mode z is recomputed in backward instead, as eval-mode backward is rare (frozen-BN fine-tuning).
* mask, only with ReLU: y > 0 packed as bits (1/16 of a bf16 y), so BN backward reads 1 bit per
  element for dReLU instead of y.
* mean, invstd: fp32 per channel, C floats each.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from fastres import backends as backend
from fastres.backends import torch as aten_backend
from fastres.errors import InputDtypeError
from fastres.layout import conv_out_shape, memory_format_of, stats_dtype
from fastres.ops.common import BNSpec, aten_reason, autocast_operands, differentiable_backward, eager, plain_eager
from fastres.ops.conv_bn_act_checks import ConvSpec, IntPair, conv_spec, explain

Tensor = torch.Tensor
OP = "conv_bn_act"


def _support_args(x: Tensor, weight: Tensor, residual: Optional[Tensor], stride, padding, dilation,
                  groups: int, training: bool, relu: bool) -> dict:
    """The keyword arguments of the backends' conv_bn_act_supports (the contract), flat: a ConvSpec is
    unpacked into this call."""
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
    autograd.Function; torch.compile traces through it.) Its arguments are the custom op's, flat: autograd
    tracks only top-level tensors (bn_weight, bn_bias), so a BNSpec is flattened where it is applied.

    In eager mode the backend's forward/backward run directly; under tracing through the custom ops.
    A backward run with autograd on (``create_graph=True``: double backward, gradient penalties, hvp)
    is computed by differentiating the same math as aten ops (fastres/backends/torch.py) from the saved
    inputs, so it can itself be differentiated."""

    @staticmethod
    def forward(ctx, choice, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                padding, dilation, groups, training, momentum, eps, relu):
        # choice: the _CallPlan conv_bn_act() took in plain eager mode (backend, x's format; it counted the
        # call), or the backend's name (traced, or a call the plans do not take): no second choice either way.
        if type(choice) is str:
            name, mod, fmt = choice, None, memory_format_of(x)
            save_mask = relu and any(ctx.needs_input_grad)
            args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                    dilation, groups, training, momentum, eps, relu, save_mask)
            if eager():
                mod = backend.module(name)
                y, z, mean, invstd, mask = mod.conv_bn_act_forward(*args)
            else:
                y, z, mean, invstd, mask = torch.ops.fastres.conv_bn_act(*args)
        else:   # (a plan only takes this Function when an input needs a gradient: the mask is needed)
            name, mod, fmt = choice.name, choice.mod, choice.fmt
            y, z, mean, invstd, mask = mod.conv_bn_act_forward(
                x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                dilation, groups, training, momentum, eps, relu, relu)
        ctx.backend, ctx.mod, ctx.fmt = name, mod, fmt
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
        ni = ctx.needs_input_grad   # (the first argument is the choice)
        needs = [ni[1], ni[2], has_bias and ni[3], has_gamma and ni[4], has_beta and ni[5], has_res and ni[8]]
        if grad_y is None or not any(needs):
            return (None,) * 17
        stride, padding, dilation, groups = ctx.conv
        if torch.is_grad_enabled():   # create_graph=True: differentiate the aten form (fastres.ops.common)
            dx, dw, db, dg, dbeta, dres = differentiable_backward(
                lambda rm, rv: aten_backend.conv_bn_act_aten(
                    x, weight, bias, bn_weight, bn_bias, rm, rv, residual, stride, padding, dilation, groups,
                    ctx.training, 0.0, ctx.eps, ctx.relu),
                ctx.running, (x, weight, bias, bn_weight, bn_bias, residual), needs, grad_y)
        else:
            if not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0:   # eager()
                # (count(), without its tracing checks: this is no trace)
                backend.calls[(OP, "backward", ctx.backend)] += 1
                mod = ctx.mod if ctx.mod is not None else backend.module(ctx.backend)
                grads = mod.conv_bn_act_backward(
                    grad_y.contiguous(memory_format=ctx.fmt), x, weight, bias, z, mask, mean, invstd, bn_weight,
                    stride, padding, dilation, groups, ctx.training, ctx.relu, needs)
            else:
                grads = torch.ops.fastres.conv_bn_act_backward(
                    grad_y, x, weight, bias, z, mask, mean, invstd, bn_weight, stride, padding, dilation, groups,
                    ctx.training, ctx.relu, needs)
            dx, dw, db, dg, dbeta, dres = [g if need else None for g, need in zip(grads, needs)]
        return (None, dx, dw, db, dg, dbeta, None, None, dres) + (None,) * 8


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
    checked first, then the kernels run through _ConvBNAct. (The BatchNorm arguments travel on as one
    BNSpec: :func:`run_conv_bn_act`; the convolution's as one ConvSpec, from the first decision inside.)
    """
    bn = BNSpec(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    return run_conv_bn_act(x, weight, bias, bn, residual, stride, padding, dilation, groups, relu)


def run_conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn: BNSpec, residual: Optional[Tensor],
                    stride: IntPair, padding: IntPair, dilation: IntPair, groups: int, relu: bool) -> Tensor:
    """:func:`conv_bn_act` with its BatchNorm arguments as one BNSpec (what fastres.nn's modules call).
    The conv arguments come as given (they key the plans: a ConvSpec's lists are not hashable) and
    become one ConvSpec at the first decision: the plan's, conv_spec() in _general, or (the torch
    backend, a 4-D input) conv_spec() on the way straight to aten. Each record is flattened where the
    backend, the custom op or _ConvBNAct is called."""
    if type(x) in _TENSOR_TYPES or isinstance(x, Tensor):
        try:
            name = backend.resolve_cached(OP, x.device)
        except backend.BackendUnavailableError:
            name = None   # (the general path below raises it, after the checks that come first)
        if name == "torch":
            if x.dim() == 4:   # (the general path explains any other rank)
                backend.count(OP, "forward", "torch")
                return _aten(x, weight, bias, bn, residual, conv_spec(stride, padding, dilation, groups), relu)
        elif name is not None and plain_eager():
            return _planned(name, x, weight, bias, bn, residual, stride, padding, dilation, groups, relu)
    return _general(x, weight, bias, bn, residual, stride, padding, dilation, groups, relu)


def _general(x, weight, bias, bn: BNSpec, residual, stride, padding, dilation, groups, relu) -> Tensor:
    """conv_bn_act decided afresh: the torch backend, tracing, and calls the plans do not take. The
    conv arguments as given become the call's one ConvSpec here."""
    conv = conv_spec(stride, padding, dilation, groups)
    if not isinstance(x, Tensor) or x.dim() != 4:
        explain(x, weight, bias, bn, residual, conv)
    if backend.resolve_cached(OP, x.device) != "torch":   # a fused backend is asked for: choose once
        name = backend.choose(OP, "forward", x.device, counted=eager(), aten_reason=aten_reason(x),
                              **_support_args(x, weight, residual, *conv, bn.training, relu))
        if name != "torch":
            return _fused(name, x, weight, bias, bn, residual, conv, relu)
    else:
        backend.count(OP, "forward", "torch")
    return _aten(x, weight, bias, bn, residual, conv, relu)


def _aten(x, weight, bias, bn: BNSpec, residual, conv: ConvSpec, relu) -> Tensor:
    """The call as aten ops (the torch backend, or a hand-over), its errors explained. The backend checks
    the residual's shape against the conv output before BatchNorm touches any state; only a call that
    raised is checked again, by explain(), for the error that says what was expected."""
    gamma, beta, running_mean, running_var, training, momentum, eps = bn
    stride, padding, dilation, groups = conv
    try:
        return aten_backend.conv_bn_act_aten(x, weight, bias, gamma, beta, running_mean, running_var, residual,
                                             stride, padding, dilation, groups, training, momentum, eps, relu)
    except (RuntimeError, ValueError, TypeError, IndexError):
        explain(x, weight, bias, bn, residual, conv)
        raise


def _fused(name, x, weight, bias, bn: BNSpec, residual, conv: ConvSpec, relu) -> Tensor:
    explain(x, weight, bias, bn, residual, conv)
    x, weight, bias, residual = autocast_operands(x.device.type, (x, weight, bias, residual))
    if residual is not None and residual.dtype != x.dtype:
        raise InputDtypeError(f"conv_bn_act: expected residual of the input's dtype {x.dtype}, got {residual.dtype}")
    gamma, beta, running_mean, running_var, training, momentum, eps = bn
    stride, padding, dilation, groups = conv
    if eager() and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, gamma, beta, residual))):
        # nothing to differentiate: the backend's forward directly, no autograd node, no ReLU mask
        return backend.module(name).conv_bn_act_forward(
            x, weight, bias, gamma, beta, running_mean, running_var, residual, stride, padding, dilation,
            int(groups), bool(training), float(momentum), float(eps), bool(relu), False)[0]
    return _ConvBNAct.apply(name, x, weight, bias, gamma, beta, running_mean, running_var, residual,
                            stride, padding, dilation, int(groups), bool(training), float(momentum),
                            float(eps), bool(relu))


# ---- plans: what a call decides, remembered per key ----------------------------------------------
# In plain eager mode (fastres.ops.common.plain_eager: read per call), everything conv_bn_act decides
# before its kernels run is a function of the key below: the conv arguments' checks and ConvSpec (the
# record each call of the key then carries), the input checks (metadata: explain), the backend's answer
# (supports: metadata, by the contract), the autocast dtype and the residual's dtype after it, whether
# an autograd node is needed (grad mode, requires_grad), and x's memory format after autocast (shape and
# strides). The key holds each tensor's (shape, strides, dtype, device, requires_grad), the backend
# module resolved for (op, device, the user's choice), grad mode, the autocast dtype, and the plain
# arguments as given. Nothing in a plan is derived from a tensor's values. A bad call raises while its
# plan is built, and is never remembered.

_TENSOR_TYPES = (Tensor, torch.nn.Parameter)   # (a type() test is cheaper than isinstance: these go first)
_PLANS: dict = {}
_MAX_PLANS = 4096


class _CallPlan(NamedTuple):
    name: str                            # the backend that runs the call ("torch" for a hand-over)
    mod: object                          # its module
    counted: Tuple[str, str, str]        # the key of fastres.backends.calls this call counts under
    why: Optional[str]                   # a hand-over's reason (logged per call, as choose() does)
    conv: ConvSpec                       # the checked conv arguments: the record each call of the key carries
    cast: Optional[torch.dtype]          # autocast's dtype for x, weight, bias and residual, or None
    autograd: bool                       # through _ConvBNAct (grad mode on, an input requires grad)
    fmt: torch.memory_format             # x's memory format (after autocast): grad_y's in backward


def _planned(name, x, weight, bias, bn: BNSpec, residual, stride, padding, dilation, groups, relu) -> Tensor:
    mod = backend.module(name)
    dev = x.device.type
    cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    grad = torch.is_grad_enabled()
    gamma, beta, running_mean, running_var, training, momentum, eps = bn
    tensors = (x, weight, bias, gamma, beta, running_mean, running_var, residual)
    try:
        key = (mod, grad, cast, stride, padding, dilation, groups, training, relu,
               *[None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors])
        plan = _PLANS[key]
    except KeyError:
        plan = None
    except (AttributeError, TypeError):   # a non-tensor argument, an unhashable conv argument (a list)
        return _general(x, weight, bias, bn, residual, stride, padding, dilation, groups, relu)
    if plan is None:
        plan = _plan(name, mod, cast, grad, x, weight, bias, bn, residual, stride, padding, dilation, groups, relu)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    backend.calls[plan.counted] += 1   # (count(), without its tracing checks: plain eager traces nothing)
    if plan.why is not None:
        backend.log_handover(OP, "forward", name, plan.why)
        return _aten(x, weight, bias, bn, residual, plan.conv, relu)
    if plan.cast is not None:
        dt = plan.cast
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        residual = None if residual is None else residual.to(dt)
    stride, padding, dilation, groups = plan.conv   # (the call's record, flattened for _ConvBNAct / the backend)
    if plan.autograd:
        return _ConvBNAct.apply(plan, x, weight, bias, gamma, beta, running_mean, running_var, residual, stride,
                                padding, dilation, groups, bool(training), float(momentum), float(eps), bool(relu))
    # nothing to differentiate: the backend's forward directly, no autograd node, no ReLU mask
    return plan.mod.conv_bn_act_forward(x, weight, bias, gamma, beta, running_mean, running_var, residual, stride,
                                        padding, dilation, groups, bool(training), float(momentum), float(eps),
                                        bool(relu), False)[0]


def _plan(name, mod, cast, grad, x, weight, bias, bn: BNSpec, residual, stride, padding, dilation, groups,
          relu) -> _CallPlan:
    """The decisions of _general for a call of this key, in its order, with its errors (which raise).
    The conv arguments as given become the ConvSpec every call of this key then carries."""
    conv = conv_spec(stride, padding, dilation, groups)
    if x.dim() != 4:
        explain(x, weight, bias, bn, residual, conv)
    why = aten_reason(x)   # (in plain eager mode: only meta tensors)
    if why is None:
        why = "; ".join(backend.reasons(name, OP, **_support_args(
            x, weight, residual, *conv, bn.training, relu))) or None
    if why is not None:   # handed to torch, as backend.choose() hands it
        return _CallPlan("torch", None, (OP, "forward", f"{name}->torch"), why, conv, None, False,
                         memory_format_of(x))
    explain(x, weight, bias, bn, residual, conv)
    x, weight, bias, residual = autocast_operands(x.device.type, (x, weight, bias, residual))
    if residual is not None and residual.dtype != x.dtype:
        raise InputDtypeError(f"conv_bn_act: expected residual of the input's dtype {x.dtype}, got {residual.dtype}")
    autograd = grad and any(t is not None and t.requires_grad for t in (x, weight, bias, bn.weight, bn.bias, residual))
    return _CallPlan(name, mod, (OP, "forward", name), None, conv, cast, autograd, memory_format_of(x))
