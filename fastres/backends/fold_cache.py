"""The torch backend's cache of folded BatchNorms, used only inside an active ``fastres.frozen()`` context
(the contract users read: fastres/frozen.py).

A fold cached across calls cannot see every change to the tensors it was made from (fused optimizers and
``.data`` edits leave version counters alone, inference tensors have none), so the default eval path reads
the live tensors on every call. Inside the context a fold is remade when
- the values, dtype or device of any of its small tensors (conv bias, BatchNorm weight, bias, running
  statistics: C numbers each) differ from the ones it was made from: compared on every call (a few
  microseconds), which sees every way they can change, running-statistic updates by any forward included;
- the conv weight is another tensor object, storage, dtype, device, shape or strides (.to(), .half(),
  ``p.data = ...`` (also a same-shape transpose of the same storage), load_state_dict(assign=True),
  torch.func.functional_call with new tensors) or its
  version counter moved (copy_, load_state_dict, in-place ops through the parameter itself). The entry
  holds an alias of the weight it was folded from, so that storage stays allocated while the entry lives:
  a new weight can never be handed the same address (without the alias, ``p.data = a; p.data = b`` between
  two calls could put `b` where the folded weight was, and the fold looked valid);
- :data:`generation` moved: on every torch.optim Optimizer step (a global step hook: fused, foreach and
  for-loop optimizers alike, which may leave the version counter alone) and on frozen.refresh();
- a frozen() context holding its BatchNorm is entered or left (those modules' folds only: a context in
  one model, or thread, does not remake another model's folds).

A fold with a NaN or an infinity in it is kept, marked, and not used: that layer runs the default path,
so that NaN propagates as in torchvision, through aten's ReLU rather than a fused one that would make it
0 (its callers check the mark: fastres.backends.torch, fastres.models.plan).

A context covers the thread that entered it, as torch.no_grad does: another thread calling the same model
outside any context of its own runs the default path on the live tensors (the cached entries themselves
are shared: each is validated by the rules above wherever it is used).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Tuple

import torch
from torch.optim import optimizer as _optim

from fastres.backends.common import pair_tensors

Tensor = torch.Tensor

__all__ = ["fold", "freeze", "thaw", "refresh", "frozen_active", "entry", "slot", "state"]


def fold(weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
         running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(W * s, beta + (b - running_mean) * s), s = gamma / sqrt(running_var + eps), per output channel.

    Computed in fp32 at least (fp64 when the weight or the statistics are fp64) and returned in the conv
    weight's dtype: one rounding of the exact product, as the weight itself had one (an fp16 model's
    statistics are fp16 too: the scale is not computed in fp16). Differentiable."""
    ct = torch.promote_types(torch.promote_types(running_var.dtype, weight.dtype), torch.float32)
    s = torch.rsqrt(running_var.to(ct) + eps)
    if bn_weight is not None:
        s = s * bn_weight.to(ct)
    shift = -running_mean.to(ct) * s if bias is None else (bias.to(ct) - running_mean.to(ct)) * s
    if bn_bias is not None:
        shift = shift + bn_bias.to(ct)
    w = (weight.to(ct) * s.reshape(-1, 1, 1, 1)).to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        w = w.contiguous(memory_format=torch.channels_last)
    return w, shift.to(weight.dtype)


# BatchNorm module -> [number of active frozen() contexts holding it, in any thread; cache entry or None].
_FROZEN: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()
# Empty while no frozen() context holds any BatchNorm, in any thread: a test without a call on the default
# path (the mapping's own table; a dead module's entry may linger there: frozen_active then answers).
holding = _FROZEN.data


class _Held(threading.local):
    """Per thread: BatchNorm module -> number of this thread's active contexts holding it."""

    def __init__(self) -> None:
        self.bns: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


_held = _Held()
generation = 0
_optimizer_hook = None


def _bump(*_args) -> None:
    global generation
    generation += 1


def freeze(bns) -> None:
    """Let the BatchNorm modules `bns` use cached folds in this thread (one more active context for each)."""
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = _optim.register_optimizer_step_post_hook(_bump)
    held = _held.bns
    for bn in bns:
        held[bn] = held.get(bn, 0) + 1
        slot = _FROZEN.get(bn)
        if slot is None:
            _FROZEN[bn] = [1, None]
        else:
            slot[0] += 1
            slot[1] = None   # a context's first use of a fold makes it anew (other modules' folds stay)


def thaw(bns) -> None:
    """Undo one :func:`freeze` of `bns` in this thread; a module no context holds any more drops its fold."""
    held = _held.bns
    for bn in bns:
        n = held.get(bn)
        if n is not None:
            if n <= 1:
                del held[bn]
            else:
                held[bn] = n - 1
        slot = _FROZEN.get(bn)
        if slot is not None:
            slot[0] -= 1
            if slot[0] <= 0:
                del _FROZEN[bn]
            else:
                slot[1] = None


