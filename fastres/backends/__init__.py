"""The backends of fastres's fused ops, their contract, and which one runs a call.

Three backends implement every fused op, one file each, with the same functions:

* ``torch``  (fastres/backends/torch.py)  - plain PyTorch on aten's own kernels: runs anywhere.
* ``triton`` (fastres/backends/triton.py) - the Triton kernels of fastres.kernels (kernels/); needs CUDA
  tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported (tests).
* ``cuda``   (fastres/backends/cuda.py)   - the CUDA C++ extension fastres._C (csrc/) around cuDNN.

The oracle every backend is tested against is fastres/ops/reference.py (the math, written out once).

Contract of op ``conv_bn_act`` (every backend module defines these three functions):

``conv_bn_act_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
stride, padding, dilation, groups, training, momentum, eps, relu, save_mask) -> (y, z, mean, invstd, mask)``
    x (N, Cin, H, W) fp32/fp16/bf16 (fp64 on torch), NCHW-contiguous or channels_last; weight
    (Cout, Cin/groups, kh, kw) and bias (Cout,) or None in x's dtype; bn_weight/bn_bias (Cout,) or
    None, running_mean/running_var (Cout,) or None (fp32; fp64 for fp64 data); residual None or
    shaped like y, in x's dtype; stride/padding/dilation 2-lists; momentum is the effective factor.
    y = act(bn(conv(x)) (+ residual)) in x's dtype and memory format (fastres.layout.memory_format_of);
    z the pre-BN conv output, same format (training), else empty; mean, invstd (Cout,) in
    fastres.layout.stats_dtype(x) (the batch statistics in training, the running ones in eval);
    mask the packed ReLU bit mask of y (fastres.layout.pack_relu_mask) when relu and save_mask, else
    empty uint8. Training with running stats updates them in place: running_mean <- (1 - m) *
    running_mean + m * mean, running_var likewise with the unbiased variance.
``conv_bn_act_backward(grad_y, x, weight, bias, z, mask, mean, invstd, bn_weight, stride, padding,
dilation, groups, training, relu, needs) -> (dx, dweight, dbias, dbn_weight, dbn_bias, dresidual)``
    grad_y in x's memory format; z, mask, mean, invstd as the forward returned them (z empty in eval:
    recomputed); needs, six bools in output order. Each output in its input's dtype and memory
    format (dbn_weight/dbn_bias in bn_weight's dtype, else stats_dtype), a fresh empty tensor where
    needs is False. The common tail (conv backward + output formats) is fastres/backends/common.py.
``conv_bn_act_supports(x, weight, residual, stride, padding, dilation, groups, training, relu) -> Optional[str]``
    None when the backend's kernels cover the call, else a short reason: the call then runs on
    torch, logged at DEBUG on the ``fastres`` logger and counted in :data:`calls` as
    (op, phase, "<name>->torch").

Aliasing: every output is a fresh tensor: never an input, never another output (custom ops demand it).

Choosing a backend: :func:`set_backend` (or the environment variable ``FASTRES_BACKEND``):

* ``"auto"`` - CPU tensors: torch. CUDA tensors: per op, the first of :data:`AUTO_PREFERENCE` that is
  available and verified on a GPU; torch while no GPU run is on record.
* an explicit name: that backend, or :class:`BackendUnavailableError` when it cannot run the call
  (not installed, not built, wrong device). Nothing falls back silently; the one documented
  exception is a call outside a backend's kernels (``conv_bn_act_supports`` above).
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch as _torch  # (not `torch`: that name is the submodule fastres.backends.torch)

from fastres.kernels import interpreter_active

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "set_backend",
    "get_backend",
    "use_backend",
    "available",
    "resolve",
    "resolve_cached",
    "implementation",
    "module",
    "calls",
]

log = logging.getLogger("fastres")

BACKENDS = ("auto", "triton", "cuda", "torch")

# Where each concrete backend's implementation of every fused op lives. A module listed here exposes,
# for an op named OP: OP_forward, OP_backward and optionally OP_supports (returns None when it can
# serve the call, or a short reason when it cannot).
_IMPL_MODULES = {
    "torch": "fastres.backends.torch",
    "triton": "fastres.backends.triton",
    "cuda": "fastres.backends.cuda",
}

# "auto" on CUDA tensors: per op, the backends in order of preference, filled in from the recorded GPU
# runs (benchmarks/results/): the faster of cuda and triton first, and only backends whose GPU tests
# have passed on record. No GPU run is on record yet, so auto runs the torch backend on CUDA tensors
# too; "triton" and "cuda" are there to be chosen explicitly (and are what the GPU run verifies).
AUTO_PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "conv_bn_act": ("torch",),
}

# How many times each (op, phase, backend) ran, counted when an op's implementation is called (so it
# counts under torch.compile too). Tests use it to prove which kernels ran.
calls: "collections.Counter[Tuple[str, str, str]]" = collections.Counter()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed, not built, or wrong device)."""


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown fastres backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name.lower()


