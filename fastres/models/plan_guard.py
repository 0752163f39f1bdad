"""The per-call proof that a frozen plan (fastres.models.plan) still stands, in a fraction of the full check.

Why. A plan runs only after a call has checked everything it stands in for: the vouched call's module
checks (fastres.models.input_layout: every module of a known class, eval, no hook, no forward of its own),
the structure walk (fastres.models.plan_walk: its steps equal the plan's) and every (conv, BN) fold entry
re-validated by the fold cache's rules (fastres/backends/fold_cache.py). On ResNet-50 that costs 0.75 ms
per call with warm caches and 1.5 ms in a serving loop, where the convolutions before it evict what it
reads (measured, 2 CPU cores): 4-5 % of a 30 ms call, the margin against ONNX Runtime. A :class:`Guard`,
armed by a call that passed the full check, proves on the next calls that nothing the full check read has
changed since, so that it would pass again; when the proof fails, the full check runs (and may arm a new
guard). It reads, live, on every call:

* the modules: for every module the vouched call's walk reaches (the model and all its submodules), its
  class is the same, its instance dict equals the one the full check saw (same keys; each value the same
  object or an equal one: a geometry attribute - stride, padding, dilation, groups, kernel size, ceil mode,
  return_indices, channel counts - must be the very same object, so that stride (1.0, 1.0) rebound for
  (1, 1) is not taken as unchanged), its submodule table equals the one seen (the same module objects: the
  set of modules is the same, by induction from the model), and its four hook tables are empty. A value
  that can change in place (a list, dict, set or bytearray other than nn.Module's own tables) makes the
  model unguardable: the full check then runs on every call, as before;
* the classes: every class in each module's MRO has the attributes it had (a forward or _conv_forward
  patched on a class, an attribute added to one);
* the tensors, read from the modules' parameter and buffer tables as the fold cache reads them: each conv
  weight by everything the cache keys it by (object, storage address, version counter, dtype, device,
  shape, strides), the small tensors (conv bias, BatchNorm weight, bias, running statistics) by value:
  concatenated (in blocks of fewer than 32768 values, which aten's cat runs without its thread pool) and
  compared bit for bit with the values seen, each 1-D with the length seen and the concatenation float32
  (a float64 one would change the fold's arithmetic; narrower ones are exact in it);
* the fold cache: its generation (optimizer steps, refresh()), inference mode, this thread's frozen
  state (the same thread, and each BatchNorm's cache slot still held and holding the very entry the plan
  was built from: a frozen() context entered or left on them misses).

Everything else the full check reads is read live by the guarded call too (fastres.models.input_layout's
call-level conditions, fastres.models.plan's global ones).

Two forms of the proof read the same things. With the CPU extension built (fastres._cpu,
csrc/cpu/plan_guard.cpp: fastres/_native.py) the modules and tensors are proved in C++: each instance
dict entry by entry against its copy in insertion order (same keys; each value the same object or an
equal str, int, float, complex, bytes or tuple of them: so the dicts are equal, without a hash lookup
and without running an __eq__ that could change the module mid-check), the tensors from their
TensorImpl, the small ones by memcmp against one snapshot, each required float32, contiguous, 1-D, on
the CPU, without a neg or conj bit, a plain tensor or parameter (a guard whose tensors are not all such,
whose submodule tables are not plain dicts, or whose C++ form does not hold when armed, keeps the Python
form). Without it, Python: dict ==, cat and numpy. Measured on ResNet-50 in a serving loop, 2 CPU cores:
0.37-0.47 ms per call in C++, 0.94-1.08 ms in Python, against ~1.5 ms for the full check; with warm
caches ~0.25 ms in Python, ~0.75 ms for the full check. The C++ form's cost in a serving loop is cache
misses (0.07 ms with warm caches), one pointer after another: a guard also keeps the addresses of what it
reads (csrc/cpu/plan_guard.cpp, guard_lines), and a call first asks the CPU to fetch them all at once
(:meth:`Guard.prefetch`, a hint that reads nothing the proof relies on): 0.10-0.12 ms less per ResNet-50
b8 call (0.71 -> 0.59 ms for the guarded call's checks), nothing measurable on ResNet-18.

A guard holds the modules it checks. It lives in its plan's model record and goes with the plan, at the
latest when the frozen() context that made it is left (fastres.frozen drops the plans of every model in
it), so it keeps nothing alive beyond the context.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from fastres._native import cpu as _native  # (None without the built extension: the Python proof)
from fastres.backends import fold_cache
from fastres.backends.common import pair_tensors

Tensor = torch.Tensor

__all__ = ["Guard", "arm", "inert"]

# nn.Module's own tables (and conv's padding tuple): compared as values; their contents are either read
# below (submodules, hooks, tensors) or not read by any forward the plan stands in for (state_dict hooks)
_TABLES = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_pre_hooks",
    "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_reversed_padding_repeated_twice"})
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
          torch.layout)
# attributes the plan's ops take as geometry: compared by identity (an equal value of another type is not
# what torch accepts: F.conv2d rejects a float stride)
_EXACT = ("stride", "padding", "dilation", "groups", "kernel_size", "ceil_mode", "return_indices",
          "in_channels", "out_channels")
_BLOCK = 32767   # values per concatenation: aten's cat runs serially below 32768 (its grain size)
_numel = Tensor.numel
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_KIND = {**{k: 1 for k in _HOOKS}, **{k: 2 for k in _EXACT}, "_modules": 3}   # (csrc/cpu/plan_guard.cpp)
_NEEDED = _HOOKS + ("_modules",)   # (in every instance dict, where the C++ form reads them)
_SMALL_TYPES = (Tensor, nn.Parameter)


_INERT: tuple = ()


def inert(cls: type) -> None:
    """Declare a class whose instances, kept as a module attribute, no forward a plan stands in for reads
    (fastres.convert's report on a converted model): such a value does not make a model unguardable."""
    global _INERT
    _INERT = _INERT + (cls,)


def _plain(v) -> bool:
    """Whether `v` is an immutable builtin value (tuples and frozensets of them included): equal means
    the same to any code that reads it."""
    if type(v) in _PLAIN:
        return True
    return type(v) in (tuple, frozenset) and all(_plain(i) for i in v)


def _settled(v) -> bool:
    """Whether an attribute value cannot change unseen: plain, a class, or an object compared by identity
    (a function, a partial: no forward a plan stands in for reads more of it) that is neither a tensor nor
    a module (their contents change in place)."""
    return _plain(v) or isinstance(v, type) or isinstance(v, _INERT) or (type(v).__eq__ is object.__eq__
                                                and not isinstance(v, (Tensor, nn.Module)))


def _module_record(m: nn.Module):
    """(module, its class, a copy of its instance dict, (the ids of its submodules, them), the ids of its
    geometry attributes and the getter that reads them), or None when a value could change unseen (a
    list, array or tensor attribute, geometry that is not plain)."""
    d = m.__dict__
    for k, v in d.items():
        if k not in _TABLES and not (_plain(v) if k in _EXACT else _settled(v)):
            return None
    keys = tuple(k for k in _EXACT if k in d)
    get = operator.itemgetter(*keys) if len(keys) > 1 else None
    if len(keys) == 1:
        k0 = keys[0]
        get = lambda dd: (dd[k0],)   # noqa: E731  (itemgetter of one key returns the value, not a tuple)
    ids = tuple(map(id, get(d))) if get is not None else ()
    kids = list(m._modules.values())   # (held: an id is not reused while its object lives)
    return (m, type(m), dict(d), (list(map(id, kids)), kids), get, ids)


def _small(pairs) -> Tuple[list, list, list]:
    """(the conv weights, the small tensors that are not None, which of the five per pair are None) of
    the pairs, read from their tables (conv bias, BN weight, BN bias, running mean, running variance: a
    None moved from one to another must not read as the same list)."""
    weights, small, nones = [], [], []
    for conv, bn in pairs:
        t = pair_tensors(conv, bn)   # (as the fold cache reads them)
        weights.append(t[0])
        five = t[1:6]
        if None in five:
            nones.append((len(weights), tuple(t is None for t in five)))
            small += [t for t in five if t is not None]
        else:
            small += five
    return weights, small, nones


def _blocks(small: list) -> List[list]:
    out, cur, n = [], [], 0
    for t in small:
        k = _numel(t)
        if cur and n + k > _BLOCK:
            out.append(cur)
            cur, n = [], 0
        cur.append(t)
        n += k
    if cur:
        out.append(cur)
    return out


def _bits(block: list) -> Optional[Tensor]:
    """The block's tensors concatenated, as int32 bits, or None when that is not float32 1-D on the CPU
    (a float64 tensor promotes it; tensors of other dimensions fail to concatenate or give 2-D)."""
    c = torch.cat(block)
    if c.dtype is not torch.float32 or c.dim() != 1 or c.device.type != "cpu":
        return None
    return c.view(torch.int32)


try:   # numpy compares the bits 2-4x faster than torch.equal (ResNet-50: 106,000 values, 30 vs 100 us)
    import numpy as _np

    def _same_bits(a: Tensor, b) -> bool:
        return _np.array_equal(a.numpy(), b)

    def _snapshot(bits: Tensor):
        return bits.clone().numpy()
except ImportError:   # (torch runs without numpy)
    def _same_bits(a: Tensor, b) -> bool:
        return torch.equal(a, b)

    def _snapshot(bits: Tensor):
        return bits.clone()


class Guard:
    """See the module docstring. Built by :func:`arm`; :meth:`holds` is the per-call proof."""

    __slots__ = ("key", "hits", "plan", "records", "classes", "pairs", "count", "nones", "numels", "sizes", "bits",
                 "wstate", "generation", "inference", "held", "slots", "entries", "native", "lines")

    def prefetch(self) -> None:
        """Ask the CPU to fetch the memory the C++ proof reads, all at once (csrc/cpu/plan_guard.cpp,
        guard_lines: a hint that changes nothing the proof reads; nothing without the C++ form)."""
        if self.lines is not None:
            _native.prefetch(self.lines)

    def holds(self) -> bool:
        try:
            return self._holds()
        except Exception:   # anything unexpected (a value whose == raises, a tensor on another device)
            return False

    def _holds(self) -> bool:
        if self.plan.dead or fold_cache.generation != self.generation or fold_cache._held.bns is not self.held \
                or torch.is_inference_mode_enabled() is not self.inference:
            return False
        for s, e in zip(self.slots, self.entries):
            if s[0] <= 0 or s[1] is not e:
                return False
        for c, snap in self.classes:
            if c.__dict__ != snap:
                return False
        if self.native is not None:   # (the same proof in C++: csrc/cpu/plan_guard.cpp)
            records, tensors = self.native
            return _native.records_hold(records) and _native.tensors_hold(*tensors)
        for m, cls, d, (kids, _), get, ids in self.records:
            dd = m.__dict__
            if type(m) is not cls or dd != d or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks \
                    or m._backward_pre_hooks or ((kids or m._modules) and list(map(id, m._modules.values())) != kids):
                return False
            if get is not None and tuple(map(id, get(dd))) != ids:
                return False
        weights, small, nones = _small(self.pairs)
        if list(map(fold_cache.state, weights)) != self.wstate or nones != self.nones or len(small) != self.count \
                or list(map(_numel, small)) != self.numels:
            return False
        i = 0
        for n, want in zip(self.sizes, self.bits):
            got = _bits(small[i:i + n])
            if got is None or not _same_bits(got, want):
                return False
            i += n
        return True


def _reach(model: nn.Module) -> List[nn.Module]:
    """The model and every module under it, through the `_modules` tables (as the vouched call's module
    check walks them)."""
    out, seen, stack = [], {id(model)}, [model]
    while stack:
        m = stack.pop()
        out.append(m)
        for c in m._modules.values():
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                stack.append(c)
    return out


def arm(key: tuple, model: nn.Module, plan, pairs, entries: list) -> Optional[Guard]:
    """A guard for `plan` (its key), built by a call of `model` that has just passed the full check:
    `pairs` its (conv, BN) pairs and `entries` their fold entries (the plan's own). None when the model
    cannot be guarded (a value that can change in place, a pair without its cache slot)."""
    try:
        return _arm(key, model, plan, pairs, entries)
    except Exception:   # (a table not where nn.Module keeps it: the full check stays)
        return None


def _arm(key: tuple, model: nn.Module, plan, pairs, entries: list) -> Optional[Guard]:
    modules = _reach(model)
    g = Guard()
    g.key, g.hits = key, 0
    g.plan, g.pairs, g.entries = plan, list(pairs), list(entries)
    g.records = []
    for m in modules:
        r = _module_record(m)
        if r is None:
            return None
        g.records.append(r)
    g.classes = [(c, dict(c.__dict__)) for c in dict.fromkeys(c for m in modules for c in type(m).__mro__)]
    g.slots = [fold_cache.slot(bn) for _, bn in pairs]
    if any(s is None for s in g.slots):
        return None
    weights, small, g.nones = _small(pairs)
    if any(t.dim() != 1 for t in small):
        return None
    g.wstate = list(map(fold_cache.state, weights))
    g.count, g.numels = len(small), list(map(_numel, small))
    g.sizes, g.bits = [], []
    for block in _blocks(small):
        bits = _bits(block)
        if bits is None:
            return None
        g.sizes.append(len(block))
        g.bits.append(_snapshot(bits))
    g.generation, g.inference = fold_cache.generation, torch.is_inference_mode_enabled()
    g.held = fold_cache._held.bns
    g.native = g.lines = None
    if _native is not None:
        try:
            g.native = _native_form(g, pairs, small)
            if g.native is not None:
                g.lines = _native.guard_lines(g.native[0], g.native[1][0])
        except Exception:   # (a value the C++ form cannot take: the Python proof)
            g.native = g.lines = None
    return g


def _native_form(g: Guard, pairs, small: list):
    """The guard's records and tensors as csrc/cpu/plan_guard.cpp reads them, or None when that form
    does not hold at once (a small tensor that is not a float32 contiguous plain tensor or parameter, a
    table read otherwise than from the instance dict): the Python proof then runs."""
    if any(type(t) not in _SMALL_TYPES or not t.is_contiguous() for t in small) \
            or any(not all(k in r[2] for k in _NEEDED) or type(r[2]["_modules"]) is not dict for r in g.records):
        return None   # (an OrderedDict's _modules: its order is its own, not the one the C++ walks)
    records = [(m, cls, d, bytes(_KIND.get(k, 0) for k in d), tuple(kids)) for m, cls, d, (_, kids), _, _ in g.records]
    masks = [0] * len(g.pairs)
    for i, pattern in g.nones:
        masks[i - 1] = sum(1 << f for f, none in enumerate(pattern) if none)
    snapshot = b"".join(bytes(b.untyped_storage()) if isinstance(b, Tensor) else b.tobytes() for b in g.bits)
    weights = [pair_tensors(conv, bn)[0] for conv, bn in pairs]
    tensors = (list(map(tuple, pairs)), tuple(map(_native.weight_key, weights)), _SMALL_TYPES, bytes(masks),
               tuple(g.numels), snapshot)
    if not (_native.records_hold(records) and _native.tensors_hold(*tensors)):
        return None
    return records, tensors