def refresh() -> None:
    """Every cached fold is made again on its next use."""
    _bump()


def frozen_active(bn: torch.nn.Module) -> bool:
    """Whether a frozen() context of this thread holds `bn`."""
    return bool(holding) and bn in _held.bns


def state(t: Tensor):
    """What a conv weight's entry is keyed by: object, storage address, version counter, dtype, device,
    shape and strides."""
    version = None if t.is_inference() else t._version   # inference tensors carry no version counter
    return (id(t), t.data_ptr(), version, t.dtype, t.device, tuple(t.shape), t.stride())



def slot(bn: torch.nn.Module) -> Optional[list]:
    """`bn`'s cache slot, [number of active contexts holding it, entry or None], or None when no context
    holds it. A slot is one list for as long as any context holds its module (freeze and thaw update it
    in place; when its count reaches 0 it is dropped, and a later freeze makes a new one)."""
    return _FROZEN.get(bn)


def _same_values(snapshot, tensors) -> bool:
    return all((a is None) == (b is None) and (a is None or torch.equal(a, b)) for a, b in zip(snapshot, tensors))


def _tensors(conv: torch.nn.Module, bn: torch.nn.Module):
    """(conv weight, (conv bias, BN weight, BN bias, running mean, running var)); an exact nn.Conv2d and
    nn.BatchNorm2d read from their tables (:func:`fastres.backends.common.pair_tensors`)."""
    if type(conv) is torch.nn.Conv2d and type(bn) is torch.nn.BatchNorm2d:
        t = pair_tensors(conv, bn)
        return t[0], t[1:6]
    return conv.weight, (conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


_REDUCED = (torch.float16, torch.bfloat16)   # (whose BatchNorm takes fp32 parameters and statistics too)


def entry(conv: torch.nn.Conv2d, bn: torch.nn.Module, eps: float) -> Optional[list]:
    """The cached fold of (conv, bn), remade first if anything it was made from changed (the rules above),
    or None when no active frozen() context of this thread holds `bn`, or it has no running statistics, or
    its tensors are not one value per output channel of the conv in the conv weight's dtype (or fp32 for an
    fp16 / bf16 weight), as nn.BatchNorm2d takes them (the default path explains that call).
    An entry: [key, folded weight, folded bias, ((what it was packed for, prepacked weight), ...) newest
    first or None, the small tensors' values it was made from, an alias of the conv weight it was folded
    from, whether every folded number is finite (:func:`_finite`: a fold that is not must not be used)].
    The packs are replaced as one new tuple, so a thread never reads a weight packed
    for another shape than the one stored beside it. The small tensors enter the key by dtype and device only (their
    values are compared on every call: torch.equal ignores dtype); the conv weight by everything in
    :func:`state`. (It runs once per layer per call: ~10 us of Python.)"""
    slot = _FROZEN.get(bn)
    if slot is None or bn not in _held.bns:
        return None
    weight, small = _tensors(conv, bn)
    if weight.dim() != 4 or small[3] is None or small[4] is None:
        return None
    c = (weight.shape[0],)
    kinds = []
    wd = weight.dtype
    for t in small:
        if t is None:
            kinds.append(None)
        elif t.shape != c or (t.dtype is not wd and not (t.dtype is torch.float32 and wd in _REDUCED)):
            return None   # (another dtype: BatchNorm's own error, from the default path)
        else:
            kinds.append((t.dtype, t.device))
    key = (generation, state(weight), tuple(kinds), eps, torch.is_inference_mode_enabled())
    e = slot[1]
    if e is None or e[0] != key or not _same_values(e[4], small):
        w, b = fold(weight, *small, eps)
        e = slot[1] = [key, w, b, None, tuple(None if t is None else t.detach().clone() for t in small),
                       weight.detach(), _finite(w, b)]
    return e


def _finite(w: Tensor, b: Tensor) -> bool:
    """Whether every folded number is finite (summed in fp64, which no fp32 or fp16 value overflows: the
    sum is finite exactly when each term is). A fold with a NaN or an infinity (from a NaN or infinite
    weight or statistic, a negative running_var) is not used: a fused ReLU would turn the NaN it makes
    into 0, where torchvision's ReLU keeps it, so that layer runs the default path on the live tensors
    (fastres.backends.torch.conv_bn_act_frozen), and so do the ReLUs after it in that call."""
    return bool(torch.isfinite(w.sum(dtype=torch.float64) + b.sum(dtype=torch.float64)))
