"""The stem's max pooling on a CPU, for the NCHW tensors users feed.

aten has two CPU kernels for max_pool2d: the NCHW one walks each (n, c) plane one output at a time; the
channels_last one vectorises across channels. On ResNet's stem (3x3, stride 2, after 64 channels at half
the input's resolution) the NCHW kernel measured 3.1-3.7 ms at batch 1, 224 px, against 0.16 ms for the
channels_last one (2 CPU cores, fp32; 2.0 ms against 0.10 ms at batch 8, 32 px): about 6% of a whole
torchvision ResNet-50 forward. Two layout copies (the stem's output to channels_last, the pooled result
back to NCHW) cost a fraction of the difference, so :func:`max_pool` pools an NCHW input in channels_last
and returns an NCHW tensor with the strides torchvision's would have.

The same values, bit for bit: a max of the same elements (NaN propagates in both kernels, ties take the
first element of the window in both: checked with ties, NaN and -inf, every dtype the fast path takes,
at AVX-512, AVX2 and no-vector capabilities, in tests/models/test_pool.py).

Taken only where nobody could tell: an exact nn.MaxPool2d without hooks or a replaced forward (on the
instance or the class), not returning indices, on an NCHW-contiguous CPU tensor (exactly torch.Tensor)
that no gradient will flow back into (the backward would come back channels_last, and BatchNorm's
backward rounds differently in that layout), no forward-mode AD, no functorch transform, no torch
function or dispatch mode, not traced, compiled or exported (each sees torchvision's single max_pool2d).
Anything else calls the module.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwd_ad
import torch.nn as nn
import torch.nn.functional as F

from fastres.nn import hooked, is_fx_tracing
from fastres.nn_methods import own_method
from fastres.ops.common import functorch_active

Tensor = torch.Tensor

__all__ = ["max_pool"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CL = torch.channels_last
_FORWARD = own_method(nn.MaxPool2d, "forward")   # (a forward patched on the class is the user's code: it runs)


def _channels_last_pays(pool: nn.Module, x: Tensor) -> bool:
    # (tracers first: torch.compile cannot trace the mode queries; then the context: vmap rejects layout
    # queries on its tensors)
    return (not torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not torch.jit.is_tracing()
            and not is_fx_tracing() and type(pool) is nn.MaxPool2d and nn.MaxPool2d.forward is _FORWARD is not None
            and type(x) is Tensor and not functorch_active() and _fwd_ad._current_level < 0
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0
            and "forward" not in pool.__dict__ and not hooked(pool)
            and not pool.return_indices and x.device.type == "cpu" and x.dim() == 4 and x.dtype in _DTYPES
            and not (torch.is_grad_enabled() and x.requires_grad)
            and x.is_contiguous() and not x.is_contiguous(memory_format=_CL))


def max_pool(pool: nn.Module, x: Tensor) -> Tensor:
    """``pool(x)``, through aten's channels_last kernel when `x` is an NCHW CPU tensor and the conditions
    of the module docstring hold; the result NCHW with freshly computed contiguous strides (as the NCHW
    kernel allocates it). A call the kernel rejects is made again as ``pool(x)``, which raises
    torchvision's error."""
    if not _channels_last_pays(pool, x):
        return pool(x)
    try:
        y = F.max_pool2d(x.contiguous(memory_format=_CL), pool.kernel_size, pool.stride, pool.padding,
                         pool.dilation, ceil_mode=pool.ceil_mode)
    except RuntimeError:
        return pool(x)
    return y.clone(memory_format=torch.contiguous_format)
