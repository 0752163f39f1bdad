"""warmup(model, example_input): tune every Triton conv a model launches, before CUDA-graph capture.

The GPU conv is autotuned on its first launch per key (bucketed batch rows, channels, filter,
stride, padding, epilogue): the tuner times several configs, which cannot happen while a CUDA graph
is being captured. One forward (+ backward when the model is in training mode and has parameters
that require grad) of an example batch launches every conv key the model will use at that batch
size (and, with the rows bucketed to a power of two, at nearby ones); afterwards each launch is a
cache hit and the model can be captured.

The warm-up leaves the model as it found it: parameters' .grad and every buffer (BatchNorm running
statistics, num_batches_tracked) are restored, so a warm-up does not count as a training step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["warmup"]


def _default_loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, (tuple, list)):
        return sum(_default_loss(o) for o in out)
    if isinstance(out, dict):
        return sum(_default_loss(o) for o in out.values())
    raise TypeError(f"warmup: cannot reduce a model output of type {type(out).__name__} to a loss; pass loss_fn")


def warmup(model: torch.nn.Module, example_input: Any, *, backward: Optional[bool] = None,
           loss_fn: Optional[Callable[[Any], torch.Tensor]] = None) -> None:
    """Run model(example_input) once (+ backward), so every conv autotune key is tuned.

    example_input: a tensor (or a tuple of positional arguments) of the batch shape to be captured;
    backward: default True when model.training and a parameter requires grad;
    loss_fn: maps the output to a scalar for backward (default: the sum of every output tensor).
    Model state (buffers, .grad) is restored afterwards. Synchronizes the device at the end.
    """
    params = [p for p in model.parameters()]
    if backward is None:
        backward = model.training and any(p.requires_grad for p in params)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.set_grad_enabled(bool(backward)):
            out = model(*args)
            if backward:
                (loss_fn or _default_loss)(out).backward()
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
            for p, g in zip(params, grads):
                if g is None:
                    p.grad = None
                else:
                    p.grad.copy_(g) if p.grad is not None else setattr(p, "grad", g)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
