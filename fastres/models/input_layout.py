"""Inside fastres.frozen, CPU inference in channels_last for the NCHW input users have.

On a CPU, PyTorch's convolutions (oneDNN) work in a channels-last layout. Inside ``fastres.frozen(model)``
the torch backend runs each folded conv + BN (+ add) (+ ReLU) as one oneDNN convolution with a prepacked
weight, but only on channels_last data (fastres/backends/torch.py: measured 1.2-1.5x aten's eval there;
slower on NCHW). So an NCHW image is converted once at the model's input; every layer after it keeps
channels_last, and the model's output (the logits: 2-D) has no layout: the user sees what torchvision
returns, within the house rule (the fold's own rounding, as frozen() documents).

Only inside frozen(): outside it, a channels_last input meets the live NCHW weights, and aten's
convolution then copies each 3x3 / 7x7 weight to channels_last on every call (seen in torch.profiler
as aten::contiguous -> aten::clone), which costs more than it saves at small batches.

Converted only when nobody can see an intermediate tensor or its layout, checked on every call (a walk
over the modules, ~0.1 ms on 2 cores against tens of milliseconds of convolutions); otherwise the model
runs on the input as given, as torchvision would:

* a CPU float32 tensor (exactly torch.Tensor, no subclass such as a FakeTensor), 4-D, NCHW-contiguous
  (converted) or channels_last (kept);
* inference: the model and every submodule in eval mode (but those whose forward never reads it: convs,
  ReLUs, pools, Linear, Identity, Flatten, Sequential), gradients off (torch.no_grad /
  torch.inference_mode) and no forward-mode AD level open, so no gradient or tangent comes back in
  another layout (or is lost); no autocast;
* not traced or transformed: not torch.compile / torch.export, torch.jit.trace, torch.fx, torch.func;
* the model's stem BatchNorm (bn1) inside an active fastres.frozen context;
* every submodule of a type whose code fastres knows (:func:`allow`: the fused blocks, nn.Conv2d,
  nn.BatchNorm2d, nn.ReLU, pools, nn.Linear ...), none with a forward (or a conv's _conv_forward) replaced
  on the instance, torch's own
  forwards on nn.Conv2d, nn.BatchNorm2d, nn.ReLU and nn.Linear (fastres.nn.nn_methods_unpatched), and no
  module hook anywhere: a hook or a user's own code (a swapped head, a replaced activation, a patched
  forward) sees exactly the tensors torchvision would give it; F.conv2d, F.batch_norm and F.relu torch's
  own (fastres.nn_methods.functions_unpatched: a wrapper there sees the calls torchvision makes);
* the torch backend chosen for conv_bn_act on the CPU;
* no NaN and no infinity in the input: a vouched call fuses each ReLU into its convolution as oneDNN's
  post-op, which turns a NaN into 0 where torch.relu keeps it; an unvouched call's ReLUs are aten's, so
  a NaN or an infinity in the input comes out as torchvision gives it (every fold is finite too:
  fastres.backends.fold_cache). A NaN that first arises inside the network (an fp32 overflow of finite
  activations) is not seen: fastres.frozen's contract.

The same check vouches for the whole call (:func:`inference_call`, :class:`vouch`): while the model's body
runs, its (conv, BN) pairs skip the per-layer checks it made for all of them, which on ResNet-50 at batch 8
cost about as much host time as a tenth of its convolutions (fastres/backends/torch.py,
conv_bn_act_vouched). Each layer still checks what may differ between layers, and every fold is
still validated on every call by the cache's own rules.
"""
from __future__ import annotations

import math
from typing import Set, Tuple

import torch
import torch.autograd.forward_ad as _fwd_ad
import torch.nn as nn
import torch.nn.functional as F

from fastres import backends as backend
from fastres._native import cpu as _native  # (None without the built extension)
from fastres.backends import torch as aten_backend
from fastres.module_calls import tracing_modules
from fastres.module_calls import untraced as _untraced
from fastres.nn import FusedConvBN2d, FusedConvBNReLU2d
from fastres.nn_methods import functions_unpatched, nn_methods_unpatched, own_method
from fastres.ops.common import functorch_active

Tensor = torch.Tensor

__all__ = ["allow", "call_ok", "classify", "features", "head", "inference_call", "inference_input", "vouch", "vouched"]

_ALLOWED: Set[type] = {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear,
                       nn.Sequential, nn.Identity, nn.Dropout, nn.Flatten, FusedConvBN2d, FusedConvBNReLU2d}

# Classes whose forward (torch's own: the nn methods are checked, the rest have no training branch) never
# reads `training`: a module of these left in train mode (an nn.Identity head set after model.eval(), as
# feature extractors do) changes nothing and is no reason to give up the vouched call.
_TRAINING_FREE: Set[type] = {nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Sequential,
                             nn.Identity, nn.Flatten}

