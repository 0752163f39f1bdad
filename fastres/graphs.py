"""A whole training step (forward, loss, backward, optimizer step) captured in one CUDA graph.

At ResNet batch sizes a GPU step is launch-bound even with a thin host path: a replayed graph launches
the whole step at once. :class:`GraphedStep` does what torch.cuda.graph needs, on any backend:

    step = fastres.GraphedStep(model, optimizer, loss_fn, example_x, example_y)
    for x, y in loader:
        loss = step(x, y)          # copies x, y into the captured inputs, replays, returns the loss

* Warm-up before capture, on a side stream: fastres.kernels.warmup tunes every Triton conv (autotuning
  cannot run inside capture), then `warmup_steps` steps on the example batch allocate the optimizer's
  state and every workspace. The warm-up does not count: parameters and buffers (BatchNorm running
  statistics, num_batches_tracked) are put back in place before capture, and the optimizer's state is
  zeroed in place, which for the optimizers supported (SGD with dampening 0, Adam, AdamW) steps
  exactly as a fresh state does.
* Nothing is cached across calls by fastres (issue "never stale"): a replay re-reads every parameter
  and buffer where the optimizer updated it. What a replay cannot see is what was baked in at capture;
  each call checks it and raises instead of replaying a stale step: the set of parameters (a swapped
  submodule), train/eval mode, the optimizer's hyperparameters held as Python numbers, and the inputs'
  shapes and dtypes. An lr scheduler changing a float lr: capture a new GraphedStep after the change
  (``python -m fastres.train --cuda-graphs`` does, fastres/train/graphed.py), or, with Adam / AdamW, give
  a tensor lr (``lr=torch.tensor(1e-3, device="cuda")``, ``capturable=True``). SGD reads a tensor lr on
  the host (``alpha=-lr``), a sync that capture forbids.
* Alternatives: ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs of the forward and
  backward, the optimizer outside) and ``torch.cuda.make_graphed_callables`` (per module).
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn as nn

Tensor = torch.Tensor

__all__ = ["GraphedStep", "AutocastForward"]


def _hyper(optimizer: torch.optim.Optimizer) -> List[Tuple]:
    """The optimizer's hyperparameters that a capture bakes in: every non-tensor value of its groups."""
    return [tuple((k, v) for k, v in sorted(g.items()) if k != "params" and not isinstance(v, Tensor))
            for g in optimizer.param_groups]


def _fresh_is_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this optimizer's state, zeroed, steps exactly as its fresh (empty) state does: Adam and
    AdamW (moments and step count start at 0), SGD with dampening 0 (a zero momentum buffer gives
    buf = grad, as the first step's copy of the gradient does)."""
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return True
    return type(optimizer) is torch.optim.SGD and all(g.get("dampening", 0) == 0 for g in optimizer.param_groups)


class AutocastForward(nn.Module):
    """`model`'s forward under autocast to `dtype` with autocast's weight cache off, as a capture needs it
    (a cached cast would be captured once and never re-read the updated weights). Wrap the model in it to
    capture an autocast training step: ``GraphedStep(AutocastForward(model, torch.bfloat16), ...)``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=self.dtype, cache_enabled=False):
            return self.model(x)


class GraphedStep:
    """forward + loss + backward + optimizer.step of `model`, captured once on CUDA, replayed per call.

    model, optimizer: on CUDA, as the eager step uses them. loss_fn(output, target) -> scalar tensor.
    example_x, example_y: CUDA tensors shaped and typed as every later batch (a graph has fixed shapes).
    Calling it with (x, y) returns the step's loss (a tensor the next call overwrites: clone to keep it).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], example_x: Tensor, example_y: Tensor,
                 warmup_steps: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("fastres.GraphedStep: CUDA graphs need a CUDA GPU (torch.cuda.is_available() is False)")
        for name, t in (("example_x", example_x), ("example_y", example_y)):
            if not isinstance(t, Tensor) or t.device.type != "cuda":
                got = t.device if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"fastres.GraphedStep: expected {name} as a CUDA tensor, got {got}")
        params = list(model.parameters())
        if not params or any(p.device.type != "cuda" for p in params):
            raise ValueError("fastres.GraphedStep: expected a model whose parameters are all on CUDA")
        if not _fresh_is_zero(optimizer):
            raise ValueError(f"fastres.GraphedStep: supports torch.optim.SGD (dampening 0), Adam and AdamW, whose "
                             f"state it can reset after the warm-up; got {type(optimizer).__name__}")
        if warmup_steps < 1:
            raise ValueError(f"fastres.GraphedStep: warmup_steps must be >= 1, got {warmup_steps}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.static_x, self.static_y = example_x.clone(), example_y.clone()
        self._params = tuple(id(p) for p in params)
        self._training = model.training
        self._warm_up(warmup_steps)
        self._hyper = _hyper(optimizer)
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)   # grads are then allocated inside the graph's pool
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step()

    def _step(self) -> Tensor:
        loss = self.loss_fn(self.model(self.static_x), self.static_y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _warm_up(self, steps: int) -> None:
        from fastres.kernels.warmup import warmup

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warmup(self.model, self.static_x)   # Triton autotuning (restores the model itself)
            model_state = [t.detach().clone() for t in list(self.model.parameters()) + list(self.model.buffers())]
            for _ in range(steps):             # (the first step creates the optimizer's state)
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
            with torch.no_grad():               # the warm-up does not count: every value put back
                for t, s in zip(list(self.model.parameters()) + list(self.model.buffers()), model_state):
                    t.copy_(s)
                for state in self.optimizer.state.values():   # a fresh state, in place (see _FRESH_ZERO)
                    for v in state.values():
                        if isinstance(v, Tensor):
                            v.zero_()
        torch.cuda.current_stream().wait_stream(side)

    def check(self, x: Tensor, y: Tensor) -> None:
        """Raise when replaying would not run the step the caller means (see the module docstring)."""
        for name, t, s in (("x", x, self.static_x), ("y", y, self.static_y)):
            if not isinstance(t, Tensor) or t.shape != s.shape or t.dtype != s.dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"fastres.GraphedStep: expected {name} of shape {tuple(s.shape)} and dtype "
                                 f"{s.dtype} (the captured batch), got {got}")
        if self.model.training != self._training:
            raise RuntimeError("fastres.GraphedStep: the model's train/eval mode changed since capture; "
                               "capture a new GraphedStep")
        if tuple(id(p) for p in self.model.parameters()) != self._params:
            raise RuntimeError("fastres.GraphedStep: the model's parameters changed since capture (a swapped "
                               "submodule or parameter); capture a new GraphedStep")
        if _hyper(self.optimizer) != self._hyper:
            raise RuntimeError("fastres.GraphedStep: the optimizer's hyperparameters changed since capture "
                               "(a float lr changed by a scheduler is baked into the graph): capture a new "
                               "GraphedStep (or give Adam / AdamW a tensor lr with capturable=True)")

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        self.check(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.static_loss
