"""``python -m fastres.train --cuda-graphs``: the training step replayed from one CUDA graph.

:class:`GraphedTrainStep` drives :class:`fastres.GraphedStep` (forward, loss, backward and SGD step
captured once, replayed per batch) so that a run with the flag trains what the run without it trains:

* Fixed shapes: a graph is captured for the run's full batch; a batch of another shape (an epoch's last,
  partial batch) is not given to it: the trainer runs that one eagerly, on the same model and optimizer,
  so every epoch sees the same images as without the flag (nothing is dropped).
* The learning rate: a capture bakes a float lr in, and torch.optim.SGD turns a tensor lr into a Python
  number in its update (``alpha=-lr``, a device sync that capture forbids). So the lr stays a float and
  the step is captured again whenever the schedule changes it: the paper's schedule has at most four
  values (the warm-up's lr/10, lr, lr/10, lr/100), so a run captures at most four times, plus once
  after each --resume.
* A capture does not count: GraphedStep's warm-up steps put parameters and buffers back and zero the
  optimizer's state in place (a fresh state); this class puts the momentum buffers back as they were, so
  a capture in mid-run or after --resume continues with the momentum the run had, and it forks the RNG
  around the capture, so the data order and augmentation do not depend on the flag.
* Autocast: bf16 runs inside the graph, with autocast's weight cache off (the casts are captured and
  re-read the weights at every replay). fp16 (GradScaler checks for infs on the host every step),
  --compile and several processes are refused by the command line.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.graphs import AutocastForward, GraphedStep

Tensor = torch.Tensor

__all__ = ["GraphedTrainStep"]


class GraphedTrainStep:
    """One training step of `model` with `optimizer` (cross-entropy loss) replayed from a CUDA graph.

    Calling it with a full batch (x, y) returns (output, loss) of that step: tensors of the graph that
    the next call overwrites. The first call captures; a call at another lr captures again.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp_dtype: Optional[torch.dtype]):
        self.model, self.optimizer = model, optimizer
        self.forward = AutocastForward(model, amp_dtype) if amp_dtype is not None else model
        self.step: Optional[GraphedStep] = None
        self.out: Optional[Tensor] = None
        self.lrs: List[float] = []   # the lr of every capture so far
        self._captured_lr: Tuple[float, ...] = ()

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        self.out = out.detach()  # at capture: the graph's output, which every replay rewrites
        return F.cross_entropy(out.float(), y)

    def _lr(self) -> Tuple[float, ...]:
        return tuple(g["lr"] for g in self.optimizer.param_groups)

    def __call__(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        if self.step is None or self._lr() != self._captured_lr:
            self.capture(x, y)
        self.forward.training = self.model.training  # GraphedStep checks the mode it captured
        loss = self.step(x, y)
        return self.out, loss

    def capture(self, x: Tensor, y: Tensor) -> None:
        """Capture the step for batches shaped as (x, y) at the optimizer's current lr."""
        self.step = self.out = None  # the previous graph and its memory go first
        state = [(v, v.clone()) for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        self.forward.training = self.model.training
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            self.step = GraphedStep(self.forward, self.optimizer, self._loss, x, y)
        with torch.no_grad():
            for v, saved in state:  # GraphedStep zeroed the state after its warm-up: the run's, back in place
                v.copy_(saved)
        self._captured_lr = self._lr()
        self.lrs.append(self._captured_lr[0])
