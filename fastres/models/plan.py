"""Inside fastres.frozen, a fastres ResNet's body on a CPU as one compiled plan (oneDNN Graph).

Why. In a vouched frozen call (fastres.models.input_layout) each folded conv + BN (+ add) (+ ReLU) is one
prepacked oneDNN convolution, and the convolutions themselves are fast: on ResNet-50 at batch 8, 64 px
(2 CPU cores) their kernels sum to 26.3 ms, less than ONNX Runtime's whole 28.6-29.0 ms. The call took
31.9 ms: torch's op builds oneDNN's primitive descriptor on every call (~25 us per convolution, before any
work) and Python runs between the layers (~14 us per layer). ONNX Runtime makes each kernel once. So
does a plan: the body (stem, max pooling, every block) traced once by TorchScript as a pure function of
its input with the folded weights as constants, compiled by its oneDNN Graph fuser (each primitive made
once, each weight reordered once), then called as one function. Measured in one process: ResNet-50 b8 64 px
26.9 ms (per-layer frozen 32.0, ONNX Runtime 28.6), b1 224 px 37.8 (43.5, 39.3); ResNet-18 b16 64 px
21.1 (23.5, 23.7), b1 224 px 16.8 (18.6, 18.2) (minimum of alternated rounds; benchmarks/results for
the model-level rows). The pooled head stays in Python on the live modules (fastres.models.input_layout).

When. A vouched call (every module of a known class, eval, no hooks, gradients off, not traced, CPU fp32
channels_last input, the torch backend) whose body is exactly what fastres.models.plan_walk knows (its
docstring), with torch's own conv2d / max_pool2d / relu / batch_norm / pad and module-call machinery
(with a wrapper there the plan steps aside and the per-layer path answers, as it would without plans: it
runs a wrapped Module.__call__, not a wrapped F.conv2d or F.batch_norm, whose ops it fuses), oneDNN on
(torch.backends.mkldnn and fastres.backends.torch.onednn_enabled), and no torch function or dispatch mode
(those would not see the plan's ops). A plan is built for a (structure, input shape) once calls with it have spent
:data:`PLAN_AFTER_SECONDS` on the per-layer path (building one costs 0.2-0.7 s on ResNet-50: a serving or
evaluation loop repays it, a few calls do not), at most :data:`PLANS_KEPT` per model.
``fastres.frozen(model, plan=False)`` never builds one.

Never stale. A plan's constants are its own copies of the fold cache's folded weights and biases. The
full check of a call: the vouched call's module checks, the structure walked again (its steps must equal
the plan's: a swapped module, a changed stride or padding, a replaced ReLU or pool miss the plan) and
every (conv, BN) pair asking the fold cache for its entry, which re-validates it by all the cache's rules
(fastres/backends/fold_cache.py); the plan runs only when each entry is the very one it was built from,
and none is built from a fold with a NaN or an infinity (its fused ReLUs would make a NaN 0).
Anything else runs the per-layer path, and a plan whose entries are gone is released. A call that passed
the full check arms a guard (fastres.models.plan_guard) with which the next calls prove, in a third of
the time, that nothing the full check read has changed (:func:`armed`); when the proof fails, the full
check runs. The oneDNN Graph fuser keeps reordered copies of constant weights
per compiled graph, so a plan is never updated in place: a changed fold means a new plan.

Memory. TorchScript keeps a traced graph's constant tensors alive after the graph is dropped (measured:
one weight's bytes per trace), so a released plan frees its constants' storage itself once no call is
running it, and asks glibc to return the freed pages (:func:`_trim`). What TorchScript and the fuser
still keep is ~4.5 MB per build (ResNet-20, ResNet-18) to ~8.7 MB (ResNet-50), measured with mallinfo
over 10 builds; so at most :data:`MAX_BUILDS` plans are built per process (after that, the per-layer
path).

The fuser is switched on (``torch.jit.enable_onednn_fusion``) only around a plan's own first calls, while
TorchScript compiles it, and restored after; a plan whose compiled graph holds no fused group (a torch
without the fuser) is dropped and its structure not tried again.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastres.backends import torch as aten_backend
from fastres.backends.fold_cache import entry as _entry
from fastres.models import plan_guard
from fastres.models.input_layout import call_ok
from fastres.models.plan_walk import Body, NoPlan, register, torch_own, walk

Tensor = torch.Tensor

__all__ = ["register", "armed", "body", "live", "drop", "disable", "enable", "PLAN_AFTER_SECONDS", "PLANS_KEPT",
           "MAX_BUILDS"]

PLAN_AFTER_SECONDS = 0.25   # per-layer time spent on one (structure, input shape) before a plan is built
PLANS_KEPT = 4              # plans per model (input shapes), the oldest released first
MAX_BUILDS = 64             # plans built per process (each leaves a few MB behind: module docstring)
_WARM_CALLS = 2             # calls that run with the fuser on: TorchScript profiles, then compiles
_GUARD_MISSES = 4           # guards armed in a row that never held: no more for that plan (the full check)
builds = 0

_log = logging.getLogger("fastres")
_build_lock = threading.Lock()
_off: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def disable(model: nn.Module) -> None:
    """No plan for `model` or any model in it until a matching :func:`enable` (fastres.frozen(model,
    plan=False))."""
    for m in model.modules():
        _off[m] = _off.get(m, 0) + 1
    drop(model)


def enable(model: nn.Module) -> None:
    for m in model.modules():
        n = _off.get(m, 0) - 1
        if n <= 0:
            _off.pop(m, None)
        else:
            _off[m] = n


def _fuser_available() -> bool:
    return (hasattr(torch._C, "_jit_set_llga_enabled") and hasattr(torch._C, "_jit_llga_enabled")
            and torch.backends.mkldnn.is_available())


class _Plan:
    """A traced body and what it was built from: the fold entries (by identity), its constants, and how
    many calls are running it (its constants are freed only when released and none is)."""

    def __init__(self, fn, entries: list, consts: List[Tensor]) -> None:
        self.fn, self.entries, self.consts = fn, entries, consts
        self.calls = 0          # calls made (the first _WARM_CALLS compile it)
        self.running = 0
        self.dead = False
        self.lock = threading.Lock()

    def run(self, x: Tensor) -> Optional[Tensor]:
        with self.lock:
            if self.dead:
                return None
            self.running += 1
            self.calls += 1
            n = self.calls
        try:
            if n > _WARM_CALLS:
                return self.fn(x)
            with _build_lock:   # the fuser's switch is global: one compiling plan at a time
                prev = torch._C._jit_llga_enabled()
                torch._C._jit_set_llga_enabled(True)
                try:
                    y = self.fn(x)
                    fused = "oneDNNFusionGroup" in str(torch._C._last_executed_optimized_graph())
                finally:
                    torch._C._jit_set_llga_enabled(prev)
            if n == _WARM_CALLS and not fused:
                raise RuntimeError("TorchScript compiled the plan without a oneDNN fusion group")
            return y
        finally:
            with self.lock:
                self.running -= 1
                free = self.dead and self.running == 0
            if free:
                self._free()

    def built_from(self, entries: list) -> bool:
        """Whether the plan is alive and every fold entry is the very one it was built from."""
        with self.lock:
            return not self.dead and all(e is p for e, p in zip(entries, self.entries))

    def release(self) -> None:
        with self.lock:
            if self.dead:
                return
            self.dead = True
            free = self.running == 0
        if free:
            self._free()

    def _free(self) -> None:
        for t in self.consts:   # TorchScript keeps a dropped graph's constants: free their bytes
            t.untyped_storage().resize_(0)
        self.fn = self.consts = None
        _trim()


def _trim() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing): a released
    plan's constants are a model's weights, freed between allocations that stay, and glibc keeps such
    holes (measured: RSS +51 MB per ResNet-18 rebuild without this, +4.5 MB in use)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class _ModelPlans:
    """A model's plans by (steps, input shape), newest last, the per-layer time spent on each key that
    has none yet, and the plans' guards by input shape (fastres.models.plan_guard); keys whose plan failed
    are not tried again."""

    def __init__(self) -> None:
        self.plans: Dict[tuple, _Plan] = {}
        self.spent: Dict[tuple, list] = {}
        self.failed: set = set()
        self.guards: Dict[tuple, plan_guard.Guard] = {}
        self.misses: Dict[tuple, int] = {}
        self.bns: set = set()   # ids of the BatchNorms its plans fold (:func:`drop_using`)

    def release(self, key: tuple) -> None:
        plan = self.plans.pop(key, None)
        if plan is not None:
            g = self.guards.get(key[1])
            if g is not None and g.plan is plan:
                del self.guards[key[1]]
            plan.release()

    def arm(self, key: tuple, model: nn.Module, plan: _Plan, pairs, entries: list) -> None:
        """Arm a guard for `plan` after a call that passed the full check, unless its last
        :data:`_GUARD_MISSES` guards never held (something the guard reads changes on every call while
        the full check passes: the guard would only add its own cost)."""
        old = self.guards.get(key[1])
        misses = 0 if old is None or old.hits else self.misses.get(key, 0) + (old.key == key)
        self.misses[key] = misses
        if misses < _GUARD_MISSES:
            g = plan_guard.arm(key, model, plan, pairs, entries)
            if g is not None:
                self.guards[key[1]] = g

    def release_all(self) -> None:
        for key in list(self.plans):
            self.release(key)

    def __del__(self) -> None:
        try:
            self.release_all()
        except Exception:   # (interpreter shutdown)
            pass


_PLANS: "weakref.WeakKeyDictionary[nn.Module, _ModelPlans]" = weakref.WeakKeyDictionary()


def live(model: nn.Module) -> bool:
    """Whether a plan of `model` has been compiled (it ran past its compiling calls)."""
    mp = _PLANS.get(model)
    return mp is not None and any(p.calls > _WARM_CALLS and not p.dead for p in list(mp.plans.values()))


def drop_using(bns) -> None:
    """Release the plans of every model that folds any of `bns` (a frozen() context leaving them: their
    folds go, so do plans made from them, whichever model they belong to - a model swapped out of the
    context's model, or sharing its modules)."""
    ids = {id(bn) for bn in bns}
    for model, mp in list(_PLANS.items()):
        if mp.bns & ids:
            _PLANS.pop(model, None)
            mp.release_all()


def drop(model: nn.Module) -> None:
    """Release every plan of `model` and of the models in it (fastres.frozen's exit: nothing outlives
    the context, the guards that hold its modules included)."""
    if not _PLANS:
        return
    for m in model.modules():
        mp = _PLANS.pop(m, None)
        if mp is not None:
            mp.release_all()


def _build(mp: _ModelPlans, key: tuple, steps: tuple, pairs: list, entries: list, x: Tensor) -> Optional[Tensor]:
    """Trace a plan for `key` (its (conv, BN) `pairs`, their fold `entries`) on this call's input; the
    trace's own result is this call's body output."""
    global builds
    consts = [t.clone() for e in entries for t in (e[1], e[2])]
    with _build_lock:
        if key in mp.plans:   # (another thread built it meanwhile)
            fn = None
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # (TorchScript's deprecation notice: the plan is internal)
                    fn = torch.jit.trace(Body(steps, consts), x, check_trace=False,
                                         _compilation_unit=torch._C.CompilationUnit(), _store_inputs=False)
            except Exception as e:   # a body TorchScript cannot trace: the per-layer path, not tried again
                _log.debug("fastres: no frozen plan (%s)", e)
                mp.failed.add(key)
                fn = None
            if fn is not None:
                builds += 1
                while len(mp.plans) >= PLANS_KEPT:
                    mp.release(next(iter(mp.plans)))
                plan = mp.plans[key] = _Plan(fn, entries, consts)
                mp.bns.update(id(bn) for _, bn in pairs)
    if fn is None:
        for t in consts:
            t.untyped_storage().resize_(0)
        return None
    return plan.run(x)   # (the first of the calls that compile it)


def _guarded(mp: _ModelPlans, key: tuple, fn: Callable, *args) -> Optional[Tensor]:
    """fn(*args) (a plan's call or build), or None when it fails: the per-layer path answers and this
    (structure, shape) is not tried again."""
    try:
        return fn(*args)
    except Exception as e:
        _log.debug("fastres: frozen plan failed (%s); per-layer path", e)
        mp.failed.add(key)
        mp.release(key)
        return None


def _plan_ok(model: nn.Module, x: Tensor) -> bool:
    """The conditions of the module docstring's "When" that are not the model's own."""
    return not (model in _off or not _fuser_available() or aten_backend.onednn_enabled is False
                or not torch.backends.mkldnn.enabled or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() or x.numel() == 0 or not torch_own())


def armed(model: nn.Module, x) -> Optional[Tuple[Tensor, Tensor]]:
    """(the body's output, `x` as the body read it) for a frozen call of `model` on `x` whose plan's
    guard holds (fastres.models.plan_guard: nothing the last full check read has changed) and whose
    call-level conditions hold (fastres.models.input_layout.call_ok, :func:`_plan_ok`); else None, and
    the caller makes the full check (input_layout.inference_call, :func:`body`)."""
    if torch.compiler.is_compiling():   # (nothing here for torch.compile to trace)
        return None
    mp = _PLANS.get(model)
    if mp is None or not mp.guards or type(x) is not Tensor:
        return None
    g = mp.guards.get(tuple(x.shape))
    if g is None:
        return None
    g.prefetch()   # (the memory its proof reads, fetched while the call's conditions are checked)
    if not call_ok(model, x) or not _plan_ok(model, x) or not g.holds():
        return None
    xc = x.contiguous(memory_format=torch.channels_last)
    y = _guarded(mp, g.key, g.plan.run, xc.detach())
    if y is None:
        return None
    g.hits += 1
    return y, xc


def body(model: nn.Module, x: Tensor, layers: Tuple[str, ...], maxpool: bool,
         per_layer: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
    """The body of a vouched frozen call of `model` on `x` (channels_last fp32 CPU): through its plan when
    one is valid (module docstring), else ``per_layer(model, x)``, timed toward building one. A plan that
    ran past its compiling calls is given a guard (:func:`armed`)."""
    if not _plan_ok(model, x):
        return per_layer(model, x)
    try:
        w = walk(model, layers, maxpool)
        key = (tuple(w.steps), tuple(x.shape))
        hash(key)
    except (NoPlan, AttributeError, KeyError, TypeError):
        return per_layer(model, x)
    mp = _PLANS.get(model)
    if mp is None:
        mp = _PLANS[model] = _ModelPlans()
    if key in mp.failed:
        return per_layer(model, x)
    entries = [_entry(conv, bn, bn.eps) for conv, bn in w.pairs]
    plan = mp.plans.get(key)
    if plan is not None:
        if plan.built_from(entries):
            y = _guarded(mp, key, plan.run, x.detach())
            if y is not None:
                if plan.calls > _WARM_CALLS:
                    mp.arm(key, model, plan, w.pairs, entries)
                return y
        mp.release(key)   # a fold it was built from is gone (or the plan failed)
        mp.spent.pop(key, None)
    spent = mp.spent.setdefault(key, [0, 0.0])
    if spent[0] >= 2 and spent[1] >= PLAN_AFTER_SECONDS and builds < MAX_BUILDS \
            and all(e is not None and e[6] and e[1].dtype is torch.float32 for e in entries):
        mp.spent.pop(key, None)
        y = _guarded(mp, key, _build, mp, key, tuple(w.steps), w.pairs, entries, x.detach())
        if y is not None:
            return y
    t = time.perf_counter()
    y = per_layer(model, x)
    spent[0] += 1
    spent[1] += time.perf_counter() - t
    return y
