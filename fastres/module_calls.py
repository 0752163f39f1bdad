"""Whether a fused layer must call its modules as the plain model would: hooks, and the tracers that
record module calls.

A fused conv + BN (+ add) (+ ReLU) stands in for module calls. A hook on one of those modules (or a global
module hook, or a forward set on the instance) is code the fused op would skip, and torch.fx, torch.jit.trace
and torch.export record each module call (:func:`tracing_modules`); either way the modules run
as themselves. Asked on every layer call, so each check here is attribute reads, no generators.

:data:`untraced`: a fastres model call asks once, when its forward is entered, whether a module tracer runs
(fastres.models.input_layout.vouch); while its layers run, they skip that question (five Python calls
into torch.fx, torch.compiler and torch.jit: on a CPU, after each large convolution, such code runs from
cold caches, measured at 45 us per layer for the whole of a pair's checks before this). The
tracers call the model's forward, so one that runs is running when the forward is entered. Not seen: a
tracer a user starts on a part of the model from inside the call (a hook that traces a submodule): that
part then runs fused, with the values of an untraced call. Global module hooks are still read on every call.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn
from torch.fx import _symbolic_trace
from torch.nn.modules import module as _module_mod

__all__ = ["is_fx_tracing", "tracing_modules", "global_hooks", "module_hooked", "hooked", "plain_forward_needed",
           "inner_plain_forward_needed", "untraced"]


class _Untraced(threading.local):
    """Per thread: `on` while a fastres model call that found no module tracer runs; `cpu_torch`: whether
    conv_bn_act then resolved to the torch backend on the CPU (fastres.nn's eval path, asked once too)."""

    on = False
    cpu_torch = False


untraced = _Untraced()

# True inside torch.fx.symbolic_trace.
is_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing


def tracing_modules() -> bool:
    """Whether a tracer that records module calls is running: torch.fx symbolic tracing, torch.jit.trace
    (and the legacy ONNX exporter on it), torch.export (and the dynamo ONNX exporter on it). Their graphs
    name and scope each op by the module that called it (fx node targets, ONNX node names such as
    /layer1/layer1.0/conv1/Conv, nn_module_stack, which torch.export.unflatten rebuilds modules from) and
    keep torchvision's op order (the shortcut after bn2 / bn3): under them every module is called, as in
    torchvision's forward. (Not torch.compile: it compiles the fused path; the jit query is asked outside it.)"""
    return is_fx_tracing() or torch.compiler.is_exporting() or (
        not torch.compiler.is_compiling() and torch._C._is_tracing())

_hooks = _module_mod  # torch.nn.modules.module: where the global module hooks live


def global_hooks() -> bool:
    """Whether a global module hook (torch.nn.modules.module.register_module_*_hook) is registered."""
    return bool(_hooks._global_forward_hooks or _hooks._global_forward_pre_hooks or _hooks._global_backward_hooks
                or _hooks._global_backward_pre_hooks)


def _own_code(m: nn.Module) -> bool:
    """Whether `m` carries a forward (or a conv's _conv_forward) set on the instance: the user's code,
    which calling the module runs and a fused op would skip."""
    d = m.__dict__
    return "forward" in d or "_conv_forward" in d


def module_hooked(m: nn.Module) -> bool:
    """Whether `m` itself has a forward, forward-pre, backward or backward-pre hook, or a forward set on
    the instance (either runs code a fused op would skip)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _own_code(m))


def hooked(*mods: nn.Module) -> bool:
    """Whether calling these modules would run a hook (theirs, or a global module hook) or a forward set
    on the instance, so that a fused forward, which does not call them, would skip it. A few dict
    lookups: free when there is none."""
    if global_hooks():
        return True
    for m in mods:   # (module_hooked, inlined: no generator on the per-call path)
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or _own_code(m):
            return True
    return False


def plain_forward_needed(*mods: nn.Module) -> bool:
    """True when a fused forward must run its modules as the plain model would (each module called):
    under a tracer that records module calls (:func:`tracing_modules`: the graph must show the real
    Conv2d / BatchNorm2d / ReLU calls, as torchvision's does) or when one of them, or the module system,
    has hooks."""
    return tracing_modules() or hooked(*mods)


def _subtree_hooked(m: nn.Module) -> bool:
    """Whether a module below `m` (not `m` itself) has a hook of its own or an instance forward: a walk of the
    `_modules` tables, as Module.modules() would walk them, reading each module's own table (it runs on every
    block call: no generators, no calls but the recursion). A module without those tables says yes (it then
    runs as itself, and raises what torchvision's call of it raises)."""
    for c in m.__dict__["_modules"].values():
        if c is not None:
            try:
                d = c.__dict__
                if d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"] \
                        or "forward" in d or "_conv_forward" in d or (d["_modules"] and _subtree_hooked(c)):
                    return True
            except (KeyError, AttributeError):
                return True
    return False


def inner_plain_forward_needed(block: nn.Module) -> bool:
    """plain_forward_needed(*every module inside `block`): a module tracer, a global module hook, or a
    hook on any module below the block (the block's own hooks run anyway: it is called)."""
    return (not untraced.on and tracing_modules()) or global_hooks() or _subtree_hooked(block)


def _pair_hooked(conv: nn.Module, bn: nn.Module) -> bool:
    """hooked(conv, bn), as attribute reads (no calls: it runs on every fused call)."""
    h = _hooks
    return bool(h._global_forward_hooks or h._global_forward_pre_hooks or h._global_backward_hooks
                or h._global_backward_pre_hooks
                or conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks or conv._backward_pre_hooks
                or bn._forward_hooks or bn._forward_pre_hooks or bn._backward_hooks or bn._backward_pre_hooks
                or "forward" in conv.__dict__ or "_conv_forward" in conv.__dict__ or "forward" in bn.__dict__
                or "_conv_forward" in bn.__dict__)   # (_own_code, inlined)