_requested: str = _validate(os.environ.get("FASTRES_BACKEND", "auto") or "auto")


def set_backend(name: str) -> None:
    """Choose the backend for every fused op: "auto", "triton", "cuda" or "torch".

    Raises ValueError for an unknown name and BackendUnavailableError for an explicit backend that is
    not installed or built here (the device is checked per call, when the op sees its tensors).
    """
    global _requested
    name = _validate(name)
    if name in ("triton", "cuda"):
        ok, why = available(name)
        if not ok:
            raise BackendUnavailableError(f"fastres backend {name!r} is not available: {why}")
    _requested = name
    _resolved.clear()


def get_backend() -> str:
    """The backend the user asked for (possibly "auto")."""
    return _requested


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    previous = _requested
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def available(name: str) -> Tuple[bool, str]:
    """Whether a concrete backend is installed/built here, and if not, why. Device-independent."""
    name = _validate(name)
    if name in ("auto", "torch"):
        return True, ""
    if name == "triton":
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return False, f"triton cannot be imported ({e})"
        try:
            importlib.import_module(_IMPL_MODULES["triton"])
        except Exception as e:
            return False, f"fastres.kernels cannot be imported ({type(e).__name__}: {e})"
        return True, ""
    # cuda
    from fastres import _ext

    return _ext.status()


def _device_check(name: str, device: _torch.device) -> Optional[str]:
    """Why `name` cannot run on tensors of `device`, or None when it can."""
    if name == "torch":
        return None
    if name == "triton":
        if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
            return None
        return (f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                f"before triton is imported); got tensors on {device}")
    if name == "cuda":
        if device.type == "cuda":
            return None
        return f"the cuda backend needs CUDA tensors; got tensors on {device}"
    raise AssertionError(name)


# (op, device type, requested backend) -> the concrete backend resolve() chose. Whether a backend is
# installed and which device types it serves does not change within a process, so the choice is
# made once; set_backend() / use_backend() clear it (and tests that patch _requested must too).
_resolved: Dict[Tuple[str, str, str], str] = {}


def resolve_cached(op: str, device: _torch.device) -> str:
    """:func:`resolve`, remembered per (op, device type, requested backend): the per-call fast path.
    A choice that raises is not remembered (the next call raises again, with its reason)."""
    key = (op, device.type, _requested)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = resolve(op, device)
    return name


def resolve(op: str, device: _torch.device) -> str:
    """The concrete backend that runs `op` on tensors of `device` under the current choice."""
    req = _requested
    if req == "auto":
        if device.type != "cuda":
            return "torch"
        for name in AUTO_PREFERENCE.get(op, ("torch",)):
            if available(name)[0] and _device_check(name, device) is None:
                return name
        return "torch"
    ok, why = available(req)
    if not ok:
        raise BackendUnavailableError(f"fastres backend {req!r} is not available: {why}")
    why = _device_check(req, device)
    if why is not None:
        raise BackendUnavailableError(f"fastres op {op}: {why}")
    return req


_modules: Dict[str, object] = {}


def module(name: str):
    """The module implementing backend `name` (imported once)."""
    mod = _modules.get(name)
    if mod is None:
        mod = _modules[name] = importlib.import_module(_IMPL_MODULES[name])
    return mod


_module = module


def implementation(op: str, phase: str, device: _torch.device, **call) -> Tuple[str, Callable]:
    """(backend name, function) that runs `op`'s `phase` ("forward" or "backward") for this call.

    `call` holds the op's arguments that decide whether a backend's kernels cover it (shapes, dtypes,
    conv parameters); a backend that does not cover them hands the call to torch, logged and counted.
    """
    name = resolve(op, device)
    mod = _module(name)
    supports = getattr(mod, f"{op}_supports", None)
    if name != "torch" and supports is not None:
        why = supports(**call)
        if why is not None:
            log.debug("fastres %s %s: %s backend does not cover this call (%s); running torch",
                      op, phase, name, why)
            calls[(op, phase, f"{name}->torch")] += 1
            name, mod = "torch", _module("torch")
    calls[(op, phase, name)] += 1
    return name, getattr(mod, f"{op}_{phase}")
