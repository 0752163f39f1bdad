"""Which implementation runs a fused op: "cuda" (csrc/, fastres._C), "triton" (kernels/), "torch" (reference).

The user asks for a backend with :func:`set_backend` (or the environment variable ``FASTRES_BACKEND``):

* ``"torch"``  - plain PyTorch (fastres/ops/reference.py): runs anywhere, the oracle of every test.
* ``"triton"`` - the Triton kernels; needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``
  set before triton was imported (the interpreter: slow, for tests).
* ``"cuda"``   - the CUDA C++ extension fastres._C; needs it built and CUDA tensors.
* ``"auto"``   - CPU tensors: torch. CUDA tensors: per op, the faster of cuda and triton according to
  the recorded GPU runs (:data:`AUTO_PREFERENCE`), among those available and verified on a GPU;
  torch while no GPU run is on record.

Asking explicitly for a backend that cannot serve a call raises :class:`BackendUnavailableError`;
nothing falls back silently. The one documented exception: a call a backend's kernels do not
cover (for example a grouped convolution for the Triton conv) runs on the torch backend, is logged
at DEBUG level on the ``fastres`` logger, counted in :data:`calls`, and shown by ``python -m fastres.info``.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "set_backend",
    "get_backend",
    "use_backend",
    "available",
    "resolve",
    "implementation",
    "calls",
]

log = logging.getLogger("fastres")

BACKENDS = ("auto", "triton", "cuda", "torch")

# Where each concrete backend's implementation of every fused op lives. A module listed here exposes,
# for an op named OP: OP_forward, OP_backward and optionally OP_supports (returns None when it can
# serve the call, or a short reason when it cannot).
_IMPL_MODULES = {
    "torch": "fastres.ops.reference",
    "triton": "fastres.kernels.conv_bn_act",
    "cuda": "fastres.ops.cuda_impl",
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


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _device_check(name: str, device: torch.device) -> Optional[str]:
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


def resolve(op: str, device: torch.device) -> str:
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


def _module(name: str):
    return importlib.import_module(_IMPL_MODULES[name])


def implementation(op: str, phase: str, device: torch.device, **call) -> Tuple[str, Callable]:
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