_mm = torch.nn.modules.module  # where the global module hooks live
_vouched = aten_backend.vouched
_CPU = torch.device("cpu")


def allow(*classes: type) -> None:
    """Declare module classes whose forward keeps working on channels_last input and shows no
    intermediate tensor (fastres's blocks and fused layers register themselves)."""
    _ALLOWED.update(classes)


def _tensor_ok(x) -> bool:
    """A CPU float32 4-D tensor (exactly torch.Tensor) in NCHW or channels_last."""
    return (type(x) is Tensor and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)))


def _context_ok() -> bool:
    return not (torch.is_grad_enabled() or _fwd_ad._current_level >= 0 or torch.is_autocast_enabled("cpu")
                or torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
                or functorch_active() or _mm._global_forward_hooks or _mm._global_forward_pre_hooks
                or _mm._global_backward_hooks or _mm._global_backward_pre_hooks)


def _stem_frozen(model: nn.Module) -> bool:
    bn = model._modules.get("bn1")
    return bn is not None and aten_backend.frozen_active(bn)


def _modules_ok(model: nn.Module) -> bool:
    """The module checks of the list above, over model.modules() (walked through the `_modules` tables:
    a third of the time of the modules() generator on ResNet-50's 160 modules)."""
    allowed = _ALLOWED
    seen = {id(model)}
    stack = [model]
    while stack:
        m = stack.pop()
        if (m is not model and (type(m) not in allowed or (m.training and type(m) not in _TRAINING_FREE)
                                or "forward" in m.__dict__
                                or "_conv_forward" in m.__dict__)) \
                or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
        for c in m._modules.values():
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                stack.append(c)
    return True


def inference_call(model: nn.Module, x: Tensor) -> Tuple[Tensor, bool]:
    """(`x` as the model should read it, whether the call is vouched for): when the conditions above
    hold, an NCHW `x` converted to channels_last (a channels_last one as it is) and True: the model's
    (conv, BN) pairs may then skip the per-layer checks this one made for all of them
    (fastres.backends.torch.conv_bn_act_vouched; the model runs its body under :class:`vouch`).
    Otherwise (`x`, False). (The model itself, the first of model.modules(), may be any class: its
    forward is the caller.)"""
    if not call_ok(model, x) or not _modules_ok(model):
        return x, False
    return x.contiguous(memory_format=torch.channels_last), True


def call_ok(model: nn.Module, x) -> bool:
    """The conditions above but the module checks: those of the call (its context, its input, torch's
    nn methods, the backend chosen). A frozen plan's guard (fastres.models.plan_guard) stands in for the
    module checks."""
    # (not traced by torch.compile; outside frozen() the stem's fold test answers, in a dict lookup; the
    # context before the tensor: vmap rejects some queries)
    if torch.compiler.is_compiling() or not _stem_frozen(model) or model.training or not _context_ok() \
            or not _tensor_ok(x) or not nn_methods_unpatched() or not functions_unpatched():
        return False
    try:
        if backend.resolve_cached("conv_bn_act", x.device) != "torch":
            return False
    except Exception:   # a backend that cannot run here: the first layer raises the error that says so
        return False
    return _finite(x)


def _finite(x: Tensor) -> bool:
    """Whether `x` holds no NaN and no infinity. With fastres._cpu built, by its values' exponent bits
    (csrc/cpu/finite.cpp: one read of the input; 0.11-0.16 ms less than the sum below in a serving loop,
    where the sum's op starts from cold caches after the convolutions); otherwise, or for an input it does
    not take, its sum is finite (a NaN or an infinity makes it NaN or infinite; finite values whose fp32
    sum overflows say no too, and that call runs unvouched: correct, slower)."""
    if _native is not None:
        ok = _native.all_finite(x)
        if ok is not None:
            return ok
    return math.isfinite(x.sum().item())


def inference_input(model: nn.Module, x: Tensor) -> Tensor:
    """`x` as the model should read it (:func:`inference_call`'s first value)."""
    return inference_call(model, x)[0]


