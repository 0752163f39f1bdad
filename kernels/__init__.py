"""fastres.kernels: the Triton kernels of fastres and their host launchers (installed from kernels/).

This package stands alone: it imports nothing of fastres outside fastres.kernels, so the kernels can
be read, compiled and tested on their own. Importing the package itself does not import triton;
its modules do.

* conv.py      - implicit-GEMM conv2d over NHWC with the statistics / folded-BN epilogues
* batchnorm.py - BatchNorm finalize, apply (+ residual, ReLU, bit mask) and backward
* alloc.py     - output allocation with the poison switch tests use
"""
import os

__all__ = ["interpreter_active"]


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
