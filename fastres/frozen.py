"""fastres.frozen(model): inference with BatchNorm folded into the convolutions, computed once.

By default a fastres model in eval mode runs torchvision's own ops on the live parameters and buffers
on every call, so no edit of any kind can make it stale. Serving and evaluation loops that do not
touch the weights can ask for more: inside ``with fastres.frozen(model):`` each (conv, BatchNorm) pair
of `model` that runs on the torch backend in eval mode folds BatchNorm into the convolution once and
keeps the result (on a CPU, in fp32, with channels_last input, the folded weight is also prepacked for
oneDNN with the residual add and ReLU as post-ops, for each of the last 4 input shapes; a fastres
ResNet's NCHW input is converted to channels_last once at the model's input for that, where nobody can
see the layout: fastres.models.input_layout).
Where that check passes, a fastres model also vouches for the whole call: its layers skip the per-layer
checks the model made once for all of them (each fold is still validated on every call by the rules
below) and its nn.Linear head runs oneDNN's matmul on the live weight. Once calls with one input shape
have spent a quarter of a second there, the model's body (stem, pooling, blocks) is traced once into a
plan that oneDNN Graph compiles (fastres/models/plan.py: each primitive made once, ~0.2-0.7 s to build on
ResNet-50); a call runs the plan only while its structure and every fold are the ones it was built from
(checked on every call: most calls by a guard that proves nothing the last full check read has changed
since, fastres/models/plan_guard.py).
``fastres.frozen(model, plan=False)`` keeps the per-layer path.

The contract: inside the context a fold is remade on its next use after
- any change of value of a conv bias, a BatchNorm weight, bias or running statistic, however it was
  made (a training-mode forward, recalibration, ``.data`` edits, load_state_dict): these are C numbers
  per layer and are compared on every call;
- any ``step()`` of a torch.optim optimizer (fused, foreach or for-loop), anywhere;
- any change of tensor object, storage, dtype, device or shape behind a conv weight (``.to()``,
  ``.half()``, ``p.data = t``, ``load_state_dict(assign=True)``, ``torch.func.functional_call`` with
  other tensors), and any in-place write through the conv weight itself (``copy_``, ``mul_`` under
  ``torch.no_grad()``, ``load_state_dict``: they move its version counter);
- :meth:`frozen.refresh`.
What no cache can see, and what therefore needs ``refresh()`` inside the context: an in-place edit of a
conv weight through ``w.data`` (it has its own version counter), of a conv weight that is an inference
tensor (those have none), or by code that writes memory without moving the version counter: torch.optim's
functional forms with ``fused=True`` (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam`` ... called
directly, and the ``torch._fused_*`` ops: fused kernels leave the counter alone, and only an optimizer's
``step()`` tells the cache), writes through ``.numpy()`` or DLPack views or through a tensor the weight
was set to share memory with (``p.data = v[...]``, as torch.nn.utils.vector_to_parameters does, then
an edit of ``v``), shared memory written by another process. The context covers the thread that entered
it, as torch.no_grad does: another thread calling the model outside a context of its own runs the
default path on the live tensors. On exit every fold of `model` is dropped; nothing outlives the
context (the plans of `model` and of every model in it included). A NaN or an infinity in the input,
the weights or the statistics comes out as torchvision gives it: such an input runs each layer's ReLU as
aten's (oneDNN's fused ReLU turns a NaN into 0), such a fold is not used (that layer runs the default
path). What no check sees is a NaN that first arises inside the network from finite numbers (an fp32
overflow of the activations): a fused ReLU then makes it 0, as torch.compile's freezing does. Calls
that need gradients of the weights (autograd on, parameters requiring grad), torch.compile, export and
tracing take the default path inside the context too. Under forward-mode AD
the fold runs through aten's convolution, not the prepacked oneDNN one (which has no tangent formula).
"""
from __future__ import annotations

import threading

import torch.nn as nn

from fastres.backends import torch as aten_backend
from fastres.models import plan as _plan
from fastres.nn import is_frozen_bn

__all__ = ["frozen"]


class frozen:
    """Context manager: ``with fastres.frozen(model) as f: ...``; ``f.refresh()`` after an edit the
    cache cannot see (see the module docstring for the whole contract). Re-entrant and nestable; it covers
    the thread that entered it (one object may be entered by several threads, each for itself)."""

    def __init__(self, model: nn.Module, plan: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastres.frozen: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(plan, bool):
            raise TypeError(f"fastres.frozen: plan must be True or False, got {plan!r}")
        self.model = model
        self.plan = plan
        self._local = threading.local()   # per thread: depth and the BatchNorm modules it froze

    def _state(self) -> list:
        st = getattr(self._local, "st", None)
        if st is None:
            st = self._local.st = [0, []]
        return st

    def __enter__(self) -> "frozen":
        st = self._state()
        if st[0] == 0:
            st[1] = [m for m in self.model.modules()
                     if isinstance(m, nn.modules.batchnorm._NormBase) or is_frozen_bn(m)]
            aten_backend.freeze(st[1])
        st[0] += 1
        if not self.plan:
            _plan.disable(self.model)
        return self

    def __exit__(self, *exc) -> None:
        st = self._state()
        st[0] -= 1
        if not self.plan:
            _plan.enable(self.model)
        if st[0] == 0:
            aten_backend.thaw(st[1])
            _plan.drop(self.model)
            _plan.drop_using(st[1])   # (plans of other models made from these folds: a swapped-out model)
            st[1] = []

    def refresh(self) -> None:
        """Remake every fold on its next use (after an edit through ``.data`` and the like)."""
        aten_backend.refresh()

    def __repr__(self) -> str:
        st = self._state()
        state = "active in this thread" if st[0] else "inactive in this thread"
        return f"fastres.frozen({type(self.model).__name__}, {state}, {len(st[1])} BatchNorm modules)"