class vouch:
    """``with vouch(ok, *given): ...`` runs the body as a vouched call when `ok`, and resets that on exit
    (also on an exception). `given`: the tensors the call was given (and their converted copies), which
    no layer may write its output into (fastres.backends.torch.conv_bn_act_vouched writes a block's
    output into its residual when the residual is the call's own). A call that is not vouched leaves the
    state alone and does not even read it (so that torch.compile, where `ok` is always False, traces no
    thread-local state), and a nested model call in a vouched one stays vouched: the outer call's check
    covered every module under it (its `given` are kept from writes too, until it returns).

    Every call also asks once whether a tracer that records module calls runs (fastres.module_calls.tracing_modules:
    torch.fx, torch.jit.trace, torch.export, each of which calls the model's forward, so runs when it is
    entered); when none does, its layers skip that question until it returns (fastres.module_calls: with
    the other per-layer checks it cost 2-3% of a ResNet-18 eval forward on a CPU, asked by every pair and
    block). A vouched call's own checks answered it. Not under torch.compile (the question is asked, the
    state neither read nor set)."""

    __slots__ = ("ok", "set", "given", "prev", "untraced")

    def __init__(self, ok: bool, *given: Tensor) -> None:
        self.ok = ok
        self.given = given

    def __enter__(self) -> None:
        if self.ok:   # (its checks found no tracer, and the torch backend chosen on the CPU)
            self.untraced = not _untraced.on
            if self.untraced:
                _untraced.on = _untraced.cpu_torch = True
        else:
            self.untraced = not torch.compiler.is_compiling() and not _untraced.on and not tracing_modules()
            if self.untraced:
                try:
                    _untraced.cpu_torch = backend.resolve_cached("conv_bn_act", _CPU) == "torch"
                except Exception:   # (a backend that cannot run: each layer asks, and raises what says so)
                    _untraced.cpu_torch = False
                _untraced.on = True
        self.set = self.ok and not _vouched.on
        self.prev = None
        if self.set:
            _vouched.on = True
            _vouched.kept = tuple(t.data_ptr() for t in self.given)
        elif self.ok and self.given:
            self.prev = _vouched.kept
            _vouched.kept = self.prev + tuple(t.data_ptr() for t in self.given)

    def __exit__(self, *exc) -> None:
        if self.untraced:
            _untraced.on = False
        if self.set:
            _vouched.on = False
            _vouched.kept = ()
        elif self.prev is not None:
            _vouched.kept = self.prev


def vouched() -> bool:
    """Whether the running model call is vouched for (see :func:`inference_call`)."""
    return _vouched.on


_AAP_FORWARD = own_method(nn.AdaptiveAvgPool2d, "forward")   # (a forward patched on the class is the user's code)


def features(pool: nn.Module, x: Tensor, ok: bool) -> Tensor:
    """``torch.flatten(pool(x), 1)``, the pooled features the head reads. In a vouched call (`ok`) a global
    average pooling (an exact nn.AdaptiveAvgPool2d to (1, 1), its class forward nn.AdaptiveAvgPool2d's)
    runs as ``F.avg_pool2d`` over the whole plane: the same mean of the same H * W values (summed in
    another order: within fp32 rounding), the same (N, C, 1, 1) shape and strides. In the running model
    adaptive_avg_pool2d took 141-155 us per call against 43-50 us for avg_pool2d (its channels_last
    kernel is one op; adaptive pooling to 1 is a mean: sum, then divide, each a cold op after the last
    convolution), ResNet-50 at batch 8, 64 px and batch 1, 224 px, 2 CPU cores."""
    if ok and _global_pool(pool, x):
        return torch.flatten(F.avg_pool2d(x, x.shape[-2:]), 1)
    return torch.flatten(pool(x), 1)


def _global_pool(pool: nn.Module, x: Tensor) -> bool:
    """Whether `pool` on `x` is the mean over x's whole plane: an exact nn.AdaptiveAvgPool2d to (1, 1), its
    class forward nn.AdaptiveAvgPool2d's, on a 4-D `x` with a plane that is not empty."""
    return type(pool) is nn.AdaptiveAvgPool2d and nn.AdaptiveAvgPool2d.forward is _AAP_FORWARD is not None \
        and pool.output_size in (1, (1, 1)) and x.dim() == 4 and x.shape[-2] > 0 and x.shape[-1] > 0


def classify(pool: nn.Module, fc: nn.Module, x: Tensor, ok: bool) -> Tensor:
    """``head(fc, features(pool, x, ok), ok)``, the logits from the body's output `x`. In a vouched call
    (`ok`) whose pooling is global (:func:`_global_pool`), pooling and an exact nn.Linear head run as one
    C++ call where it takes them (fastres.backends.torch.pooled_linear_vouched: up to 16 rows, with
    fastres._cpu built)."""
    if ok and _global_pool(pool, x):
        y = aten_backend.pooled_linear_vouched(x, fc)
        if y is not None:
            return y
    return head(fc, features(pool, x, ok), ok)


def head(fc: nn.Module, x: Tensor, ok: bool) -> Tensor:
    """The model's classifier `fc` on the pooled features `x`: in a vouched call (`ok`, from
    :func:`inference_call`) a large nn.Linear runs through oneDNN's matmul
    (fastres.backends.torch.linear_vouched), else as the module."""
    if ok:
        y = aten_backend.linear_vouched(x, fc)
        if y is not None:
            return y
    return fc(x)
