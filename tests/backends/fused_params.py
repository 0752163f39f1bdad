"""The fused backends the tests under tests/backends/ run on, with the skip each one needs.

* triton: CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py on a
  machine without a GPU: tiny shapes, fp32 and fp16 only, the interpreter has no bf16), or a GPU, where
  it is marked ``gpu`` too, so that scripts/gpu_check.sh's ``-m gpu`` selection runs it compiled
  (FASTRES_COLLECT_AS_GPU=1 marks it so without a GPU: that script's --dry-run collects the GPU selection).
* cuda: fastres._C built and a GPU (marked ``gpu``: tests/conftest.py skips it, with the reason,
  without one).

DEVICE is where the tests put their tensors: the GPU when there is one, else the CPU. case_seed and
grad_leaf are the helpers the op comparisons (test_fused_backends.py, test_bn_act_backends.py) share.
"""
import os
import zlib

import pytest
import torch

from fastres import _ext
from fastres.kernels import interpreter_active

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EXT_BUILT, EXT_WHY = _ext.status()
_AS_GPU = HAS_CUDA or os.environ.get("FASTRES_COLLECT_AS_GPU") == "1"

_TRITON_SKIP = pytest.mark.skipif(
    not HAS_CUDA and not interpreter_active(),
    reason="triton needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)")
_EXT_SKIP = pytest.mark.skipif(not EXT_BUILT, reason=f"fastres._C is not built: {EXT_WHY}")

# Backends that run kernels here.
BACKENDS = [
    pytest.param("triton", marks=[_TRITON_SKIP, *([pytest.mark.gpu] if _AS_GPU else [])]),
    pytest.param("cuda", marks=[pytest.mark.gpu, _EXT_SKIP]),
]

# Backends whose Python module imports here (no kernel runs: supports() and friends).
MODULES = [pytest.param("triton"), pytest.param("cuda", marks=_EXT_SKIP)]


def skip_unless_dtype_runs(dtype: torch.dtype) -> None:
    """bf16 does not run under Triton's interpreter: a real skip there."""
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bfloat16 needs a GPU (Triton's interpreter has no bf16)")


def case_seed(*key) -> int:
    """A seed of its own per test case, the same in every run (failures reproduce)."""
    return zlib.crc32(repr(key).encode())


def grad_leaf(t, dtype: torch.dtype, fmt=None):
    """t in `dtype`, requiring grad: laid out in memory format `fmt` when one is given, else cloned;
    None stays None."""
    if t is None:
        return None
    t = t.to(dtype)
    return (t.contiguous(memory_format=fmt) if fmt is not None else t.clone()).requires_grad_()
