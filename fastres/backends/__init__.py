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
    None when the backend's kernels cover the call, else a short reason, decided from the tensors'
    metadata only (shape, strides, dtype, device; never their values: fastres/ops/conv_bn_act.py
    remembers the answer per metadata key): the call then runs on
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
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch as _torch  # (not `torch`: that name is the submodule fastres.backends.torch)
from torch.fx import _symbolic_trace as _st

from fastres.kernels import interpreter_active  # noqa: F401  (re-exported: tests ask fastres.backend)

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
    "choose",
    "log_handover",
    "count",
    "module",
    "runs_here",
    "table",
    "REGISTRY",
    "calls",
]

log = logging.getLogger("fastres")

# True inside torch.fx.symbolic_trace (not inside torch.export, which traces the fused path itself).
_fx_tracing = getattr(_st, "is_fx_symbolic_tracing", None) or _st.is_fx_tracing

# The registry: one line per backend. Each module declares itself (NAME, DEVICES, DTYPES, OPS,
# available() -> (bool, reason), device_reason(device) -> reason or None) and implements, for every op
# OP it lists, OP_forward, OP_backward and OP_supports(**call) -> None or a reason (or a list of them).
# Everything that lists backends (info, bench, parity, the tests, "auto") reads this table.
REGISTRY: Dict[str, str] = {
    "triton": "fastres.backends.triton",
    "cuda": "fastres.backends.cuda",
    "torch": "fastres.backends.torch",
}
BACKENDS = ("auto",) + tuple(REGISTRY)

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
    if name != "auto":
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
    """Whether a concrete backend is installed/built here, and if not, why (its module's own answer, or
    why the module cannot be imported). Device-independent: see :func:`runs_here` for this machine."""
    name = _validate(name)
    if name == "auto":
        return True, ""
    try:
        mod = module(name)
    except ImportError as e:   # not installed / not built: the module says why
        return False, str(e)
    except Exception as e:     # a broken install
        return False, f"{REGISTRY[name]} cannot be imported ({type(e).__name__}: {e})"
    return mod.available()


def _device_check(name: str, device: _torch.device) -> Optional[str]:
    """Why `name` cannot run on tensors of `device`, or None when it can (the backend's declaration)."""
    return module(name).device_reason(device)


def runs_here(name: str) -> Tuple[bool, str]:
    """Whether backend `name` can run a call on this machine now: available, and a device it serves is
    present (CUDA for triton and cuda; CPU tensors through Triton's interpreter count for triton)."""
    ok, why = available(name)
    if not ok or name in ("auto", "torch"):
        return ok, why
    devices = [_torch.device("cuda")] if _torch.cuda.is_available() else []
    devices.append(_torch.device("cpu"))
    whys = [_device_check(name, d) for d in devices]
    if all(w is not None for w in whys):
        return False, whys[0]
    return True, ""


def table() -> List[dict]:
    """One row per registered backend: name, devices, dtypes, ops, available (+ why not), runs here."""
    rows = []
    for name in REGISTRY:
        ok, why = available(name)
        here, why_here = runs_here(name) if ok else (False, why)
        mod = module(name) if ok else None
        rows.append(dict(name=name, devices=tuple(getattr(mod, "DEVICES", ())),
                         dtypes=tuple(str(d).replace("torch.", "") for d in getattr(mod, "DTYPES", ())),
                         ops=tuple(getattr(mod, "OPS", ())), available=ok, runs_here=here,
                         reason=why or why_here))
    return rows


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
        mod = _modules[name] = importlib.import_module(REGISTRY[name])
    return mod


def reasons(name: str, op: str, **call) -> List[str]:
    """Why backend `name`'s kernels do not cover this call of `op` (empty when they do)."""
    supports = getattr(module(name), f"{op}_supports", None)
    why = None if supports is None else supports(**call)
    if why is None:
        return []
    return [why] if isinstance(why, str) else list(why)


def count(op: str, phase: str, name: str) -> None:
    """Count one call of `op`'s `phase` on backend `name` (or "unfused", "<name>->torch") in
    :data:`calls`; not while torch.compile or torch.fx traces (the traced code counts when it runs)."""
    if not _torch.compiler.is_compiling() and not _fx_tracing():
        calls[(op, phase, name)] += 1


def choose(op: str, phase: str, device: _torch.device, counted: bool = True, aten_reason: Optional[str] = None,
           **call) -> str:
    """The one choice of a call: the backend resolved for (op, device, user's choice), handed to torch
    when its kernels do not cover the call or `aten_reason` says the call must be aten ops (logged at
    DEBUG). Counted once, under what runs: the backend's name, or "<name>->torch" for a hand-over."""
    name = resolve_cached(op, device)
    ran = name
    if name != "torch":
        why = [aten_reason] if aten_reason is not None else reasons(name, op, **call)
        if why:
            log_handover(op, phase, name, "; ".join(why))
            ran, name = f"{name}->torch", "torch"
    if counted:
        count(op, phase, ran)
    return name


def log_handover(op: str, phase: str, name: str, why: str) -> None:
    """The DEBUG line of a call handed from backend `name` to torch (not while torch.compile traces)."""
    if not _torch.compiler.is_compiling():   # (a logging call would break the graph)
        log.debug("fastres %s %s: %s backend does not cover this call (%s); running torch", op, phase, name, why)


def implementation(op: str, phase: str, device: _torch.device, **call) -> Tuple[str, Callable]:
    """(backend name, function) that runs `op`'s `phase` ("forward" or "backward") for this call, as
    :func:`choose` picks it (counted). Used where the choice cannot travel: the custom ops' bodies."""
    name = choose(op, phase, device, **call)
    return name, getattr(module(name), f"{op}_{phase}")
