"""What every fused op shares, whatever it fuses: the BatchNorm arguments as one record (BNSpec), when
a fused backend may run its kernels directly, why a call must run as aten ops instead, autocast of the
data operands, and the differentiable backward (a backward run with create_graph=True)."""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

Tensor = torch.Tensor

__all__ = ["BNSpec", "eager", "plain_eager", "aten_reason", "autocast_operands", "differentiable_backward",
           "functorch_active"]


class BNSpec(NamedTuple):
    """The BatchNorm's arguments as one typed record: what travels from a module (fastres.nn) or a
    public functional to the boundary where it is flattened, the torch.library custom op, the
    autograd.Function (autograd sees only its top-level tensors) or a backend function, whose
    signatures keep the flat order (weight, bias, running_mean, running_var, ..., training, momentum,
    eps). Built once per call: fields are read (or the record unpacked), never copied into a new one.

    training: normalise with the batch statistics (and update running_mean/running_var in place when
    given) or with the running ones; momentum: the effective factor (1/num_batches_tracked for
    momentum=None). tests/ops/test_bnspec.py holds the field order to the schemas and the contract."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    training: bool
    momentum: float
    eps: float


def eager() -> bool:
    """True when a fused backend may run its kernels directly, skipping the custom op's dispatch: plain
    eager execution. Under torch.compile / torch.export tracing, or with a TorchDispatchMode active
    (FlopCounterMode, fake tensors, a profiler's mode), the custom op must be what is seen."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def plain_eager() -> bool:
    """eager(), and none of the states that make aten_reason() hand a call to aten ops (a torch.func
    transform, torch.export, torch.jit.trace): a fused call may then take its remembered plan. The
    per-call part of that decision (what the metadata does not hold), so it is read on every call."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None and not torch.compiler.is_exporting()
            and not torch._C._is_tracing())


def functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def aten_reason(x: Tensor) -> Optional[str]:
    """Why a call on a fused backend must run as aten ops instead (torch backend), or None:
    tensors on the meta device (shape inference), torch.func transforms (vmap, grad, jvp: the fused
    kernels have no batching or forward-mode rule), torch.export / ONNX export and torch.jit.trace
    (a deployable graph of standard ops)."""
    if x.device.type == "meta":
        return "meta tensors"
    if functorch_active() and not torch.compiler.is_compiling():   # (dynamo's own tracing is not one)
        return "a torch.func transform is active"
    if torch.compiler.is_exporting():
        return "torch.export"
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    return None


def autocast_operands(device_type: str, operands: Sequence[Optional[Tensor]]):
    """Under autocast, the data operands (input, conv weight and bias, residual) in the autocast dtype;
    BatchNorm parameters and statistics are not passed here: they stay in their own dtype (fp32)."""
    if not torch.is_autocast_enabled(device_type):
        return tuple(operands)
    dt = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dt) for t in operands)


def differentiable_backward(aten_forward: Callable[[Optional[Tensor], Optional[Tensor]], Tensor],
                            running: Optional[Sequence[Tensor]], leaves: Sequence[Optional[Tensor]],
                            needs: Sequence[bool], grad_y: Tensor) -> List[Optional[Tensor]]:
    """A fused op's backward as a differentiable function of grad_y and of its inputs (double backward,
    gradient penalties, hvp): the forward recomputed from the saved inputs as aten ops,
    aten_forward(running_mean, running_var), and differentiated with create_graph=True.

    running: the (running_mean, running_var) an eval-mode forward normalised with (read, not mutated),
    or None in training (batch statistics; the running ones are not passed, so not updated again).
    leaves: the op's differentiable inputs, in the order of needs; returns a gradient per need (None
    where not needed)."""
    rm, rv = running if running is not None else (None, None)
    wanted = [t for t, need in zip(leaves, needs) if need]
    with torch.enable_grad():
        y = aten_forward(rm, rv)
        got = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    return [next(got) if need else None for need in needs]
