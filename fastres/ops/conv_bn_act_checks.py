"""conv_bn_act's argument checks: the conv arguments as one checked record (ConvSpec), and the errors
that say what was expected for a bad call (explain). What they read is metadata (shape, dtype, device)
and plain values, so a call that passed is remembered per key; symbolic sizes (tracing) and
non-tensor arguments are checked without the memory."""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Sequence, Union

import torch

from fastres.errors import InputDtypeError, InputShapeError, dtype_error
from fastres.layout import conv_out_shape, int_pair
from fastres.ops.common import BNSpec

Tensor = torch.Tensor

__all__ = ["ConvSpec", "conv_spec", "explain"]


IntPair = Union[int, Sequence[int]]


class ConvSpec(NamedTuple):
    """The convolution's arguments as one typed record, checked (:func:`conv_spec`): what travels inside
    conv_bn_act from the call's first decision to the boundary where it is flattened, the torch.library
    custom op (whose schema takes int[] lists), the autograd.Function or a backend function, whose
    signatures keep the flat order (stride, padding, dilation, groups). Built (or taken from a call plan)
    once per call: fields are read (or the record unpacked), never copied into a new one. (The plans' key
    holds the arguments as given instead: the record's lists are not hashable.)"""
    stride: List[int]
    padding: List[int]
    dilation: List[int]
    groups: int


def _pair(v: IntPair, name: str) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if not all(isinstance(i, int) for i in v):   # (a float: the TypeError F.conv2d raises too)
        raise TypeError(f"conv_bn_act: {name} must be an int or a pair of ints, got {v!r}")
    if len(v) != 2:
        raise ValueError(f"conv_bn_act: {name} must be an int or a pair of ints, got {v!r}")
    return v


@functools.lru_cache(maxsize=1024)
def _spec(stride, padding, dilation, groups) -> ConvSpec:
    return ConvSpec(_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), groups)


def conv_spec(stride: IntPair, padding: IntPair, dilation: IntPair, groups: int) -> ConvSpec:
    """The checked ConvSpec of these arguments, remembered per value (a pure function of them). Its
    lists are shared between calls: nothing in fastres mutates them, and they never reach a user.
    (Under torch.compile the function itself: dynamo warns about, and ignores, an lru_cache.)"""
    if torch.compiler.is_compiling():
        return _spec.__wrapped__(stride, padding, dilation, groups)
    # the cache's key: exact ints only ((1.0, 1.0) == (1, 1), same hash); anything else checked uncached
    s, p, d = int_pair(stride), int_pair(padding), int_pair(dilation)
    if s is None or p is None or d is None or type(groups) is not int:
        return _spec.__wrapped__(stride, padding, dilation, groups)
    return _spec(s, p, d, groups)


def _check(x: Tensor, weight: Tensor, bias, bn: BNSpec, residual, conv: ConvSpec) -> None:
    """Raise the error that says what was expected for a bad call. What it checks is the tensors'
    metadata (shape, dtype, device), so a call that passed is remembered per metadata key (_checked:
    the records flattened into it, the lists as tuples); symbolic sizes (tracing) or non-tensor
    arguments are checked without it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"conv_bn_act: expected a 4-D tensor input (N, C, H, W), got {type(x).__name__}")
    tensors = (x, weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, residual)
    stride, padding, dilation, groups = conv
    try:
        metas = [None if t is None else (t.shape, t.dtype, t.device) for t in tensors]
        _checked(*metas, tuple(stride), tuple(padding), tuple(dilation), groups, bool(bn.training))
        return
    except (AttributeError, TypeError):   # (an unhashable key, or a bad call: checked again below)
        pass
    _check_tensors(*tensors, stride, padding, dilation, groups, bn.training)


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
        raise dtype_error("conv_bn_act: expected a floating-point input (float32, float16, bfloat16 or float64), "
                          f"got {x.dtype}", x.dtype)
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


def explain(x: Tensor, weight: Tensor, bias, bn: BNSpec, residual, conv: ConvSpec) -> None:
    """Raise the error that says what was expected for a bad call (nothing when the call is good)."""
    _check(x, weight, bias, bn, residual, conv)
    dev = x.device.type
    if not (dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)) and weight.dtype != x.dtype:
        raise InputDtypeError(f"conv_bn_act: expected weight of the input's dtype {x.dtype}, got {weight.dtype} "
                        f"(float32, float16, bfloat16 and float64 work; use autocast or convert the model "
                        f"with .to(dtype))")


